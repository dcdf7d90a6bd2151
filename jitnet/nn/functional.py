"""Neural-network functions: activations, convolution, pooling, normalization, dropout and losses.

New primitives (one registry row each, next to their public function): ``conv2d`` and its two gradients
(im2col + one BLAS gemm, col2im), ``max_pool2d`` (argmax-routed gradient) and ``avg_pool2d``, fused
``cross_entropy`` (per-row logsumexp forward, softmax-minus-target backward, one kernel each), and fused
LSTM steps. Everything else is a composition of jitnet ops, so its gradient comes from theirs.

Unless said otherwise, losses reduce with ``reduction="mean"`` (also ``"sum"`` and ``"none"``).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .. import bounds
from .. import kernelgen
from .. import kernels_conv as KC
from .. import kernels_cpu as K
from .. import ops
from .. import random as _random
from .. import winograd
from ..autodiff import core as _ad
from ..autodiff.core import Primitive, apply, current_interpreter
from ..lazy import LazyModule
from ..lowp import is_floating, is_lowp
from ..ops import log_softmax, relu, sigmoid, softmax, softplus, tanh
from ..tensor import Tensor, _infer_array
from .embedding_ops import embedding

# the CUDA backend's services and kernels, imported when a CUDA implementation first runs (never on the CPU)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))    # what the native emitters handle
_G = LazyModule("jitnet.backend_cuda")
_KG = LazyModule("jitnet.kernels_gpu")
_C = LazyModule("jitnet.cuda")

__all__ = ["relu", "sigmoid", "tanh", "softplus", "softmax", "log_softmax", "leaky_relu", "elu", "gelu",
           "linear", "conv2d", "conv2d_grad_input", "conv2d_grad_weight", "conv_output_size", "max_pool2d",
           "avg_pool2d", "dropout", "batch_norm", "cross_entropy", "binary_cross_entropy_with_logits",
           "mse_loss", "l2_loss", "huber_loss", "log_uniform_candidate_sampler", "nce_loss",
           "sampled_softmax_loss", "l1_regularizer", "l2_regularizer", "max_norm", "lstm_step", "lstm_seq", "lstm_cell",
           "gru_cell", "rnn_cell"]


def _t(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


def _c(a):
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _reduce(loss, reduction, op):
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ==============================================================================================================
# Activations
# ==============================================================================================================

def leaky_relu(x, negative_slope=0.01):
    """Return x where x > 0, else negative_slope * x."""
    x = _t(x)
    return ops.where(x > 0, x, x * negative_slope)


def elu(x, alpha=1.0):
    """Return x where x > 0, else alpha * (exp(x) - 1)."""
    x = _t(x)
    return ops.where(x > 0, x, (ops.exp(ops.minimum(x, 0.0)) - 1.0) * alpha)


def gelu(x):
    """Return the GELU of x (tanh approximation)."""
    x = _t(x)
    return x * 0.5 * (ops.tanh((x + x * x * x * 0.044715) * math.sqrt(2.0 / math.pi)) + 1.0)


def linear(x, W, b=None):
    """Return x @ W + b for W of shape (in, out)."""
    x, W = _t(x), _t(W)
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"linear: input of shape {x.shape} does not match weight of shape {W.shape} "
                         f"(expected last input dim {W.shape[0]})")
    y = ops.matmul(x, W)
    if b is None:
        return y
    if _ad._AUTOCAST is not None:            # under jn.autocast the bias joins the GEMM's low dtype
        b = _ad._AUTOCAST.lower(_t(b))
    return y + b


# ==============================================================================================================
# Convolution: im2col + one gemm. cols is (C*KH*KW, N*OH*OW); W is (O, C, KH, KW) viewed as (O, C*KH*KW).
# ==============================================================================================================

def _pair(v, name, op):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{op}: {name} must be an int or a pair, got {v}")
    return v


def conv_output_size(size, k, stride, pad_lo, pad_hi, dilation=1):
    """Return the output length of a convolution/pooling window over ``size`` positions."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def _conv_padding(padding, hw, khw, stride, dilation, op):
    """Return ((top, bottom), (left, right)) for padding 'same' / 'valid' / int / pair / pair of pairs."""
    if isinstance(padding, str):
        p = padding.lower()
        if p == "valid":
            return (0, 0), (0, 0)
        if p == "same":
            out = []
            for size, k, s, d in zip(hw, khw, stride, dilation):
                o = -(-size // s)
                total = max((o - 1) * s + d * (k - 1) + 1 - size, 0)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    if isinstance(padding, (int, np.integer)):
        return (int(padding),) * 2, (int(padding),) * 2
    padding = tuple(padding)
    if len(padding) == 2 and all(isinstance(p, (int, np.integer)) for p in padding):
        return (int(padding[0]),) * 2, (int(padding[1]),) * 2
    if len(padding) == 2:
        return tuple(int(a) for a in padding[0]), tuple(int(a) for a in padding[1])
    raise ValueError(f"{op}: cannot read padding {padding!r}")


def _geom(xs, ws, stride, pads, dilation):
    n, c, h, w = xs
    o, _, kh, kw = ws
    oh = conv_output_size(h, kh, stride[0], pads[0][0], pads[0][1], dilation[0])
    ow = conv_output_size(w, kw, stride[1], pads[1][0], pads[1][1], dilation[1])
    return n, c, h, w, o, kh, kw, oh, ow


# One thread: the im2col matrix of a chunk of images stays about CHUNK_BYTES small, so that im2col writes it into
# the L2 cache and the gemm reads it from there (8 MiB chunks, spilling to L3, made im2col + gemm ~1.3x slower),
# and the gemms go one per image. Several threads: BLAS splits each gemm over the threads, and hundreds of small
# threaded gemms alternating with single-threaded im2col made a 2-thread training step 2x slower than one
# thread (BLAS workers spin between calls), so chunks of CHUNK_BYTES_THREADED take one gemm each.
CHUNK_BYTES = 512 << 10
CHUNK_BYTES_THREADED = 8 << 20


def _per_image_gemms():
    return numba.get_num_threads() == 1


def _chunks(n, per_image_elems, itemsize):
    """Return [(n0, n1)] batch ranges whose im2col matrix fits in the chunk budget (at least one image each)."""
    budget = CHUNK_BYTES if _per_image_gemms() else CHUNK_BYTES_THREADED
    nb = max(1, min(n, budget // max(per_image_elems * itemsize, 1)))
    return [(i, min(n, i + nb)) for i in range(0, n, nb)]


def _grad_chunks(n, per_image_elems, itemsize, ohw):
    """Chunks for the gradients: with one thread, one image each once an image has 256+ output positions (the
    gradient g of one image is already an (O, OH*OW) matrix, so a gemm per image beats copying a chunk of g
    into (O, nb*OH*OW))."""
    if ohw >= 256 and _per_image_gemms():
        return [(i, i + 1) for i in range(n)]
    return _chunks(n, per_image_elems, itemsize)


def _im2col(x, n0, n1, kh, kw, stride, pads, dilation, oh, ow):
    """Return the (C*KH*KW, nb*OH*OW) patch matrix of images n0..n1 of contiguous x, in the scratch buffer."""
    c = x.shape[1]
    cols = KC.workspace(c * kh * kw * (n1 - n0) * oh * ow, x.dtype).reshape(c * kh * kw, (n1 - n0) * oh * ow)
    KC.im2col_chunk(x[n0:n1], cols, kh, kw, stride[0], stride[1], pads[0][0], pads[1][0], dilation[0],
                    dilation[1], oh, ow)
    return cols


def _conv2d_impl(x, w, *b, stride, pads, dilation):
    n, c, h, wd, o, kh, kw, oh, ow = _geom(x.shape, w.shape, stride, pads, dilation)
    if n * o * oh * ow and winograd.supported(x.shape, w.shape, stride, dilation, x.dtype):
        return winograd.conv2d(x, w, b[0] if b else None, pads)
    out = np.empty((n, o, oh * ow), x.dtype)
    if out.size == 0:
        return out.reshape(n, o, oh, ow)
    x, w2 = _c(x), _c(w).reshape(o, c * kh * kw)
    ohw = oh * ow
    per_image = _per_image_gemms()
    for n0, n1 in _chunks(n, c * kh * kw * ohw, x.itemsize):
        cols = _im2col(x, n0, n1, kh, kw, stride, pads, dilation, oh, ow)
        if per_image or n1 - n0 == 1:
            for j in range(n1 - n0):     # one gemm per image, straight into its (O, OH*OW) block of the output
                np.dot(w2, cols[:, j * ohw:(j + 1) * ohw], out=out[n0 + j])
            if b:
                out[n0:n1] += b[0][:, None]
        else:                            # one gemm for the chunk, scattered to NCHW with the bias added
            y2 = KC.workspace(o * (n1 - n0) * ohw, x.dtype, "gemm").reshape(o, (n1 - n0) * ohw)
            np.dot(w2, cols, out=y2)
            KC.onp_to_nop_bias(y2, _c(b[0]) if b else np.zeros(o, x.dtype), out[n0:n1], bool(b))
    return out.reshape(n, o, oh, ow)


def _conv2d_grad_input_impl(g, w, *, x_shape, stride, pads, dilation):
    n, c, h, wd, o, kh, kw, oh, ow = _geom(x_shape, w.shape, stride, pads, dilation)
    dx = np.empty(x_shape, g.dtype)
    if g.size == 0:
        dx[...] = 0
        return dx
    if stride == (1, 1) and (o <= c or winograd.supported(g.shape, (c, o, kh, kw), stride, dilation, g.dtype)):
        # With stride 1 the input gradient is g correlated with the flipped, transposed filters over g padded by
        # d*(k-1) - pad. With no more output than input channels that forward convolution's im2col is no larger
        # than col2im's scratch and its gemm has the long K = O*KH*KW, which BLAS runs faster than K = O; where
        # it runs in Winograd tiles it is faster still.
        lo = (dilation[0] * (kh - 1) - pads[0][0], dilation[1] * (kw - 1) - pads[1][0])
        hi = (h + pads[0][0] - oh, wd + pads[1][0] - ow)                  # d*(k-1) - bottom / right padding
        if min(lo + hi) >= 0:
            wt = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            return _conv2d_impl(g, wt, stride=stride, pads=((lo[0], hi[0]), (lo[1], hi[1])), dilation=dilation)
    g3 = _c(g).reshape(n, o, oh * ow)
    w2t = _c(w).reshape(o, c * kh * kw).T               # a transposed operand costs BLAS nothing
    ohw = oh * ow
    for n0, n1 in _grad_chunks(n, c * kh * kw * ohw, g.itemsize, ohw):
        if n1 - n0 == 1:
            g2 = g3[n0]                                  # one image: its (O, OH*OW) gradient is already a matrix
        else:
            g2 = KC.workspace(o * (n1 - n0) * ohw, g.dtype, "gemm").reshape(o, (n1 - n0) * ohw)
            KC.nop_to_onp(g3[n0:n1], g2)
        dcols = KC.workspace(c * kh * kw * (n1 - n0) * ohw, g.dtype).reshape(c * kh * kw, (n1 - n0) * ohw)
        np.dot(w2t, g2, out=dcols)
        KC.col2im_chunk(dcols, dx[n0:n1], kh, kw, stride[0], stride[1], pads[0][0], pads[1][0], dilation[0],
                        dilation[1], oh, ow)
    return dx


def _conv2d_grad_weight_impl(x, g, *, w_shape, stride, pads, dilation):
    n, c, h, wd, o, kh, kw, oh, ow = _geom(x.shape, w_shape, stride, pads, dilation)
    if g.size and winograd.supported(x.shape, w_shape, stride, dilation, x.dtype):
        return winograd.conv2d_grad_weight(x, g, w_shape, pads)
    # dW^T (C*kh*kw, O) = cols @ g2^T, accumulated over chunks of images: BLAS runs this orientation (a tall
    # product with a small N) faster than dW = g2 @ cols^T, whose long K sits on a transposed operand
    dwt = np.zeros((c * kh * kw, o), x.dtype)
    if g.size == 0:
        return np.ascontiguousarray(dwt.T).reshape(w_shape)
    x, g3 = _c(x), _c(g).reshape(n, o, oh * ow)
    tmp = np.empty_like(dwt)
    ohw = oh * ow
    for i, (n0, n1) in enumerate(_grad_chunks(n, c * kh * kw * ohw, x.itemsize, ohw)):
        if n1 - n0 == 1:
            g2 = g3[n0]
        else:
            g2 = KC.workspace(o * (n1 - n0) * ohw, g.dtype, "gemm").reshape(o, (n1 - n0) * ohw)
            KC.nop_to_onp(g3[n0:n1], g2)
        cols = _im2col(x, n0, n1, kh, kw, stride, pads, dilation, oh, ow)
        if i == 0:
            np.dot(cols, g2.T, out=dwt)
        else:
            np.dot(cols, g2.T, out=tmp)
            dwt += tmp
    return np.ascontiguousarray(dwt.T).reshape(w_shape)


def _conv2d_vjp(g, ans, ins, needs, stride, pads, dilation):
    x, w = ins[0], ins[1]
    p = dict(stride=stride, pads=pads, dilation=dilation)
    gx = apply(CONV2D_GRAD_INPUT, g, w, x_shape=x.shape, **p) if needs[0] else None
    gw = apply(CONV2D_GRAD_WEIGHT, x, g, w_shape=w.shape, **p) if needs[1] else None
    res = (gx, gw)
    if len(ins) == 3:
        res += (_conv2d_bias_grad(g) if needs[2] else None,)
    return res


def _conv2d_bias_grad_impl(g):
    out = np.empty(g.shape[1], g.dtype)
    KC.channel_sum(_c(g).reshape(g.shape[0], g.shape[1], -1), out)
    return out


def _conv2d_bias_grad(g):
    """Return the sum of g (N, O, OH, OW) over all but the channel axis (one pass over contiguous rows)."""
    if g.size == 0 or (g.is_cuda and g.dtype not in _FLOAT_DTYPES):
        return ops.sum(g, axis=(0, 2, 3))
    return apply(CONV2D_BIAS_GRAD, g)


def _conv2d_grad_input_vjp(g, ans, ins, needs, x_shape, stride, pads, dilation):
    gy, w = ins
    p = dict(stride=stride, pads=pads, dilation=dilation)
    return (apply(CONV2D, g, w, **p) if needs[0] else None,
            apply(CONV2D_GRAD_WEIGHT, g, gy, w_shape=w.shape, **p) if needs[1] else None)


def _conv2d_grad_weight_vjp(g, ans, ins, needs, w_shape, stride, pads, dilation):
    x, gy = ins
    p = dict(stride=stride, pads=pads, dilation=dilation)
    return (apply(CONV2D_GRAD_INPUT, gy, g, x_shape=x.shape, **p) if needs[0] else None,
            apply(CONV2D, x, g, **p) if needs[1] else None)


# -- CUDA: im2col + the tiled matmul + col2im (no Winograd or chunking on the GPU) --

def _i64(v):
    return np.int64(v)


def _im2col_cuda(x, kh, kw, stride, pads, dilation, oh, ow):
    n, c = tuple(x.shape)[:2]
    cols = _C.empty((c * kh * kw, n * oh * ow), x.dtype)
    _G.launch(_KG.im2col, cols.size, x, cols, _i64(kh), _i64(kw), _i64(stride[0]), _i64(stride[1]), _i64(pads[0][0]),
            _i64(pads[1][0]), _i64(dilation[0]), _i64(dilation[1]), _i64(oh), _i64(ow))
    return cols


def _conv2d_cuda(x, w, *b, stride, pads, dilation):
    n, c, h, wd, o, kh, kw, oh, ow = _geom(x.shape, w.shape, stride, pads, dilation)
    if n * o * oh * ow == 0:
        return _C.empty((n, o, oh, ow), x.dtype)
    x = _G.contiguous(x)
    w2 = _C.reshape(_G.contiguous(w), (o, c * kh * kw))
    cols = _im2col_cuda(x, kh, kw, stride, pads, dilation, oh, ow)
    y2 = ops._matmul_arrays_cuda(w2, cols)
    out = _C.empty((n, o, oh * ow), x.dtype)
    bias = _G.contiguous(b[0]) if b else _G.flat_view(w2)          # (a 1-D placeholder the kernel never reads)
    _G.launch(_KG.onp_to_nop, out.size, y2, bias, out, bool(b))
    return _C.reshape(out, (n, o, oh, ow))


def _conv2d_grad_input_cuda(g, w, *, x_shape, stride, pads, dilation):
    n, c, h, wd, o, kh, kw, oh, ow = _geom(x_shape, w.shape, stride, pads, dilation)
    dx = _G.zeros(x_shape, g.dtype)
    if g.size == 0:
        return dx
    g3 = _C.reshape(_G.contiguous(g), (n, o, oh * ow))
    g2 = _C.empty((o, n * oh * ow), g.dtype)
    _G.launch(_KG.nop_to_onp, g3.size, g3, g2)
    w2t = _G.transpose_view(_C.reshape(_G.contiguous(w), (o, c * kh * kw)), (1, 0))
    dcols = ops._matmul_arrays_cuda(w2t, g2)
    _G.launch(_KG.col2im_add, dcols.size, dcols, dx, _i64(kh), _i64(kw), _i64(stride[0]), _i64(stride[1]), _i64(pads[0][0]),
            _i64(pads[1][0]), _i64(dilation[0]), _i64(dilation[1]), _i64(oh), _i64(ow))
    return dx


def _conv2d_grad_weight_cuda(x, g, *, w_shape, stride, pads, dilation):
    n, c, h, wd, o, kh, kw, oh, ow = _geom(x.shape, w_shape, stride, pads, dilation)
    if g.size == 0:
        return _G.zeros(w_shape, x.dtype)
    g3 = _C.reshape(_G.contiguous(g), (n, o, oh * ow))
    g2 = _C.empty((o, n * oh * ow), g.dtype)
    _G.launch(_KG.nop_to_onp, g3.size, g3, g2)
    cols = _im2col_cuda(_G.contiguous(x), kh, kw, stride, pads, dilation, oh, ow)
    dw = ops._matmul_arrays_cuda(g2, _G.transpose_view(cols, (1, 0)))
    return _C.reshape(dw, w_shape)

def _conv2d_bias_grad_cuda(g):
    out = _channel_reduce_cuda(_ncs_cuda(g), None, 2, 1)
    return _C.reshape(out, (g.shape[1],))


CONV2D_BIAS_GRAD = Primitive("conv2d_bias_grad", impl={"cpu": _conv2d_bias_grad_impl, "cuda": _conv2d_bias_grad_cuda},
                             vjp=lambda g, ans, ins, needs: (
                                 ops.broadcast_to(ops.reshape(g, (1, -1, 1, 1)), ins[0].shape),))
CONV2D = Primitive("conv2d", impl={"cpu": _conv2d_impl, "cuda": _conv2d_cuda}, vjp=_conv2d_vjp)
CONV2D_GRAD_INPUT = Primitive("conv2d_grad_input", impl={"cpu": _conv2d_grad_input_impl, "cuda": _conv2d_grad_input_cuda},
                              vjp=_conv2d_grad_input_vjp)
CONV2D_GRAD_WEIGHT = Primitive("conv2d_grad_weight", impl={"cpu": _conv2d_grad_weight_impl,
                                                                        "cuda": _conv2d_grad_weight_cuda},
                               vjp=_conv2d_grad_weight_vjp)


def _conv_args(x, W, stride, padding, dilation, op):
    x, W = _t(x), _t(W)
    if x.ndim != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got shape {x.shape}")
    if W.ndim != 4:
        raise ValueError(f"{op}: weight must be 4-D (out_channels, in_channels, KH, KW), got shape {W.shape}")
    if x.shape[1] != W.shape[1]:
        raise ValueError(f"{op}: input of shape {x.shape} has {x.shape[1]} channels but weight of shape "
                         f"{W.shape} expects {W.shape[1]}")
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{op}: stride {stride} and dilation {dilation} must be positive")
    pads = _conv_padding(padding, x.shape[2:], W.shape[2:], stride, dilation, op)
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{op}: negative padding {pads}")
    oh = conv_output_size(x.shape[2], W.shape[2], stride[0], *pads[0], dilation[0])
    ow = conv_output_size(x.shape[3], W.shape[3], stride[1], *pads[1], dilation[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"{op}: kernel {W.shape[2:]} (dilation {dilation}) is larger than the padded input "
                         f"{x.shape[2:]} with padding {pads}")
    return x, W, stride, pads, dilation


def conv2d(x, W, b=None, stride=1, padding=0, dilation=1):
    """Return the 2-D cross-correlation of x (N, C, H, W) with W (O, C, KH, KW) plus b (O,): (N, O, OH, OW).

    ``padding`` is "same", "valid", an int, a pair (ph, pw) or a pair of pairs ((top, bottom), (left, right)).
    """
    x, W, stride, pads, dilation = _conv_args(x, W, stride, padding, dilation, "conv2d")
    if x.dtype != W.dtype:
        raise TypeError(f"conv2d: input dtype {x.dtype} differs from weight dtype {W.dtype}")
    if pads[0][0] != pads[0][1] or pads[1][0] != pads[1][1]:
        x = ops.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
        pads = ((0, 0), (0, 0))
    if b is not None:
        b = _t(b)
        if b.shape != (W.shape[0],):
            raise ValueError(f"conv2d: bias of shape {b.shape} does not match {W.shape[0]} output channels")
        if b.dtype != x.dtype:
            b = b.astype(x.dtype)
        return apply(CONV2D, x, W, b, stride=stride, pads=pads, dilation=dilation)
    return apply(CONV2D, x, W, stride=stride, pads=pads, dilation=dilation)


def conv2d_grad_input(g, W, x_shape, stride=1, padding=0, dilation=1):
    """Return the gradient of conv2d w.r.t. its input (shape ``x_shape``) given output gradient g."""
    g, W = _t(g), _t(W)
    stride, dilation = _pair(stride, "stride", "conv2d_grad_input"), _pair(dilation, "dilation", "conv2d")
    pads = _conv_padding(padding, x_shape[2:], W.shape[2:], stride, dilation, "conv2d_grad_input")
    return apply(CONV2D_GRAD_INPUT, g, W, x_shape=tuple(x_shape), stride=stride, pads=pads, dilation=dilation)


def conv2d_grad_weight(x, g, W_shape, stride=1, padding=0, dilation=1):
    """Return the gradient of conv2d w.r.t. its weight (shape ``W_shape``) given input x and output gradient g."""
    x, g = _t(x), _t(g)
    stride, dilation = _pair(stride, "stride", "conv2d_grad_weight"), _pair(dilation, "dilation", "conv2d")
    pads = _conv_padding(padding, x.shape[2:], W_shape[2:], stride, dilation, "conv2d_grad_weight")
    return apply(CONV2D_GRAD_WEIGHT, x, g, w_shape=tuple(W_shape), stride=stride, pads=pads, dilation=dilation)


# ==============================================================================================================
# Pooling
# ==============================================================================================================

def _pool_args(x, kernel_size, stride, padding, op):
    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got shape {x.shape}")
    k = _pair(kernel_size, "kernel_size", op)
    s = k if stride is None else _pair(stride, "stride", op)
    if isinstance(padding, str):
        pads = _conv_padding(padding, x.shape[2:], k, s, (1, 1), op)
    else:
        p = _pair(padding, "padding", op)
        pads = ((p[0], p[0]), (p[1], p[1]))
    if pads[0][0] > k[0] or pads[1][0] > k[1]:
        raise ValueError(f"{op}: padding {pads} must not exceed the kernel size {k}")
    oh = conv_output_size(x.shape[2], k[0], s[0], *pads[0])
    ow = conv_output_size(x.shape[3], k[1], s[1], *pads[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"{op}: window {k} is larger than the padded input {x.shape[2:]}")
    return x, k, s, pads, (oh, ow)


def _is_2x2(k, s, p):
    """True for the common 2x2 window with stride 2 and no padding (disjoint windows: a fast path)."""
    return k == (2, 2) and s == (2, 2) and p == (0, 0)


def _max_pool_impl(x, k, s, p, out_hw):
    out = np.empty(x.shape[:2] + out_hw, x.dtype)
    if not out.size:
        return out
    if _is_2x2(k, s, p):
        KC.max_pool2x2(_c(x), out)
    else:
        K.nn_max_pool2d(_c(x), out, k[0], k[1], s[0], s[1], p[0], p[1])
    return out


def _max_pool_grad_impl(x, g, k, s, p):
    dx = np.empty(x.shape, g.dtype)
    if _is_2x2(k, s, p) and g.size:
        KC.max_pool2x2_grad(_c(x), _c(g), dx)
    else:
        K.nn_max_pool2d_grad(_c(x), _c(g), dx, k[0], k[1], s[0], s[1], p[0], p[1])
    return dx


def _max_pool_cuda(x, k, s, p, out_hw):
    out = _C.empty(tuple(x.shape)[:2] + tuple(out_hw), x.dtype)
    if out.size:
        _G.launch(_KG.max_pool2d, out.size, _G.contiguous(x), out, _i64(k[0]), _i64(k[1]), _i64(s[0]), _i64(s[1]), _i64(p[0]),
                _i64(p[1]))
    return out


def _max_pool_grad_cuda(x, g, k, s, p):
    dx = _G.zeros(x.shape, g.dtype)
    if g.size:
        _G.launch(_KG.max_pool2d_grad, g.size, _G.contiguous(x), _G.contiguous(g), dx, _i64(k[0]), _i64(k[1]), _i64(s[0]),
                _i64(s[1]), _i64(p[0]), _i64(p[1]))
    return dx

MAX_POOL_GRAD = Primitive("max_pool2d_grad", impl={"cpu": _max_pool_grad_impl, "cuda": _max_pool_grad_cuda})
MAX_POOL = Primitive("max_pool2d", impl={"cpu": _max_pool_impl, "cuda": _max_pool_cuda},
                     vjp=lambda g, ans, ins, needs, k, s, p, out_hw: (apply(MAX_POOL_GRAD, ins[0], g, k=k, s=s,
                                                                             p=p),))
def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Return the max over each kernel_size window of x (N, C, H, W) (stride defaults to the kernel size)."""
    x, k, s, pads, out_hw = _pool_args(x, kernel_size, stride, padding, "max_pool2d")
    if pads[0][0] != pads[0][1] or pads[1][0] != pads[1][1]:
        x = ops.pad(x, ((0, 0), (0, 0), pads[0], pads[1]), constant_values=-np.inf)
        pads = ((0, 0), (0, 0))
    return apply(MAX_POOL, x, k=k, s=s, p=(pads[0][0], pads[1][0]), out_hw=out_hw)


def _avg_pool_impl(x, k, s, p, out_hw, include_pad):
    out = np.empty(x.shape[:2] + out_hw, x.dtype)
    if out.size:
        K.nn_avg_pool2d(_c(x), out, k[0], k[1], s[0], s[1], p[0], p[1], include_pad)
    return out


def _avg_pool_grad_impl(g, x_shape, k, s, p, include_pad):
    dx = np.empty(x_shape, g.dtype)
    K.nn_avg_pool2d_grad(_c(g), dx, k[0], k[1], s[0], s[1], p[0], p[1], include_pad)
    return dx


def _avg_pool_cuda(x, k, s, p, out_hw, include_pad):
    out = _C.empty(tuple(x.shape)[:2] + tuple(out_hw), x.dtype)
    if out.size:
        _G.launch(_KG.avg_pool2d, out.size, _G.contiguous(x), out, _i64(k[0]), _i64(k[1]), _i64(s[0]), _i64(s[1]), _i64(p[0]),
                _i64(p[1]), bool(include_pad), x.dtype.type(0))
    return out


def _avg_pool_grad_cuda(g, x_shape, k, s, p, include_pad):
    dx = _G.zeros(x_shape, g.dtype)
    if g.size:
        _G.launch(_KG.avg_pool2d_grad, g.size, _G.contiguous(g), dx, _i64(k[0]), _i64(k[1]), _i64(s[0]), _i64(s[1]), _i64(p[0]),
                _i64(p[1]), bool(include_pad))
    return dx

AVG_POOL = Primitive("avg_pool2d", impl={"cpu": _avg_pool_impl, "cuda": _avg_pool_cuda})
AVG_POOL_GRAD = Primitive("avg_pool2d_grad", impl={"cpu": _avg_pool_grad_impl, "cuda": _avg_pool_grad_cuda})
AVG_POOL.vjp = lambda g, ans, ins, needs, k, s, p, out_hw, include_pad: (
    apply(AVG_POOL_GRAD, g, x_shape=ins[0].shape, k=k, s=s, p=p, include_pad=include_pad),)
AVG_POOL_GRAD.vjp = lambda g, ans, ins, needs, x_shape, k, s, p, include_pad: (
    apply(AVG_POOL, g, k=k, s=s, p=p, out_hw=ins[0].shape[2:], include_pad=include_pad),)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Return the mean over each kernel_size window of x (N, C, H, W) (padding counted if count_include_pad)."""
    x, k, s, pads, out_hw = _pool_args(x, kernel_size, stride, padding, "avg_pool2d")
    if pads[0][0] != pads[0][1] or pads[1][0] != pads[1][1]:
        x = ops.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
        pads = ((0, 0), (0, 0))
    return apply(AVG_POOL, x, k=k, s=s, p=(pads[0][0], pads[1][0]), out_hw=out_hw,
                 include_pad=bool(count_include_pad))


# ==============================================================================================================
# Dropout and batch normalization (compositions of ops)
# ==============================================================================================================

def dropout(x, rate=0.5, training=True):
    """Return x with a fraction ``rate`` of entries zeroed and the rest scaled by 1/(1-rate) (inverted dropout).

    Identity when not training or rate == 0. The mask comes from ``jitnet.random``.
    """
    x = _t(x)
    if not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")
    if not training or rate == 0:
        return x
    keep = 1.0 - rate
    mask = _random.bernoulli(keep, x.shape, dtype=x.dtype if is_floating(x.dtype) else np.float32,
                             device=x.device)
    return x * (mask * (1.0 / keep))


def _ncs(x):
    """x (N, C, ...) as a contiguous (N, C, S) array."""
    return _c(x).reshape(x.shape[0], x.shape[1], -1)


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _bn_moments_impl(x):
    out = np.empty((2, x.shape[1]), x.dtype)
    KC.bn_moments(_ncs(x), out)
    return out


def _bn_moments_vjp(g, ans, ins, needs):
    x = ins[0]
    shape = _channel_shape(x)
    n = x.size // x.shape[1]
    gm, gv, m = (ops.reshape(ops.getitem(t, i), shape) for t, i in ((g, 0), (g, 1), (ans, 0)))
    return ((gm + gv * 2.0 * (x - ops.stop_gradient(m))) * (1.0 / n),)


def _channel_affine_impl(x, a, b):
    y = np.empty(x.shape, x.dtype)
    KC.channel_affine(_ncs(x), _c(a), _c(b), y.reshape(x.shape[0], x.shape[1], -1))
    return y


def _channel_affine_sums_impl(g, x):
    out = np.empty((2, x.shape[1]), x.dtype)
    KC.channel_affine_sums(_ncs(g), _ncs(x), out)
    return out


def _channel_affine_vjp(g, ans, ins, needs):
    x, a, _ = ins
    gx = g * ops.reshape(a, _channel_shape(x)) if needs[0] else None
    if not (needs[1] or needs[2]):
        return gx, None, None
    sums = apply(CHANNEL_AFFINE_SUMS, g, x)          # one pass over g and x for both parameter gradients
    return gx, ops.getitem(sums, 1), ops.getitem(sums, 0)


def _no_second_order_bn(g, ans, ins, needs):
    raise NotImplementedError("channel_affine_sums: a gradient of the batch-norm gradient is not implemented")


# -- CUDA: a two-pass per-channel reduction (float64 partial sums per chunk of a channel, then one thread per
# channel combines them) and one elementwise pass for the affine map --

def _ncs_cuda(x):
    """Device x (N, C, ...) as a contiguous (N, C, S) array."""
    x = _G.contiguous(x)
    return _C.reshape(x, (x.shape[0], x.shape[1], x.size // (x.shape[0] * x.shape[1])))


def _channel_reduce_cuda(g3, x3, mode, rows):
    """The (rows, C) per-channel result of ``kernels_gpu.channel_partials``/``channel_finish`` in ``mode`` over
    g3 (N, C, S) (and x3 in mode 1); N * S must be positive."""
    nb, ch, sp = g3.shape
    total = nb * sp
    nch = max(1, -(-total // _KG.ROW_CHUNK))
    part = _C.empty((2, ch, nch), np.float64)
    _G.launch_rows(_KG.channel_partials, ch * nch, g3, g3 if x3 is None else x3, part, _i64(mode),
                   _i64(_KG.ROW_CHUNK))
    out = _C.empty((rows, ch), g3.dtype)
    _G.launch(_KG.channel_finish, ch, part, g3, out, _i64(mode), np.float64(total))
    return out


def _bn_moments_cuda(x):
    return _channel_reduce_cuda(_ncs_cuda(x), None, 0, 2)


def _channel_affine_cuda(x, a, b):
    x3 = _ncs_cuda(x)
    y = _C.empty(x3.shape, x.dtype)
    _G.launch(_KG.channel_affine, y.size, x3, _G.contiguous(a), _G.contiguous(b), y)
    return _C.reshape(y, x.shape)


def _channel_affine_sums_cuda(g, x):
    return _channel_reduce_cuda(_ncs_cuda(g), _ncs_cuda(x), 1, 2)


BN_MOMENTS = Primitive("bn_moments", impl={"cpu": _bn_moments_impl, "cuda": _bn_moments_cuda}, vjp=_bn_moments_vjp)
CHANNEL_AFFINE = Primitive("channel_affine", impl={"cpu": _channel_affine_impl, "cuda": _channel_affine_cuda},
                           vjp=_channel_affine_vjp)
CHANNEL_AFFINE_SUMS = Primitive("channel_affine_sums", impl={"cpu": _channel_affine_sums_impl,
                                                             "cuda": _channel_affine_sums_cuda},
                                vjp=_no_second_order_bn)


def _bn_native(which):
    """The native-driver form of batch norm's fused rows (``kernels_conv`` kernels over (N, C, S) views)."""
    kernel = {"moments": KC.bn_moments, "affine": KC.channel_affine, "sums": KC.channel_affine_sums}[which]

    def emit(n, a, o, kernels):
        x = n.inputs[-1] if which == "sums" else n.inputs[0]
        if (x.dtype not in _FLOAT_DTYPES or any(v.dtype != x.dtype for v in n.inputs) or len(x.shape) < 2
                or not x.size):
            return None
        ncs = kernelgen.shape_source((x.shape[0], x.shape[1], x.size // (x.shape[0] * x.shape[1])))
        dt = kernelgen.dtype_source(x.dtype)
        k = kernelgen.use_kernel(kernels, kernel, x.size)
        v3 = [f"np.ascontiguousarray({s}).reshape({ncs})" for s in a]
        if which == "affine":
            return [f"{o} = np.empty({kernelgen.shape_source(x.shape)}, {dt})",
                    f"{k}({v3[0]}, np.ascontiguousarray({a[1]}), np.ascontiguousarray({a[2]}), {o}.reshape({ncs}))"]
        return [f"{o} = np.empty({kernelgen.shape_source((2, x.shape[1]))}, {dt})", f"{k}({', '.join(v3)}, {o})"]
    return emit


BN_MOMENTS.extra["native"] = _bn_native("moments")
CHANNEL_AFFINE.extra["native"] = _bn_native("affine")
CHANNEL_AFFINE_SUMS.extra["native"] = _bn_native("sums")


def _fused_bn(x):
    """Whether batch norm's fused rows take x: floating on the CPU, float32/float64 on CUDA, and not empty."""
    return x.size > 0 and (x.dtype in _FLOAT_DTYPES if x.is_cuda else is_floating(x.dtype))


def batch_moments(x):
    """Return (mean, biased variance) of x (N, C, ...) per channel (axis 1), each (C,).

    On the CPU one pass over x (float64 sums); the gradient is the usual (g_mean + 2 g_var (x - mean)) / n.
    """
    x = _t(x)
    if x.ndim < 2:
        raise ValueError(f"batch_moments: input must have a batch and a channel axis, got shape {x.shape}")
    if not _fused_bn(x):
        axes = (0,) + tuple(range(2, x.ndim))
        return ops.mean(x, axes), ops.var(x, axes)
    st = apply(BN_MOMENTS, x)
    # the rows taken by slices: their gradients are dense rows that fuse (an integer index would give each a
    # sparse gradient, the two summed by a concatenation and made dense by a scatter_add)
    c = (x.shape[1],)
    return ops.reshape(ops.getitem(st, slice(0, 1)), c), ops.reshape(ops.getitem(st, slice(1, 2)), c)


def channel_affine(x, a, b):
    """Return x * a[c] + b[c] along the channel axis 1 of x (N, C, ...): one pass on the CPU, and one pass over
    the output gradient and x for both a's and b's gradients."""
    x, a, b = _t(x), _t(a), _t(b)
    if a.shape != (x.shape[1],) or b.shape != (x.shape[1],):
        raise ValueError(f"channel_affine: a {a.shape} and b {b.shape} must be ({x.shape[1]},) for x {x.shape}")
    if _ad._AUTOCAST is not None and is_lowp(x.dtype):
        x = x.astype(np.float32)          # under jn.autocast batch norm maps float16 in float32 on every device
    if not _fused_bn(x):
        shape = _channel_shape(x)
        return x * ops.reshape(a, shape) + ops.reshape(b, shape)
    if a.dtype != x.dtype:
        a = a.astype(x.dtype)
    if b.dtype != x.dtype:
        b = b.astype(x.dtype)
    return apply(CHANNEL_AFFINE, x, a, b)


def batch_norm(x, mean, var, gamma=None, beta=None, eps=1e-5, axis=1):
    """Return (x - mean) / sqrt(var + eps) * gamma + beta, with the statistics broadcast along ``axis``."""
    x = _t(x)
    shape = [1] * x.ndim
    ax = axis % x.ndim
    shape[ax] = x.shape[ax]
    shape = tuple(shape)

    def b(v):
        v = _t(v)
        return ops.reshape(v, shape) if v.ndim == 1 else v
    y = (x - b(mean)) * ops.reciprocal(ops.sqrt(b(var) + eps))
    if gamma is not None:
        y = y * b(gamma)
    if beta is not None:
        y = y + b(beta)
    return y


# ==============================================================================================================
# Losses
# ==============================================================================================================

def _label_error(labels, bad, classes):
    return bounds.index_error("cross_entropy", "label", int(labels.reshape(-1)[bad]), bad, f"{classes} classes",
                              labels.shape)


def _xent_int_impl(x, labels):
    out = np.empty(x.shape[0], x.dtype)
    labels = _c(labels.astype(np.int64, copy=False))
    bad = K.nn_xent_int(_c(x), labels, out)
    if bad >= 0:
        raise _label_error(labels, bad, x.shape[1])
    return out


def _xent_int_grad_impl(x, labels, g):
    out = np.empty(x.shape, x.dtype)
    labels = _c(labels.astype(np.int64, copy=False))
    bad = K.nn_xent_int_grad(_c(x), labels, _c(g.astype(x.dtype, copy=False)), out)
    if bad >= 0:
        raise _label_error(labels, bad, x.shape[1])
    return out


def _xent_int_reduced_impl(x, labels, mean):
    out = np.empty(1, x.dtype)
    labels = _c(labels.astype(np.int64, copy=False))
    bad = K.nn_xent_int_reduced(_c(x), labels, np.bool_(mean), out)
    if bad >= 0:
        raise _label_error(labels, bad, x.shape[1])
    return out.reshape(())


def _xent_int_reduced_grad_impl(x, labels, g, mean):
    out = np.empty(x.shape, x.dtype)
    labels = _c(labels.astype(np.int64, copy=False))
    bad = K.nn_xent_int_reduced_grad(_c(x), labels, np.ascontiguousarray(g, x.dtype).reshape(1), np.bool_(mean),
                                     out)
    if bad >= 0:
        raise _label_error(labels, bad, x.shape[1])
    return out


def _xent_prob_impl(x, p):
    out = np.empty(x.shape[0], x.dtype)
    K.nn_xent_prob(_c(x), _c(p.astype(x.dtype, copy=False)), out)
    return out


def _xent_prob_grad_impl(x, p, g):
    out = np.empty(x.shape, x.dtype)
    K.nn_xent_prob_grad(_c(x), _c(p.astype(x.dtype, copy=False)), _c(g.astype(x.dtype, copy=False)), out)
    return out


def _device_labels(labels):
    """Integer labels as a contiguous device array (host labels are checked and moved once)."""
    if _G.is_host(labels):
        labels = _G.index_array(labels, 1 << 62, "cross_entropy", 0)
    return _G.contiguous(labels)


def _xent_int_cuda(x, labels):
    x = _G.contiguous(x)
    labels = _device_labels(labels)
    m, n = x.shape
    out = _C.empty((m,), x.dtype)
    err, opid = _G.error_slot("cross_entropy", "label")
    if m:
        if n <= _KG.SMALL_ROW:
            _G.launch(_KG.xent_int_rows_small, m, x, _G.flat_view(labels), out, err, opid)
        else:
            _G.launch_rows(_KG.xent_int_rows, m, x, _G.flat_view(labels), out, err, opid)
    return out


def _xent_int_grad_cuda(x, labels, g):
    x = _G.contiguous(x)
    labels = _G.contiguous(labels)
    g = _G.contiguous(_G.cast(g, x.dtype))
    m, n = x.shape
    out = _C.empty((m, n), x.dtype)
    err, opid = _G.error_slot("cross_entropy", "label")
    if m:
        if n <= _KG.SMALL_ROW:
            _G.launch(_KG.xent_int_grad_rows_small, m, x, _G.flat_view(labels), _G.flat_view(g), out, err, opid)
        else:
            _G.launch_rows(_KG.xent_int_grad_rows, m, x, _G.flat_view(labels), _G.flat_view(g), out, err, opid)
    return out


def _xent_int_reduced_cuda(x, labels, mean):
    labels = _device_labels(labels)
    rows = _xent_int_cuda(x, labels)            # per-row losses, the label check reported by that kernel
    out = _C.empty((1,), x.dtype)
    _G.launch_rows(_KG.labelled_rows_reduce, 1, rows, _G.flat_view(labels), np.bool_(mean), out)
    return _C.reshape(out, ())


def _xent_int_reduced_grad_cuda(x, labels, g, mean):
    labels = _device_labels(labels)
    gr = _C.empty((x.shape[0],), x.dtype)
    _G.launch_rows(_KG.labelled_rows_scale, 1, _G.flat_view(labels), _G.flat_view(_G.contiguous(_G.cast(g, x.dtype))),
                   np.bool_(mean), gr)
    return _xent_int_grad_cuda(x, labels, gr)


def _xent_prob_cuda(x, p):
    x = _G.contiguous(x)
    p = _G.contiguous(_G.cast(p, x.dtype))
    m, n = x.shape
    out = _C.empty((m,), x.dtype)
    if m:
        if n <= _KG.SMALL_ROW:
            _G.launch(_KG.xent_prob_rows_small, m, x, p, out)
        else:
            _G.launch_rows(_KG.xent_prob_rows, m, x, p, out)
    return out


def _xent_prob_grad_cuda(x, p, g):
    x = _G.contiguous(x)
    p = _G.contiguous(_G.cast(p, x.dtype))
    g = _G.contiguous(_G.cast(g, x.dtype))
    m, n = x.shape
    out = _C.empty((m, n), x.dtype)
    if m:
        if n <= _KG.SMALL_ROW:
            _G.launch(_KG.xent_prob_grad_rows_small, m, x, p, _G.flat_view(g), out)
        else:
            _G.launch_rows(_KG.xent_prob_grad_rows, m, x, p, _G.flat_view(g), out)
    return out

XENT_INT_GRAD = Primitive("cross_entropy_int_grad", impl={"cpu": _xent_int_grad_impl, "cuda": _xent_int_grad_cuda})
XENT_INT = Primitive("cross_entropy_int", impl={"cpu": _xent_int_impl, "cuda": _xent_int_cuda},
                     vjp=lambda g, ans, ins, needs: (apply(XENT_INT_GRAD, ins[0], ins[1], g), None))
XENT_INT_GRAD.vjp = lambda g, ans, ins, needs: (
    _xent_hvp(ins[0], ops.one_hot(ins[1], ins[0].shape[-1], ins[0].dtype) * ops.reshape(
        ops.astype(ins[1] >= 0, ins[0].dtype), (-1, 1)), ins[2], g), None,
    ops.sum(g * (ops.softmax(ins[0]) - ops.one_hot(ins[1], ins[0].shape[-1], ins[0].dtype)), -1)
    * ops.astype(ins[1] >= 0, ins[0].dtype) if needs[2] else None)
bounds.mark(XENT_INT, i1=("label", "ignore"))
bounds.mark(XENT_INT_GRAD, i1=("label", "ignore"))


def _xent_reduced_weights(labels, dtype, mean):
    """(rows,) weights of the reduced cross entropy's rows: 1 (mean: 1 / max(count, 1)) on the rows with a label
    >= 0, 0 on the others, as a graph."""
    valid = ops.astype(labels >= 0, dtype)
    return valid / ops.maximum(ops.sum(valid), 1.0) if mean else valid


def _xent_int_reduced_grad_vjp(g, ans, ins, needs, mean):
    """Second order, through the per-row gradient: XENT_INT_REDUCED_GRAD(x, y, s) = XENT_INT_GRAD(x, y, s * w)."""
    x, y, s = ins
    w = _xent_reduced_weights(y, x.dtype, mean)
    dx, _, dgr = XENT_INT_GRAD.vjp(g, None, (x, y, ops.reshape(s, (1,)) * w), needs)
    return dx, None, ops.sum(dgr * w) if needs[2] else None


XENT_INT_REDUCED_GRAD = Primitive("cross_entropy_int_reduced_grad", impl={"cpu": _xent_int_reduced_grad_impl,
                                                                          "cuda": _xent_int_reduced_grad_cuda},
                                  vjp=_xent_int_reduced_grad_vjp)
XENT_INT_REDUCED = Primitive("cross_entropy_int_reduced", impl={"cpu": _xent_int_reduced_impl,
                                                                "cuda": _xent_int_reduced_cuda},
                             vjp=lambda g, ans, ins, needs, mean: (
                                 apply(XENT_INT_REDUCED_GRAD, ins[0], ins[1], g, mean=mean), None))
bounds.mark(XENT_INT_REDUCED, i1=("label", "ignore"))
bounds.mark(XENT_INT_REDUCED_GRAD, i1=("label", "ignore"))


XENT_PROB_GRAD = Primitive("cross_entropy_prob_grad", impl={"cpu": _xent_prob_grad_impl,
                                                                  "cuda": _xent_prob_grad_cuda})
XENT_PROB = Primitive("cross_entropy_prob", impl={"cpu": _xent_prob_impl, "cuda": _xent_prob_cuda},
                      vjp=lambda g, ans, ins, needs: (
                          apply(XENT_PROB_GRAD, ins[0], ins[1], g) if needs[0] else None,
                          -ops.reshape(g, (-1, 1)) * ops.log_softmax(ins[0]) if needs[1] else None))
XENT_PROB_GRAD.vjp = lambda g, ans, ins, needs: (
    _xent_hvp(ins[0], ins[1], ins[2], g),
    ops.reshape(ins[2], (-1, 1)) * (ops.reshape(ops.sum(g * ops.softmax(ins[0]), -1), (-1, 1)) - g)
    if needs[1] else None,
    ops.sum(g * (ops.softmax(ins[0]) * ops.sum(ins[1], -1, keepdims=True) - ins[1]), -1) if needs[2] else None)


def _xent_int_native(grad, reduced=False):
    """The native-driver form of the fused cross entropy (its gradient; the reduced forms), with the label check."""
    kernel = {(False, False): K.nn_xent_int, (True, False): K.nn_xent_int_grad,
              (False, True): K.nn_xent_int_reduced, (True, True): K.nn_xent_int_reduced_grad}[grad, reduced]

    def emit(n, a, o, kernels):
        x, lab = n.inputs[0], n.inputs[1]
        if x.dtype not in _FLOAT_DTYPES or len(x.shape) != 2 or lab.dtype.kind not in "iu" or len(lab.shape) != 1:
            return None
        if grad and n.inputs[2].dtype != x.dtype:
            return None
        k = kernelgen.use_kernel(kernels, kernel, x.size)
        scalar = reduced and not grad                # the reduced kernel writes a (1,) buffer
        buf = f"_b{o}" if scalar else o
        lines = [f"_l = np.ascontiguousarray({a[1]}).astype(np.int64)",
                 f"{buf} = np.empty({kernelgen.shape_source((1,) if scalar else n.out.shape)}, "
                 f"{kernelgen.dtype_source(x.dtype)})"]
        args = [f"np.ascontiguousarray({a[0]})", "_l"]
        if grad:
            args.append(f"np.ascontiguousarray({a[2]})" + (".reshape(1)" if reduced else ""))
        if reduced:
            args.append(kernelgen.flag_source(bool(n.params["mean"])))
        lines.append(f"_e = {k}({', '.join(args + [buf])})")
        if scalar:
            lines.append(f"{o} = {buf}.reshape(())")
        return lines + bounds.native_raise_lines("_e", "_l", "cross_entropy", "label", x.shape[1], "{} classes")
    return emit


XENT_INT.extra["native"] = _xent_int_native(False)
XENT_INT_GRAD.extra["native"] = _xent_int_native(True)
XENT_INT_REDUCED.extra["native"] = _xent_int_native(False, True)
XENT_INT_REDUCED_GRAD.extra["native"] = _xent_int_native(True, True)



def _xent_hvp(x, p, gr, v):
    """Return the VJP w.r.t. logits x of g * (softmax(x) * sum(p) - p) against cotangent v."""
    s = ops.softmax(x)
    w = ops.reshape(gr, (-1, 1)) * ops.sum(p, -1, keepdims=True)
    return w * s * (v - ops.sum(v * s, -1, keepdims=True))


def cross_entropy(logits, labels, reduction="mean", label_smoothing=0.0):
    """Return the softmax cross entropy of ``logits`` (..., C) against integer labels (...) or probabilities.

    Integer labels use one fused kernel (logsumexp - logit of the label); a negative label is ignored (loss
    0, excluded from the mean). Float labels of shape (..., C) are probability (or one-hot) rows. Reduction
    defaults to the mean over rows.
    """
    x, y = _t(logits), _t(labels)
    if x.ndim < 1:
        raise ValueError(f"cross_entropy: logits must have a class axis, got shape {x.shape}")
    if not is_floating(x.dtype):
        x = ops.astype(x, np.float32)
    c = x.shape[-1]
    x2 = ops.reshape(x, (-1, c))
    if y.dtype.kind in "iu":
        if y.shape != x.shape[:-1]:
            raise ValueError(f"cross_entropy: integer labels of shape {y.shape} do not match logits of shape "
                             f"{x.shape} (expected {x.shape[:-1]})")
        y2 = ops.reshape(y, (-1,))
        if reduction in ("mean", "sum") and not label_smoothing:       # one fused row each way
            return apply(XENT_INT_REDUCED, x2, y2, mean=reduction == "mean")
        yv = y.numpy() if _is_eager() and not y.is_cuda else None      # (no copy from the GPU: a label out
                                                                          # of range is reported by the kernel)
        if label_smoothing:
            p = ops.one_hot(y2, c, x.dtype) * (1.0 - label_smoothing) + label_smoothing / c
            loss = apply(XENT_PROB, x2, p)
        else:
            loss = apply(XENT_INT, x2, y2)
        loss = ops.reshape(loss, x.shape[:-1])
        if reduction == "mean":
            if yv is not None:                # eager on the host: the labels are known now
                if (yv < 0).any():
                    n = int((yv >= 0).sum())
                    return ops.sum(loss) * (1.0 / n if n else 0.0)
            else:                             # traced, or on the device: ignored (negative) labels counted
                n = ops.sum(ops.astype(y2 >= 0, x.dtype))     # by the graph, so jit == eager (scaling the
                rows = float(y2.shape[0])                     # rows, not the mean, keeps its gradient a
                return ops.mean(loss * (rows / ops.maximum(n, 1.0)))     # folded constant: the step stays native
        return _reduce(loss, reduction, "cross_entropy")
    if y.shape != x.shape:
        raise ValueError(f"cross_entropy: probability labels of shape {y.shape} do not match logits of shape "
                         f"{x.shape}")
    p2 = ops.reshape(ops.astype(y, x.dtype), (-1, c))
    if label_smoothing:
        p2 = p2 * (1.0 - label_smoothing) + label_smoothing / c
    loss = ops.reshape(apply(XENT_PROB, x2, p2), x.shape[:-1])
    return _reduce(loss, reduction, "cross_entropy")


def _is_eager():
    return current_interpreter() is None


def binary_cross_entropy_with_logits(logits, targets, reduction="mean", pos_weight=None):
    """Return the sigmoid cross entropy max(x, 0) - x*z + log(1 + exp(-|x|)) elementwise, reduced (mean)."""
    x, z = _t(logits), _t(targets)
    if not is_floating(x.dtype):
        x = ops.astype(x, np.float32)
    z = ops.astype(z, x.dtype)
    try:
        np.broadcast_shapes(x.shape, z.shape)
    except ValueError:
        raise ValueError(f"binary_cross_entropy_with_logits: logits {x.shape} and targets {z.shape} do not "
                         f"broadcast") from None
    if pos_weight is None:
        loss = ops.softplus(x) - x * z
    else:
        lw = (_t(pos_weight) - 1.0) * z + 1.0
        loss = (1.0 - z) * x + lw * ops.softplus(-x)
    return _reduce(loss, reduction, "binary_cross_entropy_with_logits")


def mse_loss(pred, target, reduction="mean"):
    """Return the squared error (pred - target)**2, averaged over all elements (reduction='mean')."""
    pred, target = _t(pred), _t(target)
    try:
        np.broadcast_shapes(pred.shape, target.shape)
    except ValueError:
        raise ValueError(f"mse_loss: shapes {pred.shape} and {target.shape} do not broadcast") from None
    d = pred - target
    return _reduce(d * d, reduction, "mse_loss")


def l2_loss(x, reduction="mean"):
    """Return each example's squared L2 norm sum(x[i]**2) (no 1/2 factor) over non-batch axes, then reduced.

    ``reduction="mean"`` (default) averages over the batch axis 0, "sum" adds, "none" returns shape (batch,).
    A 1-D x is one example per entry.
    """
    x = _t(x)
    sq = x * x
    per = ops.sum(sq, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else sq
    return _reduce(per, reduction, "l2_loss")


def huber_loss(pred, target, delta=1.0, reduction="mean"):
    """Return 0.5*d**2 where |d| <= delta else delta*(|d| - 0.5*delta), d = pred - target, reduced (mean)."""
    pred, target = _t(pred), _t(target)
    d = pred - target
    ad = ops.abs(d)
    q = ops.minimum(ad, delta)
    loss = q * q * 0.5 + (ad - q) * delta
    return _reduce(loss, reduction, "huber_loss")


# ---- candidate sampling -------------------------------------------------------------------------------------

def _log_uniform_prob(ids, range_max):
    ids = np.asarray(ids, dtype=np.float64)
    return (np.log(ids + 2.0) - np.log(ids + 1.0)) / math.log(range_max + 1.0)


def log_uniform_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max):
    """Return (sampled ids (num_sampled,), true expected counts (batch, num_true), sampled expected counts).

    Samples from the log-uniform (Zipfian) distribution P(k) = log((k+2)/(k+1)) / log(range_max+1) with the
    jitnet.random generator. Expected counts follow TensorFlow: with ``unique`` they are 1 - (1-P)**num_tries.
    """
    gen = _random.get_generator()
    log_range = math.log(range_max + 1.0)
    if unique:
        if num_sampled > range_max:
            raise ValueError(f"log_uniform_candidate_sampler: cannot draw {num_sampled} unique ids from "
                             f"{range_max}")
        seen, out, tries = set(), [], 0
        while len(out) < num_sampled:
            batch = max(2 * (num_sampled - len(out)), 16)
            draws = (np.exp(gen.random(batch) * log_range).astype(np.int64) - 1)
            for v in np.minimum(draws, range_max - 1):
                tries += 1
                v = int(v)
                if v not in seen:
                    seen.add(v)
                    out.append(v)
                    if len(out) == num_sampled:
                        break
        sampled = np.asarray(out, dtype=np.int64)
    else:
        sampled = np.minimum(np.exp(gen.random(num_sampled) * log_range).astype(np.int64) - 1, range_max - 1)
        tries = num_sampled

    def expected(ids):
        p = _log_uniform_prob(ids, range_max)
        if unique:
            return -np.expm1(tries * np.log1p(-p))
        return p * num_sampled
    tc = np.asarray(_t(true_classes).numpy(), dtype=np.int64).reshape(-1, num_true)
    return (Tensor._wrap(sampled), Tensor._wrap(expected(tc).astype(np.float32)),
            Tensor._wrap(expected(sampled).astype(np.float32)))


def _gather_rows(weights, ids):
    return embedding(weights, ids)


def _sampled_logits(weights, biases, labels, inputs, num_sampled, num_classes, num_true, sampled_values,
                    remove_accidental_hits, op):
    weights, biases, inputs = _t(weights), _t(biases), _t(inputs)
    labels = _t(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: labels must be integers, got dtype {labels.dtype}")
    if inputs.ndim != 2 or weights.ndim != 2 or inputs.shape[1] != weights.shape[1]:
        raise ValueError(f"{op}: inputs (batch, dim) {inputs.shape} and weights (num_classes, dim) "
                         f"{weights.shape} do not match")
    if weights.shape[0] != num_classes or biases.shape != (num_classes,):
        raise ValueError(f"{op}: weights {weights.shape} and biases {biases.shape} must have num_classes="
                         f"{num_classes} rows")
    bsz = inputs.shape[0]
    labels = ops.reshape(labels, (bsz, num_true)).astype(np.int64)
    if sampled_values is None:
        sampled_values = log_uniform_candidate_sampler(labels, num_true, num_sampled, True, num_classes)
    sampled, true_exp, samp_exp = (_t(v) for v in sampled_values)
    sampled = sampled.astype(np.int64)
    all_ids = ops.concatenate([ops.reshape(labels, (-1,)), sampled])
    all_w = _gather_rows(weights, all_ids)
    all_b = _gather_rows(ops.reshape(biases, (-1, 1)), all_ids)
    nt = bsz * num_true
    true_w = ops.reshape(all_w[:nt], (bsz, num_true, -1))
    true_b = ops.reshape(all_b[:nt], (bsz, num_true))
    samp_w, samp_b = all_w[nt:], ops.reshape(all_b[nt:], (-1,))
    true_logits = ops.sum(ops.expand_dims(inputs, 1) * true_w, -1) + true_b
    samp_logits = ops.matmul(inputs, ops.transpose(samp_w)) + samp_b
    true_logits = true_logits - ops.log(ops.astype(true_exp, inputs.dtype))
    samp_logits = samp_logits - ops.log(ops.astype(samp_exp, inputs.dtype))
    if remove_accidental_hits:
        # graph ops, not NumPy: the labels may be traced (a jitted step)
        hit = ops.any(ops.equal(ops.expand_dims(labels, 2), ops.reshape(sampled, (1, 1, -1))), axis=1)
        samp_logits = ops.where(hit, ops.full_like(samp_logits, -1e30 if inputs.dtype == np.float64 else -3e37),
                                samp_logits)
    logits = ops.concatenate([true_logits, samp_logits], axis=1)
    return logits, bsz


def _sampled_targets(logits, num_true):
    """Targets of sampled logits: 1/num_true in the true columns, 0 in the sampled ones (on the logits' device)."""
    if logits.device.type != "cpu":         # built on the device: no host constant to copy in a step
        return ops.concatenate([ops.full_like(logits[:, :num_true], 1.0 / num_true),
                                ops.zeros_like(logits[:, num_true:])], axis=1)
    tgt = np.zeros(logits.shape, logits.dtype)
    tgt[:, :num_true] = 1.0 / num_true
    return Tensor._wrap(tgt)


def nce_loss(weights, biases, labels, inputs, num_sampled, num_classes, num_true=1, sampled_values=None,
             remove_accidental_hits=False):
    """Return the per-example noise-contrastive estimation loss (batch,) with TensorFlow's semantics.

    ``weights`` (num_classes, dim), ``biases`` (num_classes,), integer ``labels`` (batch, num_true), ``inputs``
    (batch, dim). Negatives come from the log-uniform candidate sampler (unique); logits are corrected by
    subtracting log(expected count); the loss is the sigmoid cross entropy summed over the true and sampled
    columns (true targets 1/num_true).
    """
    logits, bsz = _sampled_logits(weights, biases, labels, inputs, num_sampled, num_classes, num_true,
                                  sampled_values, remove_accidental_hits, "nce_loss")
    loss = binary_cross_entropy_with_logits(logits, _sampled_targets(logits, num_true), reduction="none")
    return ops.sum(loss, axis=1)


def sampled_softmax_loss(weights, biases, labels, inputs, num_sampled, num_classes, num_true=1,
                         sampled_values=None, remove_accidental_hits=True):
    """Return the per-example sampled softmax loss (batch,) with TensorFlow's semantics (log-uniform sampler)."""
    logits, bsz = _sampled_logits(weights, biases, labels, inputs, num_sampled, num_classes, num_true,
                                  sampled_values, remove_accidental_hits, "sampled_softmax_loss")
    return cross_entropy(logits, _sampled_targets(logits, num_true), reduction="none")


# ---- regularizers and constraints ---------------------------------------------------------------------------

def l1_regularizer(scale):
    """Return a function w -> scale * sum(|w|) (TensorFlow's l1_regularizer)."""
    if scale < 0:
        raise ValueError(f"l1_regularizer: scale must be non-negative, got {scale}")

    def reg(w):
        """Return scale * sum(|w|)."""
        return ops.sum(ops.abs(_t(w))) * scale
    return reg


def l2_regularizer(scale):
    """Return a function w -> scale * sum(w**2) / 2 (TensorFlow's l2_regularizer, built on tf.nn.l2_loss)."""
    if scale < 0:
        raise ValueError(f"l2_regularizer: scale must be non-negative, got {scale}")

    def reg(w):
        """Return scale * sum(w**2) / 2."""
        w = _t(w)
        return ops.sum(w * w) * (0.5 * scale)
    return reg


def max_norm(w, max_value=2.0, axis=0, eps=1e-7):
    """Return w rescaled so that the L2 norm along ``axis`` is at most ``max_value`` (Keras MaxNorm).

    Apply it as a constraint after an update: ``p.assign(max_norm(p, 3.0))``.
    """
    w = _t(w)
    norms = ops.sqrt(ops.sum(w * w, axis=axis, keepdims=True))
    desired = ops.clip(norms, 0.0, max_value)
    return w * (desired / (norms + eps))


# ==============================================================================================================
# Recurrent cells: clean per-step functions (a Python loop over time calls them; jn.scan can take their place)
# ==============================================================================================================

def rnn_cell(x, h, W_ih, W_hh, b, nonlinearity="tanh"):
    """Return the next hidden state act(x @ W_ih + h @ W_hh + b) of an Elman RNN."""
    z = ops.matmul(x, W_ih) + ops.matmul(h, W_hh) + b
    if nonlinearity == "tanh":
        return ops.tanh(z)
    if nonlinearity == "relu":
        return ops.relu(z)
    raise ValueError(f"rnn_cell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


def lstm_cell(x, h, c, W_ih, W_hh, b):
    """Return (h', c') of an LSTM step with gates [i, f, g, o] = split(x @ W_ih + h @ W_hh + b, 4).

    W_ih (in, 4H), W_hh (H, 4H), b (4H,). One fused kernel does the gates; the result equals the textbook
    equations c' = f*c + i*g, h' = o*tanh(c').
    """
    hd = W_hh.shape[0]
    xw = ops.matmul(x, W_ih)
    s = lstm_state(h, c)
    s = lstm_step(xw, s, W_hh, b)
    return s[:, :hd], s[:, hd:2 * hd]


def lstm_cell_reference(x, h, c, W_ih, W_hh, b):
    """Return (h', c') of an LSTM step written with elementary ops (for checking the fused step)."""
    hd = W_hh.shape[0]
    z = ops.matmul(x, W_ih) + ops.matmul(h, W_hh) + b
    i = ops.sigmoid(z[:, :hd])
    f = ops.sigmoid(z[:, hd:2 * hd])
    g = ops.tanh(z[:, 2 * hd:3 * hd])
    o = ops.sigmoid(z[:, 3 * hd:])
    c2 = f * c + i * g
    return o * ops.tanh(c2), c2


def gru_cell(x, h, W_ih, W_hh, b_ih, b_hh):
    """Return the next hidden state of a GRU (PyTorch's equations, gates [r, z, n]).

    r = sig(xW_r + b_ir + hU_r + b_hr), z = sig(...), n = tanh(xW_n + b_in + r * (hU_n + b_hn)),
    h' = (1 - z) * n + z * h.
    """
    hd = W_hh.shape[0]
    gi = ops.matmul(x, W_ih) + b_ih
    gh = ops.matmul(h, W_hh) + b_hh
    rz = ops.sigmoid(gi[:, :2 * hd] + gh[:, :2 * hd])
    r, z = rz[:, :hd], rz[:, hd:]
    n = ops.tanh(gi[:, 2 * hd:] + r * gh[:, 2 * hd:])
    return n + z * (h - n)


# ---- fused LSTM step: the state is packed as s = [h, c, i, f, g, o] (B, 6H) so one primitive is one step ----

def _lstm_step_impl(xw, s_prev, whh, b, *mask):
    bsz, hd = s_prev.shape[0], whh.shape[0]
    out = np.empty((bsz, 6 * hd), xw.dtype)
    m = _c(mask[0]) if mask else np.ones(1, xw.dtype)
    K.nn_lstm_step(_c(xw), _c(s_prev), _c(whh), _c(b), m, out, bool(mask))
    return out


def _lstm_dz_impl(g, s, s_prev, *mask):
    bsz, hd = s.shape[0], s.shape[1] // 6
    dz = np.empty((bsz, 4 * hd), s.dtype)
    m = _c(mask[0]) if mask else np.ones(1, s.dtype)
    K.nn_lstm_step_dz(_c(g), _c(s), _c(s_prev), m, dz, bool(mask))
    return dz


def _lstm_dprev_impl(g, dz, s, whh, *mask):
    out = np.empty(s.shape, s.dtype)
    m = _c(mask[0]) if mask else np.ones(1, s.dtype)
    K.nn_lstm_step_dprev(_c(g), _c(dz), _c(s), _c(whh), m, out, bool(mask))
    return out


# -- CUDA: the recurrent GEMMs through the tiled matmul, then one launch over (row, unit) for the gates, dz or
# d s_prev; a sequence is a host loop over time of those launches --

def _row_cuda(a, k):
    """Device view of a[k] (a contiguous)."""
    return _C.view(a, a.shape[1:], a.strides[1:], k * a.strides[0])


def _h_cuda(s, hd):
    """Device view of the h part s[:, :hd] of a packed state (B, 6H)."""
    return _C.view(s, (s.shape[0], hd), s.strides, 0)


def _lstm_mask_cuda(mask, b):
    """(contiguous mask, has_mask): without a mask, a 1-D view of b's first element stands in (never read)."""
    if mask:
        return _G.contiguous(mask[0]), True
    return _C.view(b, (min(b.size, 1),), (b.dtype.itemsize,), 0), False


def _lstm_gates_cuda(xw, s_prev, whh, b, m, has_mask, out):
    z = _G.run_primitive("matmul", _h_cuda(s_prev, whh.shape[0]), whh)
    _G.launch(_KG.lstm_gates, out.shape[0] * whh.shape[0], z, xw, b, s_prev, m, out, has_mask, out.dtype.type(1))


def _lstm_step_cuda(xw, s_prev, whh, b, *mask):
    xw, s_prev, whh, b = (_G.contiguous(a) for a in (xw, s_prev, whh, b))
    m, has_mask = _lstm_mask_cuda(mask, b)
    out = _C.empty((s_prev.shape[0], 6 * whh.shape[0]), xw.dtype)
    if out.size:
        _lstm_gates_cuda(xw, s_prev, whh, b, m, has_mask, out)
    return out


def _lstm_dz_cuda(g, s, s_prev, *mask):
    g, s, s_prev = (_G.contiguous(a) for a in (g, s, s_prev))
    m, has_mask = _lstm_mask_cuda(mask, g)
    bsz, hd = s.shape[0], s.shape[1] // 6
    dz = _C.empty((bsz, 4 * hd), s.dtype)
    _G.launch(_KG.lstm_step_dz, bsz * hd, g, s, s_prev, m, dz, has_mask, s.dtype.type(1))
    return dz


def _lstm_dprev_into(g, dz, s, whh, m, has_mask, add, out):
    """out = d s_prev (+ add when add is not None) of one step (see ``kernels_gpu.lstm_step_dprev``)."""
    dh = _G.run_primitive("matmul", dz, _G.transpose_view(whh, (1, 0)))
    _G.launch(_KG.lstm_step_dprev, out.shape[0] * whh.shape[0], g, s, dh, m, g if add is None else add, out,
              has_mask, add is not None, out.dtype.type(1))


def _lstm_dprev_cuda(g, dz, s, whh, *mask):
    g, dz, s, whh = (_G.contiguous(a) for a in (g, dz, s, whh))
    m, has_mask = _lstm_mask_cuda(mask, g)
    out = _C.empty(s.shape, s.dtype)
    if out.size:
        _lstm_dprev_into(g, dz, s, whh, m, has_mask, None, out)
    return out


LSTM_DZ = Primitive("lstm_step_dz", impl={"cpu": _lstm_dz_impl, "cuda": _lstm_dz_cuda})
LSTM_DPREV = Primitive("lstm_step_dprev", impl={"cpu": _lstm_dprev_impl, "cuda": _lstm_dprev_cuda})


def _lstm_step_vjp(g, ans, ins, needs):
    xw, s_prev, whh, b = ins[:4]
    mask = ins[4:]
    dz = apply(LSTM_DZ, g, ans, s_prev, *mask)
    hd = whh.shape[0]
    d_s = apply(LSTM_DPREV, g, dz, ans, whh, *mask) if needs[1] else None
    d_whh = ops.matmul(ops.transpose(ops.copy(s_prev[:, :hd])), dz) if needs[2] else None
    d_b = ops.sum(dz, axis=0) if needs[3] else None
    return (dz if needs[0] else None, d_s, d_whh, d_b) + (None,) * len(mask)


LSTM_STEP = Primitive("lstm_step", impl={"cpu": _lstm_step_impl, "cuda": _lstm_step_cuda}, vjp=_lstm_step_vjp)


def _kernel_native(kernel, n_args, out_shape):
    """Native-driver form ``out = empty(out_shape(node)); kernel(*contiguous inputs, mask or ones(1), out,
    has_mask)`` of the fused LSTM step rows: ``n_args`` array inputs, then an optional mask input."""
    def emit(n, a, o, kernels):
        dt = n.inputs[0].dtype
        if dt not in _FLOAT_DTYPES or any(v.dtype != dt for v in n.inputs):
            return None
        kname = kernelgen.use_kernel(kernels, kernel)
        args = [f"np.ascontiguousarray({x})" for x in a[:n_args]]
        has_mask = len(a) > n_args
        src_dt = kernelgen.dtype_source(dt)
        mask = f"np.ascontiguousarray({a[n_args]})" if has_mask else f"np.ones(1, {src_dt})"
        return [f"{o} = np.empty({kernelgen.shape_source(out_shape(n))}, {src_dt})",
                f"{kname}({', '.join(args)}, {mask}, {o}, {kernelgen.flag_source(has_mask)})"]
    return emit


LSTM_STEP.extra["native"] = _kernel_native(K.nn_lstm_step, 4,
                                           lambda n: (n.inputs[1].shape[0], 6 * n.inputs[2].shape[0]))
LSTM_DZ.extra["native"] = _kernel_native(K.nn_lstm_step_dz, 3,
                                         lambda n: (n.inputs[1].shape[0], 4 * n.inputs[1].shape[1] // 6))
LSTM_DPREV.extra["native"] = _kernel_native(K.nn_lstm_step_dprev, 4, lambda n: n.inputs[2].shape)



# ---- a whole LSTM sequence in one primitive (the layer's path): one kernel call forward, one backward ----

def _lstm_seq_impl(xw, s0, whh, b, *mask):
    t, bsz, hd = xw.shape[0], s0.shape[0], whh.shape[0]
    out = np.empty((t, bsz, 6 * hd), xw.dtype)
    m = _c(mask[0]) if mask else np.ones((1, 1), xw.dtype)
    K.nn_lstm_seq(_c(xw), _c(s0), _c(whh), _c(b), m, out, bool(mask))
    return out


def _lstm_seq_bwd_parts(t, bsz, hd):
    """(start, stop, shape) of dxw, ds0, dW_hh and db in the flat output of ``lstm_seq_bwd``."""
    shapes = ((t, bsz, 4 * hd), (bsz, 6 * hd), (hd, 4 * hd), (4 * hd,))
    ends = np.cumsum([0] + [int(np.prod(s)) for s in shapes]).tolist()
    return [(ends[i], ends[i + 1], shapes[i]) for i in range(4)]


def _lstm_seq_bwd_impl(g, S, s0, whh, *mask):
    t, bsz, h6 = S.shape
    parts = _lstm_seq_bwd_parts(t, bsz, h6 // 6)
    flat = np.empty(parts[-1][1], S.dtype)
    m = _c(mask[0]) if mask else np.ones((1, 1), S.dtype)
    K.nn_lstm_seq_bwd(_c(g), _c(S), _c(s0), _c(whh), m, bool(mask),
                      *[flat[a:b].reshape(shp) for a, b, shp in parts])
    return flat


def _no_second_order(name):
    def vjp(g, ans, ins, needs, **params):
        raise NotImplementedError(f"{name}: no second-order gradient (differentiate lstm_step over jn.scan "
                                  f"instead)")
    return vjp


def _lstm_seq_cuda(xw, s0, whh, b, *mask):
    xw, s0, whh, b = (_G.contiguous(a) for a in (xw, s0, whh, b))
    m, has_mask = _lstm_mask_cuda(mask, b)
    t, bsz, hd = xw.shape[0], s0.shape[0], whh.shape[0]
    S = _C.empty((t, bsz, 6 * hd), xw.dtype)
    for k in range(t if S.size else 0):
        _lstm_gates_cuda(_row_cuda(xw, k), s0 if k == 0 else _row_cuda(S, k - 1), whh, b,
                         _row_cuda(m, k) if has_mask else m, has_mask, _row_cuda(S, k))
    return S


def _lstm_seq_bwd_cuda(g, S, s0, whh, *mask):
    g, S, s0, whh = (_G.contiguous(a) for a in (g, S, s0, whh))
    t, bsz, h6 = S.shape
    hd = h6 // 6
    parts = _lstm_seq_bwd_parts(t, bsz, hd)
    if t * bsz * hd == 0:                      # no steps, rows or units: every gradient is zero (or empty)
        return _G.zeros((parts[-1][1],), S.dtype)
    m, has_mask = _lstm_mask_cuda(mask, s0)
    flat = _C.empty((parts[-1][1],), S.dtype)
    dz, ds0, dwhh, db = (_C.view(flat, shp, _C.c_strides(shp, S.dtype.itemsize), a * S.dtype.itemsize)
                         for a, _, shp in parts)
    one = S.dtype.type(1)
    bufs = (_C.empty((bsz, h6), S.dtype), _C.empty((bsz, h6), S.dtype))
    gk = _row_cuda(g, t - 1)            # d S[k] in full: G[k] plus what step k + 1 sends back
    for k in range(t - 1, -1, -1):
        prev = s0 if k == 0 else _row_cuda(S, k - 1)
        mk = _row_cuda(m, k) if has_mask else m
        sk, dzk = _row_cuda(S, k), _row_cuda(dz, k)
        _G.launch(_KG.lstm_step_dz, bsz * hd, gk, sk, prev, mk, dzk, has_mask, one)
        if k > 0:
            out = bufs[k % 2]
            _lstm_dprev_into(gk, dzk, sk, whh, mk, has_mask, _row_cuda(g, k - 1), out)
            gk = out
        else:
            _lstm_dprev_into(gk, dzk, sk, whh, mk, has_mask, None, ds0)
    hp = _C.empty((t * bsz, hd), S.dtype)          # [h_{-1}; ...; h_{T-2}]: dW_hh is one GEMM over all steps
    _G.launch(_KG.lstm_prev_h, hp.size, S, s0, hp)
    dz2 = _C.reshape(dz, (t * bsz, 4 * hd))
    _G.copy_into(dwhh, _G.run_primitive("matmul", _G.transpose_view(hp, (1, 0)), dz2))
    _G.copy_into(db, _G.run_primitive("reduce", dz2, op="sum", axes=(0,), keepdims=False))
    return flat


LSTM_SEQ_BWD = Primitive("lstm_seq_bwd", impl={"cpu": _lstm_seq_bwd_impl, "cuda": _lstm_seq_bwd_cuda},
                         vjp=_no_second_order("lstm_seq_bwd"))


def _lstm_seq_vjp(g, ans, ins, needs):
    xw, s0, whh, b = ins[:4]
    mask = ins[4:]
    flat = apply(LSTM_SEQ_BWD, g, ans, s0, whh, *mask)
    parts = _lstm_seq_bwd_parts(xw.shape[0], xw.shape[1], whh.shape[0])
    return tuple(ops.reshape(flat[a:b], shp) if need else None
                 for (a, b, shp), need in zip(parts, needs[:4])) + (None,) * len(mask)


LSTM_SEQ = Primitive("lstm_seq", impl={"cpu": _lstm_seq_impl, "cuda": _lstm_seq_cuda}, vjp=_lstm_seq_vjp)


def lstm_seq(xw, s0, W_hh, b, mask=None):
    """Run an LSTM over time in one primitive; return the packed states S (T, B, 6H) = [h, c, i, f, g, o].

    ``xw`` (T, B, 4H) is the input projection of every step, ``s0`` (B, 6H) the packed initial state (see
    ``lstm_state``), ``mask`` (T, B) stops finished rows (they keep h and c). The forward is one kernel
    call (a BLAS GEMM and a fused gate pass per step); the backward is one reverse loop plus a single GEMM
    over all steps for ``W_hh``'s gradient (the layout cuDNN and PyTorch use), so neither grows the tape or
    a jitted graph with the sequence length. ``S[..., :H]`` are the outputs h_t.
    """
    xw, s0, W_hh, b = _t(xw), _t(s0), _t(W_hh), _t(b)
    hd = W_hh.shape[0]
    if xw.ndim != 3 or W_hh.shape != (hd, 4 * hd) or xw.shape[2] != 4 * hd or s0.shape != (xw.shape[1], 6 * hd) \
            or b.shape != (4 * hd,):
        raise ValueError(f"lstm_seq: inconsistent shapes xw {xw.shape}, s0 {s0.shape}, W_hh {W_hh.shape}, "
                         f"b {b.shape} (expected (T, B, 4H), (B, 6H), (H, 4H), (4H,))")
    if mask is not None and _t(mask).shape != xw.shape[:2]:
        raise ValueError(f"lstm_seq: mask has shape {_t(mask).shape}, expected (T, B) = {xw.shape[:2]}")
    return apply(LSTM_SEQ, *_in_dtype(W_hh.dtype, xw, s0, W_hh, b, mask))


def lstm_state(h, c):
    """Return the packed LSTM state [h, c, 0, 0, 0, 0] (B, 6H) that ``lstm_step`` consumes."""
    h, c = _t(h), _t(c)
    z = ops.zeros((h.shape[0], 4 * h.shape[1]), h.dtype, device=h.device)
    return ops.concatenate([h, c, z], axis=1)


def lstm_step(xw, s, W_hh, b, mask=None):
    """Return the next packed LSTM state (B, 6H) = [h, c, i, f, g, o] from xw = x @ W_ih (B, 4H), state s.

    Rows where ``mask`` (B,) is 0 keep their h and c. Slice ``[:, :H]`` for h and ``[:, H:2H]`` for c.
    """
    xw, s, W_hh, b = _t(xw), _t(s), _t(W_hh), _t(b)
    hd = W_hh.shape[0]
    if W_hh.shape != (hd, 4 * hd) or xw.shape != (s.shape[0], 4 * hd) or s.shape[1] != 6 * hd or \
            b.shape != (4 * hd,):
        raise ValueError(f"lstm_step: inconsistent shapes xw {xw.shape}, state {s.shape}, W_hh {W_hh.shape}, "
                         f"b {b.shape} (expected (B, 4H), (B, 6H), (H, 4H), (4H,))")
    return apply(LSTM_STEP, *_in_dtype(W_hh.dtype, xw, s, W_hh, b, mask))


def _in_dtype(dt, *tensors):
    """The tensors (None dropped) cast to ``dt`` where they differ: the fused LSTM kernels take one dtype."""
    return [t if t.dtype == dt else t.astype(dt) for t in map(_t, (x for x in tensors if x is not None))]
