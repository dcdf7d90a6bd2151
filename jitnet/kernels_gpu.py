"""CUDA kernels of jitnet's primitives (``numba.cuda``), and the scalar helpers generated kernels call.

Imported only when a CUDA device is first used (``jitnet.cuda.require``): importing jitnet never imports
``numba.cuda``. Every kernel is a plain module-level ``@cuda.jit`` function over device arrays and scalars:

* launches are computed from sizes (:func:`grid`): ``BLOCK`` threads per block (256 on a GPU), at most
  ``MAX_BLOCKS`` blocks, and every kernel walks its work with a grid-stride loop, so any size runs on any grid;
* reductions are shared-memory tree reductions (no warp shuffles: Numba's simulator runs them too), with a
  ``cuda.syncthreads()`` between every write and read of shared memory;
* scatters with possible duplicate targets use ``cuda.atomic.add``;
* a kernel that meets a bad index cannot raise: it records the first one in the error record of
  :mod:`jitnet.cuda` (a compare-and-swap on its first slot) and writes zero; the next synchronizing call raises.

In Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) each thread is a Python thread, so block and tile sizes
are small there (``BLOCK=16``): every kernel is written for any power-of-two block size. The sizes are
constants of this file on purpose: kernels are compiled with ``cache=True`` and Numba's cache key does not
see global values, but it does see an edit of the file.
"""
from __future__ import annotations

import math
import types

import numpy as np
from numba import cuda
from numba.core import config

from . import kernels_scalar as KS

SIM = bool(config.ENABLE_CUDASIM)
#: files whose helpers these kernels inline (jitnet.cache ties the cached kernels to them too)
_CACHE_DEPENDS = ("kernels_scalar.py",)


#: threads per block of 1-D kernels (a power of two: the tree reductions halve it)
BLOCK = 16 if SIM else 256
#: the grid never has more blocks than this; grid-stride loops cover the rest
MAX_BLOCKS = 2 if SIM else 16384
#: elements of one row that one block reduces before a second pass combines the partial results
ROW_CHUNK = BLOCK * (4 if SIM else 32)
#: rows one thread sums in a column reduction before a second pass
COL_CHUNK = 4 if SIM else 64
#: rows of at most this length are handled one thread per row (softmax family, arg-reductions)
SMALL_ROW = 8 if SIM else 32
#: matmul tiles: a block computes a BM x BN tile of C in BK-deep steps, each thread a TM x TN sub-tile
MM_BM, MM_BN, MM_BK, MM_TM, MM_TN = (8, 8, 4, 2, 2) if SIM else (64, 64, 16, 4, 4)
MM_BMP = MM_BM + 1              # A's tile is stored transposed with one padding column (no bank conflicts)
MM_TR = MM_BM // MM_TM          # thread rows of a tile
MM_TC = MM_BN // MM_TN          # thread columns of a tile
MM_THREADS = MM_TR * MM_TC
#: large tiles for big products (at least MB_MIN_OUTPUTS outputs per matrix): 8 x 8 outputs per thread, so each
#: pair of shared-memory loads feeds 4 multiply-adds instead of 2
MB_BM, MB_BN, MB_BK, MB_TM, MB_TN = (16, 16, 4, 4, 4) if SIM else (128, 128, 8, 8, 8)
MB_BMP = MB_BM + 1
MB_TR = MB_BM // MB_TM
MB_TC = MB_BN // MB_TN
MB_THREADS = MB_TR * MB_TC
MB_MIN_OUTPUTS = 256 if SIM else 1 << 20

_U64 = np.uint64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S40 = np.uint64(40)
_TWO53 = 1.0 / 9007199254740992.0
_TWO24 = 1.0 / 16777216.0


def grid(n, block=None):
    """Return the number of blocks for ``n`` work items (at least 1, at most MAX_BLOCKS)."""
    b = block or BLOCK
    return max(1, min((int(n) + b - 1) // b, MAX_BLOCKS))


# ==============================================================================================================
# Scalar helpers (the elementwise templates call these by name; kernelgen_cuda imports them)
# ==============================================================================================================
# On a GPU math.exp / math.floor / math.fmod follow IEEE semantics (inf, NaN). The simulator runs the same
# code as Python, whose math functions raise on inf and NaN instead: there the helpers guard those inputs and
# return what the GPU returns.

if SIM:
    @cuda.jit(device=True)
    def fexp(x):
        """Return exp(x) (IEEE: exp(inf) = inf, exp(nan) = nan)."""
        if x != x:
            return x
        if x > 709.0:
            return math.inf
        return math.exp(x)

    @cuda.jit(device=True)
    def floor_s(x):
        """Return floor(x) as a float (NaN and inf unchanged)."""
        if x != x or x == math.inf or x == -math.inf:
            return x
        return math.floor(x)

    @cuda.jit(device=True)
    def ceil_s(x):
        """Return ceil(x) as a float (NaN and inf unchanged)."""
        if x != x or x == math.inf or x == -math.inf:
            return x
        return math.ceil(x)

    @cuda.jit(device=True)
    def fmod_raw(a, b):
        """Return C's fmod(a, b) (NaN when b is 0 or a is infinite)."""
        if b == 0 or a != a or b != b or a == math.inf or a == -math.inf:
            return math.nan
        return math.fmod(a, b)

    @cuda.jit(device=True)
    def sin_s(x):
        """Return sin(x) (NaN for infinite x)."""
        if x != x or x == math.inf or x == -math.inf:
            return math.nan
        return math.sin(x)

    @cuda.jit(device=True)
    def cos_s(x):
        """Return cos(x) (NaN for infinite x)."""
        if x != x or x == math.inf or x == -math.inf:
            return math.nan
        return math.cos(x)
else:
    @cuda.jit(device=True)
    def fexp(x):
        """Return exp(x)."""
        return math.exp(x)

    @cuda.jit(device=True)
    def floor_s(x):
        """Return floor(x) as a float."""
        return math.floor(x)

    @cuda.jit(device=True)
    def ceil_s(x):
        """Return ceil(x) as a float."""
        return math.ceil(x)

    @cuda.jit(device=True)
    def fmod_raw(a, b):
        """Return C's fmod(a, b)."""
        return math.fmod(a, b)

    @cuda.jit(device=True)
    def sin_s(x):
        """Return sin(x)."""
        return math.sin(x)

    @cuda.jit(device=True)
    def cos_s(x):
        """Return cos(x)."""
        return math.cos(x)


def _rebound(py, bindings, name=None):
    """Return a copy of Python function ``py`` whose global names ``bindings`` resolve to other objects.

    Numba reads a function's globals when it compiles it, so the copy compiles the same body against these
    bindings (the GPU forms of helpers, a kernel's tile constants). A new ``name`` is also its qualname: Numba
    names cache files by qualname, so two kernels from one body keep separate files."""
    env = dict(py.__globals__)
    env.update(bindings)
    f = types.FunctionType(py.__code__, env, name or py.__name__, py.__defaults__, py.__closure__)
    if name:
        f.__qualname__ = name
    f.__doc__ = py.__doc__
    return f


def device_form(f):
    """Return the CUDA device function of the shared helper ``f`` (a name of ``kernels_scalar.SHARED``).

    The Python body written once in kernels_scalar is compiled again for CUDA, its calls to ``fexp``,
    ``floor_s``, ``fmod_raw`` and to other shared helpers bound to this module's device functions."""
    names = ("fexp", "floor_s", "ceil_s", "fmod_raw", "sin_s", "cos_s") + tuple(KS.SHARED)
    return cuda.jit(device=True)(_rebound(KS.SHARED[f], {k: globals()[k] for k in names if k in globals()}))


sigmoid_s = device_form("sigmoid_s")
softplus_s = device_form("softplus_s")
sign_s = device_form("sign_s")
maximum_s = device_form("maximum_s")
minimum_s = device_form("minimum_s")
combine_s = device_form("combine_s")      # op 0 sum, 1 product, 2 max, 3 min (NaN wins)
floordiv_s = device_form("floordiv_s")
ifloordiv_s = device_form("ifloordiv_s")
imod_s = device_form("imod_s")
fmod_s = device_form("fmod_s")
sgd_elem = device_form("sgd_elem")
adagrad_elem = device_form("adagrad_elem")
rmsprop_elem = device_form("rmsprop_elem")
adam_elem = device_form("adam_elem")
adamw_elem = device_form("adamw_elem")


@cuda.jit(device=True)
def _report(err, code, value, bound, opid, pos):
    """Record an error (the first one wins: compare-and-swap on err[0]); pos: flat position of the bad value."""
    if cuda.atomic.compare_and_swap(err, 0, code) == 0:
        err[1] = value
        err[2] = bound
        err[3] = opid
        err[4] = pos


@cuda.jit(device=True)
def _fix_index(v, n, wrap, pos, err, opid):
    """Return index v in [0, n) (with ``wrap``, a negative v counts from the end); report it (at flat position
    ``pos``) and return -1 if out of range."""
    w = v + n if wrap and v < 0 else v
    if w < 0 or w >= n:
        _report(err, 1, v, n, opid, pos)
        return -1
    return w


# ==============================================================================================================
# Fill, ranges, strided gather/scatter (views with any strides, negative ones included)
# ==============================================================================================================

@cuda.jit(cache=True)
def fill(out, value):
    """out[i] = value for a flat out."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < out.shape[0]:
        out[i] = value
        i += step


@cuda.jit(cache=True)
def arange_fill(out, start, step_value):
    """out[i] = start + i * step_value."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < out.shape[0]:
        out[i] = start + i * step_value
        i += step


@cuda.jit(cache=True)
def eye_fill(out, k):
    """out[i, j] = 1 where j == i + k, else 0 (out 2-D)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    m = out.shape[1]
    n = out.shape[0] * m
    while i < n:
        r = i // m
        c = i - r * m
        out[r, c] = 1 if c == r + k else 0
        i += step


@cuda.jit(cache=True)
def gather_strided(src, offset, shape, strides, out):
    """out[flat i] = src[offset + sum(idx_k * strides[k])] over the C-order multi-index of ``shape``.

    ``src`` is the flat buffer a view lives in; ``strides`` are in elements and may be negative or zero.
    """
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nd = len(shape)
    while i < out.shape[0]:
        q = i
        pos = offset
        for kk in range(nd):
            k = nd - 1 - kk
            d = shape[k]
            c = q % d
            q = q // d
            pos += c * strides[k]
        out[i] = src[pos]
        i += step


@cuda.jit(cache=True)
def scatter_strided(src, dst, offset, shape, strides):
    """dst[offset + sum(idx_k * strides[k])] = src[flat i] (the inverse of ``gather_strided``; no duplicates)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nd = len(shape)
    while i < src.shape[0]:
        q = i
        pos = offset
        for kk in range(nd):
            k = nd - 1 - kk
            d = shape[k]
            c = q % d
            q = q // d
            pos += c * strides[k]
        dst[pos] = src[i]
        i += step


# ==============================================================================================================
# Reductions: rows (m, n) over the last axis, columns (n, m) over the first. op: 0 sum, 1 prod, 2 max, 3 min
# ==============================================================================================================

@cuda.jit(cache=True)
def reduce_rows(x, out, op, ident, chunk):
    """out[r, c] = reduction of x[r, c*chunk:(c+1)*chunk]; one block per (row, chunk) task, tree in shared memory."""
    sm = cuda.shared.array(BLOCK, dtype=x.dtype)
    t = cuda.threadIdx.x
    m = x.shape[0]
    n = x.shape[1]
    nch = out.shape[1]
    task = cuda.blockIdx.x
    while task < m * nch:
        r = task // nch
        c = task - r * nch
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = ident
        j = lo + t
        while j < hi:
            acc = combine_s(acc, x[r, j], op)
            j += BLOCK
        sm[t] = acc
        cuda.syncthreads()
        s = BLOCK // 2
        while s > 0:
            if t < s:
                sm[t] = combine_s(sm[t], sm[t + s], op)
            cuda.syncthreads()
            s //= 2
        if t == 0:
            out[r, c] = sm[0]
        cuda.syncthreads()          # sm is rewritten by the next task
        task += cuda.gridDim.x


@cuda.jit(cache=True)
def reduce_cols(x, out, op, ident, chunk):
    """out[c, j] = reduction of x[c*chunk:(c+1)*chunk, j]: one thread per (chunk, column), coalesced reads."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.shape[0]
    m = x.shape[1]
    nch = out.shape[0]
    while i < nch * m:
        c = i // m
        j = i - c * m
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = ident
        for r in range(lo, hi):
            acc = combine_s(acc, x[r, j], op)
        out[c, j] = acc
        i += step


@cuda.jit(device=True)
def _arg_better(v, i, bv, bi, is_max):
    """True when (v, i) beats (bv, bi): NaN first, then larger (smaller) value, then smaller index."""
    if bi < 0:
        return True
    if v != v:
        return bv == bv or i < bi
    if bv != bv:
        return False
    if v == bv:
        return i < bi
    return v > bv if is_max else v < bv


@cuda.jit(cache=True)
def argreduce_rows(x, out, is_max):
    """out[r] = index of the first max (min) of row r, NaN first; one block per row."""
    sv = cuda.shared.array(BLOCK, dtype=x.dtype)
    si = cuda.shared.array(BLOCK, dtype=np.int64)
    t = cuda.threadIdx.x
    m = x.shape[0]
    n = x.shape[1]
    r = cuda.blockIdx.x
    while r < m:
        bv = x[r, 0]
        bi = -1
        j = t
        while j < n:
            v = x[r, j]
            if _arg_better(v, j, bv, bi, is_max):
                bv = v
                bi = j
            j += BLOCK
        sv[t] = bv
        si[t] = bi
        cuda.syncthreads()
        s = BLOCK // 2
        while s > 0:
            if t < s:
                oi = si[t + s]
                if oi >= 0 and _arg_better(sv[t + s], oi, sv[t], si[t], is_max):
                    sv[t] = sv[t + s]
                    si[t] = oi
            cuda.syncthreads()
            s //= 2
        if t == 0:
            out[r] = si[0]
        cuda.syncthreads()
        r += cuda.gridDim.x


@cuda.jit(cache=True)
def argreduce_rows_small(x, out, is_max):
    """out[r] = index of the first max (min) of row r; one thread per (short) row."""
    r = cuda.grid(1)
    step = cuda.gridsize(1)
    while r < x.shape[0]:
        bv = x[r, 0]
        bi = 0
        for j in range(1, x.shape[1]):
            v = x[r, j]
            if _arg_better(v, j, bv, bi, is_max):
                bv = v
                bi = j
        out[r] = bi
        r += step


# ==============================================================================================================
# Softmax family over the rows of (m, n): block-per-row kernels (three tree reductions) and thread-per-row ones
# ==============================================================================================================

@cuda.jit(device=True)
def _block_max(sm, t, v):
    """Return the max of v over the block (NaN wins) through shared array sm; every thread gets it."""
    sm[t] = v
    cuda.syncthreads()
    s = BLOCK // 2
    while s > 0:
        if t < s:
            sm[t] = maximum_s(sm[t], sm[t + s])
        cuda.syncthreads()
        s //= 2
    r = sm[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _block_sum(sm, t, v):
    """Return the sum of v over the block through shared array sm; every thread gets it."""
    sm[t] = v
    cuda.syncthreads()
    s = BLOCK // 2
    while s > 0:
        if t < s:
            sm[t] += sm[t + s]
        cuda.syncthreads()
        s //= 2
    r = sm[0]
    cuda.syncthreads()
    return r


@cuda.jit(cache=True)
def softmax_rows(x, out, mode):
    """out = softmax (mode 0) or log_softmax (mode 1) of each row of x; one block per row."""
    sm = cuda.shared.array(BLOCK, dtype=x.dtype)
    t = cuda.threadIdx.x
    m = x.shape[0]
    n = x.shape[1]
    r = cuda.blockIdx.x
    while r < m:
        mx = x[r, 0]
        j = t
        while j < n:
            mx = maximum_s(mx, x[r, j])
            j += BLOCK
        mx = _block_max(sm, t, mx)
        s = mx - mx                 # 0, or NaN for an infinite or NaN max (the row's softmax is NaN then)
        j = t
        while j < n:
            s += fexp(x[r, j] - mx)
            j += BLOCK
        s = _block_sum(sm, t, s)
        if mode == 0:
            inv = (s * 0 + 1) / s
            j = t
            while j < n:
                out[r, j] = fexp(x[r, j] - mx) * inv
                j += BLOCK
        else:
            ls = mx + math.log(s)
            j = t
            while j < n:
                out[r, j] = x[r, j] - ls
                j += BLOCK
        r += cuda.gridDim.x


@cuda.jit(cache=True)
def softmax_rows_small(x, out, mode):
    """``softmax_rows`` with one thread per (short) row."""
    r = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.shape[1]
    while r < x.shape[0]:
        mx = x[r, 0]
        for j in range(1, n):
            mx = maximum_s(mx, x[r, j])
        s = mx - mx
        for j in range(n):
            s += fexp(x[r, j] - mx)
        if mode == 0:
            inv = (s * 0 + 1) / s
            for j in range(n):
                out[r, j] = fexp(x[r, j] - mx) * inv
        else:
            ls = mx + math.log(s)
            for j in range(n):
                out[r, j] = x[r, j] - ls
        r += step


@cuda.jit(device=True)
def _lse_finish(mx, s):
    """Return logsumexp from the row max and sum(exp(x - max)); an infinite or NaN max is the answer itself."""
    if mx != mx or mx == math.inf or mx == -math.inf:
        return mx
    return mx + math.log(s)


@cuda.jit(cache=True)
def logsumexp_rows(x, out):
    """out[r] = log(sum(exp(x[r]))), stable; one block per row."""
    sm = cuda.shared.array(BLOCK, dtype=x.dtype)
    t = cuda.threadIdx.x
    m = x.shape[0]
    n = x.shape[1]
    r = cuda.blockIdx.x
    while r < m:
        mx = x[r, 0]
        j = t
        while j < n:
            mx = maximum_s(mx, x[r, j])
            j += BLOCK
        mx = _block_max(sm, t, mx)
        s = mx * 0
        if mx == mx and mx != math.inf and mx != -math.inf:
            j = t
            while j < n:
                s += fexp(x[r, j] - mx)
                j += BLOCK
        s = _block_sum(sm, t, s)
        if t == 0:
            out[r] = _lse_finish(mx, s)
        r += cuda.gridDim.x


@cuda.jit(device=True)
def _row_lse(x, r):
    """Return logsumexp of row r of x (sequential: thread-per-row kernels)."""
    n = x.shape[1]
    mx = x[r, 0]
    for j in range(1, n):
        mx = maximum_s(mx, x[r, j])
    s = mx * 0
    if mx == mx and mx != math.inf and mx != -math.inf:
        for j in range(n):
            s += fexp(x[r, j] - mx)
    return _lse_finish(mx, s)


@cuda.jit(device=True)
def _block_row_lse(x, r, sm, t):
    """Return logsumexp of row r of x computed by the whole block (every thread gets it)."""
    n = x.shape[1]
    mx = x[r, 0]
    j = t
    while j < n:
        mx = maximum_s(mx, x[r, j])
        j += BLOCK
    mx = _block_max(sm, t, mx)
    s = mx * 0
    if mx == mx and mx != math.inf and mx != -math.inf:
        j = t
        while j < n:
            s += fexp(x[r, j] - mx)
            j += BLOCK
    s = _block_sum(sm, t, s)
    return _lse_finish(mx, s)


@cuda.jit(cache=True)
def logsumexp_rows_small(x, out):
    """``logsumexp_rows`` with one thread per (short) row."""
    r = cuda.grid(1)
    step = cuda.gridsize(1)
    while r < x.shape[0]:
        out[r] = _row_lse(x, r)
        r += step


# -- cross entropy (integer labels: a negative label is ignored; a label >= n is reported) ---------------------

@cuda.jit(cache=True)
def xent_int_rows(x, labels, out, err, opid):
    """out[r] = logsumexp(x[r]) - x[r, labels[r]] (0 for a negative label); one block per row."""
    sm = cuda.shared.array(BLOCK, dtype=x.dtype)
    t = cuda.threadIdx.x
    n = x.shape[1]
    r = cuda.blockIdx.x
    while r < x.shape[0]:
        lse = _block_row_lse(x, r, sm, t)
        if t == 0:
            lab = labels[r]
            if lab < 0:
                out[r] = 0
            elif lab >= n:
                _report(err, 1, lab, n, opid, r)
                out[r] = math.nan
            else:
                out[r] = lse - x[r, lab]
        r += cuda.gridDim.x


@cuda.jit(cache=True)
def xent_int_rows_small(x, labels, out, err, opid):
    """``xent_int_rows`` with one thread per (short) row."""
    r = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.shape[1]
    while r < x.shape[0]:
        lab = labels[r]
        if lab < 0:
            out[r] = 0
        elif lab >= n:
            _report(err, 1, lab, n, opid, r)
            out[r] = math.nan
        else:
            out[r] = _row_lse(x, r) - x[r, lab]
        r += step


@cuda.jit(cache=True)
def labelled_rows_reduce(rows, labels, mean, out):
    """out[0] = the float64 sum of rows (mean: divided by the count of labels >= 0; 0 when every label is
    negative, NaN for no rows): the reduced cross entropy's second pass (its rows are 0 where the label is
    negative). One block (``launch_rows`` over one row)."""
    sm = cuda.shared.array(BLOCK, dtype=np.float64)
    t = cuda.threadIdx.x
    s = 0.0
    c = 0.0
    i = t
    while i < rows.shape[0]:
        if labels[i] >= 0:
            s += rows[i]
            c += 1.0
        i += BLOCK
    s = _block_sum(sm, t, s)
    c = _block_sum(sm, t, c)
    if t == 0:
        if not mean:
            out[0] = s
        elif c > 0:
            out[0] = s / c
        elif rows.shape[0] > 0:
            out[0] = 0
        else:
            out[0] = math.nan


@cuda.jit(cache=True)
def labelled_rows_scale(labels, g, mean, out):
    """out[r] = g[0] (mean: divided by max(count of labels >= 0, 1)) for every row: the per-row weight of the
    reduced cross entropy's gradient (rows with a negative label get zeros from the gradient kernel). One
    block."""
    sm = cuda.shared.array(BLOCK, dtype=np.float64)
    t = cuda.threadIdx.x
    c = 0.0
    i = t
    while i < labels.shape[0]:
        if labels[i] >= 0:
            c += 1.0
        i += BLOCK
    c = _block_sum(sm, t, c)
    v = g[0] / max(c, 1.0) if mean else g[0] * 1.0
    i = t
    while i < out.shape[0]:
        out[i] = v
        i += BLOCK


@cuda.jit(cache=True)
def xent_int_grad_rows(x, labels, g, out, err, opid):
    """out[r] = g[r] * (softmax(x[r]) - onehot(labels[r])) (zeros for a negative label, a report for one >= n);
    one block per row."""
    sm = cuda.shared.array(BLOCK, dtype=x.dtype)
    t = cuda.threadIdx.x
    n = x.shape[1]
    r = cuda.blockIdx.x
    while r < x.shape[0]:
        lse = _block_row_lse(x, r, sm, t)
        lab = labels[r]
        gi = g[r]
        if t == 0 and lab >= n:
            _report(err, 1, lab, n, opid, r)
        j = t
        while j < n:
            if lab < 0 or lab >= n:
                out[r, j] = 0
            else:
                v = gi * fexp(x[r, j] - lse)
                out[r, j] = v - gi if j == lab else v
            j += BLOCK
        r += cuda.gridDim.x


@cuda.jit(cache=True)
def xent_int_grad_rows_small(x, labels, g, out, err, opid):
    """``xent_int_grad_rows`` with one thread per (short) row."""
    r = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.shape[1]
    while r < x.shape[0]:
        lab = labels[r]
        if lab >= n:
            _report(err, 1, lab, n, opid, r)
        if lab < 0 or lab >= n:
            for j in range(n):
                out[r, j] = 0
        else:
            lse = _row_lse(x, r)
            gi = g[r]
            for j in range(n):
                v = gi * fexp(x[r, j] - lse)
                out[r, j] = v - gi if j == lab else v
        r += step


@cuda.jit(cache=True)
def xent_prob_rows(x, p, out):
    """out[r] = sum_j p[r, j] * (logsumexp(x[r]) - x[r, j]); one block per row."""
    sm = cuda.shared.array(BLOCK, dtype=x.dtype)
    t = cuda.threadIdx.x
    n = x.shape[1]
    r = cuda.blockIdx.x
    while r < x.shape[0]:
        lse = _block_row_lse(x, r, sm, t)
        s = lse * 0
        j = t
        while j < n:
            pj = p[r, j]
            if pj != 0:
                s += pj * (lse - x[r, j])
            j += BLOCK
        s = _block_sum(sm, t, s)
        if t == 0:
            out[r] = s
        r += cuda.gridDim.x


@cuda.jit(cache=True)
def xent_prob_rows_small(x, p, out):
    """``xent_prob_rows`` with one thread per (short) row."""
    r = cuda.grid(1)
    step = cuda.gridsize(1)
    while r < x.shape[0]:
        lse = _row_lse(x, r)
        s = lse * 0
        for j in range(x.shape[1]):
            pj = p[r, j]
            if pj != 0:
                s += pj * (lse - x[r, j])
        out[r] = s
        r += step


@cuda.jit(cache=True)
def xent_prob_grad_rows(x, p, g, out):
    """out[r] = g[r] * (softmax(x[r]) * sum(p[r]) - p[r]); one block per row."""
    sm = cuda.shared.array(BLOCK, dtype=x.dtype)
    t = cuda.threadIdx.x
    n = x.shape[1]
    r = cuda.blockIdx.x
    while r < x.shape[0]:
        lse = _block_row_lse(x, r, sm, t)
        sp = p[r, 0] * 0
        j = t
        while j < n:
            sp += p[r, j]
            j += BLOCK
        sp = _block_sum(sm, t, sp)
        gi = g[r]
        j = t
        while j < n:
            out[r, j] = gi * (fexp(x[r, j] - lse) * sp - p[r, j])
            j += BLOCK
        r += cuda.gridDim.x


@cuda.jit(cache=True)
def xent_prob_grad_rows_small(x, p, g, out):
    """``xent_prob_grad_rows`` with one thread per (short) row."""
    r = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.shape[1]
    while r < x.shape[0]:
        lse = _row_lse(x, r)
        sp = p[r, 0] * 0
        for j in range(n):
            sp += p[r, j]
        gi = g[r]
        for j in range(n):
            out[r, j] = gi * (fexp(x[r, j] - lse) * sp - p[r, j])
        r += step


# ==============================================================================================================
# Matmul: c[b] = a[b] @ b[b] for (batch, M, K) @ (batch, K, N), any strides (transposed views need no copy)
# ==============================================================================================================

def _matmul_tiles(a, b, c, zero):
    """Tiled shared-memory matmul with a TM x TN register tile per thread (blocks of T_THREADS threads).

    The tile sizes ``T_*`` are not globals of this module: :func:`_tiled` compiles this body once per tile
    set (``MM_*`` and ``MB_*``), binding them as the constants of that kernel.

    Grid: (ceil(N / BN), ceil(M / BM), batches); a block loops over batches with a grid stride in z. Tiles
    of A (BM x BK) and B (BK x BN) are staged in shared memory, zero-padded at the edges; A's tile is stored
    transposed with one column of padding so that the staging writes do not conflict on shared-memory banks.
    Each thread owns rows ``tr + T_TR * i`` and columns ``tc + T_TC * j`` of the tile, so a warp reads
    consecutive words of B's tile and writes consecutive columns of C.
    """
    As = cuda.shared.array((T_BK, T_BMP), dtype=c.dtype)
    Bs = cuda.shared.array((T_BK, T_BN), dtype=c.dtype)
    acc = cuda.local.array((T_TM, T_TN), dtype=c.dtype)
    ra = cuda.local.array(T_TM, dtype=c.dtype)
    rb = cuda.local.array(T_TN, dtype=c.dtype)
    tid = cuda.threadIdx.x
    tr = tid // T_TC
    tc = tid - tr * T_TC
    M = c.shape[1]
    N = c.shape[2]
    K = a.shape[2]
    row0 = cuda.blockIdx.y * T_BM
    col0 = cuda.blockIdx.x * T_BN
    bz = cuda.blockIdx.z
    while bz < c.shape[0]:
        for i in range(T_TM):
            for j in range(T_TN):
                acc[i, j] = zero
        for k0 in range(0, K, T_BK):
            e = tid
            while e < T_BM * T_BK:
                rr = e // T_BK
                kk = e - rr * T_BK
                gr = row0 + rr
                gk = k0 + kk
                As[kk, rr] = a[bz, gr, gk] if (gr < M and gk < K) else zero
                e += T_THREADS
            e = tid
            while e < T_BK * T_BN:
                kk = e // T_BN
                cc = e - kk * T_BN
                gk = k0 + kk
                gc = col0 + cc
                Bs[kk, cc] = b[bz, gk, gc] if (gk < K and gc < N) else zero
                e += T_THREADS
            cuda.syncthreads()
            for kk in range(T_BK):
                for i in range(T_TM):
                    ra[i] = As[kk, tr + T_TR * i]
                for j in range(T_TN):
                    rb[j] = Bs[kk, tc + T_TC * j]
                for i in range(T_TM):
                    for j in range(T_TN):
                        acc[i, j] += ra[i] * rb[j]
            cuda.syncthreads()
        for i in range(T_TM):
            gr = row0 + tr + T_TR * i
            if gr < M:
                for j in range(T_TN):
                    gc = col0 + tc + T_TC * j
                    if gc < N:
                        c[bz, gr, gc] = acc[i, j]
        bz += cuda.gridDim.z


def _tiled(name, p):
    """Compile :func:`_matmul_tiles` as the CUDA kernel ``name`` with the tile constants named ``p + "_*"``."""
    tiles = ("BM", "BN", "BK", "BMP", "TM", "TN", "TR", "TC", "THREADS")
    return cuda.jit(cache=True)(_rebound(_matmul_tiles, {"T_" + k: globals()[p + "_" + k] for k in tiles}, name))


#: the small tiles (MM_*: 64 x 64 tiles of C, 4 x 4 outputs per thread)
matmul_tiled = _tiled("matmul_tiled", "MM")
#: the large tiles (MB_*: 128 x 128 tiles of C, 8 x 8 outputs per thread) for big products
matmul_tiled_big = _tiled("matmul_tiled_big", "MB")


# ==============================================================================================================
# Gathers and scatters (indices of any integer dtype; negative ones count from the end)
# ==============================================================================================================

@cuda.jit(cache=True)
def take_axis(x, idx, out, wrap, err, opid):
    """out[o, j, k] = x[o, idx[j], k] for x (outer, n, inner), idx (m,), out (outer, m, inner)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    outer = out.shape[0]
    m = out.shape[1]
    inner = out.shape[2]
    n = x.shape[1]
    while i < outer * m * inner:
        o = i // (m * inner)
        rem = i - o * m * inner
        j = rem // inner
        k = rem - j * inner
        src = _fix_index(idx[j], n, wrap, j, err, opid)
        if src < 0:
            out[o, j, k] = 0
        else:
            out[o, j, k] = x[o, src, k]
        i += step


@cuda.jit(cache=True)
def scatter_add_axis(target, idx, upd, wrap, err, opid):
    """target[o, idx[j], k] += upd[o, j, k] with atomics (duplicate indices accumulate)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    outer = upd.shape[0]
    m = upd.shape[1]
    inner = upd.shape[2]
    n = target.shape[1]
    while i < outer * m * inner:
        o = i // (m * inner)
        rem = i - o * m * inner
        j = rem // inner
        k = rem - j * inner
        dst = _fix_index(idx[j], n, wrap, j, err, opid)
        if dst >= 0:
            cuda.atomic.add(target, (o, dst, k), upd[o, j, k])
        i += step


@cuda.jit(cache=True)
def one_hot_fill(idx, out, on, off, err, opid):
    """out[i, j] = on where j == idx[i] else off (a negative index gives a row of off; one >= depth is reported)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    depth = out.shape[1]
    while i < out.shape[0] * depth:
        r = i // depth
        j = i - r * depth
        if j == 0 and idx[r] >= depth:
            _report(err, 1, idx[r], depth, opid, r)
        out[r, j] = on if idx[r] == j else off
        i += step


@cuda.jit(cache=True)
def take_along_rows(x, idx, out, inner, err, opid):
    """out[r, j] = x[r, idx[r, j]] for x (rows, n), idx and out (rows, k); ``inner``: the size of the index
    array's axes after the gathered one (errors report positions in its own layout)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    k = out.shape[1]
    n = x.shape[1]
    while i < out.shape[0] * k:
        r = i // k
        j = i - r * k
        src = _fix_index(idx[r, j], n, True, (r // inner) * k * inner + j * inner + r % inner, err, opid)
        out[r, j] = x[r, src] if src >= 0 else 0
        i += step


@cuda.jit(cache=True)
def put_along_rows_add(target, idx, upd, inner, err, opid):
    """target[r, idx[r, j]] += upd[r, j] with atomics (``inner`` as in take_along_rows)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    k = upd.shape[1]
    n = target.shape[1]
    while i < upd.shape[0] * k:
        r = i // k
        j = i - r * k
        dst = _fix_index(idx[r, j], n, True, (r // inner) * k * inner + j * inner + r % inner, err, opid)
        if dst >= 0:
            cuda.atomic.add(target, (r, dst), upd[r, j])
        i += step


# ==============================================================================================================
# Scans, sorting
# ==============================================================================================================

@cuda.jit(cache=True)
def cumulative_lines(x, out, op, exclusive, reverse, init):
    """Cumulative sum (op 0) / product (op 1) of x (outer, n, inner) along axis 1: one thread per line.

    ``init`` is 0 (sum) or 1 (product) in out's dtype."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    outer = x.shape[0]
    n = x.shape[1]
    inner = x.shape[2]
    while i < outer * inner:
        o = i // inner
        k = i - o * inner
        acc = init
        for jj in range(n):
            j = n - 1 - jj if reverse else jj
            v = x[o, j, k]
            if exclusive:
                out[o, j, k] = acc
            if op == 0:
                acc += v
            else:
                acc *= v
            if not exclusive:
                out[o, j, k] = acc
        i += step


@cuda.jit(device=True)
def _sorts_before(a, i, b, j, descending):
    """True when element (a, i) comes before (b, j) in a stable sort; NaN last in both directions."""
    if a != a:
        return b != b and i < j
    if b != b:
        return True
    if a == b:
        return i < j
    return a > b if descending else a < b


@cuda.jit(cache=True)
def rank_sort_rows(x, out, descending, k):
    """Stable argsort of each row (rank sort: one thread per element counts what sorts before it).

    out[r, rank(i)] = i for the elements whose rank is below k (k = n: a full argsort; smaller: top-k).
    O(n) work per element: meant for rows of up to a few thousand entries.
    """
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.shape[1]
    while i < x.shape[0] * n:
        r = i // n
        e = i - r * n
        v = x[r, e]
        rank = 0
        for j in range(n):
            if _sorts_before(x[r, j], j, v, e, descending):
                rank += 1
        if rank < k:
            out[r, rank] = e
        i += step


# ==============================================================================================================
# Random numbers: a counter-based generator (SplitMix64 of key + counter * golden gamma), no state on the device
# ==============================================================================================================

@cuda.jit(device=True)
def _mix64(z):
    """The SplitMix64 output function of state z (uint64)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@cuda.jit(device=True)
def _bits(key, counter):
    """Return 64 random bits for (key, counter)."""
    return _mix64(key + counter * _GOLDEN)


@cuda.jit(device=True)
def _unit53(h):
    """Return a float64 in [0, 1) from the top 53 bits of h."""
    return (h >> _S11) * _TWO53


@cuda.jit(device=True)
def _normal_pair(key, c):
    """Return a standard normal draw (Box-Muller on two uniforms of counters 2c and 2c+1)."""
    u1 = ((_bits(key, c + c) >> _S11) + _U64(1)) * _TWO53          # (0, 1]
    u2 = _unit53(_bits(key, c + c + _U64(1)))
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2)


@cuda.jit(cache=True)
def random_fill(out, kind, key, offset, a, b):
    """Fill flat ``out`` with draws of ``kind``: 0 uniform[a, b), 1 normal(a, b), 2 truncated normal (|z| <= 2),
    3 bernoulli(a), 4 integers in [a, b). Element i uses counters from ``offset + i`` (truncated normal: up
    to 64 rounds of ``offset + round * n + i``), so draws never overlap when the caller advances ``offset``."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n = out.shape[0]
    while i < n:
        c = offset + _U64(i)
        if kind == 0:
            out[i] = a + (b - a) * _unit53(_bits(key, c))
        elif kind == 1:
            out[i] = a + b * _normal_pair(key, c)
        elif kind == 2:
            z = _normal_pair(key, c)
            rnd = 1
            while (z > 2.0 or z < -2.0) and rnd < 64:
                z = _normal_pair(key, offset + _U64(rnd) * _U64(n) + _U64(i))
                rnd += 1
            if z > 2.0 or z < -2.0:
                z = 0.0
            out[i] = a + b * z
        elif kind == 3:
            out[i] = 1 if _unit53(_bits(key, c)) < a else 0
        else:
            span = _U64(b - a)
            out[i] = a + np.int64(_bits(key, c) % span)
        i += step


# ==============================================================================================================
# Optimizer updates: in place over flat parameter, gradient and slot arrays (scalars in the parameter's dtype)
# ==============================================================================================================

@cuda.jit(cache=True)
def sgd_update(p, g, buf, lr, wd, momentum, omd, nesterov, use_mom):
    """p -= lr * (g + wd p), through a momentum buffer (optionally Nesterov) when use_mom."""
    i = cuda.grid(1)
    while i < p.shape[0]:
        sgd_elem(p, g, buf, i, lr, wd, momentum, omd, nesterov, use_mom)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def adagrad_update(p, g, acc, lr, wd, eps):
    """acc += g^2; p -= lr * g / (sqrt(acc) + eps)."""
    i = cuda.grid(1)
    while i < p.shape[0]:
        adagrad_elem(p, g, acc, i, lr, wd, eps)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def rmsprop_update(p, g, ms, mg, mom, lr, wd, rho, omr, eps, momentum, centered, use_mom):
    """ms = rho ms + (1-rho) g^2 (centered: minus mg^2); p -= (momentum of) lr g / sqrt(ms + eps)."""
    i = cuda.grid(1)
    while i < p.shape[0]:
        rmsprop_elem(p, g, ms, mg, mom, i, lr, wd, rho, omr, eps, momentum, centered, use_mom)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def adam_update(p, g, m, v, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps):
    """Adam: m, v moments; p -= lr_c * m / (sqrt(v) / sqrt(bc2) + eps) with lr_c = lr / bc1."""
    i = cuda.grid(1)
    while i < p.shape[0]:
        adam_elem(p, g, m, v, i, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def adamw_update(p, g, m, v, lr_c, lr_wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps):
    """AdamW: p -= lr * wd * p (decoupled decay), then adam_update's step without an L2 term."""
    i = cuda.grid(1)
    while i < p.shape[0]:
        adamw_elem(p, g, m, v, i, lr_c, lr_wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def rows_touched(idx, flags, err, opid):
    """flags[idx[j]] = 1 for every j (marks the rows a sparse gradient names)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n = flags.shape[0]
    while i < idx.shape[0]:
        r = _fix_index(idx[i], n, False, i, err, opid)
        if r >= 0:
            flags[r] = 1
        i += step


# Sparse (row) updates: one thread per element of 2-D p; rows whose flag is clear keep still (lazy updates)

@cuda.jit(cache=True)
def sgd_rows_update(p, g, buf, flags, lr, wd, momentum, omd, nesterov, use_mom):
    """``sgd_update`` on the rows of 2-D p whose flag is set (g: summed gradient rows, dense)."""
    i = cuda.grid(1)
    d = p.shape[1]
    while i < p.shape[0] * d:
        r = i // d
        if flags[r] != 0:
            sgd_elem(p[r], g[r], buf[r], i - r * d, lr, wd, momentum, omd, nesterov, use_mom)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def adagrad_rows_update(p, g, acc, flags, lr, wd, eps):
    """``adagrad_update`` on the flagged rows of 2-D p."""
    i = cuda.grid(1)
    d = p.shape[1]
    while i < p.shape[0] * d:
        r = i // d
        if flags[r] != 0:
            adagrad_elem(p[r], g[r], acc[r], i - r * d, lr, wd, eps)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def adam_rows_update(p, g, m, v, flags, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps):
    """``adam_update`` on the flagged rows of 2-D p (lazy Adam: other rows and their moments keep still)."""
    i = cuda.grid(1)
    d = p.shape[1]
    while i < p.shape[0] * d:
        r = i // d
        if flags[r] != 0:
            adam_elem(p[r], g[r], m[r], v[r], i - r * d, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps)
        i += cuda.gridsize(1)


# ==============================================================================================================
# Convolution (im2col / col2im around the tiled matmul) and pooling, NCHW
# ==============================================================================================================

@cuda.jit(cache=True)
def im2col(x, cols, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_):
    """cols[c*kh*kw + ky*kw + kx, n*oh*ow + oy*ow + ox] = x[n, c, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw].

    Positions outside the image (padding) get 0."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    ncols = cols.shape[1]
    total = cols.shape[0] * ncols
    hw = oh_ * ow_
    while i < total:
        row = i // ncols
        col = i - row * ncols
        c = row // (kh_ * kw_)
        rk = row - c * kh_ * kw_
        ky = rk // kw_
        kx = rk - ky * kw_
        n = col // hw
        rc = col - n * hw
        oy = rc // ow_
        ox = rc - oy * ow_
        iy = oy * sh - ph + ky * dh
        ix = ox * sw - pw + kx * dw
        if 0 <= iy < x.shape[2] and 0 <= ix < x.shape[3]:
            cols[row, col] = x[n, c, iy, ix]
        else:
            cols[row, col] = 0
        i += step


@cuda.jit(cache=True)
def col2im_add(cols, dx, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_):
    """dx[n, c, iy, ix] += cols[...] (the adjoint of ``im2col``), with atomics for overlapping windows."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    ncols = cols.shape[1]
    total = cols.shape[0] * ncols
    hw = oh_ * ow_
    while i < total:
        row = i // ncols
        col = i - row * ncols
        c = row // (kh_ * kw_)
        rk = row - c * kh_ * kw_
        ky = rk // kw_
        kx = rk - ky * kw_
        n = col // hw
        rc = col - n * hw
        oy = rc // ow_
        ox = rc - oy * ow_
        iy = oy * sh - ph + ky * dh
        ix = ox * sw - pw + kx * dw
        if 0 <= iy < dx.shape[2] and 0 <= ix < dx.shape[3]:
            cuda.atomic.add(dx, (n, c, iy, ix), cols[row, col])
        i += step


@cuda.jit(cache=True)
def onp_to_nop(y2, bias, out, has_bias):
    """out[n, o, p] = y2[o, n*P + p] (+ bias[o]): the (O, N*P) matmul result to NCHW order."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nb = out.shape[0]
    o_ = out.shape[1]
    pp = out.shape[2]
    while i < nb * o_ * pp:
        n = i // (o_ * pp)
        rem = i - n * o_ * pp
        o = rem // pp
        p = rem - o * pp
        v = y2[o, n * pp + p]
        out[n, o, p] = v + bias[o] if has_bias else v
        i += step


@cuda.jit(cache=True)
def nop_to_onp(g, out):
    """out[o, n*P + p] = g[n, o, p]."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nb = g.shape[0]
    o_ = g.shape[1]
    pp = g.shape[2]
    while i < nb * o_ * pp:
        n = i // (o_ * pp)
        rem = i - n * o_ * pp
        o = rem // pp
        p = rem - o * pp
        out[o, n * pp + p] = g[n, o, p]
        i += step


@cuda.jit(cache=True)
def max_pool2d(x, out, kh_, kw_, sh, sw, ph, pw):
    """out[n, c, oy, ox] = max of the window (padding never wins; NaN propagates)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nb, ch, oh_, ow_ = out.shape
    while i < nb * ch * oh_ * ow_:
        ox = i % ow_
        q = i // ow_
        oy = q % oh_
        q = q // oh_
        c = q % ch
        n = q // ch
        best = x[n, c, 0, 0]
        have = False
        for ky in range(kh_):
            iy = oy * sh - ph + ky
            if 0 <= iy < x.shape[2]:
                for kx in range(kw_):
                    ix = ox * sw - pw + kx
                    if 0 <= ix < x.shape[3]:
                        v = x[n, c, iy, ix]
                        if not have:
                            best = v
                            have = True
                        else:
                            best = maximum_s(best, v)
        out[n, c, oy, ox] = best
        i += step


@cuda.jit(cache=True)
def max_pool2d_grad(x, g, dx, kh_, kw_, sh, sw, ph, pw):
    """dx[argmax of each window] += g (the first maximum of the window, as on the CPU; atomics for overlaps)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nb, ch, oh_, ow_ = g.shape
    while i < nb * ch * oh_ * ow_:
        ox = i % ow_
        q = i // ow_
        oy = q % oh_
        q = q // oh_
        c = q % ch
        n = q // ch
        best = x[n, c, 0, 0]
        by = -1
        bx = -1
        for ky in range(kh_):
            iy = oy * sh - ph + ky
            if 0 <= iy < x.shape[2]:
                for kx in range(kw_):
                    ix = ox * sw - pw + kx
                    if 0 <= ix < x.shape[3]:
                        v = x[n, c, iy, ix]
                        if by < 0 or v > best:
                            best = v
                            by = iy
                            bx = ix
        if by >= 0:
            cuda.atomic.add(dx, (n, c, by, bx), g[n, c, oy, ox])
        i += step


@cuda.jit(cache=True)
def avg_pool2d(x, out, kh_, kw_, sh, sw, ph, pw, include_pad, zero):
    """out = mean over the window (over the window's in-bounds part unless include_pad); zero in x's dtype."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nb, ch, oh_, ow_ = out.shape
    while i < nb * ch * oh_ * ow_:
        ox = i % ow_
        q = i // ow_
        oy = q % oh_
        q = q // oh_
        c = q % ch
        n = q // ch
        s = zero
        cnt = 0
        for ky in range(kh_):
            iy = oy * sh - ph + ky
            for kx in range(kw_):
                ix = ox * sw - pw + kx
                if 0 <= iy < x.shape[2] and 0 <= ix < x.shape[3]:
                    s += x[n, c, iy, ix]
                    cnt += 1
        if include_pad:
            h0 = oy * sh - ph
            w0 = ox * sw - pw
            cnt = (min(h0 + kh_, x.shape[2] + ph) - h0) * (min(w0 + kw_, x.shape[3] + pw) - w0)
        out[n, c, oy, ox] = s / max(cnt, 1)
        i += step


@cuda.jit(cache=True)
def avg_pool2d_grad(g, dx, kh_, kw_, sh, sw, ph, pw, include_pad):
    """dx += g / count spread over each window (atomics for overlapping windows)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nb, ch, oh_, ow_ = g.shape
    while i < nb * ch * oh_ * ow_:
        ox = i % ow_
        q = i // ow_
        oy = q % oh_
        q = q // oh_
        c = q % ch
        n = q // ch
        h0 = oy * sh - ph
        w0 = ox * sw - pw
        if include_pad:
            cnt = (min(h0 + kh_, dx.shape[2] + ph) - h0) * (min(w0 + kw_, dx.shape[3] + pw) - w0)
        else:
            cnt = (min(h0 + kh_, dx.shape[2]) - max(h0, 0)) * (min(w0 + kw_, dx.shape[3]) - max(w0, 0))
        v = g[n, c, oy, ox] / max(cnt, 1)
        for ky in range(kh_):
            iy = oy * sh - ph + ky
            for kx in range(kw_):
                ix = ox * sw - pw + kx
                if 0 <= iy < dx.shape[2] and 0 <= ix < dx.shape[3]:
                    cuda.atomic.add(dx, (n, c, iy, ix), v)
        i += step


@cuda.jit(cache=True)
def wrap_index(idx, out, n, err, opid):
    """out[i] = idx[i] wrapped into [0, n) (negative counts from the end); 0 and a report when out of range."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < idx.shape[0]:
        v = _fix_index(idx[i], n, True, i, err, opid)
        out[i] = v if v >= 0 else 0
        i += step


# ==============================================================================================================
# Per-channel reductions of (N, C, S) arrays (batch-norm statistics, its affine gradient, a conv bias gradient)
# ==============================================================================================================
# Two passes: ``channel_partials`` runs one block per (channel, chunk of ``chunk`` of the N*S positions) and
# writes float64 partial sums; ``channel_finish`` adds a channel's partials (one thread per channel) and writes
# the result in the output's dtype. mode 0: the moments, sums of (x - x[0, c, 0]) and its square (the shift by
# the channel's first value keeps float64 sums accurate when |mean| >> std); mode 1: sums of g and g * x;
# mode 2: the sum of g.

@cuda.jit(cache=True)
def channel_partials(g, x, part, mode, chunk):
    """part[0, c, k], part[1, c, k] = the mode's two float64 sums over positions [k*chunk, (k+1)*chunk) of
    channel c of g (N, C, S) (and x, same shape, in mode 1)."""
    sa = cuda.shared.array(BLOCK, dtype=np.float64)
    sb = cuda.shared.array(BLOCK, dtype=np.float64)
    t = cuda.threadIdx.x
    c_ = g.shape[1]
    s_ = g.shape[2]
    total = g.shape[0] * s_
    nch = part.shape[2]
    task = cuda.blockIdx.x
    while task < c_ * nch:
        c = task // nch
        k = task - c * nch
        hi = min((k + 1) * chunk, total)
        shift = np.float64(g[0, c, 0]) if mode == 0 else 0.0
        a = 0.0
        b = 0.0
        e = k * chunk + t
        while e < hi:
            n = e // s_
            p = e - n * s_
            v = np.float64(g[n, c, p])
            if mode == 0:
                d = v - shift
                a += d
                b += d * d
            else:
                a += v
                if mode == 1:
                    b += v * np.float64(x[n, c, p])
            e += BLOCK
        a = _block_sum(sa, t, a)
        b = _block_sum(sb, t, b)
        if t == 0:
            part[0, c, k] = a
            part[1, c, k] = b
        task += cuda.gridDim.x


@cuda.jit(cache=True)
def channel_finish(part, g, out, mode, count):
    """Combine ``channel_partials``' sums per channel: mode 0 out[0, c], out[1, c] = mean and biased variance
    (``count`` values a channel); mode 1 out[0, c], out[1, c] = the two sums; mode 2 out[0, c] = the sum."""
    c = cuda.grid(1)
    step = cuda.gridsize(1)
    while c < part.shape[1]:
        a = 0.0
        b = 0.0
        for k in range(part.shape[2]):
            a += part[0, c, k]
            b += part[1, c, k]
        if mode == 0:
            m = a / count
            out[0, c] = np.float64(g[0, c, 0]) + m
            out[1, c] = max(b / count - m * m, 0.0)
        else:
            out[0, c] = a
            if mode == 1:
                out[1, c] = b
        c += step


@cuda.jit(cache=True)
def channel_affine(x, a, b, y):
    """y[n, c, s] = x[n, c, s] * a[c] + b[c] for x, y (N, C, S)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    c_ = x.shape[1]
    s_ = x.shape[2]
    while i < x.shape[0] * c_ * s_:
        n = i // (c_ * s_)
        rem = i - n * c_ * s_
        c = rem // s_
        p = rem - c * s_
        y[n, c, p] = x[n, c, p] * a[c] + b[c]
        i += step


# ==============================================================================================================
# Fused LSTM step, packed state s = [h, c, i, f, g, o] (B, 6H): one thread per (row, unit j); the recurrent
# GEMMs (h @ W_hh forward, dz @ W_hh^T backward) run in the tiled matmul between these launches
# ==============================================================================================================

@cuda.jit(cache=True)
def lstm_gates(z, xw, b, s_prev, mask, s_out, use_mask, one):
    """s_out = the next state from z = h_prev @ W_hh (B, 4H), the input projection xw (B, 4H) and bias b (4H,):
    gates i, f, o = sigmoid, g = tanh of z + xw + b; c = f c_prev + i g; h = o tanh(c). Rows whose mask is 0
    (when use_mask) keep h and c, and their gates are 0."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    hd = s_out.shape[1] // 6
    while i < s_out.shape[0] * hd:
        r = i // hd
        j = i - r * hd
        if use_mask and mask[r] == 0:
            s_out[r, j] = s_prev[r, j]
            s_out[r, hd + j] = s_prev[r, hd + j]
            for q in range(2, 6):
                s_out[r, q * hd + j] = 0
        else:
            ig = sigmoid_s(z[r, j] + (xw[r, j] + b[j]), one)
            fg = sigmoid_s(z[r, hd + j] + (xw[r, hd + j] + b[hd + j]), one)
            gg = math.tanh(z[r, 2 * hd + j] + (xw[r, 2 * hd + j] + b[2 * hd + j]))
            og = sigmoid_s(z[r, 3 * hd + j] + (xw[r, 3 * hd + j] + b[3 * hd + j]), one)
            c = fg * s_prev[r, hd + j] + ig * gg
            s_out[r, j] = og * math.tanh(c)
            s_out[r, hd + j] = c
            s_out[r, 2 * hd + j] = ig
            s_out[r, 3 * hd + j] = fg
            s_out[r, 4 * hd + j] = gg
            s_out[r, 5 * hd + j] = og
        i += step


@cuda.jit(device=True)
def _lstm_tc_dc(g, s, r, j, hd, one):
    """(tanh(c), dc) of unit j of row r: dc = d c from g = d s, through h = o tanh(c) and c's own gradient."""
    tc = math.tanh(s[r, hd + j])
    return tc, g[r, hd + j] + g[r, j] * s[r, 5 * hd + j] * (one - tc * tc)


@cuda.jit(cache=True)
def lstm_step_dz(g, s, s_prev, mask, dz, use_mask, one):
    """dz (B, 4H) = the gradient w.r.t. the gate pre-activations from g = d s (B, 6H) (the gates' own gradients,
    g's i, f, g, o parts, included); 0 on rows whose mask is 0."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    hd = dz.shape[1] // 4
    while i < dz.shape[0] * hd:
        r = i // hd
        j = i - r * hd
        if use_mask and mask[r] == 0:
            for q in range(4):
                dz[r, q * hd + j] = 0
        else:
            tc, dc = _lstm_tc_dc(g, s, r, j, hd, one)
            ig = s[r, 2 * hd + j]
            fg = s[r, 3 * hd + j]
            gg = s[r, 4 * hd + j]
            og = s[r, 5 * hd + j]
            dz[r, j] = (dc * gg + g[r, 2 * hd + j]) * ig * (one - ig)
            dz[r, hd + j] = (dc * s_prev[r, hd + j] + g[r, 3 * hd + j]) * fg * (one - fg)
            dz[r, 2 * hd + j] = (dc * ig + g[r, 4 * hd + j]) * (one - gg * gg)
            dz[r, 3 * hd + j] = (g[r, j] * tc + g[r, 5 * hd + j]) * og * (one - og)
        i += step


@cuda.jit(cache=True)
def lstm_step_dprev(g, s, dh, mask, add, out, use_mask, use_add, one):
    """out (B, 6H) = d s_prev = [dh, dc * f, 0, 0, 0, 0] with dh = dz @ W_hh^T (B, H), plus ``add`` (B, 6H) when
    use_add; rows whose mask is 0 pass g's h and c parts through."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    hd = dh.shape[1]
    while i < out.shape[0] * hd:
        r = i // hd
        j = i - r * hd
        if use_mask and mask[r] == 0:
            vh = g[r, j]
            vc = g[r, hd + j]
        else:
            tc, dc = _lstm_tc_dc(g, s, r, j, hd, one)
            vh = dh[r, j]
            vc = dc * s[r, 3 * hd + j]
        if use_add:
            out[r, j] = vh + add[r, j]
            out[r, hd + j] = vc + add[r, hd + j]
            for q in range(2, 6):
                out[r, q * hd + j] = add[r, q * hd + j]
        else:
            out[r, j] = vh
            out[r, hd + j] = vc
            for q in range(2, 6):
                out[r, q * hd + j] = 0
        i += step


@cuda.jit(cache=True)
def lstm_prev_h(S, s0, hp):
    """hp[t*B + r, j] = h_{t-1}[r, j] (s0's h for t = 0) for S (T, B, 6H): the left operand of dW_hh's GEMM."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    bsz = S.shape[1]
    hd = hp.shape[1]
    while i < hp.shape[0] * hd:
        row = i // hd
        j = i - row * hd
        t = row // bsz
        r = row - t * bsz
        hp[row, j] = s0[r, j] if t == 0 else S[t - 1, r, j]
        i += step
