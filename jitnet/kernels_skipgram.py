"""Skip-gram word2vec's CPU kernels (Numba): pair generation, the noise-word draw and the Hogwild
negative-sampling SGD of word2vec's C code over chunks of sentences (``sg_ns_train_chunk``).

The data helpers that feed them (vocabulary, subsampling thresholds, the cumulative noise table and its guide)
are in :mod:`jitnet.data.word2vec`; the embeddings and the training loops in :mod:`jitnet.models.skipgram`. The
CUDA form of the training kernel, :mod:`jitnet.kernels_skipgram_gpu`, compiles this file's walk (``_sg_ns_part``,
``_sg_ns_walk``, ``_sg_ns_pair``) for the device, with row updates by atomics.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import cache

__all__ = ["pairs_kernel", "lcg", "draw", "GUIDE_SHIFT", "sg_ns_pair", "sg_ns_sentences", "sg_ns_train_chunk"]


@njit(cache=True, nogil=True)
def _pairs_kernel(ids, bounds, window, shrink, out_c, out_x):
    n = 0
    for s in range(bounds.shape[0] - 1):
        lo, hi = bounds[s], bounds[s + 1]
        for i in range(lo, hi):
            w = window - shrink[i]
            for j in range(max(lo, i - w), min(hi, i + w + 1)):
                if j != i:
                    out_c[n] = ids[i]
                    out_x[n] = ids[j]
                    n += 1
    return n


_LCG_MUL = np.uint64(25214903917)
_LCG_ADD = np.uint64(11)
_LCG_MASK = np.uint64(0xFFFFFFFFFFFF)
_SH16 = np.uint64(16)
_M32 = np.uint64(0xFFFFFFFF)


@njit(cache=True, nogil=True)
def _lcg(r):
    """Return the next state of word2vec's 48-bit linear congruential generator."""
    return (r * _LCG_MUL + _LCG_ADD) & _LCG_MASK


_GUIDE_SHIFT = 15           # guide buckets of 2**15 table units: 2**16 buckets over the 2**31 domain


@njit(cache=True, nogil=True)
def _draw(cum, guide, v):
    """Return the first word i with cum[i] > v (a noise word for the uniform integer v), via the guide."""
    i = guide[v >> _GUIDE_SHIFT]
    while cum[i] <= v:
        i += 1
    return i


# -- the training walk, written once for both targets ------------------------------------------------------------
# _sg_ns_pair, _sg_ns_walk and _sg_ns_part are plain Python bodies compiled here for the CPU;
# kernels_skipgram_gpu compiles the same bodies as CUDA device functions, rebinding the names they call that
# differ between the targets: _add_at (the update of a shared row or counter), _lcg (the simulator's form
# avoids NumPy's overflow warning), _draw, and the walk's own _sg_ns_pair / _sg_ns_walk. The loop over parts
# is the only code of each target: a prange here, a grid-stride loop over threads there.

@njit(cache=True, nogil=True, inline="always")
def _add_at(a, i, v):
    """a[i] += v with no lock: threads race on shared rows and on the word counter (word2vec's Hogwild).

    The CUDA form is an atomic add (threads still read rows being updated, but no update is lost)."""
    a[i] += v


@njit(cache=True, fastmath=True, nogil=True)
def _sg_ns_pair(w_in, w_out, cum, guide, center, ctx, negative, alpha, work, r):
    """One (center, context) pair: the context's input row predicts the center against ``negative`` noise
    words; updates w_out rows and the input row in place; returns the generator state."""
    dim = w_in.shape[1]
    l1 = w_in[ctx]
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
        row = w_out[t]
        f = np.float32(0.0)
        for k in range(dim):
            f += l1[k] * row[k]
        if f > 6.0:
            g = (label - np.float32(1.0)) * alpha
        elif f < -6.0:
            g = label * alpha
        else:
            g = (label - np.float32(1.0) / (np.float32(1.0) + math.exp(-f))) * alpha
        g = np.float32(g)
        for k in range(dim):
            work[k] += g * row[k]
            _add_at(row, k, g * l1[k])
    for k in range(dim):
        _add_at(l1, k, work[k])
    return r


@njit(cache=True, fastmath=True, nogil=True)
def _sg_ns_walk(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0, alpha1,
                pos0, total, done, r, buf, work):
    """Train sentences s_lo..s_hi-1 serially; return (generator state, words kept after subsampling).

    ``buf`` (at least the longest sentence) int32 holds a sentence's kept words, ``work`` (D,) float32 the
    input row's gradient. The learning rate follows the words processed by all threads, pos0 + done[0]
    (word2vec's shared counter, added to after each sentence).
    """
    kept = 0
    for s in range(s_lo, s_hi):
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
            buf[n] = w
            n += 1
        kept += n
        for i in range(n):
            r = _lcg(r)
            b = np.int64((r >> _SH16) % np.uint64(window))
            lo = max(0, i - window + b)
            hi = min(n, i + window + 1 - b)
            for j in range(lo, hi):
                if j != i:
                    r = _sg_ns_pair(w_in, w_out, cum, guide, buf[i], buf[j], negative, alpha32, work, r)
        _add_at(done, 0, bounds[s + 1] - bounds[s])
    return r, kept


@njit(cache=True, fastmath=True, nogil=True)
def _sg_ns_part(p, ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0, alpha1,
                pos0, total, states, kept, done, buf, work):
    """Train part p of sentences s_lo..s_hi-1 cut into states.shape[0] parts: advance states[p], add the words
    kept to kept[p]. ``buf`` and ``work`` are the part's scratch (see :func:`_sg_ns_walk`)."""
    nparts = states.shape[0]
    ns = s_hi - s_lo
    a = s_lo + ns * p // nparts
    b = s_lo + ns * (p + 1) // nparts
    if b > a:
        r, k = _sg_ns_walk(ids, bounds, a, b, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                           alpha1, pos0, total, done, states[p], buf, work)
        states[p] = r
        kept[p] += k


@njit(cache=True, nogil=True)
def _longest(bounds, s_lo, s_hi):
    """Return the length of the longest of sentences s_lo..s_hi-1 (0 for none)."""
    m = 0
    for s in range(s_lo, s_hi):
        m = max(m, bounds[s + 1] - bounds[s])
    return m


@njit(cache=True, fastmath=True, nogil=True)
def _sg_ns_sentences(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                     alpha1, pos0, total, done, r):
    """Train sentences s_lo..s_hi-1 serially; return (generator state, words kept after subsampling).

    :func:`_sg_ns_walk` with its scratch allocated here."""
    buf = np.empty(_longest(bounds, s_lo, s_hi), np.int32)
    work = np.empty(w_in.shape[1], np.float32)
    return _sg_ns_walk(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                       alpha1, pos0, total, done, r, buf, work)


@njit(cache=True, fastmath=True, parallel=True)
def sg_ns_train_chunk(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                      alpha1, pos0, total, states):
    """Train sentences s_lo..s_hi-1 split into len(states) parts run in parallel (Hogwild); return kept words.

    ``pos0`` is the number of words processed before this chunk and ``total`` the number over all epochs:
    the learning rate decays linearly from alpha0 to alpha1 with the words processed. ``cum``/``guide`` are
    the noise table and its guide (:func:`unigram_table`, :func:`noise_guide`); ``sample_int`` the uint32
    keep thresholds. ``states`` holds one generator state per part and is advanced in place.
    """
    nparts = states.shape[0]
    kept = np.zeros(nparts, np.int64)
    done = np.zeros(1, np.int64)
    maxlen = _longest(bounds, s_lo, s_hi)
    dim = w_in.shape[1]
    for p in prange(nparts):
        _sg_ns_part(p, ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                    alpha1, pos0, total, states, kept, done, np.empty(maxlen, np.int32), np.empty(dim, np.float32))
    return kept.sum()



pairs_kernel = _pairs_kernel
lcg = _lcg
draw = _draw
GUIDE_SHIFT = _GUIDE_SHIFT
sg_ns_pair = _sg_ns_pair
sg_ns_sentences = _sg_ns_sentences

cache.protect_module(__name__)    # imported after jitnet: give these kernels the self-repairing cache
