"""CPU kernels: plain module-level ``@njit(cache=True)`` functions with flat array and scalar arguments.

Elementwise primitives are not here: their kernels are generated from the scalar templates in
``jitnet.ops`` by ``jitnet.kernelgen`` (one op eagerly, a fused group under ``jitnet.jit``). The scalar
helpers those templates call are at the top of this file. Below them come the kernels that are not
elementwise: reductions, softmax, scans, matmul, gathers and scatters, sorting.

Conventions: every kernel writes into an ``out`` array allocated by the caller; arrays arrive in a canonical
2-D or 3-D contiguous form (the caller collapses and transposes); ``*_par`` variants use ``prange`` over the
outer dimension and are chosen by the caller for large inputs. Bounds are checked by the caller before a
kernel runs, so no kernel reads outside an array.
"""
import math

import numpy as np
import numba
from numba import njit, prange

_FM = {"reassoc", "nsz", "arcp", "contract"}     # fast math without nnan/ninf: NaN and inf stay exact


# --------------------------------------------------------------------------------------------------------------
# Scalar helpers used by the elementwise templates (inlined into the generated kernels)
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def sigmoid_s(x, one):
    """Return the logistic sigmoid of x, stable for large |x|."""
    if x >= 0:
        z = math.exp(-x)
        return one / (one + z)
    z = math.exp(x)
    return z / (one + z)


@njit(cache=True, inline="always")
def softplus_s(x, zero):
    """Return log(1 + exp(x)), stable for large |x|."""
    m = x if x > zero else zero
    return m + math.log1p(math.exp(-abs(x)))


@njit(cache=True, inline="always")
def sign_s(x, zero):
    """Return -1, 0 or 1 with the sign of x (NaN stays NaN)."""
    if x > zero:
        return zero + 1
    if x < zero:
        return zero - 1
    return x * zero


@njit(cache=True, inline="always")
def maximum_s(a, b):
    """Return the larger of a and b, NaN if either is NaN (NumPy's maximum)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@njit(cache=True, inline="always")
def minimum_s(a, b):
    """Return the smaller of a and b, NaN if either is NaN (NumPy's minimum)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a <= b else b


@njit(cache=True, inline="always")
def floordiv_s(a, b):
    """Return floor(a / b) (NumPy's floor_divide for floats)."""
    return math.floor(a / b)


@njit(cache=True, inline="always")
def ifloordiv_s(a, b):
    """Return a // b for integers, 0 where b == 0 (NumPy's convention)."""
    if b == 0:
        return a * 0
    return a // b


@njit(cache=True, inline="always")
def imod_s(a, b):
    """Return a mod b for integers with the sign of b, 0 where b == 0 (NumPy's convention)."""
    if b == 0:
        return a * 0
    return a % b


@njit(cache=True, inline="always")
def fmod_s(a, b):
    """Return a mod b for floats with the sign of b (NumPy's remainder)."""
    r = math.fmod(a, b)
    if r != 0 and ((r < 0) != (b < 0)):
        r += b
    return r


# --------------------------------------------------------------------------------------------------------------
# Reductions over the last axis of a contiguous (rows, n) array, and over the first axis of (n, cols)
# op codes: 0 sum, 1 prod, 2 max, 3 min
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _reduce_row(x, i, op):
    n = x.shape[1]
    if op == 0:
        acc = x[i, 0] * 0
        for j in range(n):
            acc += x[i, j]
    elif op == 1:
        acc = x[i, 0] * 0 + 1
        for j in range(n):
            acc *= x[i, j]
    elif op == 2:
        acc = x[i, 0]
        for j in range(1, n):
            v = x[i, j]
            if v > acc or v != v:
                acc = v
                if v != v:
                    break
    else:
        acc = x[i, 0]
        for j in range(1, n):
            v = x[i, j]
            if v < acc or v != v:
                acc = v
                if v != v:
                    break
    return acc


@njit(cache=True, fastmath=_FM, nogil=True)
def reduce_last(x, out, op):
    """Reduce each row of x (rows, n) with op into out (rows,)."""
    for i in range(x.shape[0]):
        out[i] = _reduce_row(x, i, op)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def reduce_last_par(x, out, op):
    """Parallel ``reduce_last``."""
    for i in prange(x.shape[0]):
        out[i] = _reduce_row(x, i, op)


@njit(cache=True, fastmath=_FM, inline="always")
def _reduce_cols_block(x, out, op, r0, r1):
    n = x.shape[1]
    for i in range(r0, r1):
        if op == 0:
            for j in range(n):
                out[j] += x[i, j]
        elif op == 1:
            for j in range(n):
                out[j] *= x[i, j]
        elif op == 2:
            for j in range(n):
                v = x[i, j]
                if v > out[j] or v != v:
                    out[j] = v
        else:
            for j in range(n):
                v = x[i, j]
                if v < out[j] or v != v:
                    out[j] = v


@njit(cache=True, fastmath=_FM, nogil=True)
def reduce_first(x, out, op):
    """Reduce x (m, cols) over its first axis with op into out (cols,)."""
    out[:] = x[0]
    _reduce_cols_block(x, out, op, 1, x.shape[0])


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def reduce_first_par(x, out, op, nchunks):
    """Parallel ``reduce_first``: row chunks reduce into partial rows, then the partials are combined."""
    m = x.shape[0]
    part = np.empty((nchunks, x.shape[1]), dtype=out.dtype)
    step = (m + nchunks - 1) // nchunks
    for c in prange(nchunks):
        r0 = c * step
        r1 = min(m, r0 + step)
        if r0 < r1:
            part[c, :] = x[r0]
            _reduce_cols_block(x, part[c], op, r0 + 1, r1)
        else:
            part[c, :] = x[0]
    out[:] = part[0]
    # a chunk with no rows repeats row 0, which only a sum or product would count twice
    used = min(nchunks, (m + step - 1) // step)
    _reduce_cols_block(part, out, op, 1, used)


@njit(cache=True, nogil=True, parallel=True)
def arg_reduce_last(x, out, is_max):
    """Write the index of the max (is_max) or min of each row of x (rows, n) into out (rows,) int64."""
    for i in prange(x.shape[0]):
        best = x[i, 0]
        bi = 0
        for j in range(1, x.shape[1]):
            v = x[i, j]
            if best != best:
                break
            if (v > best if is_max else v < best) or v != v:
                best = v
                bi = j
        out[i] = bi


# --------------------------------------------------------------------------------------------------------------
# Softmax family over the last axis of (rows, n)
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, fastmath=_FM, inline="always")
def _softmax_row(x, out, i, mode):
    n = x.shape[1]
    m = x[i, 0]
    for j in range(1, n):
        if x[i, j] > m:
            m = x[i, j]
    if m == -np.inf or m != m:
        m = m * 0 if m == -np.inf else m
    s = x[i, 0] * 0
    if mode == 0:                       # softmax
        for j in range(n):
            e = math.exp(x[i, j] - m)
            out[i, j] = e
            s += e
        r = 1 / s
        for j in range(n):
            out[i, j] *= r
    else:                               # log_softmax
        for j in range(n):
            s += math.exp(x[i, j] - m)
        ls = m + math.log(s)
        for j in range(n):
            out[i, j] = x[i, j] - ls


@njit(cache=True, fastmath=_FM, nogil=True)
def softmax_last(x, out, mode):
    """Write softmax (mode 0) or log_softmax (mode 1) of each row of x (rows, n) into out."""
    for i in range(x.shape[0]):
        _softmax_row(x, out, i, mode)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def softmax_last_par(x, out, mode):
    """Parallel ``softmax_last``."""
    for i in prange(x.shape[0]):
        _softmax_row(x, out, i, mode)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def logsumexp_last(x, out):
    """Write log(sum(exp(row))) of each row of x (rows, n) into out (rows,), stable for large values."""
    for i in prange(x.shape[0]):
        m = x[i, 0]
        for j in range(1, x.shape[1]):
            if x[i, j] > m:
                m = x[i, j]
        if m == -np.inf or m == np.inf or m != m:
            s = x[i, 0] * 0
            for j in range(x.shape[1]):
                s += math.exp(x[i, j])
            out[i] = math.log(s) if m != m or m == -np.inf else m
            continue
        s = x[i, 0] * 0
        for j in range(x.shape[1]):
            s += math.exp(x[i, j] - m)
        out[i] = m + math.log(s)


# --------------------------------------------------------------------------------------------------------------
# Scans over the middle axis of (outer, n, inner): cumsum (op 0) and cumprod (op 1)
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, nogil=True)
def cumulative(x, out, op, exclusive, reverse):
    """Write the cumulative sum (op 0) or product (op 1) of x (outer, n, inner) along axis 1 into out."""
    outer, n, inner = x.shape
    for o in prange(outer):
        acc = np.empty(inner, dtype=out.dtype)
        for k in range(inner):
            acc[k] = 0 if op == 0 else 1
        for jj in range(n):
            j = n - 1 - jj if reverse else jj
            for k in range(inner):
                v = x[o, j, k]
                if exclusive:
                    out[o, j, k] = acc[k]
                if op == 0:
                    acc[k] += v
                else:
                    acc[k] *= v
                if not exclusive:
                    out[o, j, k] = acc[k]


# --------------------------------------------------------------------------------------------------------------
# Matmul through BLAS (np.dot inside @njit calls the BLAS gemm; never inside a prange)
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def matmul_2d(a, b, out):
    """Write a (m, k) @ b (k, n) into out (m, n) with one BLAS gemm."""
    np.dot(a, b, out)


@njit(cache=True, nogil=True)
def matmul_batched(a, b, out):
    """Write a[i] @ b[i] into out[i] for each i of the leading axis (one gemm each)."""
    for i in range(out.shape[0]):
        np.dot(a[i], b[i], out[i])


# --------------------------------------------------------------------------------------------------------------
# Gathers and scatters. Indices are int64 and already checked against their bound by the caller.
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, nogil=True)
def take_axis(x, idx, out):
    """out[o, j, :] = x[o, idx[j], :] for x (outer, n, inner), idx (m,), out (outer, m, inner)."""
    outer, m, inner = out.shape
    for t in prange(outer * m):
        o = t // m
        j = t - o * m
        src = idx[j]
        for k in range(inner):
            out[o, j, k] = x[o, src, k]


@njit(cache=True, nogil=True)
def scatter_add_axis(target, idx, updates):
    """target[o, idx[j], :] += updates[o, j, :] (duplicates accumulate); the embedding-gradient kernel."""
    outer, m, inner = updates.shape
    for o in range(outer):
        for j in range(m):
            dst = idx[j]
            for k in range(inner):
                target[o, dst, k] += updates[o, j, k]


@njit(cache=True, nogil=True)
def scatter_add_flat(target, pos, updates):
    """target[pos[i]] += updates[i] for flat arrays (duplicates accumulate)."""
    for i in range(pos.shape[0]):
        target[pos[i]] += updates[i]


@njit(cache=True, parallel=True, nogil=True)
def take_along_last(x, idx, out):
    """out[r, j] = x[r, idx[r, j]] for x (rows, n), idx and out (rows, k)."""
    for r in prange(out.shape[0]):
        for j in range(out.shape[1]):
            out[r, j] = x[r, idx[r, j]]


@njit(cache=True, parallel=True, nogil=True)
def put_along_last_add(target, idx, updates):
    """target[r, idx[r, j]] += updates[r, j] for each row r (rows are independent)."""
    for r in prange(updates.shape[0]):
        for j in range(updates.shape[1]):
            target[r, idx[r, j]] += updates[r, j]


@njit(cache=True, parallel=True, nogil=True)
def one_hot_kernel(idx, out, on, off):
    """out[i, :] = off except out[i, idx[i]] = on (an index outside [0, depth) gives a row of off)."""
    depth = out.shape[1]
    for i in prange(idx.shape[0]):
        for j in range(depth):
            out[i, j] = off
        k = idx[i]
        if 0 <= k < depth:
            out[i, k] = on


@njit(cache=True, nogil=True)
def index_bounds(idx):
    """Return (min, max) of a non-empty int64 array."""
    lo = idx[0]
    hi = idx[0]
    for i in range(1, idx.shape[0]):
        v = idx[i]
        if v < lo:
            lo = v
        elif v > hi:
            hi = v
    return lo, hi


@njit(cache=True, nogil=True)
def wrap_negative(idx, n):
    """Add n to every negative entry of idx in place (NumPy's negative indices)."""
    for i in range(idx.shape[0]):
        if idx[i] < 0:
            idx[i] += n


# --------------------------------------------------------------------------------------------------------------
# Sorting along the last axis of (rows, n)
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, nogil=True)
def argsort_last(x, out, descending):
    """Write the stable ascending (or descending) argsort of each row of x (rows, n) into out (int64)."""
    n = x.shape[1]
    for r in prange(x.shape[0]):
        if descending:
            order = np.argsort(-x[r], kind="mergesort")
        else:
            order = np.argsort(x[r], kind="mergesort")
        for j in range(n):
            out[r, j] = order[j]


@njit(cache=True, parallel=True, nogil=True)
def topk_last(x, k, out_idx):
    """Write the indices of the k largest entries of each row of x (rows, n), largest first, into out_idx."""
    for r in prange(x.shape[0]):
        order = np.argsort(-x[r], kind="mergesort")
        for j in range(k):
            out_idx[r, j] = order[j]


# --------------------------------------------------------------------------------------------------------------

def all_dispatchers():
    """Return every dispatcher defined in this module (for compile / cache-hit counters)."""
    return [v for v in globals().values() if hasattr(v, "_cache_hits") and hasattr(v, "overloads")]
