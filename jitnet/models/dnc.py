"""The Differentiable Neural Computer (Graves et al., 2016): an LSTM controller with an external memory.

The memory (its equations, the fused step on the CPU and CUDA, the packed state) is
:mod:`jitnet.nn.dnc_memory`; this module holds the model (:class:`DNC`), its tasks (copy, repeat-copy, bAbI)
and their training objectives. The commands ``python -m jitnet train dnc-copy`` / ``dnc-babi`` and the memory
plot are :mod:`jitnet.models.dnc_cli`.

The controller sees [x_t, r_{t-1}]; the output is y_t = W_y [h_t, r_t] + b_y. A training step (forward over
the sequence, loss, backward, gradient clipping, optimizer update) is one ``jitnet.jit`` function with the
time loop as ``jn.scan``: it compiles once for a padded length.
"""
from __future__ import annotations

import numpy as np

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet import ops
from jitnet.compiler.loops import scan
from jitnet.nn.dnc_memory import (EPS, DNCMemory, Interface, MemoryState, allocation_weights,  # noqa: F401
                                  content_weights, cosine_similarity, directional_weights, dnc_memory_backward,
                                  dnc_memory_forward, dnc_memory_step, initial_memory_state, interface_size,
                                  memory_step, oneplus, pack_state, packed_size, read_weights, split_interface,
                                  unpack_state, update_link, update_memory, update_precedence, update_usage,
                                  write_weights)

__all__ = ["EPS", "oneplus", "interface_size", "Interface", "split_interface", "cosine_similarity",
           "content_weights", "allocation_weights", "update_usage", "write_weights", "update_memory",
           "update_link", "update_precedence", "directional_weights", "read_weights", "MemoryState",
           "initial_memory_state", "memory_step", "packed_size", "pack_state", "unpack_state", "dnc_memory_step",
           "dnc_memory_forward", "dnc_memory_backward", "DNC", "copy_batch", "repeat_copy_batch", "bit_errors",
           "CopyModel", "BabiModel"]

# ==============================================================================================================
# The model
# ==============================================================================================================

class DNC(nn.Module):
    """A DNC over batch-first sequences: an LSTM controller of ``hidden_size`` units and an (N, W) memory
    with ``num_reads`` read heads and one write head; ``forward(x (B, T, X)) -> logits (B, T, output_size)``.

    The memory is a :class:`jitnet.nn.DNCMemory`: ``fused=True`` (default) runs each memory step as one
    primitive (a kernel and its gradient kernel, on the CPU or CUDA); ``fused=False`` runs :func:`memory_step`,
    the same equations written with jitnet ops.
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
        self.memory = DNCMemory(self.memory_size, self.word_size, self.num_reads, fused=self.fused)
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
        return ctrl, self.memory.initial_state(batch, self.dtype, dev)

    def unpack(self, mem):
        """Return the :class:`MemoryState` of a memory state as the model carries it (packed when fused)."""
        return self.memory.unpack(mem)

    def _reads(self, mem):
        """Return the flat read vectors (B, R*W) of a carried memory state."""
        return self.memory.reads(mem)

    def _mem_step(self, mem, xi):
        return self.memory(mem, xi)

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
        self.device = None
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

    def to(self, device):
        """Move the network (and so its optimizer's state) to ``device``; batches given as arrays follow it."""
        self.net.to(device)
        self.device = None if jn.device(device).type == "cpu" else jn.device(device)
        return self

    def _tensor(self, b):
        b = b if isinstance(b, jn.Tensor) else jn.tensor(b)
        return b.to(self.device) if self.device is not None and not b.is_cuda else b

    def train_step(self, *batch):
        """Run one optimization step (forward, loss, backward, clipping, update); return the loss before it."""
        return self._step(*[self._tensor(b) for b in batch])

    def logits(self, x):
        """Return the output logits (B, T, Y) for inputs ``x`` (B, T, X) without recording gradients."""
        return self._fwd(self._tensor(x))


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

