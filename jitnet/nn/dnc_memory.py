"""The memory of a Differentiable Neural Computer (Graves et al., 2016): its equations, its fused step, a Module.

Memory M is (N, W); R read heads and one write head address it through an interface vector that a controller
emits each step, of size R*W + 3W + 5R + 3, laid out as

    read keys (R*W) | read strengths (R) | write key (W) | write strength (1) | erase vector (W) |
    write vector (W) | free gates (R) | allocation gate (1) | write gate (1) | read modes (3R)

Strengths go through ``oneplus(x) = 1 + softplus(x)``, gates and the erase vector through a sigmoid, the
three read modes of each head (backward, content, forward) through a softmax. One memory step:

1. usage      u = (u + w^w_prev - u * w^w_prev) * prod_i (1 - f_i w^r_prev,i)
2. allocation sort u ascending (phi), a[phi_j] = (1 - u[phi_j]) * prod_{k<j} u[phi_k] (an exclusive cumprod)
3. write      w^w = g^w (g^a a + (1 - g^a) C(M, k^w, b^w)), with C the softmax of b * cosine(key, rows)
4. memory     M = M * (1 - w^w e^T) + w^w v^T
5. link       L_ij = (1 - w^w_i - w^w_j) L_ij + w^w_i p_j, L_ii = 0;   precedence p = (1 - sum w^w) p + w^w
6. read       f_i = L w^r_prev,i, b_i = L^T w^r_prev,i, w^r_i = pi_i,0 b_i + pi_i,1 C(M, k^r_i, b^r_i) + pi_i,2 f_i
7.            read vectors r_i = M^T w^r_i

:func:`content_weights`, :func:`allocation_weights`, :func:`update_link`, ... write the equations with jitnet
ops, one for each, and :func:`memory_step` chains them. :func:`dnc_memory_step` runs the same step as one
primitive over the whole memory state packed in one (B, S) row per example (:func:`pack_state`): a kernel for
the forward step and one for its gradient, on the CPU (:mod:`jitnet.kernels_dnc`, Numba) and on CUDA
(:mod:`jitnet.kernels_dnc_gpu`). :class:`DNCMemory` is the step as a Module, either way.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import kernels_dnc as KD
from .. import lowp as _lowp
from .. import ops
from ..autodiff.core import Primitive, apply
from ..lazy import LazyModule
from ..tensor import Tensor, float32, tensor
from .module import Module

_G = LazyModule("jitnet.backend_cuda")
_KDG = LazyModule("jitnet.kernels_dnc_gpu")

__all__ = ["EPS", "oneplus", "interface_size", "Interface", "split_interface", "cosine_similarity",
           "content_weights", "allocation_weights", "update_usage", "write_weights", "update_memory",
           "update_link", "update_precedence", "directional_weights", "read_weights", "MemoryState",
           "initial_memory_state", "memory_step", "packed_size", "pack_state", "unpack_state", "dnc_memory_step",
           "dnc_memory_forward", "dnc_memory_backward", "DNCMemory"]

dnc_memory_forward = KD.dnc_memory_forward
dnc_memory_backward = KD.dnc_memory_backward

EPS = 1e-6
"""Added under the square root of vector norms and to the cosine's denominator (zero memory rows stay finite)."""


# ==============================================================================================================
# The equations, one function each (jitnet ops: they run eagerly, trace under jit and differentiate)
# ==============================================================================================================

def oneplus(x):
    """Return 1 + softplus(x) (in [1, inf): the key strengths)."""
    return 1.0 + ops.softplus(x)


def interface_size(num_reads, word_size):
    """Return the length R*W + 3W + 5R + 3 of the interface vector."""
    return num_reads * word_size + 3 * word_size + 5 * num_reads + 3


class Interface(NamedTuple):
    """The controller's interface vector split into its parts (after their nonlinearities)."""

    read_keys: object        # (B, R, W)
    read_strengths: object   # (B, R), >= 1
    write_key: object        # (B, 1, W)
    write_strength: object   # (B, 1), >= 1
    erase: object            # (B, W), in (0, 1)
    write_vector: object     # (B, W)
    free_gates: object       # (B, R), in (0, 1)
    allocation_gate: object  # (B, 1), in (0, 1)
    write_gate: object       # (B, 1), in (0, 1)
    read_modes: object       # (B, R, 3): softmax over (backward, content, forward)


def split_interface(xi, num_reads, word_size):
    """Return the :class:`Interface` of a raw interface vector ``xi`` (B, R*W + 3W + 5R + 3)."""
    R, W = int(num_reads), int(word_size)
    n = interface_size(R, W)
    if xi.ndim != 2 or xi.shape[1] != n:
        raise ValueError(f"split_interface: expected an interface of shape (batch, {n}) for {R} read heads of "
                         f"word size {W}, got {tuple(xi.shape)}")
    B = xi.shape[0]
    o = [0]

    def take(k):
        s = xi[:, o[0]:o[0] + k]
        o[0] += k
        return s
    read_keys = ops.reshape(take(R * W), (B, R, W))
    read_strengths = oneplus(take(R))
    write_key = ops.reshape(take(W), (B, 1, W))
    write_strength = oneplus(take(1))
    erase = ops.sigmoid(take(W))
    write_vector = take(W)
    free_gates = ops.sigmoid(take(R))
    allocation_gate = ops.sigmoid(take(1))
    write_gate = ops.sigmoid(take(1))
    read_modes = ops.softmax(ops.reshape(take(3 * R), (B, R, 3)), axis=-1)
    return Interface(read_keys, read_strengths, write_key, write_strength, erase, write_vector, free_gates,
                     allocation_gate, write_gate, read_modes)


def cosine_similarity(memory, keys, eps=EPS):
    """Return (B, K, N): the cosine of each key (B, K, W) with each memory row (B, N, W).

    Norms are sqrt(sum x^2 + eps) and the quotient's denominator gets + eps, so zero rows give 0, not NaN.
    """
    dot = ops.matmul(keys, ops.swapaxes(memory, -1, -2))
    mn = ops.sqrt(ops.sum(memory * memory, axis=-1) + eps)
    kn = ops.sqrt(ops.sum(keys * keys, axis=-1) + eps)
    return dot / (ops.expand_dims(kn, -1) * ops.expand_dims(mn, -2) + eps)


def content_weights(memory, keys, strengths, eps=EPS):
    """Return C(M, k, beta) (B, K, N): the softmax over rows of beta * cosine(k, M[n]) for each key."""
    return ops.softmax(cosine_similarity(memory, keys, eps) * ops.expand_dims(strengths, -1), axis=-1)


def allocation_weights(usage):
    """Return the allocation weighting (B, N) of a usage vector (B, N) (free rows first, least used first).

    With phi the ascending sort of u: a[phi_j] = (1 - u[phi_j]) * prod_{k<j} u[phi_k]. Ties keep row order.
    """
    phi = ops.argsort(usage, axis=-1)
    su = ops.take_along_axis(usage, phi, -1)
    sorted_alloc = (1.0 - su) * ops.cumprod(su, axis=-1, exclusive=True)
    return ops.take_along_axis(sorted_alloc, ops.argsort(phi, axis=-1), -1)


def update_usage(usage, write_weights_prev, read_weights_prev, free_gates):
    """Return u = (u + w^w - u * w^w) * psi with the retention psi = prod_i (1 - f_i w^r_i) (B, N)."""
    psi = ops.prod(1.0 - ops.expand_dims(free_gates, -1) * read_weights_prev, axis=1)
    return (usage + write_weights_prev - usage * write_weights_prev) * psi


def write_weights(memory, usage, iface):
    """Return the write weighting w^w = g^w (g^a a + (1 - g^a) c^w) (B, N)."""
    cw = ops.squeeze(content_weights(memory, iface.write_key, iface.write_strength), 1)
    a = allocation_weights(usage)
    ga, gw = iface.allocation_gate, iface.write_gate
    return gw * (ga * a + (1.0 - ga) * cw)


def update_memory(memory, ww, erase, write_vector):
    """Return M * (1 - w e^T) + w v^T (B, N, W)."""
    w = ops.expand_dims(ww, -1)
    return memory * (1.0 - w * ops.expand_dims(erase, 1)) + w * ops.expand_dims(write_vector, 1)


def update_link(link, ww, precedence):
    """Return L_ij = (1 - w_i - w_j) L_ij + w_i p_j with a zero diagonal (B, N, N).

    The paper's equation: w_i p_j enters once (adding w_i a second time, as some published code does, is a
    known error that lets link rows sum past 1).
    """
    n = link.shape[-1]
    wi, wj = ops.expand_dims(ww, -1), ops.expand_dims(ww, -2)
    off_diag = 1.0 - ops.eye(n, dtype=link.dtype)
    if link.is_cuda:
        off_diag = off_diag.to(link.device)
    return ((1.0 - wi - wj) * link + wi * ops.expand_dims(precedence, -2)) * off_diag


def update_precedence(precedence, ww):
    """Return p = (1 - sum_i w_i) p + w (B, N)."""
    return (1.0 - ops.sum(ww, axis=-1, keepdims=True)) * precedence + ww


def directional_weights(link, read_weights_prev):
    """Return (forward, backward) weightings (B, R, N): f_i = L w^r_i and b_i = L^T w^r_i."""
    fwd = ops.matmul(read_weights_prev, ops.swapaxes(link, -1, -2))
    bwd = ops.matmul(read_weights_prev, link)
    return fwd, bwd


def read_weights(memory, link, read_weights_prev, iface):
    """Return w^r = pi_0 b + pi_1 c^r + pi_2 f (B, R, N) from the new memory and link."""
    cr = content_weights(memory, iface.read_keys, iface.read_strengths)
    fwd, bwd = directional_weights(link, read_weights_prev)
    pi = iface.read_modes
    return pi[:, :, 0:1] * bwd + pi[:, :, 1:2] * cr + pi[:, :, 2:3] * fwd


class MemoryState(NamedTuple):
    """The memory part of the DNC's recurrent state."""

    memory: object           # (B, N, W)
    usage: object            # (B, N)
    link: object             # (B, N, N)
    precedence: object       # (B, N)
    read_weights: object     # (B, R, N)
    write_weights: object    # (B, N)
    read_vectors: object     # (B, R, W)


def initial_memory_state(batch, memory_size, word_size, num_reads, dtype=float32, device=None):
    """Return the all-zero :class:`MemoryState` of a batch (empty memory, unused, no links, no reads)."""
    B, N, W, R = int(batch), int(memory_size), int(word_size), int(num_reads)
    z = lambda *s: ops.zeros(s, dtype, device=device)  # noqa: E731
    return MemoryState(z(B, N, W), z(B, N), z(B, N, N), z(B, N), z(B, R, N), z(B, N), z(B, R, W))


def memory_step(state, xi, num_reads=None, word_size=None):
    """Return the next :class:`MemoryState` after one write and R reads driven by the raw interface ``xi``."""
    R = state.read_weights.shape[1] if num_reads is None else num_reads
    W = state.memory.shape[2] if word_size is None else word_size
    iface = split_interface(xi, R, W)
    usage = update_usage(state.usage, state.write_weights, state.read_weights, iface.free_gates)
    ww = write_weights(state.memory, usage, iface)
    memory = update_memory(state.memory, ww, iface.erase, iface.write_vector)
    link = update_link(state.link, ww, state.precedence)
    precedence = update_precedence(state.precedence, ww)
    wr = read_weights(memory, link, state.read_weights, iface)
    reads = ops.matmul(wr, memory)
    return MemoryState(memory, usage, link, precedence, wr, ww, reads)

# ==============================================================================================================
# The fused memory step: one primitive over a packed state (B, S)
# ==============================================================================================================
# Packed layout of one example's row: memory (N*W) | usage (N) | link (N*N) | precedence (N) |
# read weights (R*N) | write weights (N) | read vectors (R*W). The interface stays raw: the kernels apply its
# nonlinearities themselves.

def packed_size(memory_size, word_size, num_reads):
    """Return the length S of a packed memory state row."""
    N, W, R = memory_size, word_size, num_reads
    return N * W + N + N * N + N + R * N + N + R * W


def pack_state(state):
    """Return the packed (B, S) form of a :class:`MemoryState`."""
    B = state.memory.shape[0]
    return ops.concatenate([ops.reshape(t, (B, -1)) for t in state], axis=1)


def unpack_state(packed, memory_size, word_size, num_reads):
    """Return the :class:`MemoryState` of a packed (B, S) state (views of it)."""
    N, W, R = int(memory_size), int(word_size), int(num_reads)
    B, S = packed.shape[0], packed.shape[1]
    if S != packed_size(N, W, R):
        raise ValueError(f"unpack_state: a packed state of {N}x{W} memory with {R} read heads has "
                         f"{packed_size(N, W, R)} columns, got shape {tuple(packed.shape)}")
    oM, ou, oL, op, owr, oww, orv = KD.offsets(N, W, R)
    return MemoryState(ops.reshape(packed[:, oM:ou], (B, N, W)), packed[:, ou:oL],
                       ops.reshape(packed[:, oL:op], (B, N, N)), packed[:, op:owr],
                       ops.reshape(packed[:, owr:oww], (B, R, N)), packed[:, oww:orv],
                       ops.reshape(packed[:, orv:], (B, R, W)))


def _mem_fwd_impl(state, xi, N, W, R, eps):
    state, xi = np.ascontiguousarray(state), np.ascontiguousarray(xi)
    out = np.empty_like(state)
    KD.dnc_memory_forward(state, xi, N, W, R, eps, out)
    return out


def _mem_bwd_impl(state, xi, g, N, W, R, eps):
    state, xi, g = np.ascontiguousarray(state), np.ascontiguousarray(xi), np.ascontiguousarray(g)
    S = state.shape[1]
    out = np.empty((state.shape[0], S + xi.shape[1]), state.dtype)
    KD.dnc_memory_backward(state, xi, g, N, W, R, eps, out)
    return out


def _mem_vjp(g, ans, ins, needs, N, W, R, eps):
    state, xi = ins
    both = apply(_MEM_BWD, state, xi, g, N=N, W=W, R=R, eps=eps)     # [d state | d xi], one kernel
    S = state.shape[1]
    return (both[:, :S] if needs[0] else None), (both[:, S:] if needs[1] else None)


def _no_second_order(g, ans, ins, needs, **params):
    raise TypeError("dnc_memory_step: the fused memory step has first-order gradients only (its gradient is a "
                    "kernel, not jitnet ops); for higher-order gradients use DNC(..., fused=False) or memory_step")


def _mem_cuda(state, xi, g, N, W, R, eps, grad):
    """The CUDA form of both rows: one kernel (``kernels_dnc_gpu.dnc_memory``), one thread per batch row, the
    per-row scratch in one device array; nothing crosses to the host."""
    state, xi, g = _G.contiguous(state), _G.contiguous(xi), _G.contiguous(g)
    B, S = state.shape
    I = xi.shape[1]
    out = _G.empty((B, S + I) if grad else (B, S), state.dtype)
    scratch = _G.empty((B, _KDG.scratch_size(N, W, R, I, S)), state.dtype)
    phi = _G.empty((B, N), np.int64)
    _G.launch(_KDG.dnc_memory, B, state, xi, g, N, W, R, eps, out, grad, scratch, phi)
    return out


def _mem_fwd_cuda(state, xi, N, W, R, eps):
    return _mem_cuda(state, xi, state, N, W, R, eps, False)


def _mem_bwd_cuda(state, xi, g, N, W, R, eps):
    return _mem_cuda(state, xi, g, N, W, R, eps, True)

_MEM_BWD = Primitive("dnc_memory_step_grad", impl={"cpu": _mem_bwd_impl, "cuda": _mem_bwd_cuda},
                     vjp=_no_second_order)
_MEM_STEP = Primitive("dnc_memory_step", impl={"cpu": _mem_fwd_impl, "cuda": _mem_fwd_cuda}, vjp=_mem_vjp)


def dnc_memory_step(packed, xi, memory_size, word_size, num_reads, eps=EPS):
    """Return the next packed memory state (B, S) after one step under the raw interface ``xi`` (B, I).

    The same equations as :func:`memory_step` in one Numba kernel; its gradient is a second kernel that
    recomputes the step. See :func:`pack_state` / :func:`unpack_state` for the layout.
    """
    N, W, R = int(memory_size), int(word_size), int(num_reads)
    packed = packed if isinstance(packed, Tensor) else tensor(packed)
    xi = xi if isinstance(xi, Tensor) else tensor(xi)
    S, n_if = packed_size(N, W, R), interface_size(R, W)
    if packed.ndim != 2 or packed.shape[1] != S or xi.ndim != 2 or xi.shape != (packed.shape[0], n_if):
        raise ValueError(f"dnc_memory_step: for a {N}x{W} memory with {R} read heads expected a packed state "
                         f"(batch, {S}) and an interface (batch, {n_if}), got {tuple(packed.shape)} and "
                         f"{tuple(xi.shape)}")
    if not _lowp.is_floating(packed.dtype) or xi.dtype != packed.dtype:
        raise TypeError(f"dnc_memory_step: state and interface must share a float dtype, got {packed.dtype} and "
                        f"{xi.dtype}")
    return apply(_MEM_STEP, packed, xi, N=N, W=W, R=R, eps=float(eps))


# ==============================================================================================================
# The memory as a Module
# ==============================================================================================================

class DNCMemory(Module):
    """The DNC's memory of ``memory_size`` x ``word_size`` with ``num_reads`` read heads and one write head.

    ``forward(state, xi) -> state``: one step under the raw interface ``xi`` (B, :attr:`interface_size`).
    ``fused=True`` (default) carries the state packed (B, S) and runs :func:`dnc_memory_step` (one kernel
    forward and one backward, CPU or CUDA); ``fused=False`` carries a :class:`MemoryState` and runs
    :func:`memory_step` (jitnet ops: higher-order gradients too). The module has no parameters.
    """

    def __init__(self, memory_size=16, word_size=16, num_reads=1, fused=True, eps=EPS):
        super().__init__()
        self.memory_size, self.word_size, self.num_reads = int(memory_size), int(word_size), int(num_reads)
        if min(self.memory_size, self.word_size, self.num_reads) < 1:
            raise ValueError(f"DNCMemory: memory_size, word_size and num_reads must be >= 1, got "
                             f"{memory_size}, {word_size}, {num_reads}")
        self.fused, self.eps = bool(fused), float(eps)

    @property
    def interface_size(self):
        """The length of the raw interface vector a step reads."""
        return interface_size(self.num_reads, self.word_size)

    def initial_state(self, batch, dtype=float32, device=None):
        """Return the all-zero state of ``batch`` examples (packed when fused)."""
        mem = initial_memory_state(batch, self.memory_size, self.word_size, self.num_reads, dtype, device)
        return pack_state(mem) if self.fused else mem

    def unpack(self, state):
        """Return the :class:`MemoryState` of a state as this module carries it."""
        if not self.fused:
            return state
        return unpack_state(state, self.memory_size, self.word_size, self.num_reads)

    def reads(self, state):
        """Return the flat read vectors (B, R*W) of a carried state."""
        rw = self.num_reads * self.word_size
        if self.fused:
            return state[:, state.shape[1] - rw:]
        return ops.reshape(state.read_vectors, (state.read_vectors.shape[0], rw))

    def forward(self, state, xi):
        if self.fused:
            return dnc_memory_step(state, xi, self.memory_size, self.word_size, self.num_reads, self.eps)
        return memory_step(state, xi, self.num_reads, self.word_size)

    def extra_repr(self):
        return f"{self.memory_size}x{self.word_size}, reads {self.num_reads}, fused={self.fused}"
