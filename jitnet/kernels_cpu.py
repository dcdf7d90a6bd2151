"""CPU kernels: plain module-level ``@njit(cache=True)`` functions with flat array and scalar arguments.

Elementwise primitives are not here: their kernels are generated from the scalar templates in
``jitnet.ops`` by ``jitnet.kernelgen`` (one op eagerly, a fused group under ``jitnet.jit``); the scalar
helpers those templates call live in ``kernels_scalar.py``. This file holds the kernels that are not
elementwise: reductions, softmax, scans, gathers and scatters, sorting, and (appended by the
layers and optimizers) convolution, pooling, losses and update kernels.

Conventions: every kernel writes into an ``out`` array allocated by the caller; arrays arrive in a canonical
2-D or 3-D contiguous form (the caller collapses and transposes); ``*_par`` variants use ``prange`` over the
outer dimension and are chosen by the caller for large inputs. Bounds are checked by the caller before a
kernel runs, so no kernel reads outside an array.
"""
import math

import numpy as np
from numba import njit, prange

_FM = {"reassoc", "nsz", "arcp", "contract"}     # fast math without nnan/ninf: NaN and inf stay exact
#: files whose helpers these kernels inline (jitnet.cache ties the cached kernels to them too)
_CACHE_DEPENDS = ("kernels_scalar.py",)


from .blas import gemm  # noqa: E402  (NumPy's BLAS and thread pool, not SciPy's)
from .kernels_scalar import *  # noqa: E402,F401,F403  (the scalar helpers, re-exported)


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


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def reduce_last_par(x, out, op):
    """Reduce each row of x (rows, n) with op into out (rows,); ``reduce_last`` is its serial twin."""
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


@njit(cache=True, inline="always")
def _copy_row(x, r, out):
    # an explicit loop: ``out[:] = x[r]`` (NumPy slice assignment) took 4-6 s of a cold start to compile
    for j in range(x.shape[1]):
        out[j] = x[r, j]


@njit(cache=True, nogil=True)
def copy_into(dst, src):
    """``dst[...] = src`` for arrays of one shape, as loops. Native drivers write slices with it: Numba's
    array-to-array setitem compiles its shape-error message formatting, 3 s of a process's first driver."""
    if dst.ndim == 1:
        for i in range(dst.shape[0]):
            dst[i] = src[i]
    elif dst.ndim == 2:
        for i in range(dst.shape[0]):
            for j in range(dst.shape[1]):
                dst[i, j] = src[i, j]
    elif dst.ndim == 3:
        for i in range(dst.shape[0]):
            for j in range(dst.shape[1]):
                for k in range(dst.shape[2]):
                    dst[i, j, k] = src[i, j, k]
    else:
        for idx in np.ndindex(dst.shape):
            dst[idx] = src[idx]


@njit(cache=True, fastmath=_FM, nogil=True)
def reduce_first(x, out, op):
    """Reduce x (m, cols) over its first axis with op into out (cols,)."""
    _copy_row(x, 0, out)
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
            _copy_row(x, r0, part[c])
            _reduce_cols_block(x, part[c], op, r0 + 1, r1)
        else:
            _copy_row(x, 0, part[c])
    _copy_row(part, 0, out)
    # a chunk with no rows repeats row 0, which only a sum or product would count twice
    used = min(nchunks, (m + step - 1) // step)
    _reduce_cols_block(part, out, op, 1, used)


@njit(cache=True, fastmath=_FM, inline="always")
def _reduce_mid(x, m, op):
    acc = _reduce_row(x[0], m, op)          # x[a] is a C-contiguous (M, B) block: rows vectorize
    for a in range(1, x.shape[0]):
        acc = combine_s(acc, _reduce_row(x[a], m, op), op)
    return acc


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def reduce_middle_par(x, out, op):
    """Reduce x (A, M, B) over its first and last axes with op into out (M,): e.g. a (N, C, H, W) batch over
    (0, 2, 3) per channel, in place (each channel's B-runs are contiguous, no transposed copy). Parallel over
    M; ``reduce_middle`` is its serial twin."""
    for m in prange(x.shape[1]):
        out[m] = _reduce_mid(x, m, op)


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
def _softmax_row(x, out, i):
    # a NaN in the row, or a row of -inf, gives NaN everywhere through the arithmetic itself (as in NumPy)
    n = x.shape[1]
    m = x[i, 0]
    for j in range(1, n):
        m = max(m, x[i, j])
    s = m * 0          # 0 of the row's type (x[i, 0] * 0 would be NaN for a masked -inf first entry)
    for j in range(n):
        e = fexp(x[i, j] - m)
        out[i, j] = e
        s += e
    r = (s * 0 + 1) / s
    for j in range(n):
        out[i, j] *= r


@njit(cache=True, fastmath=_FM, inline="always")
def _log_softmax_row(x, out, i):
    n = x.shape[1]
    m = x[i, 0]
    for j in range(1, n):
        m = max(m, x[i, j])
    s = m * 0
    for j in range(n):
        s += fexp(x[i, j] - m)
    ls = m + math.log(s)
    for j in range(n):
        out[i, j] = x[i, j] - ls


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def softmax_last(x, out, mode):
    """Write softmax (mode 0) or log_softmax (mode 1) of each row of x (rows, n) into out."""
    if mode == 0:
        for i in range(x.shape[0]):
            _softmax_row(x, out, i)
    else:
        for i in range(x.shape[0]):
            _log_softmax_row(x, out, i)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def softmax_last_par(x, out, mode):
    """Parallel ``softmax_last``."""
    if mode == 0:
        for i in prange(x.shape[0]):
            _softmax_row(x, out, i)
    else:
        for i in prange(x.shape[0]):
            _log_softmax_row(x, out, i)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def logsumexp_last(x, out):
    """Write log(sum(exp(row))) of each row of x (rows, n) into out (rows,), stable for large values."""
    for i in prange(x.shape[0]):
        m = x[i, 0]
        for j in range(1, x.shape[1]):
            if x[i, j] > m:
                m = x[i, j]
        if m == -np.inf or m == np.inf or m != m:
            out[i] = m         # all -inf: -inf; any +inf: +inf; NaN (m != m): NaN
            continue
        s = m * 0
        for j in range(x.shape[1]):
            s += fexp(x[i, j] - m)
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
    """out[i, :] = off except out[i, idx[i]] = on (a negative index gives a row of off); return the position
    of the first index >= depth, or -1."""
    depth = out.shape[1]
    m = idx.shape[0]
    bad = m
    for i in prange(m):
        for j in range(depth):
            out[i, j] = off
        k = idx[i]
        if k >= depth:
            bad = min(bad, i)
        elif k >= 0:
            out[i, k] = on
    return bad if bad < m else -1


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
def check_indices(idx, lo, hi):
    """Return the position of the first entry of int64 idx outside [lo, hi); else -2 if one is negative, else -1."""
    neg = False
    for i in range(idx.shape[0]):
        v = idx[i]
        if v < lo or v >= hi:
            return i
        if v < 0:
            neg = True
    return -2 if neg else -1


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
    out = []
    for v in globals().values():
        if isinstance(v, Adaptive):
            out += [v.parallel, v.serial]
        elif hasattr(v, "_cache_hits") and hasattr(v, "overloads"):
            out.append(v)
    return out


# ==============================================================================================================
# Optimizer updates (jitnet.optim): one fused in-place kernel per optimizer. Dense kernels take flat 1-D
# param/grad/slot arrays; sparse kernels take 2-D (rows, dim) params and slots plus unique row indices and
# their summed gradient rows. Scalars arrive packed in one array ``h`` of the parameter's dtype (dispatch of
# NumPy scalar arguments costs ~1 us each). ``*_par`` variants use prange. The math of one element is
# ``kernels_scalar.*_elem``, shared with the CUDA kernels. They compile with error_model="numpy": Python's model
# tests every division for a zero divisor, and that branch kept LLVM from vectorizing the loop (Adam on 269k
# float32 parameters: 0.64 ms scalar, 0.16-0.23 ms with vdivps/vsqrtps; a zero divisor gives inf/NaN, as in NumPy).
# Unused slot arguments receive the parameter array and are never touched.
# ==============================================================================================================

@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def sgd_update(p, g, buf, h, nesterov, use_mom):
    """In place: p -= lr * (g + wd p), through a momentum buffer (optionally Nesterov) when use_mom.

    h = [lr, weight_decay, momentum, 1 - dampening] in p's dtype (one array argument: cheap dispatch)."""
    lr = h[0]
    wd = h[1]
    momentum = h[2]
    omd = h[3]
    for i in range(p.shape[0]):
        sgd_elem(p, g, buf, i, lr, wd, momentum, omd, nesterov, use_mom)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def sgd_update_par(p, g, buf, h, nesterov, use_mom):
    """Parallel sgd_update."""
    lr = h[0]
    wd = h[1]
    momentum = h[2]
    omd = h[3]
    for i in prange(p.shape[0]):
        sgd_elem(p, g, buf, i, lr, wd, momentum, omd, nesterov, use_mom)


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def adagrad_update(p, g, acc, h):
    """In place: acc += g^2; p -= lr * g / (sqrt(acc) + eps), with h = [lr, weight_decay, eps]."""
    lr = h[0]
    wd = h[1]
    eps = h[2]
    for i in range(p.shape[0]):
        adagrad_elem(p, g, acc, i, lr, wd, eps)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def adagrad_update_par(p, g, acc, h):
    """Parallel adagrad_update."""
    lr = h[0]
    wd = h[1]
    eps = h[2]
    for i in prange(p.shape[0]):
        adagrad_elem(p, g, acc, i, lr, wd, eps)


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def rmsprop_update(p, g, ms, mg, mom, h, centered, use_mom):
    """In place: ms = rho ms + (1-rho) g^2 (centered: minus mg^2); p -= (momentum of) lr g / sqrt(ms + eps).

    h = [lr, weight_decay, rho, 1 - rho, eps, momentum]."""
    lr = h[0]
    wd = h[1]
    rho = h[2]
    omr = h[3]
    eps = h[4]
    momentum = h[5]
    for i in range(p.shape[0]):
        rmsprop_elem(p, g, ms, mg, mom, i, lr, wd, rho, omr, eps, momentum, centered, use_mom)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def rmsprop_update_par(p, g, ms, mg, mom, h, centered, use_mom):
    """Parallel rmsprop_update."""
    lr = h[0]
    wd = h[1]
    rho = h[2]
    omr = h[3]
    eps = h[4]
    momentum = h[5]
    for i in prange(p.shape[0]):
        rmsprop_elem(p, g, ms, mg, mom, i, lr, wd, rho, omr, eps, momentum, centered, use_mom)


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def adam_update(p, g, m, v, h):
    """In place Adam: m, v moments; p -= lr_c * m / (sqrt(v) / sqrt(bc2) + eps) with lr_c = lr / bc1.

    h = [lr / bc1, weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, 1 / sqrt(bc2), eps]."""
    lr_c = h[0]
    wd = h[1]
    b1 = h[2]
    omb1 = h[3]
    b2 = h[4]
    omb2 = h[5]
    inv_sqrt_bc2 = h[6]
    eps = h[7]
    for i in range(p.shape[0]):
        adam_elem(p, g, m, v, i, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def adam_update_par(p, g, m, v, h):
    """Parallel adam_update."""
    lr_c = h[0]
    wd = h[1]
    b1 = h[2]
    omb1 = h[3]
    b2 = h[4]
    omb2 = h[5]
    inv_sqrt_bc2 = h[6]
    eps = h[7]
    for i in prange(p.shape[0]):
        adam_elem(p, g, m, v, i, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps)


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def adamw_update(p, g, m, v, h):
    """In place AdamW: p -= lr * wd * p (decoupled decay), then adam_update's step with no L2 term.

    h = [lr / bc1, lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, 1 / sqrt(bc2), eps]."""
    for i in range(p.shape[0]):
        adamw_elem(p, g, m, v, i, h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7])


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def adamw_update_par(p, g, m, v, h):
    """Parallel adamw_update."""
    lr_c = h[0]
    lr_wd = h[1]
    b1 = h[2]
    omb1 = h[3]
    b2 = h[4]
    omb2 = h[5]
    inv_sqrt_bc2 = h[6]
    eps = h[7]
    for i in prange(p.shape[0]):
        adamw_elem(p, g, m, v, i, lr_c, lr_wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps)


# -- sparse (row) updates: rows are unique, so rows update independently --------------------------------------

@njit(cache=True, nogil=True)
def unique_segments(idx):
    """Return (order, uniq, starts): idx[order] sorted, its unique values, and segment starts (len(uniq)+1)."""
    n = idx.shape[0]
    order = np.argsort(idx, kind="mergesort")
    uniq = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.int64)
    u = 0
    for j in range(n):
        val = idx[order[j]]
        if u == 0 or val != uniq[u - 1]:
            uniq[u] = val
            starts[u] = j
            u += 1
    starts[u] = n
    return order, uniq[:u].copy(), starts[:u + 1].copy()


@njit(cache=True, parallel=True, nogil=True)
def segment_sum_rows(values, order, starts, out):
    """out[s, :] = sum of values[order[j], :] for j in [starts[s], starts[s+1]) (duplicate rows summed)."""
    d = values.shape[1]
    for s in prange(out.shape[0]):
        for k in range(d):
            out[s, k] = values[order[starts[s]], k]
        for j in range(starts[s] + 1, starts[s + 1]):
            r = order[j]
            for k in range(d):
                out[s, k] += values[r, k]


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def sgd_sparse_update(p, rows, g, buf, h, nesterov, use_mom):
    """sgd_update on the rows p[rows[r]] with gradient rows g[r] (buffer rows updated lazily)."""
    lr = h[0]
    wd = h[1]
    momentum = h[2]
    omd = h[3]
    for r in prange(rows.shape[0]):
        dst = rows[r]
        pr = p[dst]
        gr = g[r]
        br = buf[dst]
        for k in range(pr.shape[0]):
            sgd_elem(pr, gr, br, k, lr, wd, momentum, omd, nesterov, use_mom)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def adagrad_sparse_update(p, rows, g, acc, h):
    """adagrad_update on the rows p[rows[r]] with gradient rows g[r]."""
    lr = h[0]
    wd = h[1]
    eps = h[2]
    for r in prange(rows.shape[0]):
        dst = rows[r]
        pr = p[dst]
        gr = g[r]
        ar = acc[dst]
        for k in range(pr.shape[0]):
            adagrad_elem(pr, gr, ar, k, lr, wd, eps)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True, error_model="numpy")
def adam_sparse_update(p, rows, g, m, v, h):
    """Lazy Adam: adam_update on the rows p[rows[r]] only (other rows' moments are left as they are)."""
    lr_c = h[0]
    wd = h[1]
    b1 = h[2]
    omb1 = h[3]
    b2 = h[4]
    omb2 = h[5]
    inv_sqrt_bc2 = h[6]
    eps = h[7]
    for r in prange(rows.shape[0]):
        dst = rows[r]
        pr = p[dst]
        gr = g[r]
        mr = m[dst]
        vr = v[dst]
        for k in range(pr.shape[0]):
            adam_elem(pr, gr, mr, vr, k, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps)


# ==============================================================================================================
# Neural-network kernels (jitnet.nn.functional): pooling, fused cross entropy, fused LSTM steps and sequences
# (the convolution kernels live in kernels_conv.py). Images are NCHW.
# ==============================================================================================================

@njit(cache=True, parallel=True, nogil=True)
def nn_max_pool2d(x, out, kh_, kw_, sh, sw, ph, pw):
    """Write the max over each window of x (N, C, H, W) into out (N, C, OH, OW); padding never wins."""
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = out.shape[2], out.shape[3]
    for t in prange(n_ * c_):
        n = t // c_
        c = t - n * c_
        for oh in range(oh_):
            h0 = oh * sh - ph
            for ow in range(ow_):
                w0 = ow * sw - pw
                best = -np.inf
                first = True
                for kh in range(kh_):
                    ih = h0 + kh
                    if ih < 0 or ih >= h_:
                        continue
                    for kw in range(kw_):
                        iw = w0 + kw
                        if iw < 0 or iw >= w_:
                            continue
                        v = x[n, c, ih, iw]
                        if first or v > best or v != v:
                            best = v
                            first = False
                out[n, c, oh, ow] = best


@njit(cache=True, parallel=True, nogil=True)
def nn_max_pool2d_grad(x, g, dx, kh_, kw_, sh, sw, ph, pw):
    """Route each g (N, C, OH, OW) to the argmax of its window in x (first maximum on ties) into dx."""
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = g.shape[2], g.shape[3]
    for t in prange(n_ * c_):
        n = t // c_
        c = t - n * c_
        for ih in range(h_):
            for iw in range(w_):
                dx[n, c, ih, iw] = 0
        for oh in range(oh_):
            h0 = oh * sh - ph
            for ow in range(ow_):
                w0 = ow * sw - pw
                best = -np.inf
                bi = -1
                bj = -1
                for kh in range(kh_):
                    ih = h0 + kh
                    if ih < 0 or ih >= h_:
                        continue
                    for kw in range(kw_):
                        iw = w0 + kw
                        if iw < 0 or iw >= w_:
                            continue
                        v = x[n, c, ih, iw]
                        if bi < 0 or v > best:
                            best = v
                            bi = ih
                            bj = iw
                if bi >= 0:
                    dx[n, c, bi, bj] += g[n, c, oh, ow]


@njit(cache=True, parallel=True, nogil=True)
def nn_avg_pool2d(x, out, kh_, kw_, sh, sw, ph, pw, include_pad):
    """Write the mean over each window of x into out (padding counted only when include_pad)."""
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = out.shape[2], out.shape[3]
    for t in prange(n_ * c_):
        n = t // c_
        c = t - n * c_
        for oh in range(oh_):
            h0 = oh * sh - ph
            for ow in range(ow_):
                w0 = ow * sw - pw
                s = x[0, 0, 0, 0] * 0
                cnt = 0
                for kh in range(kh_):
                    ih = h0 + kh
                    if ih < 0 or ih >= h_:
                        continue
                    for kw in range(kw_):
                        iw = w0 + kw
                        if iw < 0 or iw >= w_:
                            continue
                        s += x[n, c, ih, iw]
                        cnt += 1
                if include_pad:
                    cnt = (min(h0 + kh_, h_ + ph) - h0) * (min(w0 + kw_, w_ + pw) - w0)
                out[n, c, oh, ow] = s / max(cnt, 1)


@njit(cache=True, parallel=True, nogil=True)
def nn_avg_pool2d_grad(g, dx, kh_, kw_, sh, sw, ph, pw, include_pad):
    """Spread each g (N, C, OH, OW) evenly over its window into dx (N, C, H, W): the adjoint of avg pooling."""
    n_, c_, h_, w_ = dx.shape
    oh_, ow_ = g.shape[2], g.shape[3]
    for t in prange(n_ * c_):
        n = t // c_
        c = t - n * c_
        for ih in range(h_):
            for iw in range(w_):
                dx[n, c, ih, iw] = 0
        for oh in range(oh_):
            h0 = oh * sh - ph
            for ow in range(ow_):
                w0 = ow * sw - pw
                if include_pad:
                    cnt = (min(h0 + kh_, h_ + ph) - h0) * (min(w0 + kw_, w_ + pw) - w0)
                else:
                    cnt = (min(h0 + kh_, h_) - max(h0, 0)) * (min(w0 + kw_, w_) - max(w0, 0))
                v = g[n, c, oh, ow] / max(cnt, 1)
                for kh in range(kh_):
                    ih = h0 + kh
                    if ih < 0 or ih >= h_:
                        continue
                    for kw in range(kw_):
                        iw = w0 + kw
                        if 0 <= iw < w_:
                            dx[n, c, ih, iw] += v


@njit(cache=True, fastmath=_FM, inline="always")
def _nn_row_lse(x, i):
    n = x.shape[1]
    m = x[i, 0]
    for j in range(1, n):
        if x[i, j] > m:
            m = x[i, j]
    if m == -np.inf or m == np.inf or m != m:
        return m
    s = m * 0
    for j in range(n):
        s += math.exp(x[i, j] - m)
    return m + math.log(s)


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def nn_xent_int(x, labels, out):
    """out[i] = logsumexp(x[i]) - x[i, labels[i]] (0 where the label is negative: ignored); return the position
    of the first label >= the class count (its row is NaN, no memory outside x is read), or -1."""
    n = x.shape[1]
    m = x.shape[0]
    bad = m
    for i in prange(m):
        lab = labels[i]
        if lab < 0:
            out[i] = 0
        elif lab >= n:
            out[i] = np.nan
            bad = min(bad, i)
        else:
            out[i] = _nn_row_lse(x, i) - x[i, lab]
    return bad if bad < m else -1


@njit(cache=True, fastmath=_FM, inline="always")
def _nn_xent_grad_row(x, i, lab, gi, out):
    """out[i] = gi * (softmax(x[i]) - onehot(lab)); a row of 0 for a negative label, of NaN for lab >= classes."""
    n = x.shape[1]
    if lab < 0 or lab >= n:
        fill = 0.0 if lab < 0 else np.nan
        for j in range(n):
            out[i, j] = fill
        return
    lse = _nn_row_lse(x, i)
    for j in range(n):
        out[i, j] = gi * math.exp(x[i, j] - lse)
    out[i, lab] -= gi


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def nn_xent_int_grad(x, labels, g, out):
    """out[i] = g[i] * (softmax(x[i]) - onehot(labels[i])) (a zero row where the label is negative); return the
    position of the first label >= the class count (its row is NaN), or -1."""
    n = x.shape[1]
    m = x.shape[0]
    bad = m
    for i in prange(m):
        lab = labels[i]
        if lab >= n:
            bad = min(bad, i)
        _nn_xent_grad_row(x, i, lab, g[i], out)
    return bad if bad < m else -1


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def nn_xent_int_reduced(x, labels, mean, out):
    """out[0] = the sum (mean: the mean) of logsumexp(x[i]) - x[i, labels[i]] over the rows whose label is not
    negative, summed in float64 (a mean over no counted row: 0, over no rows at all: NaN); return the position
    of the first label >= the class count (out[0] is then NaN), or -1. The cross entropy's usual reductions in
    one pass: no per-row losses, no count, no scale."""
    n = x.shape[1]
    m = x.shape[0]
    bad = m
    s = 0.0
    cnt = 0
    for i in prange(m):
        lab = labels[i]
        if lab >= n:
            bad = min(bad, i)
        elif lab >= 0:
            s += np.float64(_nn_row_lse(x, i) - x[i, lab])
            cnt += 1
    if bad < m:
        out[0] = np.nan
        return bad
    if mean:
        out[0] = s / cnt if cnt else (0.0 if m else np.nan)
    else:
        out[0] = s
    return -1


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def nn_xent_int_reduced_grad(x, labels, g, mean, out):
    """The gradient of ``nn_xent_int_reduced`` scaled by g[0]: out[i] = g[0] (mean: / max(count, 1)) *
    (softmax(x[i]) - onehot(labels[i])) on the counted rows, 0 on ignored ones; returns as ``nn_xent_int_grad``."""
    n = x.shape[1]
    m = x.shape[0]
    cnt = 0
    if mean:
        for i in range(m):
            if labels[i] >= 0:
                cnt += 1
    gi = g[0] / max(cnt, 1) if mean else g[0] * 1.0
    bad = m
    for i in prange(m):
        lab = labels[i]
        if lab >= n:
            bad = min(bad, i)
        _nn_xent_grad_row(x, i, lab, gi, out)
    return bad if bad < m else -1


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def nn_xent_prob(x, p, out):
    """out[i] = sum_j p[i, j] * (logsumexp(x[i]) - x[i, j]): cross entropy against probability rows."""
    for i in prange(x.shape[0]):
        lse = _nn_row_lse(x, i)
        s = x[i, 0] * 0
        for j in range(x.shape[1]):
            pj = p[i, j]
            if pj != 0:
                s += pj * (lse - x[i, j])
        out[i] = s


@njit(cache=True, fastmath=_FM, parallel=True, nogil=True)
def nn_xent_prob_grad(x, p, g, out):
    """out[i] = g[i] * (softmax(x[i]) * sum(p[i]) - p[i]): the gradient of ``nn_xent_prob`` w.r.t. x."""
    n = x.shape[1]
    for i in prange(x.shape[0]):
        lse = _nn_row_lse(x, i)
        sp = p[i, 0] * 0
        for j in range(n):
            sp += p[i, j]
        gi = g[i]
        for j in range(n):
            out[i, j] = gi * (math.exp(x[i, j] - lse) * sp - p[i, j])


# The LSTM step kernels below make every inner loop one simple pass over a row (LLVM vectorizes those, with
# the vectorizable float32 sigmoid/tanh of kernels_scalar; a loop body touching many arrays at once, or a libm
# call, stays scalar and runs 5-20x slower).

@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def nn_lstm_step(xw, s_prev, whh, b, mask, s_out, use_mask):
    """One LSTM step. xw (B, 4H): input projection; s_prev / s_out (B, 6H) = [h, c, i, f, g, o]; gates i f g o.

    z = xw + h @ whh + b (the recurrent GEMM is BLAS). Rows whose mask is 0 (when use_mask) carry h and c
    through unchanged (their gates are written as zeros).
    """
    bsz = xw.shape[0]
    hd = whh.shape[0]
    z = np.empty((bsz, 4 * hd), dtype=xw.dtype)
    gemm(s_prev[:, :hd], whh, z)
    for r in range(bsz):
        orow, prow = s_out[r], s_prev[r]
        if use_mask and mask[r] == 0:
            for j in range(2 * hd):
                orow[j] = prow[j]
            for j in range(2 * hd, 6 * hd):
                orow[j] = 0
            continue
        zr, xr = z[r], xw[r]
        for j in range(4 * hd):
            zr[j] += xr[j] + b[j]
        # slices first: an index like hd + j (signed, runtime hd) makes LLVM gather instead of load
        zi, zf, zg, zo = zr[:hd], zr[hd:2 * hd], zr[2 * hd:3 * hd], zr[3 * hd:]
        oh, oc, oi, of, og, oo = (orow[:hd], orow[hd:2 * hd], orow[2 * hd:3 * hd], orow[3 * hd:4 * hd],
                                  orow[4 * hd:5 * hd], orow[5 * hd:])
        pc = prow[hd:2 * hd]
        for j in range(hd):
            oi[j] = sigmoid_v(zi[j])
        for j in range(hd):
            of[j] = sigmoid_v(zf[j])
        for j in range(hd):
            og[j] = tanh_v(zg[j])
        for j in range(hd):
            oo[j] = sigmoid_v(zo[j])
        for j in range(hd):
            oc[j] = of[j] * pc[j] + oi[j] * og[j]
        for j in range(hd):
            oh[j] = oo[j] * tanh_v(oc[j])


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def nn_lstm_step_dz(g, s, s_prev, mask, dz, use_mask):
    """Write the gradient w.r.t. the gate pre-activations dz (B, 4H) from g = d s (B, 6H).

    The saved gates are outputs of the step too: their own gradients (the i, f, g, o parts of g) are included.
    """
    bsz = s.shape[0]
    hd = dz.shape[1] // 4
    tc = np.empty(hd, s.dtype)
    dc = np.empty(hd, s.dtype)
    for r in range(bsz):
        dr = dz[r]
        if use_mask and mask[r] == 0:
            for j in range(4 * hd):
                dr[j] = 0
            continue
        _lstm_row_dz(g[r], s[r], s_prev[r], dr, tc, dc, hd)


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def _lstm_row_dz(gr, sr, pr, dr, tc, dc, hd):
    """dz of one row (see nn_lstm_step_dz); leaves tanh(c) in tc and dc = d c in dc."""
    gh, gc, gi, gf, gg_, go = (gr[:hd], gr[hd:2 * hd], gr[2 * hd:3 * hd], gr[3 * hd:4 * hd], gr[4 * hd:5 * hd],
                               gr[5 * hd:])
    sc, si, sf, sg, so = sr[hd:2 * hd], sr[2 * hd:3 * hd], sr[3 * hd:4 * hd], sr[4 * hd:5 * hd], sr[5 * hd:]
    pc = pr[hd:2 * hd]
    di, df, dg, do = dr[:hd], dr[hd:2 * hd], dr[2 * hd:3 * hd], dr[3 * hd:]
    for j in range(hd):
        tc[j] = tanh_v(sc[j])
    for j in range(hd):
        dc[j] = gc[j] + gh[j] * so[j] * (1 - tc[j] * tc[j])
    for j in range(hd):
        ig = si[j]
        di[j] = (dc[j] * sg[j] + gi[j]) * ig * (1 - ig)
    for j in range(hd):
        fg = sf[j]
        df[j] = (dc[j] * pc[j] + gf[j]) * fg * (1 - fg)
    for j in range(hd):
        gg = sg[j]
        dg[j] = (dc[j] * si[j] + gg_[j]) * (1 - gg * gg)
    for j in range(hd):
        og = so[j]
        do[j] = (gh[j] * tc[j] + go[j]) * og * (1 - og)


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def nn_lstm_step_dprev(g, dz, s, whh, mask, out, use_mask):
    """Write d s_prev (B, 6H) = [dz @ whh.T, dc * f, 0, 0, 0, 0]; rows with mask 0 pass g's h and c through."""
    bsz = s.shape[0]
    hd = whh.shape[0]
    dht = np.empty((hd, bsz), dtype=dz.dtype)       # (dz @ whh.T).T: this operand order is ~1.8x faster in
    gemm(whh, dz.T, dht)                             # OpenBLAS for few rows than dz @ whh.T
    tc = np.empty(hd, s.dtype)
    for r in range(bsz):
        orow, gr, sr = out[r], g[r], s[r]
        if use_mask and mask[r] == 0:
            for j in range(2 * hd):
                orow[j] = gr[j]
        else:
            sc, sf, so = sr[hd:2 * hd], sr[3 * hd:4 * hd], sr[5 * hd:]
            gh, gc, oc = gr[:hd], gr[hd:2 * hd], orow[hd:2 * hd]
            for j in range(hd):
                tc[j] = tanh_v(sc[j])
            for j in range(hd):
                orow[j] = dht[j, r]
            for j in range(hd):
                oc[j] = (gc[j] + gh[j] * so[j] * (1 - tc[j] * tc[j])) * sf[j]
        for j in range(2 * hd, 6 * hd):
            orow[j] = 0


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def _lstm_bwd_step(g, s, s_prev, whh, mask, use_mask, dz, out, add, use_add):
    """One step of the reverse loop: ``nn_lstm_step_dz`` and ``nn_lstm_step_dprev`` in one pass over the rows.

    Writes dz (B, 4H) from g = d s (B, 6H), and out = d s_prev (+ add when use_add) = [dz @ whh.T, dc * f, 0,
    0, 0, 0]; masked rows get dz = 0 and pass g's h and c through. tanh(c) and dc are computed once per row
    for both outputs; only the h part waits for the GEMM.
    """
    bsz = s.shape[0]
    hd = whh.shape[0]
    tc = np.empty(hd, s.dtype)
    dc = np.empty(hd, s.dtype)
    for r in range(bsz):
        dr, orow, gr = dz[r], out[r], g[r]
        oc = orow[hd:2 * hd]
        gc = gr[hd:2 * hd]
        if use_mask and mask[r] == 0:
            for j in range(4 * hd):
                dr[j] = 0
            for j in range(hd):
                oc[j] = gc[j]
        else:
            _lstm_row_dz(gr, s[r], s_prev[r], dr, tc, dc, hd)
            sf = s[r][3 * hd:4 * hd]
            for j in range(hd):
                oc[j] = dc[j] * sf[j]
        rest = orow[2 * hd:]
        if use_add:
            ar = add[r]
            ac, arest = ar[hd:2 * hd], ar[2 * hd:]
            for j in range(hd):
                oc[j] += ac[j]
            for j in range(4 * hd):
                rest[j] = arest[j]
        else:
            for j in range(4 * hd):
                rest[j] = 0
    dht = np.empty((hd, bsz), dtype=dz.dtype)       # (dz @ whh.T).T: this operand order is ~1.8x faster in
    gemm(whh, dz.T, dht)                             # OpenBLAS for few rows than dz @ whh.T
    for r in range(bsz):
        oh = out[r][:hd]
        if use_mask and mask[r] == 0:
            gh = g[r][:hd]
            for j in range(hd):
                oh[j] = gh[j]
        else:
            for j in range(hd):
                oh[j] = dht[j, r]
        if use_add:
            ah = add[r][:hd]
            for j in range(hd):
                oh[j] += ah[j]


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def nn_lstm_seq(xw, s0, whh, b, mask, S, use_mask):
    """T LSTM steps in one call: S[t] = nn_lstm_step(xw[t], S[t-1] (s0 for t = 0)).

    xw (T, B, 4H), s0 (B, 6H), S (T, B, 6H) packed states [h, c, i, f, g, o]; mask (T, B) when use_mask
    (else any (1, 1) array).
    """
    for t in range(xw.shape[0]):
        prev = s0 if t == 0 else S[t - 1]
        m = mask[t] if use_mask else mask[0]
        nn_lstm_step(xw[t], prev, whh, b, m, S[t], use_mask)


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def nn_lstm_seq_bwd(G, S, s0, whh, mask, use_mask, dz, ds0, dwhh, db):
    """Backward of nn_lstm_seq for the gradient G = d S (T, B, 6H): a reverse loop of the per-step kernels.

    Writes dz (T, B, 4H) (= d xw), ds0 (B, 6H), and the weight gradients with one GEMM over all steps,
    dwhh (H, 4H) = [h_{-1}; ...; h_{T-2}].T @ dz, and db (4H,) = dz summed over steps and rows.
    """
    T, bsz, h6 = S.shape
    hd = h6 // 6
    if T == 0:
        ds0[:] = 0
        dwhh[:] = 0
        db[:] = 0
        return
    g = G[T - 1].copy()                 # d S[t] in full: G[t] plus what step t + 1 sends back
    nxt = np.empty((bsz, h6), S.dtype)
    for t in range(T - 1, -1, -1):
        prev = s0 if t == 0 else S[t - 1]
        m = mask[t] if use_mask else mask[0]
        if t > 0:
            _lstm_bwd_step(g, S[t], prev, whh, m, use_mask, dz[t], nxt, G[t - 1], True)
            g, nxt = nxt, g
        else:
            _lstm_bwd_step(g, S[t], prev, whh, m, use_mask, dz[t], ds0, ds0, False)
    hp = np.empty((T * bsz, hd), S.dtype)
    for t in range(T):
        prev = s0 if t == 0 else S[t - 1]
        for r in range(bsz):
            hr, pr = hp[t * bsz + r], prev[r]
            for j in range(hd):
                hr[j] = pr[j]
    dz2 = dz.reshape((T * bsz, 4 * hd))
    gemm(hp.T, dz2, dwhh)
    for j in range(4 * hd):
        db[j] = 0
    for i in range(T * bsz):
        zr = dz2[i]
        for j in range(4 * hd):
            db[j] += zr[j]


# --------------------------------------------------------------------------------------------------------------
# Serial twins of the parallel kernels
# --------------------------------------------------------------------------------------------------------------
# A parallel launch costs tens of microseconds (much more on a busy machine, where it waits for every worker
# to be scheduled), and Numba's workqueue layer must not be entered from two Python threads at once. Each
# always-parallel kernel therefore gets a serial twin compiled from the same Python function (renamed, so
# Numba caches it separately: its cache key ignores the parallel flag), and calls pick the serial one for
# small inputs and outside the main thread.

import threading as _threading  # noqa: E402
import types as _types  # noqa: E402

SERIAL_BELOW = 1 << 18       # elements: smaller calls run the serial twin


def serial_twin(disp, suffix="_serial"):
    """Return a serial ``@njit(cache=True)`` dispatcher compiled from parallel dispatcher ``disp``'s function."""
    f = disp.py_func
    g = _types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__module__ = f.__module__
    g.__doc__ = f.__doc__
    opts = {k: v for k, v in disp.targetoptions.items() if k in ("fastmath", "error_model", "boundscheck")}
    return njit(cache=True, nogil=True, **opts)(g)


# the serial reductions are the parallel ones compiled without threads
reduce_last = serial_twin(reduce_last_par)
reduce_middle = serial_twin(reduce_middle_par)


@njit(cache=True, nogil=True)
def discounted_returns(rewards, dones, gamma, out):
    """out[t] = rewards[t] + gamma * out[t + 1], restarting from 0 after every t with dones[t] (float64, 1-D).

    The policy-gradient agent's returns (jitnet.models.policy_gradient.discounted_returns checks and
    converts its inputs)."""
    running = 0.0
    for t in range(rewards.shape[0] - 1, -1, -1):
        if dones[t]:
            running = 0.0
        running = rewards[t] + gamma * running
        out[t] = running


class Adaptive:
    """A parallel kernel and its serial twin; a call runs the serial one for small inputs or off the main thread."""

    def __init__(self, disp):
        self.parallel = disp
        self.serial = serial_twin(disp)
        self.__name__ = disp.py_func.__name__
        self.__doc__ = disp.py_func.__doc__

    def __call__(self, *args):
        n = 0
        for a in args:
            sz = getattr(a, "size", 0)
            if sz > n:
                n = sz
        if n < SERIAL_BELOW or _threading.current_thread() is not _threading.main_thread():
            return self.serial(*args)
        return self.parallel(*args)


def adaptive(disp):
    """Return ``disp`` wrapped as an :class:`Adaptive` (serial for small inputs and worker threads)."""
    return Adaptive(disp)


for _name in ("arg_reduce_last", "logsumexp_last", "cumulative", "take_axis", "take_along_last",
              "put_along_last_add", "one_hot_kernel", "argsort_last", "topk_last", "segment_sum_rows",
              "sgd_sparse_update", "adagrad_sparse_update", "adam_sparse_update", "nn_max_pool2d",
              "nn_max_pool2d_grad", "nn_avg_pool2d", "nn_avg_pool2d_grad", "nn_xent_int", "nn_xent_int_grad",
              "nn_xent_int_reduced", "nn_xent_int_reduced_grad",
              "nn_xent_prob", "nn_xent_prob_grad"):
    if _name in globals():
        globals()[_name] = Adaptive(globals()[_name])
