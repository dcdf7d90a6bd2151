"""The fused attention-decoder step: an LSTM step over a packed state and one step of additive attention.

Each is one kernel forward and one backward on either device (their gradients are checked by central
differences in the tests), and the rows carry native emitters, so that jitnet's native segments compile a scan
body of them, and the loop around it, into one generated function:

* :func:`lstm_step_fused` ``(xw, s, W_hh, mask)``: one LSTM step over a packed state ``[h, c, i, f, g, o]``
  (the recurrent GEMM is BLAS / the CUDA matmul; the bias is folded into ``xw``);
* :class:`AttentionDecoderCell`: both as a layer (an LSTM decoder cell reading ``[x; context]``);
* :func:`additive_attention_step` ``(q, pk, v, mask, values)``: Bahdanau scores ``v . tanh(pk + q)``, the
  masked softmax over the source and the context vector, for one decoder step (two rows:
  :func:`additive_attention_tanh`, whose result is kept for the backward pass, and
  :func:`additive_attention_context`); :func:`additive_attention_weights` gives the weights (for plots).

CPU kernels: :mod:`jitnet.kernels_seq2seq`; CUDA kernels: :mod:`jitnet.kernels_seq2seq_gpu` (loaded when a
CUDA implementation first runs).
"""
from __future__ import annotations

import numpy as np

from .. import kernels_seq2seq as KS
from .. import ops
from ..autodiff.core import Primitive, apply
from ..compiler.native import use_kernel
from ..kernelgen import dtype_name, flag_source
from ..lazy import LazyModule
from ..tensor import Tensor, _infer_array, float32
from . import functional as F
from .attention import BahdanauAttention
from .module import Module
from .recurrent import LSTMCell

# the CUDA backend's services and kernels, imported when a CUDA implementation first runs (never on the CPU)
_G = LazyModule("jitnet.backend_cuda")
_C = LazyModule("jitnet.cuda")
_KQ = LazyModule("jitnet.kernels_seq2seq_gpu")

__all__ = ["AttentionDecoderCell", "lstm_step_fused", "lstm_state", "additive_attention_step", "additive_attention_weights",
           "additive_attention_tanh", "additive_attention_context"]

lstm_fwd_kernel = KS.lstm_fwd_kernel
lstm_dz_kernel = KS.lstm_dz_kernel
lstm_dprev_kernel = KS.lstm_dprev_kernel
attention_tanh_kernel = KS.attention_tanh_kernel
attention_tanh_bwd_kernel = KS.attention_tanh_bwd_kernel
attention_context_kernel = KS.attention_context_kernel
attention_context_bwd_kernel = KS.attention_context_bwd_kernel


def _c(a):
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _mask_arg(mask):
    return (_c(mask[0].astype(np.uint8, copy=False)), True) if mask else (np.ones(1, np.uint8), False)


def _lstm_fwd_impl(xw, s_prev, whh, *mask):
    out = np.empty(s_prev.shape, xw.dtype)
    m, use = _mask_arg(mask)
    lstm_fwd_kernel(_c(xw), _c(s_prev), _c(whh), m, out, use)
    return out


def _lstm_dz_impl(g, s, s_prev, *mask):
    dz = np.empty((s.shape[0], 4 * (s.shape[1] // 6)), s.dtype)
    m, use = _mask_arg(mask)
    lstm_dz_kernel(_c(g), _c(s), _c(s_prev), m, dz, use)
    return dz


def _lstm_dprev_impl(g, dz, s, whh, *mask):
    out = np.empty(s.shape, s.dtype)
    m, use = _mask_arg(mask)
    lstm_dprev_kernel(_c(g), _c(dz), _c(s), _c(whh), m, out, use)
    return out


def _lstm_dw_impl(s_prev, dz):
    hd = dz.shape[1] // 4
    return np.matmul(s_prev[:, :hd].T, dz)


def _no_vjp(name):
    def vjp(g, ans, ins, needs, **params):
        raise TypeError(f"{name}: second-order gradients are not implemented (it is the backward kernel of a "
                        f"fused seq2seq step)")
    return vjp


# -- CUDA: jitnet.nn's LSTM step launches (the recurrent GEMM through the CUDA matmul, then one thread per
# (row, unit)) with a zero bias --

def _lstm_fwd_cuda(xw, s_prev, whh, *mask):
    return F._lstm_step_cuda(xw, s_prev, whh, _G.zeros((whh.shape[1],), xw.dtype), *mask)


def _lstm_dz_cuda(g, s, s_prev, *mask):
    return F._lstm_dz_cuda(g, s, s_prev, *mask)


def _lstm_dprev_cuda(g, dz, s, whh, *mask):
    return F._lstm_dprev_cuda(g, dz, s, whh, *mask)


def _lstm_dw_cuda(s_prev, dz):
    h = F._h_cuda(_G.contiguous(s_prev), dz.shape[1] // 4)
    return _G.run_primitive("matmul", _G.transpose_view(h, (1, 0)), dz)


S2S_LSTM_DZ = Primitive("s2s_lstm_step_dz", impl={"cpu": _lstm_dz_impl, "cuda": _lstm_dz_cuda},
                        vjp=_no_vjp("s2s_lstm_step_dz"))
S2S_LSTM_DPREV = Primitive("s2s_lstm_step_dprev", impl={"cpu": _lstm_dprev_impl, "cuda": _lstm_dprev_cuda},
                           vjp=_no_vjp("s2s_lstm_step_dprev"))
S2S_LSTM_DW = Primitive("s2s_lstm_step_dw", impl={"cpu": _lstm_dw_impl, "cuda": _lstm_dw_cuda},
                        vjp=_no_vjp("s2s_lstm_step_dw"))


def _lstm_vjp(g, ans, ins, needs):
    xw, s_prev, whh = ins[:3]
    mask = ins[3:]
    dz = apply(S2S_LSTM_DZ, g, ans, s_prev, *mask)
    d_s = apply(S2S_LSTM_DPREV, g, dz, ans, whh, *mask) if needs[1] else None
    d_w = apply(S2S_LSTM_DW, s_prev, dz) if needs[2] else None
    return (dz if needs[0] else None, d_s, d_w) + (None,) * len(mask)


S2S_LSTM = Primitive("s2s_lstm_step", impl={"cpu": _lstm_fwd_impl, "cuda": _lstm_fwd_cuda}, vjp=_lstm_vjp)


def _t(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


def lstm_state(h, c):
    """Return the packed LSTM state [h, c, 0, 0, 0, 0] (B, 6H) that :func:`lstm_step_fused` consumes."""
    h, c = _t(h), _t(c)
    return ops.concatenate([h, c, ops.zeros((h.shape[0], 4 * h.shape[1]), h.dtype, device=h.device)], axis=1)


def lstm_step_fused(xw, s, W_hh, mask=None):
    """Return the next packed LSTM state (B, 6H) = [h, c, i, f, g, o] from xw = x @ W_ih + b (B, 4H) and s.

    One kernel: the recurrent product ``h @ W_hh`` (BLAS) and the gates [i, f, g, o]. Rows whose ``mask``
    (B,) is 0 keep their h and c. ``s[:, :H]`` is h and ``s[:, H:2H]`` is c.
    """
    xw, s, W_hh = _t(xw), _t(s), _t(W_hh)
    hd = W_hh.shape[0] if W_hh.ndim == 2 else -1
    if W_hh.ndim != 2 or W_hh.shape != (hd, 4 * hd) or xw.shape != (s.shape[0], 4 * hd) or \
            s.shape != (xw.shape[0], 6 * hd):
        raise ValueError(f"lstm_step_fused: inconsistent shapes xw {xw.shape}, state {s.shape}, W_hh "
                         f"{W_hh.shape} (expected (B, 4H), (B, 6H), (H, 4H))")
    dt = W_hh.dtype
    args = [a if a.dtype == dt else a.astype(dt) for a in (xw, s, W_hh)]
    if mask is not None:
        m = _t(mask)
        if m.shape != (xw.shape[0],):
            raise ValueError(f"lstm_step_fused: mask must have shape ({xw.shape[0]},), got {m.shape}")
        args.append(m if m.dtype == np.uint8 else ops.astype(m != 0, np.uint8))
    return apply(S2S_LSTM, *args)


def _attn_check(q, pk, v, mask, vals):
    bsz, nsrc, nu = pk.shape
    if q.shape != (bsz, nu) or v.shape != (nu,) or mask.shape != (bsz, nsrc) or vals.shape[:2] != (bsz, nsrc):
        raise ValueError(f"additive_attention_step: inconsistent shapes q {q.shape}, keys {pk.shape}, v {v.shape}, "
                         f"mask {mask.shape}, values {vals.shape} (expected (B, U), (B, S, U), (U,), (B, S), "
                         f"(B, S, D))")


def _packed(sizes, dtype):
    """Return (flat buffer, offsets) for several arrays computed by one kernel."""
    off = np.cumsum([0] + [int(np.prod(sh)) for sh in sizes])
    return np.empty(int(off[-1]), dtype), off


def _parts(flat, off, shapes):
    return [flat[off[i]:off[i + 1]].reshape(sh) for i, sh in enumerate(shapes)]


def _tanh_impl(q, pk, mask):
    th = np.empty(pk.shape, pk.dtype)
    attention_tanh_kernel(_c(q), _c(pk), _c(mask), th)
    return th


def _tanh_grad_impl(g, th):
    bsz, nsrc, nu = th.shape
    shapes = [(bsz, nsrc, nu), (bsz, nu)]
    flat, off = _packed(shapes, th.dtype)
    attention_tanh_bwd_kernel(_c(g.astype(th.dtype, copy=False)), _c(th), *_parts(flat, off, shapes))
    return flat


def _ctx_impl(th, v, mask, vals):
    ctx = np.empty((th.shape[0], vals.shape[2]), th.dtype)
    attention_context_kernel(_c(th), _c(v), _c(mask), _c(vals), ctx, np.empty((1, 1), th.dtype), False)
    return ctx


def _weights_impl(th, v, mask, vals):
    ctx = np.empty((th.shape[0], vals.shape[2]), th.dtype)
    w = np.empty(mask.shape, th.dtype)
    attention_context_kernel(_c(th), _c(v), _c(mask), _c(vals), ctx, w, True)
    return w


def _ctx_grad_impl(gc, th, v, mask, vals):
    shapes = [th.shape, v.shape, vals.shape]
    flat, off = _packed(shapes, th.dtype)
    attention_context_bwd_kernel(_c(gc.astype(th.dtype, copy=False)), _c(th), _c(v), _c(mask), _c(vals),
                                 *_parts(flat, off, shapes))
    return flat


def _unpack_impl(flat, offset, shape):
    n = int(np.prod(shape))
    return flat[offset:offset + n].reshape(shape)


# -- CUDA: one thread per output element (one per row for the softmax), packed results as views of one
# flat device array --

def _scalars(dtype):
    return dtype.type(0), dtype.type(1)


def _packed_cuda(shapes, dtype):
    """Return (flat device buffer, [views of it with ``shapes``]) for several arrays computed together."""
    off = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])
    flat = _C.empty((int(off[-1]),), dtype)
    isz = flat.dtype.itemsize
    return flat, [_C.view(flat, sh, _C.c_strides(sh, isz), int(off[i]) * isz) for i, sh in enumerate(shapes)]


def _tanh_cuda(q, pk, mask):
    q, pk, mask = (_G.contiguous(a) for a in (q, pk, mask))
    th = _C.empty(pk.shape, pk.dtype)
    _G.launch(_KQ.attention_tanh, th.size, q, pk, mask, th)
    return th


def _tanh_grad_cuda(g, th):
    th = _G.contiguous(th)
    g = _G.contiguous(_G.cast(g, th.dtype))
    bsz, nsrc, nu = th.shape
    flat, (dpk, dq) = _packed_cuda([(bsz, nsrc, nu), (bsz, nu)], th.dtype)
    zero, one = _scalars(th.dtype)
    _G.launch(_KQ.attention_tanh_bwd_dpk, th.size, g, th, dpk, one)
    _G.launch(_KQ.attention_tanh_bwd_dq, bsz * nu, g, th, dq, zero, one)
    return flat


def _weights_into(th, v, mask, w):
    zero, one = _scalars(th.dtype)
    _G.launch(_KQ.attention_softmax, th.shape[0], th, v, mask, w, zero, one)


def _ctx_cuda(th, v, mask, vals):
    th, v, mask, vals = (_G.contiguous(a) for a in (th, v, mask, vals))
    w = _C.empty(mask.shape, th.dtype)
    _weights_into(th, v, mask, w)
    ctx = _C.empty((th.shape[0], vals.shape[2]), th.dtype)
    _G.launch(_KQ.attention_context, ctx.size, w, vals, ctx, th.dtype.type(0))
    return ctx


def _weights_cuda(th, v, mask, vals):
    th, v, mask = (_G.contiguous(a) for a in (th, v, mask))
    w = _C.empty(mask.shape, th.dtype)
    _weights_into(th, v, mask, w)
    return w


def _ctx_grad_cuda(gc, th, v, mask, vals):
    th, v, mask, vals = (_G.contiguous(a) for a in (th, v, mask, vals))
    gc = _G.contiguous(_G.cast(gc, th.dtype))
    zero = th.dtype.type(0)
    w = _C.empty(mask.shape, th.dtype)
    _weights_into(th, v, mask, w)
    dsc = _C.empty(mask.shape, th.dtype)
    _G.launch(_KQ.attention_context_bwd_rows, th.shape[0], gc, vals, w, dsc, zero)
    flat, (dth, dv, dvals) = _packed_cuda([th.shape, v.shape, vals.shape], th.dtype)
    _G.launch(_KQ.attention_context_bwd_dvals, dvals.size, gc, w, dvals)
    _G.launch(_KQ.attention_context_bwd_dth, dth.size, dsc, v, dth)
    _G.launch(_KQ.attention_context_bwd_dv, dv.size, dsc, th, dv, zero)
    return flat


def _unpack_cuda(flat, offset, shape):
    flat = _G.contiguous(flat)
    isz = flat.dtype.itemsize
    return _C.view(flat, shape, _C.c_strides(shape, isz), int(offset) * isz)


#: a view of part of a packed backward result (several gradients computed by one kernel)
S2S_UNPACK = Primitive("s2s_unpack", impl={"cpu": _unpack_impl, "cuda": _unpack_cuda}, kind="view",
                       vjp=_no_vjp("s2s_unpack"))
ATTN_TANH_GRAD = Primitive("additive_attention_tanh_grad", impl={"cpu": _tanh_grad_impl, "cuda": _tanh_grad_cuda},
                           vjp=_no_vjp("additive_attention_tanh_grad"))
ATTN_CTX_GRAD = Primitive("additive_attention_context_grad", impl={"cpu": _ctx_grad_impl, "cuda": _ctx_grad_cuda},
                          vjp=_no_vjp("additive_attention_context_grad"))


def _unpack(flat, shapes, needs):
    out, off = [], 0
    for shape, need in zip(shapes, needs):
        if shape is None:
            out.append(None)
            continue
        out.append(apply(S2S_UNPACK, flat, offset=off, shape=tuple(shape)) if need else None)
        off += int(np.prod(shape))
    return tuple(out)


def _tanh_vjp(g, ans, ins, needs):
    q, pk, mask = ins
    flat = apply(ATTN_TANH_GRAD, g, ans)
    d_pk, d_q = _unpack(flat, [pk.shape, q.shape], [needs[1], needs[0]])
    return d_q, d_pk, None


def _ctx_vjp(g, ans, ins, needs):
    th, v, mask, vals = ins
    flat = apply(ATTN_CTX_GRAD, g, th, v, mask, vals)
    d_th, d_v, d_vals = _unpack(flat, [th.shape, v.shape, vals.shape], [needs[0], needs[1], needs[3]])
    return d_th, d_v, None, d_vals


ATTN_TANH = Primitive("additive_attention_tanh", impl={"cpu": _tanh_impl, "cuda": _tanh_cuda}, vjp=_tanh_vjp)
ATTN_CTX = Primitive("additive_attention_context", impl={"cpu": _ctx_impl, "cuda": _ctx_cuda}, vjp=_ctx_vjp)
ATTN_WEIGHTS = Primitive("additive_attention_weights", impl={"cpu": _weights_impl, "cuda": _weights_cuda},
                         nondiff=True)


# --------------------------------------------------------------------------------------------------------------
# Native emitters: the same kernel calls as the impls above, as source lines of a generated driver, so that
# jitnet's native segments (jitnet.compiler.native) can run a whole scan body, and then the whole loop, as
# compiled code. An emitter returns None for inputs it does not handle; the step then stays a Python call.
# --------------------------------------------------------------------------------------------------------------

def _np_dt(dtype):
    return "np." + dtype_name(dtype)


def _shape_src(shape):
    shape = tuple(int(d) for d in shape)
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _floats_alike(vals, n=None):
    vals = list(vals)[:n]
    dt = vals[0].dtype
    return dt in (np.dtype(np.float32), np.dtype(np.float64)) and all(v.dtype == dt for v in vals)


def _mask_src(n, a, i):
    """Return (mask expression, use flag) for an optional uint8 mask input at position i, or None if unusable."""
    if len(n.inputs) <= i:
        return "np.ones(1, np.uint8)", flag_source(False)
    if n.inputs[i].dtype != np.uint8:
        return None
    return f"np.ascontiguousarray({a[i]})", flag_source(True)


def _contig(names):
    return ", ".join(f"np.ascontiguousarray({x})" for x in names)


def _use(kernels, kernel):
    return use_kernel(kernels, kernel)


def _emit_lstm_fwd(n, a, o, kernels):
    m = _mask_src(n, a, 3)
    if m is None or not _floats_alike(n.inputs, 3):
        return None
    k = _use(kernels, lstm_fwd_kernel)
    return [f"{o} = np.empty({_shape_src(n.out.shape)}, {_np_dt(n.out.dtype)})",
            f"{k}({_contig(a[:3])}, {m[0]}, {o}, {m[1]})"]


def _emit_lstm_dz(n, a, o, kernels):
    m = _mask_src(n, a, 3)
    if m is None or not _floats_alike(n.inputs, 3):
        return None
    k = _use(kernels, lstm_dz_kernel)
    return [f"{o} = np.empty({_shape_src(n.out.shape)}, {_np_dt(n.out.dtype)})",
            f"{k}({_contig(a[:3])}, {m[0]}, {o}, {m[1]})"]


def _emit_lstm_dprev(n, a, o, kernels):
    m = _mask_src(n, a, 4)
    if m is None or not _floats_alike(n.inputs, 4):
        return None
    k = _use(kernels, lstm_dprev_kernel)
    return [f"{o} = np.empty({_shape_src(n.out.shape)}, {_np_dt(n.out.dtype)})",
            f"{k}({_contig(a[:4])}, {m[0]}, {o}, {m[1]})"]


def _emit_lstm_dw(n, a, o, kernels):
    if not _floats_alike(n.inputs):
        return None
    hd = n.out.shape[0]
    return [f"{o} = np.empty({_shape_src(n.out.shape)}, {_np_dt(n.out.dtype)})",
            f"K.gemm({a[0]}[:, :{hd}].T, {a[1]}, {o})"]


def _emit_attn_tanh(n, a, o, kernels):
    if n.inputs[2].dtype != np.uint8 or not _floats_alike(n.inputs, 2):
        return None
    k = _use(kernels, attention_tanh_kernel)
    return [f"{o} = np.empty({_shape_src(n.out.shape)}, {_np_dt(n.out.dtype)})", f"{k}({_contig(a)}, {o})"]


def _emit_packed(kernel, shapes, n, a, o, kernels):
    off = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])
    parts = [f"{o}[{off[i]}:{off[i + 1]}].reshape({_shape_src(sh)})" for i, sh in enumerate(shapes)]
    k = _use(kernels, kernel)
    return [f"{o} = np.empty({int(off[-1])}, {_np_dt(n.out.dtype)})", f"{k}({_contig(a)}, {', '.join(parts)})"]


def _emit_attn_tanh_grad(n, a, o, kernels):
    if not _floats_alike(n.inputs):
        return None
    bsz, nsrc, nu = n.inputs[1].shape
    return _emit_packed(attention_tanh_bwd_kernel, [(bsz, nsrc, nu), (bsz, nu)], n, a, o, kernels)


def _emit_attn_ctx(weights):
    def emit(n, a, o, kernels):
        if n.inputs[2].dtype != np.uint8 or not _floats_alike([n.inputs[i] for i in (0, 1, 3)]):
            return None
        th, vals = n.inputs[0], n.inputs[3]
        dt = _np_dt(th.dtype)
        k = _use(kernels, attention_context_kernel)
        ctx = _shape_src((th.shape[0], vals.shape[2]))
        if weights:
            return [f"{o} = np.empty({_shape_src(n.out.shape)}, {dt})",
                    f"{k}({_contig(a)}, np.empty({ctx}, {dt}), {o}, {flag_source(True)})"]
        return [f"{o} = np.empty({ctx}, {dt})",
                f"{k}({_contig(a)}, {o}, np.empty((1, 1), {dt}), {flag_source(False)})"]
    return emit


def _emit_attn_ctx_grad(n, a, o, kernels):
    if n.inputs[3].dtype != np.uint8 or not _floats_alike([n.inputs[i] for i in (0, 1, 2, 4)]):
        return None
    th, v, vals = n.inputs[1], n.inputs[2], n.inputs[4]
    return _emit_packed(attention_context_bwd_kernel, [th.shape, v.shape, vals.shape], n, a, o, kernels)


def _emit_unpack(n, a, o, kernels):
    off, shape = int(n.params["offset"]), tuple(n.params["shape"])
    size = int(np.prod(shape))
    return [f"{o} = {a[0]}[{off}:{off + size}].reshape({_shape_src(shape)})"]


for _prim, _em in ((S2S_LSTM, _emit_lstm_fwd), (S2S_LSTM_DZ, _emit_lstm_dz), (S2S_LSTM_DPREV, _emit_lstm_dprev),
                   (S2S_LSTM_DW, _emit_lstm_dw), (ATTN_TANH, _emit_attn_tanh), (ATTN_TANH_GRAD, _emit_attn_tanh_grad),
                   (ATTN_CTX, _emit_attn_ctx(False)), (ATTN_WEIGHTS, _emit_attn_ctx(True)),
                   (ATTN_CTX_GRAD, _emit_attn_ctx_grad), (S2S_UNPACK, _emit_unpack)):
    _prim.extra["native"] = _em


def _attn_args(q, pk, v, mask, values):
    q, pk, v, values = _t(q), _t(pk), _t(v), _t(values)
    m = _t(mask)
    if pk.ndim != 3 or q.ndim != 2 or values.ndim != 3:
        raise ValueError(f"additive_attention_step: expected q (B, U), keys (B, S, U), values (B, S, D), got "
                         f"{q.shape}, {pk.shape}, {values.shape}")
    _attn_check(q, pk, v, m, values)
    dt = pk.dtype
    q, v, values = (a if a.dtype == dt else a.astype(dt) for a in (q, v, values))
    if m.dtype != np.uint8:
        m = ops.astype(m != 0, np.uint8)
    return q, pk, v, m, values


def additive_attention_tanh(q, pk, mask):
    """Return tanh(pk + q[:, None]) (B, S, U), zero where ``mask`` (B, S) is 0 (the first half of a step)."""
    return apply(ATTN_TANH, q, pk, mask)


def additive_attention_context(th, v, mask, values):
    """Return the context (B, D): the values weighted by the masked softmax of the scores th . v."""
    return apply(ATTN_CTX, th, v, mask, values)


def additive_attention_step(q, pk, v, mask, values):
    """Return the context (B, D) of one additive-attention step (two fused kernels, two for the gradient).

    ``q`` (B, U) is the projected query, ``pk`` (B, S, U) the projected keys (bias included), ``v`` (U,) the
    score vector, ``mask`` (B, S) nonzero where a source position is valid, ``values`` (B, S, D). Scores are
    ``v . tanh(pk[b, s] + q[b])``, the weights their softmax over the valid positions (a row with none gets
    zero weights and a zero context), the context the weighted sum of the values.
    """
    q, pk, v, m, values = _attn_args(q, pk, v, mask, values)
    return additive_attention_context(additive_attention_tanh(q, pk, m), v, m, values)


def additive_attention_weights(q, pk, v, mask, values):
    """Return the attention weights (B, S) of :func:`additive_attention_step` (no gradient; for plots)."""
    q, pk, v, m, values = _attn_args(q, pk, v, mask, values)
    return apply(ATTN_WEIGHTS, additive_attention_tanh(q, pk, m), v, m, values)


class AttentionDecoderCell(Module):
    """An LSTM decoder cell with additive (Bahdanau) attention, on the fused rows (one LSTM kernel and two
    attention kernels per step, forward and backward, on either device).

    Each step reads ``[x; context]``, where the context attends over ``values`` (B, S, key_size) with the
    previous h as the query (the decoder step of :class:`jitnet.models.seq2seq.Seq2Seq`). Call :meth:`prepare`
    once per source (the keys are projected once), :meth:`initial_state` for the packed state (B, 6H), then
    ``cell(x, state, memory)`` per step: it returns ``(next state, context)``; ``state[:, :H]`` is h.
    """

    def __init__(self, input_size, hidden_size, key_size, units=None, dtype=float32):
        super().__init__()
        self.input_size, self.hidden_size, self.key_size = int(input_size), int(hidden_size), int(key_size)
        self.cell = LSTMCell(self.input_size + self.key_size, self.hidden_size, dtype=dtype)
        self.attention = BahdanauAttention(self.hidden_size, self.key_size, int(units or hidden_size), dtype=dtype)

    def extra_repr(self):
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, key_size={self.key_size}"

    def initial_state(self, h, c=None):
        """Return the packed state (B, 6H) of h and c (default zeros)."""
        h = _t(h)
        return lstm_state(h, ops.zeros_like(h) if c is None else c)

    def prepare(self, values, mask):
        """Return the attention memory (values, projected keys, score vector, uint8 mask) of one source."""
        values, m = _t(values), _t(mask)
        if values.ndim != 3 or values.shape[2] != self.key_size or m.shape != values.shape[:2]:
            raise ValueError(f"AttentionDecoderCell.prepare: values (B, S, {self.key_size}) and mask (B, S) "
                             f"expected, got {values.shape} and {m.shape}")
        values = ops.copy(values)
        kp = self.attention.key_proj
        pk = ops.reshape(ops.matmul(ops.reshape(values, (-1, self.key_size)), kp.W), values.shape[:2] + (-1,)) + kp.b
        if m.dtype != np.uint8:
            m = ops.astype(m != 0, np.uint8)
        return values, pk, ops.reshape(self.attention.v.W, (-1,)), m

    def forward(self, x, state, memory):
        """Return (next packed state (B, 6H), context (B, key_size)) after reading ``x`` (B, input_size)."""
        values, pk, v, m = memory
        x, state = _t(x), _t(state)
        hd, e = self.hidden_size, self.input_size
        if x.ndim != 2 or x.shape[1] != e or state.shape != (x.shape[0], 6 * hd):
            raise ValueError(f"AttentionDecoderCell: x (B, {e}) and state (B, {6 * hd}) expected, got {x.shape} "
                             f"and {state.shape}")
        q = ops.matmul(state[:, :hd], self.attention.query_proj.W)
        ctx = additive_attention_context(additive_attention_tanh(q, pk, m), v, m, values)
        w = self.cell.W_ih
        xw = ops.matmul(x, w[:e]) + ops.matmul(ctx, w[e:]) + self.cell.b
        return lstm_step_fused(xw, state, self.cell.W_hh), ctx
