"""Skip-gram word2vec's CUDA kernel: the Hogwild negative-sampling SGD of ``kernels_skipgram.sg_ns_train_chunk``
on device arrays.

The walk is the CPU kernel's own Python bodies (``kernels_skipgram._sg_ns_part``, ``_sg_ns_walk`` and
``_sg_ns_pair``) compiled as CUDA device functions, in the same order and with the same 48-bit generator: a
chunk of sentences is cut into ``states.shape[0]`` parts, and one GPU thread trains one part's sentences
serially (subsampling, dynamic windows, ``negative`` noise words per pair drawn through the guide table). Only
the names those bodies call that differ between the targets are rebound here: where the CPU threads race on
the shared embedding rows and the word counter lock-free, here every such update (``_add_at``) is a
``cuda.atomic.add``: threads still read rows that others are updating (Hogwild), but no update is lost. With
one part the result is the CPU kernel's with one thread (up to float rounding: the CPU kernel is compiled with
fastmath).

Per-thread scratch is passed in (CUDA device code allocates nothing): ``buf`` (parts, longest sentence) int32
for the kept words of a sentence and ``work`` (parts, D) float32 for the input row's gradient. ``kept``
(parts,) int64 accumulates the words kept after subsampling and ``done`` (1,) int64 counts the words of the
chunk processed so far (the learning rate follows it), so nothing is read back per chunk. The launches go to
jitnet's current stream (``cuda_runtime.launch_stream``), like every other kernel's. Imported only when a CUDA
device is first used.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from . import kernels_gpu as KG
from . import kernels_skipgram as KS
from .cuda_runtime import launch_stream

__all__ = ["train_chunk_kernel", "train_chunk", "THREADS_PER_BLOCK"]

THREADS_PER_BLOCK = 64


@cuda.jit(device=True)
def _add_at(a, i, v):
    """a[i] += v, atomically (the CPU form is a plain add: ``kernels_skipgram._add_at``)."""
    cuda.atomic.add(a, i, v)


if KG.SIM:
    # word2vec's generator r -> (r * 25214903917 + 11) mod 2**48 with the product taken in 24-bit halves: the
    # simulator runs the CPU form's uint64 product as NumPy scalars, which warn when it wraps (the result mod
    # 2**48 is the same)
    _MUL = 25214903917
    _MUL_HI = np.uint64(_MUL >> 24)
    _MUL_LO = np.uint64(_MUL & 0xFFFFFF)
    _M24 = np.uint64(0xFFFFFF)
    _S24 = np.uint64(24)

    @cuda.jit(device=True)
    def _lcg(r):
        lo = r & _M24
        hi = r >> _S24
        mid = (hi * _MUL_LO + lo * _MUL_HI) & _M24
        return (lo * _MUL_LO + (mid << _S24) + KS._LCG_ADD) & KS._LCG_MASK
else:
    _lcg = cuda.jit(device=True)(KS._lcg.py_func)

_draw = cuda.jit(device=True)(KS._draw.py_func)


def _device_form(f, **bindings):
    """Return the CUDA device function of the CPU kernel ``f``'s Python body, the names it calls rebound."""
    return cuda.jit(device=True)(KG._rebound(f.py_func, dict(bindings, _add_at=_add_at, _lcg=_lcg, _draw=_draw)))


_pair = _device_form(KS._sg_ns_pair)
_walk = _device_form(KS._sg_ns_walk, _sg_ns_pair=_pair)
_part = _device_form(KS._sg_ns_part, _sg_ns_walk=_walk)


@cuda.jit
def train_chunk_kernel(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                       alpha1, pos0, total, states, kept, done, buf, work):
    """Train sentences s_lo..s_hi-1 cut into states.shape[0] parts, one thread a part (grid-stride)."""
    for p in range(cuda.grid(1), states.shape[0], cuda.gridsize(1)):
        _part(p, ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0, alpha1,
              pos0, total, states, kept, done, buf[p], work[p])


def train_chunk(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0, alpha1,
                pos0, total, states, kept, done, buf, work):
    """Launch :func:`train_chunk_kernel` on device arrays (``done`` is zeroed first) on the current stream;
    returns None.

    ``states`` (parts,) uint64 is advanced and ``kept`` (parts,) int64 accumulated in place; ``buf`` is (parts,
    longest sentence) int32 and ``work`` (parts, D) float32 scratch."""
    nparts = states.shape[0]
    if buf.shape[0] != nparts or work.shape[0] != nparts or kept.shape[0] != nparts:
        raise ValueError(f"skip-gram CUDA kernel: scratch for {buf.shape[0]}/{work.shape[0]} parts and kept for "
                         f"{kept.shape[0]}, expected {nparts} (one per generator state)")
    if work.shape[1] != w_in.shape[1]:
        raise ValueError(f"skip-gram CUDA kernel: work rows of {work.shape[1]}, expected the dimension "
                         f"{w_in.shape[1]}")
    s = launch_stream()
    KG.fill[1, 1, s](done, 0)
    tpb = min(THREADS_PER_BLOCK, nparts)
    train_chunk_kernel[(nparts + tpb - 1) // tpb, tpb, s](
        ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, float(alpha0),
        float(alpha1), pos0, total, states, kept, done, buf, work)
