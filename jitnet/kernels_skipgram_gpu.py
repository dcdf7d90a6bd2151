"""Skip-gram word2vec's CUDA kernel: the Hogwild negative-sampling SGD of ``kernels_skipgram.sg_ns_train_chunk``
on device arrays.

The same walk as the CPU kernel, in the same order and with the same 48-bit generator: a chunk of sentences
is cut into ``states.shape[0]`` parts, and one GPU thread trains one part's sentences serially (subsampling,
dynamic windows, ``negative`` noise words per pair drawn through the guide table). Where the CPU threads race
on the shared embedding rows lock-free, here every update of a row (the output rows of the target and noise
words, the context's input row) is a ``cuda.atomic.add``: threads still read rows that others are updating
(Hogwild), but no update is lost. With one part the result is the CPU kernel's with one thread (up to float
rounding: the CPU kernel is compiled with fastmath).

Per-thread scratch is passed in (CUDA device code allocates nothing): ``buf`` (parts, longest sentence) int32
for the kept words of a sentence and ``work`` (parts, D) float32 for the input row's gradient. ``kept``
(parts,) int64 accumulates the words kept after subsampling and ``done`` (1,) int64 counts the words of the
chunk processed so far (the learning rate follows it), so nothing is read back per chunk. Imported only when a
CUDA device is first used.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import kernels_skipgram as KS

__all__ = ["train_chunk_kernel", "zero_kernel", "train_chunk", "THREADS_PER_BLOCK"]

THREADS_PER_BLOCK = 64

# word2vec's generator r -> (r * 25214903917 + 11) mod 2**48, with the product taken in 24-bit halves so that
# no intermediate exceeds 64 bits (the CPU kernel's uint64 product wraps; the result mod 2**48 is the same)
_MUL = 25214903917
_MUL_HI = np.uint64(_MUL >> 24)
_MUL_LO = np.uint64(_MUL & 0xFFFFFF)
_M24 = np.uint64(0xFFFFFF)
_S24 = np.uint64(24)
_ADD = np.uint64(11)
_MASK = np.uint64(0xFFFFFFFFFFFF)
_SH16 = np.uint64(16)
_M32 = np.uint64(0xFFFFFFFF)


@cuda.jit(device=True)
def _lcg(r):
    lo = r & _M24
    hi = r >> _S24
    mid = (hi * _MUL_LO + lo * _MUL_HI) & _M24
    return (lo * _MUL_LO + (mid << _S24) + _ADD) & _MASK


_draw = cuda.jit(device=True)(KS._draw.py_func)      # the CPU kernels' noise draw, compiled for the device


@cuda.jit(device=True)
def _pair(w_in, w_out, cum, guide, center, ctx, negative, alpha, work, r):
    """One (center, context) pair, as ``kernels_skipgram._sg_ns_pair`` with atomic row updates."""
    dim = w_in.shape[1]
    for k in range(dim):
        work[k] = 0.0
    top = np.uint64(cum[cum.shape[0] - 1])
    for d in range(negative + 1):
        if d == 0:
            t = np.int64(center)
            label = np.float32(1.0)
        else:
            r = _lcg(r)
            t = np.int64(_draw(cum, guide, np.int64((r >> _SH16) % top)))
            if t == center:
                continue
            label = np.float32(0.0)
        f = np.float32(0.0)
        for k in range(dim):
            f += w_in[ctx, k] * w_out[t, k]
        if f > 6.0:
            g = (label - np.float32(1.0)) * alpha
        elif f < -6.0:
            g = label * alpha
        else:
            g = (label - np.float32(1.0) / (np.float32(1.0) + math.exp(-f))) * alpha
        g = np.float32(g)
        for k in range(dim):
            work[k] += g * w_out[t, k]
            cuda.atomic.add(w_out, (t, k), g * w_in[ctx, k])
    for k in range(dim):
        cuda.atomic.add(w_in, (ctx, k), work[k])
    return r


@cuda.jit
def train_chunk_kernel(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                       alpha1, pos0, total, states, kept, done, buf, work):
    """Train sentences s_lo..s_hi-1 cut into states.shape[0] parts, one thread a part (grid-stride)."""
    nparts = states.shape[0]
    ns = s_hi - s_lo
    for p in range(cuda.grid(1), nparts, cuda.gridsize(1)):
        a = s_lo + ns * p // nparts
        b = s_lo + ns * (p + 1) // nparts
        if b <= a:
            continue
        r = states[p]
        bp = buf[p]
        wp = work[p]
        nkept = 0
        for s in range(a, b):
            alpha = alpha0 - (alpha0 - alpha1) * (pos0 + done[0]) / total
            if alpha < alpha1:
                alpha = alpha1
            alpha32 = np.float32(alpha)
            n = 0
            for i in range(bounds[s], bounds[s + 1]):
                w = ids[i]
                r = _lcg(r)
                if np.uint64(sample_int[w]) < (r >> _SH16) & _M32:
                    continue
                bp[n] = w
                n += 1
            nkept += n
            for i in range(n):
                r = _lcg(r)
                sh = np.int64((r >> _SH16) % np.uint64(window))
                lo = max(0, i - window + sh)
                hi = min(n, i + window + 1 - sh)
                for j in range(lo, hi):
                    if j != i:
                        r = _pair(w_in, w_out, cum, guide, bp[i], bp[j], negative, alpha32, wp, r)
            cuda.atomic.add(done, 0, bounds[s + 1] - bounds[s])
        states[p] = r
        kept[p] += nkept


@cuda.jit
def zero_kernel(a):
    """Set every element of the 1-D device array ``a`` to zero."""
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] = 0


def train_chunk(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0, alpha1,
                pos0, total, states, kept, done, buf, work):
    """Launch :func:`train_chunk_kernel` on device arrays (``done`` is zeroed first); returns None.

    ``states`` (parts,) uint64 is advanced and ``kept`` (parts,) int64 accumulated in place; ``buf`` is (parts,
    longest sentence) int32 and ``work`` (parts, D) float32 scratch."""
    nparts = states.shape[0]
    if buf.shape[0] != nparts or work.shape[0] != nparts or kept.shape[0] != nparts:
        raise ValueError(f"skip-gram CUDA kernel: scratch for {buf.shape[0]}/{work.shape[0]} parts and kept for "
                         f"{kept.shape[0]}, expected {nparts} (one per generator state)")
    if work.shape[1] != w_in.shape[1]:
        raise ValueError(f"skip-gram CUDA kernel: work rows of {work.shape[1]}, expected the dimension "
                         f"{w_in.shape[1]}")
    zero_kernel[1, 1](done)
    tpb = min(THREADS_PER_BLOCK, nparts)
    train_chunk_kernel[(nparts + tpb - 1) // tpb, tpb](
        ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, float(alpha0),
        float(alpha1), pos0, total, states, kept, done, buf, work)
