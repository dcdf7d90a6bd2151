"""Convolution and pooling kernels (used by ``jitnet.nn.functional``).

A convolution runs chunk by chunk over the batch: ``im2col_chunk`` writes the patches of a few images into a
cols matrix (C*KH*KW, nb*OH*OW) small enough to stay in cache, one BLAS gemm multiplies it, and the gemm's
(O, nb*OH*OW) result is scattered to NCHW with the bias added (``onp_to_nop_bias``). The input gradient runs
the same chunks backwards (``col2im_chunk``). Kernels overwrite their whole output (no caller-side zero fill)
and keep their inner loops long and branch-free over contiguous rows (row views of contiguous arrays).

Max pooling has a fast path for the common 2x2 window with stride 2 and no padding (``max_pool2x2`` /
``max_pool2x2_grad``: the windows do not overlap, so the gradient writes every input position exactly once);
other windows use the general kernels in ``kernels_cpu``.

Each kernel is ``parallel=True`` with ``prange`` over (image, channel) planes and wrapped in
``kernels_cpu.Adaptive``, which runs its serial twin for small inputs and off the main thread.
"""
import numpy as np
from numba import njit, prange

from .kernels_cpu import _FM, Adaptive


# ==============================================================================================================
# im2col / col2im over a chunk of images
# ==============================================================================================================

@njit(cache=True, nogil=True)
def _window_offsets(oh_, ow_, sh, sw, wp):
    """Return the offset in a row-major padded plane of row length wp of each output position's window corner."""
    idx = np.empty(oh_ * ow_, np.intp)
    for oh in range(oh_):
        for ow in range(ow_):
            idx[oh * ow_ + ow] = oh * sh * wp + ow * sw
    return idx


@njit(cache=True, parallel=True, nogil=True)
def im2col_chunk(x, cols, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_):
    """Write the patches of the images of x (nb, C, H, W) into cols (C*KH*KW, nb*OH*OW).

    Row (c, kh, kw) of cols holds, for each image and output position (oh, ow), x[n, c, oh*sh-ph+kh*dh,
    ow*sw-pw+kw*dw], or 0 where that falls in the padding. Each plane is first copied into a zero-bordered
    padded plane, so the copy into a row is one branch-free loop over all OH*OW positions (a gather through
    the window offsets): rows of a few elements copied one by one ran ~2.5x slower.
    """
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    ohw = oh_ * ow_
    nb = cols.shape[1] // ohw
    hp = max(ph + h_, (oh_ - 1) * sh + (kh_ - 1) * dh + 1)
    wp = max(pw + w_, (ow_ - 1) * sw + (kw_ - 1) * dw + 1)
    idx = _window_offsets(oh_, ow_, sh, sw, wp)
    for t in prange(nb * c_):
        j = t // c_
        c = t - j * c_
        plane = x[j, c]
        pad = np.zeros(hp * wp, x.dtype)
        for ih in range(h_):
            r = (ih + ph) * wp + pw
            for iw in range(w_):
                pad[r + iw] = plane[ih, iw]
        base = j * ohw
        for kh in range(kh_):
            for kw in range(kw_):
                dst = cols[(c * kh_ + kh) * kw_ + kw][base:base + ohw]
                src = pad[kh * dh * wp + kw * dw:]
                for q in range(ohw):
                    dst[q] = src[idx[q]]


@njit(cache=True, parallel=True, nogil=True)
def col2im_chunk(cols, dx, kh_, kw_, sh, sw, ph, pw, dh, dw, oh_, ow_):
    """Write into dx (nb, C, H, W) the sum of the patch gradients cols (C*KH*KW, nb*OH*OW): the adjoint of
    ``im2col_chunk`` (every plane is overwritten). Sums into a padded plane (the adjoint of its gather) and
    copies the interior out."""
    c_, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
    ohw = oh_ * ow_
    nb = cols.shape[1] // ohw
    hp = max(ph + h_, (oh_ - 1) * sh + (kh_ - 1) * dh + 1)
    wp = max(pw + w_, (ow_ - 1) * sw + (kw_ - 1) * dw + 1)
    idx = _window_offsets(oh_, ow_, sh, sw, wp)
    for t in prange(nb * c_):
        j = t // c_
        c = t - j * c_
        pad = np.zeros(hp * wp, dx.dtype)
        base = j * ohw
        for kh in range(kh_):
            for kw in range(kw_):
                src = cols[(c * kh_ + kh) * kw_ + kw][base:base + ohw]
                dst = pad[kh * dh * wp + kw * dw:]
                for q in range(ohw):
                    dst[idx[q]] += src[q]
        plane = dx[j, c]
        for ih in range(h_):
            r = (ih + ph) * wp + pw
            for iw in range(w_):
                plane[ih, iw] = pad[r + iw]


@njit(cache=True, parallel=True, nogil=True)
def onp_to_nop_bias(y2, bias, out, has_bias):
    """out[j, o, p] = y2[o, j*P + p] (+ bias[o]) for y2 (O, nb*P) and out (nb, O, P)."""
    o_, p_ = out.shape[1], out.shape[2]
    nb = y2.shape[1] // p_
    for t in prange(nb * o_):
        j = t // o_
        o = t - j * o_
        src = y2[o]
        dst = out[j, o]
        s0 = j * p_
        if has_bias:
            b = bias[o]
            for p in range(p_):
                dst[p] = src[s0 + p] + b
        else:
            for p in range(p_):
                dst[p] = src[s0 + p]


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

# The per-plane loops live in serial helpers that the prange kernels call: written inline in the prange body the
# same loops ran ~10x slower (Numba's parallel lowering kept them from vectorizing).

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


for _name in ("im2col_chunk", "col2im_chunk", "onp_to_nop_bias", "nop_to_onp", "channel_sum", "max_pool2x2",
              "max_pool2x2_grad"):
    globals()[_name] = Adaptive(globals()[_name])
