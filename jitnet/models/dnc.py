"""The Differentiable Neural Computer (Graves et al., 2016): an LSTM controller with an external memory.

    python -m jitnet train dnc-copy [--min-len 1 --max-len 8 --bits 6 --repeat-copy] [--steps N] ...
    python -m jitnet train dnc-babi [--data-dir DIR] [--steps N] ...

Memory M is (N, W); R read heads and one write head address it through an interface vector that the
controller emits each step, of size R*W + 3W + 5R + 3, laid out as

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

The controller sees [x_t, r_{t-1}]; the output is y_t = W_y [h_t, r_t] + b_y.

The functions below (:func:`content_weights`, :func:`allocation_weights`, :func:`update_link`, ...) write the
equations with jitnet ops, one for each, and :func:`memory_step` chains them (``DNC(..., fused=False)``). The
default model runs the same step as one primitive: a Numba kernel for the forward step and one for its
gradient (``dnc_memory_step``), with the whole memory state packed in one (B, S) row per example. Tests check
the two against each other and the fused gradient by central differences.

A training step (forward over the sequence, loss, backward, gradient clipping, optimizer update) is one
``jitnet.jit`` function with the time loop as ``jn.scan``: it compiles once for a padded length.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from numba import njit

from jitnet import lowp as _lowp
from jitnet import ops
from jitnet.autodiff.core import Primitive, apply, no_cuda
from jitnet.compiler.loops import scan
from jitnet.data import babi as BB
from ._train import (ArgumentParser, NonFiniteGuard, Progress, add_nonfinite_args, restore_checkpoint,
                     save_checkpoint)

__all__ = ["EPS", "oneplus", "interface_size", "Interface", "split_interface", "cosine_similarity",
           "content_weights", "allocation_weights", "update_usage", "write_weights", "update_memory",
           "update_link", "update_precedence", "directional_weights", "read_weights", "MemoryState",
           "initial_memory_state", "memory_step", "packed_size", "pack_state", "unpack_state", "dnc_memory_step",
           "dnc_memory_forward", "dnc_memory_backward", "DNC", "copy_batch", "repeat_copy_batch", "bit_errors",
           "CopyModel", "BabiModel", "plot_memory", "copy_parser", "run_copy", "babi_parser", "run_babi",
           "train_dnc_copy", "train_dnc_babi", "TRAINERS"]

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


def initial_memory_state(batch, memory_size, word_size, num_reads, dtype=jn.float32, device=None):
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
# The model
# ==============================================================================================================

class DNC(nn.Module):
    """A DNC over batch-first sequences: an LSTM controller of ``hidden_size`` units and an (N, W) memory
    with ``num_reads`` read heads and one write head; ``forward(x (B, T, X)) -> logits (B, T, output_size)``.

    ``fused=True`` (default) runs each memory step as one primitive (a Numba kernel and its gradient kernel);
    ``fused=False`` runs :func:`memory_step`, the same equations written with jitnet ops (which is also what
    a model moved to a GPU runs: the fused kernel is CPU code).
    """

    def __init__(self, input_size, output_size, hidden_size=64, memory_size=16, word_size=16, num_reads=1,
                 fused=True, dtype=jn.float32):
        super().__init__()
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.hidden_size, self.memory_size = int(hidden_size), int(memory_size)
        self.word_size, self.num_reads = int(word_size), int(num_reads)
        if min(self.input_size, self.output_size, self.hidden_size, self.memory_size, self.word_size,
               self.num_reads) < 1:
            raise ValueError(f"DNC: every size must be >= 1, got input {input_size}, output {output_size}, "
                             f"hidden {hidden_size}, memory {memory_size}x{word_size}, reads {num_reads}")
        self.fused = bool(fused)
        rw = self.num_reads * self.word_size
        self.controller = nn.LSTMCell(self.input_size + rw, self.hidden_size, dtype=dtype)
        self.interface = nn.Linear(self.hidden_size, interface_size(self.num_reads, self.word_size), dtype=dtype)
        self.output = nn.Linear(self.hidden_size + rw, self.output_size, dtype=dtype)

    @property
    def dtype(self):
        """The parameters' dtype."""
        return self.controller.W_hh.dtype

    def initial_state(self, batch):
        """Return the zero state ((h, c) of the controller, memory state) of a batch of ``batch`` sequences."""
        dev = self.controller.W_hh.device if self.controller.W_hh.is_cuda else None
        ctrl = tuple(ops.zeros((batch, self.hidden_size), self.dtype, device=dev) for _ in range(2))
        mem = initial_memory_state(batch, self.memory_size, self.word_size, self.num_reads, self.dtype, dev)
        return ctrl, (pack_state(mem) if self.fused else mem)

    def unpack(self, mem):
        """Return the :class:`MemoryState` of a memory state as the model carries it (packed when fused)."""
        if not self.fused:
            return mem
        return unpack_state(mem, self.memory_size, self.word_size, self.num_reads)

    def _reads(self, mem):
        """Return the flat read vectors (B, R*W) of a carried memory state."""
        rw = self.num_reads * self.word_size
        if self.fused:
            return mem[:, mem.shape[1] - rw:]
        return ops.reshape(mem.read_vectors, (mem.read_vectors.shape[0], rw))

    def _mem_step(self, mem, xi):
        if self.fused and mem.is_cuda:         # the fused kernel is CPU code: the same step from jitnet ops
            st = unpack_state(mem, self.memory_size, self.word_size, self.num_reads)
            return pack_state(memory_step(st, xi, self.num_reads, self.word_size))
        if self.fused:
            return dnc_memory_step(mem, xi, self.memory_size, self.word_size, self.num_reads)
        return memory_step(mem, xi, self.num_reads, self.word_size)

    def forward(self, x, state=None, return_state=False, return_trace=False):
        """Return the logits (B, T, output_size) of the sequences ``x`` (B, T, input_size).

        ``state`` continues from a previous call's final state (``return_state=True`` returns it too, as
        ((h, c) of the controller, memory)). ``return_trace=True`` also returns {"usage" (T, B, N), "write_weights"
        (T, B, N), "read_weights" (T, B, R, N)}, the addressing over time (see :func:`plot_memory`).
        """
        x = x if isinstance(x, jn.Tensor) else jn.tensor(x)
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"DNC: expected input of shape (batch, time, {self.input_size}), got {x.shape}")
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        B, X, H = x.shape[0], self.input_size, self.hidden_size
        ctrl, mem = self.initial_state(B) if state is None else state
        c = self.controller
        xw = ops.matmul(ops.transpose(x, (1, 0, 2)), c.W_ih[:X])      # every step's input projection: one GEMM
        w_read = c.W_ih[X:]

        def body(carry, xw_t):
            h, cs, m = carry
            z = xw_t + ops.matmul(self._reads(m), w_read) + ops.matmul(h, c.W_hh) + c.b   # gates i, f, g, o
            cs = ops.sigmoid(z[:, H:2 * H]) * cs + ops.sigmoid(z[:, :H]) * ops.tanh(z[:, 2 * H:3 * H])
            h = ops.sigmoid(z[:, 3 * H:]) * ops.tanh(cs)
            m = self._mem_step(m, self.interface(h))
            ys = (h, self._reads(m))
            if return_trace:
                ms = self.unpack(m)
                ys = ys + (ms.usage, ms.write_weights, ms.read_weights)
            return (h, cs, m), ys

        (h, cs, mem), ys = scan(body, (ctrl[0], ctrl[1], mem), xw)
        ctrl = (h, cs)
        out = self.output(ops.concatenate([ys[0], ys[1]], axis=-1))
        out = ops.transpose(out, (1, 0, 2))
        res = (out,)
        if return_state:
            res += ((ctrl, mem),)
        if return_trace:
            res += ({"usage": ys[2], "write_weights": ys[3], "read_weights": ys[4]},)
        return res[0] if len(res) == 1 else res

    def extra_repr(self):
        return (f"{self.input_size} -> {self.output_size}, hidden {self.hidden_size}, memory {self.memory_size}x"
                f"{self.word_size}, reads {self.num_reads}, fused={self.fused}")


# ==============================================================================================================
# The fused memory step: one primitive over a packed state (B, S), a Numba kernel forward and one backward
# ==============================================================================================================
# Packed layout of one example's row: memory (N*W) | usage (N) | link (N*N) | precedence (N) |
# read weights (R*N) | write weights (N) | read vectors (R*W). The interface stays raw (B, R*W + 3W + 5R + 3):
# the kernels apply its nonlinearities themselves.

def packed_size(memory_size, word_size, num_reads):
    """Return the length S of a packed memory state row."""
    N, W, R = memory_size, word_size, num_reads
    return N * W + N + N * N + N + R * N + N + R * W


def _offsets_py(N, W, R):
    """Start of each part of a packed row: memory, usage, link, precedence, read weights, write weights, reads."""
    oM = 0
    ou = oM + N * W
    oL = ou + N
    op = oL + N * N
    owr = op + N
    oww = owr + R * N
    orv = oww + N
    return oM, ou, oL, op, owr, oww, orv


_offsets = njit(cache=True, no_cpython_wrapper=True)(_offsets_py)


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
    oM, ou, oL, op, owr, oww, orv = _offsets_py(N, W, R)
    return MemoryState(ops.reshape(packed[:, oM:ou], (B, N, W)), packed[:, ou:oL],
                       ops.reshape(packed[:, oL:op], (B, N, N)), packed[:, op:owr],
                       ops.reshape(packed[:, owr:oww], (B, R, N)), packed[:, oww:orv],
                       ops.reshape(packed[:, orv:], (B, R, W)))


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _sigm(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _row_norms(mem, eps, norms):
    """Write sqrt(sum_k mem[n, k]^2 + eps) of every row of mem (N, W) into norms."""
    N, W = mem.shape
    for n in range(N):
        sq = 0.0
        for k in range(W):
            sq += mem[n, k] * mem[n, k]
        norms[n] = math.sqrt(sq + eps)


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _content_fwd(mem, norms, key, beta, eps, sim, w):
    """Cosine similarities and softmax weights of one key over mem (N, W) with row norms ``norms``; return the
    key's norm."""
    N, W = mem.shape
    kn = 0.0
    for k in range(W):
        kn += key[k] * key[k]
    kn = math.sqrt(kn + eps)
    mx = -np.inf
    for n in range(N):
        dot = 0.0
        for k in range(W):
            dot += mem[n, k] * key[k]
        sim[n] = dot / (kn * norms[n] + eps)
        mx = max(mx, beta * sim[n])
    tot = 0.0
    for n in range(N):
        w[n] = math.exp(beta * sim[n] - mx)
        tot += w[n]
    for n in range(N):
        w[n] /= tot
    return kn


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _content_bwd(mem, norms, key, beta, eps, kn, sim, w, gw, gmem, gnorms, gkey):
    """Accumulate the gradients of the content weights ``w`` (given ``gw``) into gmem, gnorms (the row norms'
    gradient, applied to gmem by :func:`_norms_bwd`) and gkey; return gbeta."""
    N, W = mem.shape
    s = 0.0
    for n in range(N):
        s += gw[n] * w[n]
    gbeta = 0.0
    gkn = 0.0
    for n in range(N):
        gz = w[n] * (gw[n] - s)
        gbeta += gz * sim[n]
        gsim = gz * beta
        den = kn * norms[n] + eps
        gdot = gsim / den
        gden = -gsim * sim[n] / den
        gkn += gden * norms[n]
        gnorms[n] += gden * kn
        for k in range(W):
            gkey[k] += gdot * mem[n, k]
            gmem[n, k] += gdot * key[k]
    for k in range(W):
        gkey[k] += gkn * key[k] / kn
    return gbeta


@njit(cache=True, no_cpython_wrapper=True, error_model="numpy")
def _norms_bwd(mem, norms, gnorms, gmem):
    """Add the row norms' gradient ``gnorms`` to gmem (d norm_n / d mem[n, k] = mem[n, k] / norm_n)."""
    N, W = mem.shape
    for n in range(N):
        c = gnorms[n] / norms[n]
        for k in range(W):
            gmem[n, k] += c * mem[n, k]


@njit(cache=True, error_model="numpy")
def _memory_kernel(state, xi, g, N, W, R, eps, out, grad):
    """The memory step of every row of ``state`` (B, S) under the raw interface ``xi`` (B, I).

    ``grad`` False: write the next packed state into ``out`` (B, S). ``grad`` True: recompute the step and write
    [d(loss)/d(state) | d(loss)/d(xi)] into ``out`` (B, S + I) given ``g`` = d(loss)/d(next state). One function
    does both so that the step's code is compiled once.
    """
    dt = state.dtype
    S, I = state.shape[1], xi.shape[1]
    oM, ou, oL, op, owr, oww, orv = _offsets(N, W, R)
    RW = R * W
    o_br, o_kw = RW, RW + R
    o_bw = o_kw + W
    o_e = o_bw + 1
    o_v = o_e + W
    o_f = o_v + W
    o_ga = o_f + R
    o_gw = o_ga + 1
    o_pi = o_gw + 1
    # scratch: the interface after its nonlinearities, usage and allocation, content lookups, link weightings
    iv = np.empty(I, dt)
    psi, pre, prefix, alloc = np.empty(N, dt), np.empty(N, dt), np.empty(N, dt), np.empty(N, dt)
    phi = np.empty(N, np.int64)
    n0, sw, cw = np.empty(N, dt), np.empty(N, dt), np.empty(N, dt)
    n1, sr, cr = np.empty(N, dt), np.empty((R, N), dt), np.empty((R, N), dt)
    fw, bw = np.empty((R, N), dt), np.empty((R, N), dt)
    kn = np.empty(R + 1, dt)
    tmp = np.empty(S, dt)
    # gradients of the new memory, links, read weights, write weights, usage; of content and allocation weights
    gM = np.empty((N, W), dt)
    gL = np.empty((N, N), dt)
    gwr = np.empty((R, N), dt)
    gww = np.empty(N, dt)
    gu = np.empty(N, dt)
    gc = np.empty(N, dt)
    gsa = np.empty(N, dt)
    giv = np.empty(I, dt)    # gradient of the interface after its nonlinearities
    gn = np.empty(N, dt)     # gradient of the memory rows' norms
    for b in range(state.shape[0]):
        s = state[b]
        x = xi[b]
        o = tmp if grad else out[b]
        for k in range(x.shape[0]):
            iv[k] = x[k]
        for i in range(R):
            iv[o_br + i] = 1.0 + _softplus(x[o_br + i])
            iv[o_f + i] = _sigm(x[o_f + i])
            mx = max(x[o_pi + 3 * i], max(x[o_pi + 3 * i + 1], x[o_pi + 3 * i + 2]))
            t = 0.0
            for m in range(3):
                iv[o_pi + 3 * i + m] = math.exp(x[o_pi + 3 * i + m] - mx)
                t += iv[o_pi + 3 * i + m]
            for m in range(3):
                iv[o_pi + 3 * i + m] /= t
        iv[o_bw] = 1.0 + _softplus(x[o_bw])
        for k in range(W):
            iv[o_e + k] = _sigm(x[o_e + k])
        ga = iv[o_ga] = _sigm(x[o_ga])
        gw = iv[o_gw] = _sigm(x[o_gw])
        M0 = s[oM:ou].reshape((N, W))
        M = o[oM:ou].reshape((N, W))
        L0 = s[oL:op].reshape((N, N))
        L = o[oL:op].reshape((N, N))
        wr0 = s[owr:oww].reshape((R, N))
        wr = o[owr:oww].reshape((R, N))
        u = o[ou:oL]
        ww = o[oww:orv]
        # 1. usage: retention by the free gates of last step's reads, then last step's write
        for n in range(N):
            p = 1.0
            for i in range(R):
                p *= 1.0 - iv[o_f + i] * wr0[i, n]
            psi[n] = p
            pre[n] = s[ou + n] + s[oww + n] - s[ou + n] * s[oww + n]
            u[n] = pre[n] * p
        # 2. allocation: stable ascending sort of the usage (insertion sort), exclusive product
        for n in range(N):
            j = n
            while j > 0 and u[phi[j - 1]] > u[n]:
                phi[j] = phi[j - 1]
                j -= 1
            phi[j] = n
        acc = 1.0
        for j in range(N):
            prefix[j] = acc
            alloc[phi[j]] = (1.0 - u[phi[j]]) * acc
            acc *= u[phi[j]]
        # 3-4. write weighting from the old memory
        _row_norms(M0, eps, n0)
        kn[R] = _content_fwd(M0, n0, iv[o_kw:o_kw + W], iv[o_bw], eps, sw, cw)
        for n in range(N):
            ww[n] = gw * (ga * alloc[n] + (1.0 - ga) * cw[n])
        # 5. erase and write
        for n in range(N):
            for k in range(W):
                M[n, k] = M0[n, k] * (1.0 - ww[n] * iv[o_e + k]) + ww[n] * iv[o_v + k]
        # 6-7. temporal links and precedence
        tot = 0.0
        for n in range(N):
            tot += ww[n]
        for i in range(N):
            for j in range(N):
                L[i, j] = 0.0 if i == j else (1.0 - ww[i] - ww[j]) * L0[i, j] + ww[i] * s[op + j]
        for n in range(N):
            o[op + n] = (1.0 - tot) * s[op + n] + ww[n]
        # 8-10. read weightings: backward, content, forward
        _row_norms(M, eps, n1)
        for r in range(R):
            kn[r] = _content_fwd(M, n1, iv[r * W:(r + 1) * W], iv[o_br + r], eps, sr[r], cr[r])
            for i in range(N):
                fsum = 0.0
                bsum = 0.0
                for j in range(N):
                    fsum += L[i, j] * wr0[r, j]
                    bsum += wr0[r, j] * L[j, i]
                fw[r, i] = fsum
                bw[r, i] = bsum
            for n in range(N):
                wr[r, n] = (iv[o_pi + 3 * r] * bw[r, n] + iv[o_pi + 3 * r + 1] * cr[r, n]
                            + iv[o_pi + 3 * r + 2] * fw[r, n])
        # 11. read vectors
        for r in range(R):
            for k in range(W):
                t = 0.0
                for n in range(N):
                    t += wr[r, n] * M[n, k]
                o[orv + r * W + k] = t
        if not grad:
            continue
        gb = g[b]
        gs = out[b, :S]
        gs[:] = 0.0
        giv[:] = 0.0
        gM0 = gs[oM:ou].reshape((N, W))
        gL0 = gs[oL:op].reshape((N, N))
        gwr0 = gs[owr:oww].reshape((R, N))
        for n in range(N):
            for k in range(W):
                gM[n, k] = gb[oM + n * W + k]
            for j in range(N):
                gL[n, j] = gb[oL + n * N + j]
            gww[n] = gb[oww + n]
            gu[n] = gb[ou + n]
        for r in range(R):
            for n in range(N):
                gwr[r, n] = gb[owr + r * N + n]
        # 11. read vectors r = wr M
        for r in range(R):
            for n in range(N):
                t = 0.0
                for k in range(W):
                    gr = gb[orv + r * W + k]
                    t += gr * M[n, k]
                    gM[n, k] += wr[r, n] * gr
                gwr[r, n] += t
        # 10-8. read modes, content lookups, forward/backward weightings
        gn[:] = 0.0
        for r in range(R):
            p0, p1, p2 = iv[o_pi + 3 * r], iv[o_pi + 3 * r + 1], iv[o_pi + 3 * r + 2]
            a0 = a1 = a2 = 0.0
            for n in range(N):
                a0 += gwr[r, n] * bw[r, n]
                a1 += gwr[r, n] * cr[r, n]
                a2 += gwr[r, n] * fw[r, n]
                gc[n] = p1 * gwr[r, n]
            giv[o_pi + 3 * r] += a0
            giv[o_pi + 3 * r + 1] += a1
            giv[o_pi + 3 * r + 2] += a2
            giv[o_br + r] += _content_bwd(M, n1, iv[r * W:(r + 1) * W], iv[o_br + r], eps, kn[r], sr[r], cr[r], gc,
                                          gM, gn, giv[r * W:(r + 1) * W])
            # f_i = sum_j L_ij wr0_j ; b_j = sum_i wr0_i L_ij
            for i in range(N):
                gf = p2 * gwr[r, i]
                gbk = p0 * gwr[r, i]
                for j in range(N):
                    gL[i, j] += gf * wr0[r, j]
                    gwr0[r, j] += gf * L[i, j]
                    gL[j, i] += wr0[r, j] * gbk
                    gwr0[r, j] += gbk * L[j, i]
        _norms_bwd(M, n1, gn, gM)
        # 7. precedence p = (1 - sum ww) p0 + ww
        tot = 0.0
        gtot = 0.0
        for n in range(N):
            tot += ww[n]
        for n in range(N):
            gp = gb[op + n]
            gs[op + n] = (1.0 - tot) * gp
            gtot -= gp * s[op + n]
            gww[n] += gp
        for n in range(N):
            gww[n] += gtot
        # 6. links L_ij = (1 - ww_i - ww_j) L0_ij + ww_i p0_j, i != j
        for i in range(N):
            for j in range(N):
                if i == j:
                    gL0[i, j] = 0.0
                    continue
                gl = gL[i, j]
                gL0[i, j] = (1.0 - ww[i] - ww[j]) * gl
                gww[i] += gl * (s[op + j] - L0[i, j])
                gww[j] -= gl * L0[i, j]
                gs[op + j] += gl * ww[i]
        # 5. memory M = M0 (1 - ww e) + ww v
        for n in range(N):
            for k in range(W):
                gm = gM[n, k]
                e = iv[o_e + k]
                gM0[n, k] += gm * (1.0 - ww[n] * e)
                gww[n] += gm * (iv[o_v + k] - M0[n, k] * e)
                giv[o_e + k] -= gm * M0[n, k] * ww[n]
                giv[o_v + k] += gm * ww[n]
        # 4. ww = gw (ga a + (1 - ga) cw)
        ga, gwt = iv[o_ga], iv[o_gw]
        for n in range(N):
            giv[o_gw] += gww[n] * (ga * alloc[n] + (1.0 - ga) * cw[n])
            giv[o_ga] += gww[n] * gwt * (alloc[n] - cw[n])
            gc[n] = gww[n] * gwt * (1.0 - ga)
            gsa[n] = gww[n] * gwt * ga              # gradient of the allocation weighting, by row for now
        # 3. write content lookup on the old memory
        gn[:] = 0.0
        giv[o_bw] += _content_bwd(M0, n0, iv[o_kw:o_kw + W], iv[o_bw], eps, kn[R], sw, cw, gc, gM0, gn,
                                  giv[o_kw:o_kw + W])
        _norms_bwd(M0, n0, gn, gM0)
        # 2. allocation: sa_j = (1 - su_j) P_j with P_j = prod_{k<j} su_k; with c_m = gsa_m (1 - su_m) and
        # Q_j = sum_{m>j} c_m prod_{j<k<m} su_k (Q_j = c_{j+1} + su_{j+1} Q_{j+1}): d/d su_j = P_j (Q_j - gsa_j)
        q = 0.0
        for j in range(N - 1, -1, -1):
            n = phi[j]
            su = o[ou + n]
            gu[n] += prefix[j] * (q - gsa[n])
            q = gsa[n] * (1.0 - su) + su * q
        # 1. usage u = pre * psi, pre = u0 + ww0 - u0 ww0, psi = prod_i (1 - f_i wr0_i)
        for n in range(N):
            gpre = gu[n] * psi[n]
            gpsi = gu[n] * pre[n]
            gs[ou + n] = gpre * (1.0 - s[oww + n])
            gs[oww + n] = gpre * (1.0 - s[ou + n])
            for i in range(R):
                rest = 1.0
                for m in range(R):
                    if m != i:
                        rest *= 1.0 - iv[o_f + m] * wr0[m, n]
                gq = gpsi * rest
                giv[o_f + i] -= gq * wr0[i, n]
                gwr0[i, n] -= gq * iv[o_f + i]
        # the interface's nonlinearities
        gx = out[b, S:]
        for k in range(xi.shape[1]):
            gx[k] = giv[k]
        x = xi[b]
        for i in range(R):
            gx[o_br + i] = giv[o_br + i] * _sigm(x[o_br + i])
            fi = iv[o_f + i]
            gx[o_f + i] = giv[o_f + i] * fi * (1.0 - fi)
            t = 0.0
            for m in range(3):
                t += iv[o_pi + 3 * i + m] * giv[o_pi + 3 * i + m]
            for m in range(3):
                gx[o_pi + 3 * i + m] = iv[o_pi + 3 * i + m] * (giv[o_pi + 3 * i + m] - t)
        gx[o_bw] = giv[o_bw] * _sigm(x[o_bw])
        for k in range(W):
            e = iv[o_e + k]
            gx[o_e + k] = giv[o_e + k] * e * (1.0 - e)
        gx[o_ga] = giv[o_ga] * ga * (1.0 - ga)
        gx[o_gw] = giv[o_gw] * gwt * (1.0 - gwt)


def dnc_memory_forward(state, xi, N, W, R, eps, out):
    """Write the next packed memory state of every row of ``state`` (B, S) under the raw interface ``xi`` into
    ``out`` (B, S) (C-contiguous arrays of one float dtype)."""
    _memory_kernel(state, xi, state, N, W, R, eps, out, False)


def dnc_memory_backward(state, xi, g, N, W, R, eps, out):
    """Write [d(loss)/d(state) | d(loss)/d(xi)] into ``out`` (B, S + I) given ``g`` = d(loss)/d(next state),
    recomputing the forward step (nothing but the step's inputs is kept between the passes)."""
    _memory_kernel(state, xi, g, N, W, R, eps, out, True)


def _mem_fwd_impl(state, xi, N, W, R, eps):
    state, xi = np.ascontiguousarray(state), np.ascontiguousarray(xi)
    out = np.empty_like(state)
    dnc_memory_forward(state, xi, N, W, R, eps, out)
    return out


def _mem_bwd_impl(state, xi, g, N, W, R, eps):
    state, xi, g = np.ascontiguousarray(state), np.ascontiguousarray(xi), np.ascontiguousarray(g)
    S = state.shape[1]
    out = np.empty((state.shape[0], S + xi.shape[1]), state.dtype)
    dnc_memory_backward(state, xi, g, N, W, R, eps, out)
    return out


def _mem_vjp(g, ans, ins, needs, N, W, R, eps):
    state, xi = ins
    both = apply(_MEM_BWD, state, xi, g, N=N, W=W, R=R, eps=eps)     # [d state | d xi], one kernel
    S = state.shape[1]
    return (both[:, :S] if needs[0] else None), (both[:, S:] if needs[1] else None)


def _no_second_order(g, ans, ins, needs, **params):
    raise TypeError("dnc_memory_step: the fused memory step has first-order gradients only (its gradient is a "
                    "kernel, not jitnet ops); for higher-order gradients use DNC(..., fused=False) or memory_step")


_MEM_BWD = Primitive("dnc_memory_step_grad", impl={"cpu": _mem_bwd_impl}, vjp=_no_second_order)
_MEM_STEP = Primitive("dnc_memory_step", impl={"cpu": _mem_fwd_impl}, vjp=_mem_vjp)
no_cuda("the DNC memory kernel has no CUDA form yet", _MEM_BWD, _MEM_STEP)


def dnc_memory_step(packed, xi, memory_size, word_size, num_reads, eps=EPS):
    """Return the next packed memory state (B, S) after one step under the raw interface ``xi`` (B, I).

    The same equations as :func:`memory_step` in one Numba kernel; its gradient is a second kernel that
    recomputes the step. See :func:`pack_state` / :func:`unpack_state` for the layout.
    """
    N, W, R = int(memory_size), int(word_size), int(num_reads)
    packed = packed if isinstance(packed, jn.Tensor) else jn.tensor(packed)
    xi = xi if isinstance(xi, jn.Tensor) else jn.tensor(xi)
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
# Tasks: copy and repeat-copy of random binary vectors
# ==============================================================================================================

def copy_batch(rng, batch, min_len, max_len, bits, length=None):
    """Return (x, y, mask) of the copy task, padded to ``2 * max_len + 1`` steps (or ``length``).

    Each sequence has L in [min_len, max_len] random ``bits``-bit vectors, then a delimiter step (input
    channel ``bits`` set), then L blank steps during which the target is the sequence again. x is
    (B, T, bits + 1), y (B, T, bits), mask (B, T) marks the target steps. NumPy float32 arrays.
    """
    if not 1 <= min_len <= max_len or bits < 1 or batch < 1:
        raise ValueError(f"copy_batch: need 1 <= min_len <= max_len and bits, batch >= 1, got min_len "
                         f"{min_len}, max_len {max_len}, bits {bits}, batch {batch}")
    T = 2 * max_len + 1 if length is None else int(length)
    if T < 2 * max_len + 1:
        raise ValueError(f"copy_batch: length {T} is shorter than 2 * max_len + 1 = {2 * max_len + 1}")
    x = np.zeros((batch, T, bits + 1), np.float32)
    y = np.zeros((batch, T, bits), np.float32)
    mask = np.zeros((batch, T), np.float32)
    lens = rng.integers(min_len, max_len + 1, size=batch)
    for b, L in enumerate(lens):
        seq = rng.integers(0, 2, size=(L, bits)).astype(np.float32)
        x[b, :L, :bits] = seq
        x[b, L, bits] = 1.0
        y[b, L + 1:2 * L + 1] = seq
        mask[b, L + 1:2 * L + 1] = 1.0
    return x, y, mask


def repeat_copy_batch(rng, batch, min_len, max_len, bits, min_repeats=1, max_repeats=3, length=None):
    """Return (x, y, mask) of the repeat-copy task, padded to ``max_len * (max_repeats + 1) + 2`` steps.

    After the L-step sequence comes a delimiter step whose input channel ``bits`` is 1 and channel
    ``bits + 1`` holds the repeat count n / max_repeats; the target is the sequence n times and then an end
    marker (output channel ``bits``). x is (B, T, bits + 2), y (B, T, bits + 1), mask (B, T).
    """
    if not 1 <= min_len <= max_len or not 1 <= min_repeats <= max_repeats or bits < 1 or batch < 1:
        raise ValueError(f"repeat_copy_batch: need 1 <= min_len <= max_len, 1 <= min_repeats <= max_repeats, "
                         f"got lengths {min_len}..{max_len}, repeats {min_repeats}..{max_repeats}")
    need = max_len * (max_repeats + 1) + 2
    T = need if length is None else int(length)
    if T < need:
        raise ValueError(f"repeat_copy_batch: length {T} is shorter than the {need} steps the longest example "
                         "needs")
    x = np.zeros((batch, T, bits + 2), np.float32)
    y = np.zeros((batch, T, bits + 1), np.float32)
    mask = np.zeros((batch, T), np.float32)
    lens = rng.integers(min_len, max_len + 1, size=batch)
    reps = rng.integers(min_repeats, max_repeats + 1, size=batch)
    for b, (L, n) in enumerate(zip(lens, reps)):
        seq = rng.integers(0, 2, size=(L, bits)).astype(np.float32)
        x[b, :L, :bits] = seq
        x[b, L, bits] = 1.0
        x[b, L, bits + 1] = n / max_repeats
        y[b, L + 1:L + 1 + n * L, :bits] = np.tile(seq, (n, 1))
        y[b, L + 1 + n * L, bits] = 1.0
        mask[b, L + 1:L + 2 + n * L] = 1.0
    return x, y, mask


def bit_errors(logits, y, mask):
    """Return (wrong bits, target bits) of thresholded predictions (logit > 0) on the masked steps."""
    logits, y, mask = (np.asarray(a.numpy() if isinstance(a, jn.Tensor) else a) for a in (logits, y, mask))
    wrong = ((logits > 0) != (y > 0.5)) & (mask[..., None] > 0)
    return int(wrong.sum()), int(mask.sum()) * y.shape[-1]


def _masked_sigmoid_xent(logits, y, mask):
    """Mean sigmoid cross-entropy per target bit over the masked steps."""
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    m = ops.expand_dims(mask, -1)
    return ops.sum(per * m) / (ops.sum(mask) * y.shape[-1])


class _DNCModel:
    """Shared model plumbing: the DNC, its optimizer (RMSProp with momentum, as in the paper, or Adam), a
    jitted step with global-norm gradient clipping."""

    def __init__(self, net, lr, optimizer, clip, jit):
        self.net, self.clip = net, float(clip)
        if optimizer == "rmsprop":
            self.opt = jn.optim.RMSProp(net.parameters(), lr=lr, momentum=0.9, eps=1e-10)
        elif optimizer == "adam":
            self.opt = jn.optim.Adam(net.parameters(), lr=lr)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'rmsprop' or 'adam'")
        self._step = jn.jit(self._train_step) if jit else self._train_step
        self._fwd = jn.jit(self._logits) if jit else self._logits

    def _train_step(self, *batch):
        self.opt.zero_grad()
        loss = self.loss(*batch)
        loss.backward()
        if self.clip > 0:
            self.opt.clip_grad_norm(self.clip)
        self.opt.step()
        return loss

    def _logits(self, x):
        with jn.no_grad():
            return self.net(x)

    def train_step(self, *batch):
        """Run one optimization step (forward, loss, backward, clipping, update); return the loss before it."""
        return self._step(*[b if isinstance(b, jn.Tensor) else jn.tensor(b) for b in batch])

    def logits(self, x):
        """Return the output logits (B, T, Y) for inputs ``x`` (B, T, X) without recording gradients."""
        return self._fwd(x if isinstance(x, jn.Tensor) else jn.tensor(x))


class CopyModel(_DNCModel):
    """A DNC trained on copy (or repeat-copy) with sigmoid cross-entropy on the target steps.

    ``loss(x, y, mask)`` is the mean cross-entropy per target bit; ``train_step`` the jitted step;
    ``evaluate(rng, ...)`` the bit error rate on fresh sequences.
    """

    def __init__(self, bits=6, hidden_size=64, memory_size=16, word_size=16, num_reads=1, repeat=False,
                 lr=1e-3, optimizer="adam", clip=10.0, jit=True, fused=True, dtype=jn.float32):
        self.bits, self.repeat = int(bits), bool(repeat)
        extra = 1 if repeat else 0
        net = DNC(self.bits + 1 + extra, self.bits + extra, hidden_size, memory_size, word_size, num_reads,
                  fused=fused, dtype=dtype)
        super().__init__(net, lr, optimizer, clip, jit)

    def batch(self, rng, batch, min_len, max_len, length=None, max_repeats=3):
        """Return a (x, y, mask) batch of this model's task as NumPy arrays."""
        if self.repeat:
            return repeat_copy_batch(rng, batch, min_len, max_len, self.bits, 1, max_repeats, length)
        return copy_batch(rng, batch, min_len, max_len, self.bits, length)

    def loss(self, x, y, mask):
        """Return the mean sigmoid cross-entropy per target bit of the DNC's outputs on (x, y, mask)."""
        return _masked_sigmoid_xent(self.net(x), y, mask)

    def evaluate(self, rng, lengths, batch=32, batches=4, max_repeats=3, length=None):
        """Return {L: bit error rate} over ``batches`` fresh batches of sequences of each length L."""
        out = {}
        for L in lengths:
            wrong = total = 0
            for _ in range(batches):
                T = length if length is not None else None
                x, y, m = self.batch(rng, batch, L, L, length=T, max_repeats=max_repeats)
                w, t = bit_errors(self.logits(x), y, m)
                wrong, total = wrong + w, total + t
            out[L] = wrong / max(total, 1)
        return out


# ==============================================================================================================
# bAbI
# ==============================================================================================================

class BabiModel(_DNCModel):
    """A DNC reading one-hot bAbI tokens and predicting the answer word at every answer slot ``-``.

    ``loss(x, y, mask)`` is the mean softmax cross-entropy over the answer slots; ``evaluate(batches)``
    returns the answer accuracy.
    """

    def __init__(self, vocab_size, hidden_size=128, memory_size=32, word_size=16, num_reads=2, lr=1e-3,
                 optimizer="adam", clip=10.0, jit=True, fused=True, dtype=jn.float32):
        net = DNC(vocab_size, vocab_size, hidden_size, memory_size, word_size, num_reads, fused=fused,
                  dtype=dtype)
        super().__init__(net, lr, optimizer, clip, jit)

    def loss(self, x, y, mask):
        """Return the mean cross-entropy of the answer slots (``mask``) against answer ids ``y`` (B, T)."""
        per = F.cross_entropy(self.net(x), y, reduction="none")
        return ops.sum(per * mask) / ops.sum(mask)

    def evaluate(self, batches):
        """Return {"answer_accuracy", "answers"} over (x, y, mask) batches."""
        right = total = 0
        for x, y, mask in batches:
            pred = np.argmax(self.logits(x).numpy(), axis=-1)
            m = mask > 0
            right += int((pred[m] == y[m]).sum())
            total += int(m.sum())
        return {"answer_accuracy": right / max(total, 1), "answers": total}


# ==============================================================================================================
# Plot of the addressing over time
# ==============================================================================================================

def _png_gray(path, img):
    """Write a grayscale image (values in [0, 1]) as an 8-bit PNG with the standard library only."""
    import struct
    import zlib
    a = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    h, w = a.shape
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def plot_memory(trace, path, index=0, inputs=None, outputs=None):
    """Save a figure of memory usage, write weights and read weights (rows: memory locations, columns:
    time steps) of sequence ``index`` of a ``DNC(..., return_trace=True)`` trace; return ``path``.

    With matplotlib installed the panels are titled heat maps (inputs and outputs (B, T, C) are added when
    given); without it the panels are stacked into one grayscale PNG (white = 1) with the standard library.
    """
    get = lambda k: np.asarray(trace[k].numpy() if isinstance(trace[k], jn.Tensor) else trace[k])  # noqa: E731
    usage = get("usage")[:, index].T                       # (N, T)
    ww = get("write_weights")[:, index].T
    wr = get("read_weights")[:, index]                      # (T, R, N)
    panels = [("usage", usage), ("write weights", ww)]
    panels += [(f"read weights, head {r}", wr[:, r].T) for r in range(wr.shape[1])]
    extra = [(n, np.asarray(a.numpy() if isinstance(a, jn.Tensor) else a)[index].T)
             for n, a in (("inputs", inputs), ("outputs", outputs)) if a is not None]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        T = usage.shape[1]
        gap = np.full((1, T), 0.5)
        rows = []
        for _, p in extra + panels:
            p = np.asarray(p, np.float64)
            if p.shape[1] != T:
                continue
            lo, hi = float(p.min()), float(p.max())
            rows += [(p - lo) / (hi - lo) if hi > 1 or lo < 0 else p, gap]
        img = np.concatenate(rows[:-1], axis=0)
        _png_gray(path, np.kron(img, np.ones((6, max(2, 640 // max(T, 1))))))
        return path
    allp = extra + panels
    fig, axes = plt.subplots(len(allp), 1, figsize=(10, 1.6 * len(allp) + 1), sharex=True, squeeze=False)
    for ax, (name, p) in zip(axes[:, 0], allp):
        im = ax.imshow(p, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0 if name not in ("inputs", "outputs") else None)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("location" if name not in ("inputs", "outputs") else "channel")
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("time step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ==============================================================================================================
# Training commands
# ==============================================================================================================

def _parser(prog, description, *, steps, batch_size, lr, hidden, memory, word, reads):
    p = ArgumentParser(prog=f"python -m jitnet train {prog}", description=description)
    add_nonfinite_args(p)
    p.add_argument("--steps", type=int, default=steps, help=f"training steps to reach (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"sequences per step (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--optimizer", default="adam", choices=["adam", "rmsprop"],
                   help="adam, or rmsprop with momentum 0.9 as in the paper (default adam)")
    p.add_argument("--clip", type=float, default=10.0, help="clip gradients to this global norm (0: off)")
    p.add_argument("--hidden", type=int, default=hidden, help=f"controller LSTM units (default {hidden})")
    p.add_argument("--memory-size", type=int, default=memory, help=f"memory locations N (default {memory})")
    p.add_argument("--word-size", type=int, default=word, help=f"memory word size W (default {word})")
    p.add_argument("--reads", type=int, default=reads, help=f"read heads R (default {reads})")
    p.add_argument("--composed", action="store_true",
                   help="run the memory step as separate jitnet ops instead of the fused kernel")
    p.add_argument("--eval-every", type=int, default=500, help="evaluate and checkpoint every N steps")
    p.add_argument("--logdir", default=None, help=f"TensorBoard events, metrics.csv, checkpoints/ and the memory "
                                                  f"plot go here (default runs/{prog})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --logdir")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--no-jit", action="store_true", help="run the steps eagerly instead of under jitnet.jit")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not save the memory plot")
    return p


def _fit_steps(model, args, name, logdir, next_batch, evaluate):
    """Train ``model`` to ``args.steps`` steps with periodic evaluation, logs and checkpoints; return metrics."""
    os.makedirs(logdir, exist_ok=True)
    saver = jn.io.Saver(os.path.join(logdir, "checkpoints"), max_to_keep=args.keep)
    guard = NonFiniteGuard(model, saver, name, getattr(args, "skip_nonfinite", None))
    step = 0
    if args.resume:
        path = saver.latest_checkpoint()
        if path is None:
            print(f"{name}: no checkpoint in {saver.directory}, starting from scratch", flush=True)
        else:
            _, step = restore_checkpoint(path, model)
            print(f"{name}: resumed from {path} (step {step})", flush=True)
    writer = jn.io.SummaryWriter(logdir)
    csv = jn.io.CSVLogger(os.path.join(logdir, "metrics.csv"))
    metrics = {}
    try:
        while step < args.steps:
            chunk = min(args.eval_every, args.steps - step)
            bar = Progress(chunk, f"{name} steps {step + 1}-{step + chunk}", enabled=not args.no_progress)
            t0 = time.perf_counter()
            total, count = 0.0, 0
            try:
                for _ in range(chunk):
                    loss = guard.run(lambda: model.train_step(*next_batch()), f"step {step + 1}")
                    if loss is None:
                        bar.update(None)
                        continue
                    step += 1
                    total += loss
                    count += 1
                    bar.update(loss)
                    if step % 50 == 0:
                        writer.add_scalar("train/loss", loss, step)
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
            metrics = {"train_loss": total / count if count else float("nan")}
            guard.check_state(0, step, metrics["train_loss"] if count else None)
            metrics.update(evaluate())
            row = {"step": step, **metrics, "seconds": seconds, "steps_per_s": chunk / seconds}
            for k, v in metrics.items():
                if isinstance(v, float):
                    writer.add_scalar(("train/" if k.startswith("train") else "eval/") + k, v, step)
            writer.flush()
            csv.log(row)
            save_checkpoint(saver, model, 0, step)
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(f"{name} step {step}/{args.steps}: {shown}, {chunk / seconds:.1f} steps/s", flush=True)
    finally:
        writer.close()
        csv.close()
        if guard.report():
            print(guard.report(), file=sys.stderr, flush=True)
    metrics["step"] = step
    return metrics


def _setup(args):
    if args.threads:
        jn.set_num_threads(args.threads)
    jn.random.seed(args.seed)
    return np.random.default_rng(args.seed)


def copy_parser():
    """Return the argument parser of ``python -m jitnet train dnc-copy``."""
    p = _parser("dnc-copy", "Train a DNC on the copy (or repeat-copy) task of random binary vectors.",
                steps=3000, batch_size=16, lr=1e-3, hidden=64, memory=16, word=16, reads=1)
    p.add_argument("--bits", type=int, default=6, help="bits per vector (default 6)")
    p.add_argument("--min-len", type=int, default=1, help="shortest training sequence (default 1)")
    p.add_argument("--max-len", type=int, default=8, help="longest training sequence (default 8)")
    p.add_argument("--repeat-copy", action="store_true", help="the repeat-copy task instead of copy")
    p.add_argument("--max-repeats", type=int, default=3, help="repeat-copy: most repeats (default 3)")
    p.add_argument("--eval-batches", type=int, default=4, help="batches per length at evaluation (default 4)")
    return p


def run_copy(argv=None):
    """Train the copy command with ``argv``; return the final metrics (bit error per length included)."""
    args = copy_parser().parse_args(argv)
    name = "dnc-repeat-copy" if args.repeat_copy else "dnc-copy"
    logdir = args.logdir or os.path.join("runs", name)
    rng = _setup(args)
    model = CopyModel(args.bits, args.hidden, args.memory_size, args.word_size, args.reads, args.repeat_copy,
                      args.lr, args.optimizer, args.clip, jit=not args.no_jit, fused=not args.composed)
    print(f"{name}: DNC({model.net.extra_repr()}), {model.net.num_parameters()} parameters; lengths "
          f"{args.min_len}-{args.max_len}, batch {args.batch_size}", flush=True)
    probe = model.batch(rng, args.batch_size, args.min_len, args.max_len, max_repeats=args.max_repeats)
    T = probe[0].shape[1]
    eval_rng = np.random.default_rng(args.seed + 1)
    lengths = list(range(args.min_len, args.max_len + 1))

    def next_batch():
        return model.batch(rng, args.batch_size, args.min_len, args.max_len, length=T, max_repeats=args.max_repeats)

    def evaluate():
        errs = model.evaluate(eval_rng, lengths, args.batch_size, args.eval_batches, args.max_repeats, length=T)
        out = {"bit_error": float(np.mean(list(errs.values()))), "worst_bit_error": float(max(errs.values()))}
        out.update({f"bit_error_len{L}": float(e) for L, e in errs.items()})
        return out

    m = _fit_steps(model, args, name, logdir, next_batch, evaluate)
    if not args.no_plot:
        x, y, mask = model.batch(eval_rng, 1, args.max_len, args.max_len, length=T, max_repeats=args.max_repeats)
        with jn.no_grad():
            logits, trace = model.net(jn.tensor(x), return_trace=True)
        path = plot_memory(trace, os.path.join(logdir, "memory.png"), inputs=x,
                           outputs=1.0 / (1.0 + np.exp(-logits.numpy())))
        print(f"{name}: memory plot {path}", flush=True)
    return m


def train_dnc_copy(argv=None):
    """``python -m jitnet train dnc-copy``: train on copy / repeat-copy; return the exit code."""
    run_copy(argv)
    return 0


def babi_parser():
    """Return the argument parser of ``python -m jitnet train dnc-babi``."""
    p = _parser("dnc-babi", "Train a DNC on bAbI question answering (the real files when found, else generated "
                "single-supporting-fact stories).", steps=2000, batch_size=16, lr=1e-3, hidden=64, memory=32,
                word=16, reads=2)
    p.add_argument("--task", type=int, default=1, help="bAbI task 1..20 (default 1)")
    p.add_argument("--data-dir", default=None, help="a qa*.txt file or a directory holding the bAbI files")
    p.add_argument("--download", action="store_true", help="download the bAbI release when it is not found")
    p.add_argument("--generated", type=int, default=None,
                   help="train on N generated task-1 stories instead of the files (test: N // 5)")
    p.add_argument("--max-tokens", type=int, default=400, help="drop stories longer than this (default 400)")
    return p


def run_babi(argv=None):
    """Train the bAbI command with ``argv``; return the final metrics (answer accuracy included)."""
    args = babi_parser().parse_args(argv)
    name = "dnc-babi"
    logdir = args.logdir or os.path.join("runs", name)
    rng = _setup(args)
    train = test = None
    if args.generated is None:
        train = BB.babi_stories(args.task, "train", args.data_dir, args.download)
        test = BB.babi_stories(args.task, "test", args.data_dir, args.download) if train is not None else None
    if train is None or test is None:
        n = args.generated or 1000
        if args.generated is None:
            print(f"{name}: bAbI task {args.task} files not found (give --data-dir, $JITNET_DATA or --download); "
                  f"using {n} generated single-supporting-fact stories", flush=True)
        train = BB.generated_babi_stories(n, seed=args.seed)
        test = BB.generated_babi_stories(max(n // 5, 1), seed=args.seed + 10_000)
        source = f"generated task 1 ({n} stories)"
    else:
        source = f"bAbI task {args.task}"
    vocab = BB.BabiVocab.build(train, test)
    tr = BB.encode_stories(train, vocab, args.max_tokens)
    te = BB.encode_stories(test, vocab, args.max_tokens)
    if not tr or not te:
        raise SystemExit(f"{name}: no story of at most {args.max_tokens} tokens")
    T = max(BB.pad_length(tr), BB.pad_length(te))
    model = BabiModel(len(vocab), args.hidden, args.memory_size, args.word_size, args.reads, args.lr,
                      args.optimizer, args.clip, jit=not args.no_jit, fused=not args.composed)
    print(f"{name}: {source}: {len(tr)} train / {len(te)} test stories, vocabulary {len(vocab)}, padded length "
          f"{T}; DNC({model.net.extra_repr()}), {model.net.num_parameters()} parameters", flush=True)
    it = [iter(())]

    def next_batch():
        for _ in range(2):
            try:
                return next(it[0])
            except StopIteration:
                it[0] = BB.babi_batches(tr, vocab, args.batch_size, rng, length=T, drop_last=True)
        raise SystemExit(f"{name}: {len(tr)} training stories is less than one batch of {args.batch_size}")

    def evaluate():
        def padded():
            for x, y, mask in BB.babi_batches(te, vocab, args.batch_size, length=T, shuffle=False):
                k = args.batch_size - len(x)
                if k:
                    x = np.concatenate([x, np.zeros((k,) + x.shape[1:], x.dtype)])
                    y = np.concatenate([y, np.zeros((k,) + y.shape[1:], y.dtype)])
                    mask = np.concatenate([mask, np.zeros((k,) + mask.shape[1:], mask.dtype)])
                yield x, y, mask
        return model.evaluate(padded())

    m = _fit_steps(model, args, name, logdir, next_batch, evaluate)
    if not args.no_plot:
        x, _, _ = next(BB.babi_batches(te[:1], vocab, 1, length=T, shuffle=False))
        with jn.no_grad():
            _, trace = model.net(jn.tensor(x), return_trace=True)
        print(f"{name}: memory plot {plot_memory(trace, os.path.join(logdir, 'memory.png'))}", flush=True)
    return m


def train_dnc_babi(argv=None):
    """``python -m jitnet train dnc-babi``: train on bAbI; return the exit code."""
    run_babi(argv)
    return 0


TRAINERS = {"dnc-copy": train_dnc_copy, "dnc-babi": train_dnc_babi}


jn.cache.protect_module(__name__)    # imported after jitnet: give this module's kernels the self-repairing cache
