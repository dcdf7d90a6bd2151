"""Convolution and pooling kernels (used by ``jitnet.nn.functional``).

A convolution runs chunk by chunk over the batch (see ``nn.functional._conv2d_impl``): ``im2col_chunk`` writes
the patches of a few images into a cols matrix (C*KH*KW, nb*OH*OW) small enough to stay in cache, and NumPy's
BLAS multiplies it by the filters, one gemm per image straight into the NCHW output (with several threads, one
gemm per chunk, scattered to NCHW by ``onp_to_nop_bias``). The input gradient runs the same chunks backwards
(gemm, then ``col2im_chunk``); ``nop_to_onp`` lays a chunk of an NCHW gradient out as one (O, nb*OH*OW)
matrix; ``channel_sum`` is the bias gradient. Kernels overwrite their whole output (no
caller-side zero fill) and keep their inner loops long and branch-free over contiguous runs.

Max pooling has a fast path for the common 2x2 window with stride 2 and no padding (``max_pool2x2`` /
``max_pool2x2_grad``: the windows do not overlap, so the gradient writes every input position exactly once);
other windows use the general kernels in ``kernels_cpu``.

Each kernel is ``parallel=True`` with ``prange`` over (image, channel) planes and wrapped in
``kernels_cpu.Adaptive``, which runs its serial twin for small inputs and off the main thread. The per-plane
loops live in serial ``_*_plane`` helpers that the prange loop calls: written inline in a prange body, such
loops ran several times slower (Numba's parallel lowering kept them from vectorizing).
"""
import numpy as np
from numba import njit, prange

from .kernels_cpu import _FM, Adaptive


_WORKSPACE: dict = {}


def workspace(size, dtype, tag="cols"):
    """Return a reusable 1-D scratch buffer of at least ``size`` elements (one per tag and dtype): the
    convolutions' multi-megabyte scratch would otherwise cost more in page faults than the kernels filling it."""
    key = (tag, np.dtype(dtype))
    buf = _WORKSPACE.get(key)
    if buf is None or buf.size < size:
        buf = np.empty(size, key[1])
        _WORKSPACE[key] = buf
    return buf[:size]


# ==============================================================================================================
# im2col / col2im over a chunk of images
# ==============================================================================================================

# Both directions go through a zero-bordered copy of one image plane, ``pad`` (hp, wp), and for each kernel column
# kw its "column view" ``e`` (hp, OW): e[r, ow] = pad[r, ow*sw + kw*dw]. With stride 1 the cols row of (kh, kw)
# is then rows kh*dh .. kh*dh+OH of e, one contiguous run of OH*OW elements: the kernel copies each plane column
# KW times instead of copying KH*KW rows of OW (a few) elements each, which ran ~3x slower.

@njit(cache=True, nogil=True)
def _im2col_plane(plane, cols, r0, base, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_, hp, wp):
    h_, w_ = plane.shape
    pad = np.zeros(hp * wp, plane.dtype)
    for ih in range(h_):
        row = pad[(ih + ph) * wp + pw:]
        for iw in range(w_):
            row[iw] = plane[ih, iw]
    ohw = oh_ * ow_
    e = np.empty(hp * ow_, plane.dtype)
    for kw in range(kw_):
        for r in range(hp):
            src = pad[r * wp + kw * dw:]
            for ow in range(ow_):
                e[r * ow_ + ow] = src[ow * sw]
        for kh in range(kh_):
            dst = cols[r0 + kh * kw_ + kw][base:base + ohw]
            if sh == 1:
                src = e[kh * dh * ow_:]
                for q in range(ohw):
                    dst[q] = src[q]
            else:
                for oh in range(oh_):
                    src = e[(oh * sh + kh * dh) * ow_:]
                    for ow in range(ow_):
                        dst[oh * ow_ + ow] = src[ow]


@njit(cache=True, parallel=True, nogil=True)
def im2col_chunk(x, cols, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_):
    """Write the patches of the images of x (nb, C, H, W) into cols (C*KH*KW, nb*OH*OW).

    Row (c, kh, kw) of cols holds, for each image and output position (oh, ow), x[n, c, oh*sh-ph+kh*dh,
    ow*sw-pw+kw*dw], or 0 where that falls in the padding.
    """
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    hp = max(ph + h_, (oh_ - 1) * sh + (kh_ - 1) * dh + 1)
    wp = max(pw + w_, (ow_ - 1) * sw + (kw_ - 1) * dw + 1)
    for t in prange(x.shape[0] * c_):
        j = t // c_
        c = t - j * c_
        _im2col_plane(x[j, c], cols, c * kh_ * kw_, j * oh_ * ow_, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_,
                      hp, wp)


@njit(cache=True, nogil=True)
def _col2im_plane(cols, plane, r0, base, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_, hp, wp):
    h_, w_ = plane.shape
    pad = np.zeros(hp * wp, plane.dtype)
    ohw = oh_ * ow_
    e = np.empty(hp * ow_, plane.dtype)
    for kw in range(kw_):
        e[:] = 0
        for kh in range(kh_):
            src = cols[r0 + kh * kw_ + kw][base:base + ohw]
            if sh == 1:
                dst = e[kh * dh * ow_:]
                for q in range(ohw):
                    dst[q] += src[q]
            else:
                for oh in range(oh_):
                    dst = e[(oh * sh + kh * dh) * ow_:]
                    for ow in range(ow_):
                        dst[ow] += src[oh * ow_ + ow]
        for r in range(hp):
            dst = pad[r * wp + kw * dw:]
            for ow in range(ow_):
                dst[ow * sw] += e[r * ow_ + ow]
    for ih in range(h_):
        row = pad[(ih + ph) * wp + pw:]
        for iw in range(w_):
            plane[ih, iw] = row[iw]


@njit(cache=True, parallel=True, nogil=True)
def col2im_chunk(cols, dx, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_):
    """Write into dx (nb, C, H, W) the sum of the patch gradients cols (C*KH*KW, nb*OH*OW): the adjoint of
    ``im2col_chunk`` (every plane is overwritten)."""
    c_, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
    hp = max(ph + h_, (oh_ - 1) * sh + (kh_ - 1) * dh + 1)
    wp = max(pw + w_, (ow_ - 1) * sw + (kw_ - 1) * dw + 1)
    for t in prange(dx.shape[0] * c_):
        j = t // c_
        c = t - j * c_
        _col2im_plane(cols, dx[j, c], c * kh_ * kw_, j * oh_ * ow_, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_,
                      hp, wp)


@njit(cache=True, parallel=True, nogil=True)
def onp_to_nop_bias(y2, bias, out, has_bias):
    """out[j, o, p] = y2[o, j*P + p] (+ bias[o]) for y2 (O, nb*P) and out (nb, O, P)."""
    o_, p_ = out.shape[1], out.shape[2]
    for t in prange(out.shape[0] * o_):
        j = t // o_
        o = t - j * o_
        src = y2[o][j * p_:(j + 1) * p_]
        dst = out[j, o]
        b = bias[o] if has_bias else src[0] * 0
        for p in range(p_):
            dst[p] = src[p] + b


@njit(cache=True, parallel=True, nogil=True)
def nop_to_onp(g, out):
    """out[o, j*P + p] = g[j, o, p] for g (nb, O, P) and out (O, nb*P)."""
    o_, p_ = g.shape[1], g.shape[2]
    nb = out.shape[1] // p_
    for t in prange(nb * o_):
        j = t // o_
        o = t - j * o_
        src = g[j, o]
        dst = out[o]
        d0 = j * p_
        for p in range(p_):
            dst[d0 + p] = src[p]


@njit(cache=True, nogil=True, fastmath=_FM)
def _row_sum(row):
    s = row[0] * 0
    for p in range(row.shape[0]):
        s += row[p]
    return s


@njit(cache=True, parallel=True, nogil=True)
def channel_sum(g, out):
    """out[o] = sum of g[n, o, p] over n and p for g (N, O, P): the bias gradient of a convolution."""
    for o in prange(g.shape[1]):
        acc = g[0, 0, 0] * 0
        for n in range(g.shape[0]):
            acc += _row_sum(g[n, o])
        out[o] = acc


# ==============================================================================================================
# 2x2 max pooling with stride 2 and no padding
# ==============================================================================================================

@njit(cache=True, nogil=True)
def _max_pool2x2_plane(xp, op):
    for i in range(op.shape[0]):
        r0 = xp[2 * i]
        r1 = xp[2 * i + 1]
        dst = op[i]
        for j in range(op.shape[1]):
            m = r0[2 * j]
            v = r0[2 * j + 1]
            m = v if (v > m) | (v != v) else m
            v = r1[2 * j]
            m = v if (v > m) | (v != v) else m
            v = r1[2 * j + 1]
            m = v if (v > m) | (v != v) else m
            dst[j] = m


@njit(cache=True, parallel=True, nogil=True)
def max_pool2x2(x, out):
    """out[n, c, i, j] = max of x[n, c, 2i:2i+2, 2j:2j+2] (a NaN wins, as in the general kernel)."""
    c_ = x.shape[1]
    for t in prange(x.shape[0] * c_):
        n = t // c_
        c = t - n * c_
        _max_pool2x2_plane(x[n, c], out[n, c])


@njit(cache=True, nogil=True)
def _max_pool2x2_grad_plane(xp, gp, dp):
    dp[:, :] = 0
    for i in range(gp.shape[0]):
        r0 = xp[2 * i]
        r1 = xp[2 * i + 1]
        gr = gp[i]
        for j in range(gp.shape[1]):
            # window order (0,0), (0,1), (1,0), (1,1); a later entry wins only when strictly greater
            best = r0[2 * j]
            k = 0
            v = r0[2 * j + 1]
            k = 1 if v > best else k
            best = v if v > best else best
            v = r1[2 * j]
            k = 2 if v > best else k
            best = v if v > best else best
            v = r1[2 * j + 1]
            k = 3 if v > best else k
            dp[2 * i + (k >> 1), 2 * j + (k & 1)] = gr[j]


@njit(cache=True, parallel=True, nogil=True)
def max_pool2x2_grad(x, g, dx):
    """Route g[n, c, i, j] to the first maximum of its 2x2 window of x; every other dx entry is 0."""
    c_ = x.shape[1]
    for t in prange(x.shape[0] * c_):
        n = t // c_
        c = t - n * c_
        _max_pool2x2_grad_plane(x[n, c], g[n, c], dx[n, c])


# ==============================================================================================================
# Batch normalization: per-channel moments, per-channel affine map and its gradient sums
# ==============================================================================================================
# On (N, C, S) views (S = 1 for (N, C) inputs). Sums accumulate in float64, the moments shifted by the channel's
# first value so that a large mean does not cancel the variance away.

@njit(cache=True, nogil=True, fastmath=_FM)
def _shifted_sums(row, k):
    s1 = 0.0
    s2 = 0.0
    for p in range(row.shape[0]):
        d = np.float64(row[p]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(cache=True, nogil=True, fastmath=_FM)
def _dot_sum(g, x):
    s1 = 0.0
    s2 = 0.0
    for p in range(g.shape[0]):
        gp = np.float64(g[p])
        s1 += gp
        s2 += gp * np.float64(x[p])
    return s1, s2


@njit(cache=True, parallel=True, nogil=True)
def bn_moments(x, out):
    """out[0, c], out[1, c] = mean and biased variance of x[:, c, :] for x (N, C, S)."""
    n_, c_, s_ = x.shape
    cnt = n_ * s_
    for c in prange(c_):
        k = np.float64(x[0, c, 0])
        a = 0.0
        b = 0.0
        for n in range(n_):
            a1, b1 = _shifted_sums(x[n, c], k)
            a += a1
            b += b1
        m = a / cnt
        out[0, c] = k + m
        out[1, c] = max(b / cnt - m * m, 0.0)


@njit(cache=True, parallel=True, nogil=True)
def channel_affine_sums(g, x, out):
    """out[0, c] = sum of g[:, c, :], out[1, c] = sum of g[:, c, :] * x[:, c, :] for g, x (N, C, S)."""
    n_, c_, s_ = x.shape
    for c in prange(c_):
        a = 0.0
        b = 0.0
        for n in range(n_):
            a1, b1 = _dot_sum(g[n, c], x[n, c])
            a += a1
            b += b1
        out[0, c] = a
        out[1, c] = b


@njit(cache=True, nogil=True, fastmath=_FM)
def _affine_row(x, a, b, y):
    for p in range(x.shape[0]):
        y[p] = x[p] * a + b


@njit(cache=True, parallel=True, nogil=True)
def channel_affine(x, a, b, y):
    """y[n, c, s] = x[n, c, s] * a[c] + b[c] for x, y (N, C, S)."""
    n_, c_, s_ = x.shape
    if s_ == 1:
        for n in prange(n_):
            for c in range(c_):
                y[n, c, 0] = x[n, c, 0] * a[c] + b[c]
    else:
        for t in prange(n_ * c_):
            n = t // c_
            c = t - n * c_
            _affine_row(x[n, c], a[c], b[c], y[n, c])


for _name in ("im2col_chunk", "col2im_chunk", "onp_to_nop_bias", "nop_to_onp", "channel_sum",
              "max_pool2x2", "max_pool2x2_grad", "bn_moments", "channel_affine_sums", "channel_affine"):
    globals()[_name] = Adaptive(globals()[_name])
