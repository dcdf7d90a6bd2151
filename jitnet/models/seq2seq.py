"""Sequence-to-sequence with additive (Bahdanau) attention: model, fused step kernels, decoding, training.

    python -m jitnet train seq2seq-dates   [--epochs N --hidden 64 --batch-size 64 --cell lstm|gru ...]
    python -m jitnet train seq2seq-reverse [...]

The model (:class:`Seq2Seq`): character embeddings, a multi-layer LSTM or GRU encoder (optionally reading the
source reversed), and a decoder whose cell reads ``[embedding of the previous token; attention context]`` at
every step. The attention query is the decoder's previous top-layer state, its keys and values the encoder
outputs (padding masked out); the output layer sees ``[decoder state; context]``. Training uses teacher
forcing, a padding-masked cross entropy (or a sampled softmax for large vocabularies), gradient clipping by
global norm and Adam, all in one ``jitnet.jit`` step. The encoder and the attention decoder run on
``jn.scan``, so a step compiles once per (bucketed) source length whatever that length is.

Fused primitives make the recurrent steps cheap, each one Numba kernel forward and one backward (their
gradients are checked by central differences in the tests):

* ``lstm_step_fused(xw, s, W_hh, mask)``: one LSTM step over a packed state ``[h, c, i, f, g, o]`` (the
  recurrent GEMM is BLAS; the gates use a vectorizable exp/tanh);
* ``additive_attention_step(q, pk, v, mask, values)``: Bahdanau scores ``v . tanh(pk + q)``, the masked
  softmax over the source and the context vector, for one decoder step (two kernels: the tanh, kept for the
  backward pass, and the scores/softmax/context).

Both also come with *native emitters*, so that jitnet's native segments compile each scan body, and the loop
around it, into one generated function.

Decoding: :meth:`Seq2Seq.greedy_decode` is one jitted scan over the output length; :func:`beam_search` runs
on NumPy around a jitted single decoder step; :func:`exhaustive_search` (tiny vocabularies only) checks it.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
from numba import njit

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet import ops
from jitnet.autodiff.core import Primitive, apply, no_cuda
from jitnet.compiler.native import use_kernel
from jitnet.data import seq_tasks as T
from jitnet.kernelgen import dtype_name
from jitnet.kernels_cpu import nn_lstm_step, nn_lstm_step_dprev, nn_lstm_step_dz
from jitnet.kernels_scalar import tanh_v
from jitnet.tensor import Tensor, _infer_array
from ._train import (ArgumentParser, NonFiniteGuard, Progress, add_nonfinite_args, restore_checkpoint,
                     save_checkpoint)

__all__ = ["lstm_step_fused", "lstm_state", "additive_attention_step", "additive_attention_weights",
           "additive_attention_tanh", "additive_attention_context", "Seq2Seq", "Seq2SeqTrainer", "beam_search",
           "exhaustive_search", "sequence_log_prob", "plot_attention", "ascii_attention", "show_samples", "build",
           "fit", "run_dates", "run_reverse", "dates_parser", "reverse_parser", "train_seq2seq_dates",
           "train_seq2seq_reverse", "TRAINERS"]

_FM = {"reassoc", "nsz", "arcp", "contract"}     # fast math without nnan/ninf: NaN and inf stay exact


# ==============================================================================================================
# LSTM step over a packed state s = [h, c, i, f, g, o] (B, 6H): the gates are kept for the backward pass
# ==============================================================================================================

@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def lstm_fwd_kernel(xw, s_prev, whh, mask, s_out, use_mask):
    """One LSTM step: z = xw + h @ whh (BLAS), gates [i, f, g, o]; rows with mask 0 keep h and c.

    jitnet.nn's step kernel with a zero bias (the decoder folds its bias into xw).
    """
    nn_lstm_step(xw, s_prev, whh, np.zeros(4 * whh.shape[0], xw.dtype), mask, s_out, use_mask)


# the backward kernels are jitnet.nn's too (the same packed state)
lstm_dz_kernel = nn_lstm_step_dz
lstm_dprev_kernel = nn_lstm_step_dprev


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


S2S_LSTM_DZ = Primitive("s2s_lstm_step_dz", impl={"cpu": _lstm_dz_impl}, vjp=_no_vjp("s2s_lstm_step_dz"))
S2S_LSTM_DPREV = Primitive("s2s_lstm_step_dprev", impl={"cpu": _lstm_dprev_impl},
                           vjp=_no_vjp("s2s_lstm_step_dprev"))
S2S_LSTM_DW = Primitive("s2s_lstm_step_dw", impl={"cpu": _lstm_dw_impl}, vjp=_no_vjp("s2s_lstm_step_dw"))


def _lstm_vjp(g, ans, ins, needs):
    xw, s_prev, whh = ins[:3]
    mask = ins[3:]
    dz = apply(S2S_LSTM_DZ, g, ans, s_prev, *mask)
    d_s = apply(S2S_LSTM_DPREV, g, dz, ans, whh, *mask) if needs[1] else None
    d_w = apply(S2S_LSTM_DW, s_prev, dz) if needs[2] else None
    return (dz if needs[0] else None, d_s, d_w) + (None,) * len(mask)


S2S_LSTM = Primitive("s2s_lstm_step", impl={"cpu": _lstm_fwd_impl}, vjp=_lstm_vjp)


def _t(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


def lstm_state(h, c):
    """Return the packed LSTM state [h, c, 0, 0, 0, 0] (B, 6H) that :func:`lstm_step_fused` consumes."""
    h, c = _t(h), _t(c)
    return ops.concatenate([h, c, ops.zeros((h.shape[0], 4 * h.shape[1]), h.dtype)], axis=1)


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


# ==============================================================================================================
# One step of additive attention, as two primitives:
#   th  = tanh(pk + q)                          (B, S, U)  additive_attention_tanh
#   ctx = softmax_masked(th . v) @ values       (B, D)     additive_attention_context
# Keeping th in the graph means a backward pass recomputing the forward (jn.scan's) takes one tanh pass
# instead of two, and the context's gradient needs no tanh at all.
# ==============================================================================================================

@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def attention_tanh_kernel(q, pk, mask, th):
    """th[b, s] = tanh(pk[b, s] + q[b]) at valid positions (mask nonzero), 0 elsewhere."""
    bsz, nsrc, nu = pk.shape[0], pk.shape[1], pk.shape[2]
    for b in range(bsz):
        qb = q[b]
        for s in range(nsrc):
            tr = th[b, s]
            if mask[b, s]:
                pks = pk[b, s]
                for u in range(nu):
                    tr[u] = tanh_v(pks[u] + qb[u])
            else:
                for u in range(nu):
                    tr[u] = 0


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def attention_tanh_bwd_kernel(g, th, dpk, dq):
    """dpk = g * (1 - th^2) (B, S, U) and dq = dpk summed over the source axis (B, U)."""
    bsz, nsrc, nu = th.shape[0], th.shape[1], th.shape[2]
    for b in range(bsz):
        dqb = dq[b]
        for u in range(nu):
            dqb[u] = 0
        for s in range(nsrc):
            gs, ts, ds = g[b, s], th[b, s], dpk[b, s]
            for u in range(nu):
                ds[u] = gs[u] * (1 - ts[u] * ts[u])
            for u in range(nu):
                dqb[u] += ds[u]


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def _softmax_row(th, v, mask, b, w):
    """Fill w (S,) with the masked softmax of the scores th[b, s] . v; all zeros when no position is valid."""
    nsrc, nu = th.shape[1], th.shape[2]
    zero = w.dtype.type(0)
    m = -np.inf
    for s in range(nsrc):
        if mask[b, s]:
            ts = th[b, s]
            acc = zero
            for u in range(nu):
                acc += v[u] * ts[u]
            w[s] = acc
            m = max(m, acc)
    tot = zero
    for s in range(nsrc):
        e = math.exp(w[s] - m) if mask[b, s] else zero
        w[s] = e
        tot += e
    inv = 1 / tot if tot > 0 else zero
    for s in range(nsrc):
        w[s] *= inv


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def attention_context_kernel(th, v, mask, vals, ctx, weights, want_weights):
    """Write the context (B, D) (and the weights (B, S) when want_weights) from th (B, S, U)."""
    bsz, nsrc = th.shape[0], th.shape[1]
    dv = vals.shape[2]
    w = np.empty(nsrc, ctx.dtype)
    for b in range(bsz):
        _softmax_row(th, v, mask, b, w)
        cb = ctx[b]
        for d in range(dv):
            cb[d] = 0
        for s in range(nsrc):
            ws = w[s]
            if want_weights:
                weights[b, s] = ws
            if ws != 0:
                vs = vals[b, s]
                for d in range(dv):
                    cb[d] += ws * vs[d]


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def attention_context_bwd_kernel(gc, th, v, mask, vals, dth, dv_out, dvals):
    """Write the gradients of the context w.r.t. th (B, S, U), v (U,) and values (B, S, D)."""
    bsz, nsrc, nu = th.shape[0], th.shape[1], th.shape[2]
    dv = vals.shape[2]
    zero = th.dtype.type(0)
    w = np.empty(nsrc, th.dtype)
    dw = np.empty(nsrc, th.dtype)
    for u in range(nu):
        dv_out[u] = 0
    for b in range(bsz):
        _softmax_row(th, v, mask, b, w)
        gb = gc[b]
        wdw = zero
        for s in range(nsrc):
            vs, dvs = vals[b, s], dvals[b, s]
            ws = w[s]
            for d in range(dv):
                dvs[d] = ws * gb[d]
            acc = zero
            for d in range(dv):
                acc += gb[d] * vs[d]
            dw[s] = acc
            wdw += ws * acc
        for s in range(nsrc):
            dsc = w[s] * (dw[s] - wdw)           # softmax backward; 0 at masked positions (weight 0)
            ds, ts = dth[b, s], th[b, s]
            for u in range(nu):
                ds[u] = dsc * v[u]
            for u in range(nu):
                dv_out[u] += dsc * ts[u]


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


#: a view of part of a packed backward result (several gradients computed by one kernel)
S2S_UNPACK = Primitive("s2s_unpack", impl={"cpu": _unpack_impl}, kind="view", vjp=_no_vjp("s2s_unpack"))
ATTN_TANH_GRAD = Primitive("additive_attention_tanh_grad", impl={"cpu": _tanh_grad_impl},
                           vjp=_no_vjp("additive_attention_tanh_grad"))
ATTN_CTX_GRAD = Primitive("additive_attention_context_grad", impl={"cpu": _ctx_grad_impl},
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


ATTN_TANH = Primitive("additive_attention_tanh", impl={"cpu": _tanh_impl}, vjp=_tanh_vjp)
ATTN_CTX = Primitive("additive_attention_context", impl={"cpu": _ctx_impl}, vjp=_ctx_vjp)
ATTN_WEIGHTS = Primitive("additive_attention_weights", impl={"cpu": _weights_impl}, nondiff=True)
no_cuda("the seq2seq decoder's fused LSTM and attention kernels have no CUDA form yet",
        S2S_LSTM_DZ, S2S_LSTM_DPREV, S2S_LSTM_DW, S2S_LSTM, S2S_UNPACK, ATTN_TANH_GRAD, ATTN_CTX_GRAD, ATTN_TANH,
        ATTN_CTX, ATTN_WEIGHTS)


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
        return "np.ones(1, np.uint8)", "False"
    if n.inputs[i].dtype != np.uint8:
        return None
    return f"np.ascontiguousarray({a[i]})", "True"


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
                    f"{k}({_contig(a)}, np.empty({ctx}, {dt}), {o}, True)"]
        return [f"{o} = np.empty({ctx}, {dt})", f"{k}({_contig(a)}, {o}, np.empty((1, 1), {dt}), False)"]
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


# ==============================================================================================================
# The model
# ==============================================================================================================

def _gru_step(xw, h, W_hh, b_hh, mask=None):
    """Return the next GRU state from xw = x @ W_ih + b_ih (B, 3H) (PyTorch's equations, gates [r, z, n])."""
    hd = W_hh.shape[0]
    gh = ops.matmul(h, W_hh) + b_hh
    rz = ops.sigmoid(xw[:, :2 * hd] + gh[:, :2 * hd])
    r, z = rz[:, :hd], rz[:, hd:]
    n = ops.tanh(xw[:, 2 * hd:] + r * gh[:, 2 * hd:])
    h2 = n + z * (h - n)
    if mask is not None:
        h2 = ops.where(ops.reshape(mask, (-1, 1)) > 0, h2, h)
    return h2


def _mm(x, W):
    """Return x @ W for x (..., K) as one 2-D GEMM (its weight gradient is then one GEMM too, not one per row)."""
    if x.ndim == 2:
        return ops.matmul(x, W)
    lead = x.shape[:-1]
    y = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), W)
    return ops.reshape(y, lead + (W.shape[-1],))


class Seq2Seq(nn.Module):
    """Encoder-decoder with additive attention over character (or word) ids.

    * encoder: embedding (src_vocab, embed) and ``layers`` LSTM or GRU layers of ``hidden`` units, run with
      ``jn.scan`` under a padding mask (a padded step keeps the state), optionally over the reversed source
      (``reverse_source``: each sequence's valid part is reversed by :meth:`source_arrays`);
    * decoder: embedding (tgt_vocab, embed) and ``layers`` cells whose first layer reads [embedding of the
      previous token; context]; the context comes from :class:`jitnet.nn.BahdanauAttention` (``attention_units``,
      default ``hidden``) queried with the previous top-layer state; the initial decoder state is the
      encoder's final state; logits = [top state; context] @ W_out + b.

    Tensors are batch-first at the interface: ``src`` (B, S) int ids, ``src_mask`` (B, S) nonzero at valid
    positions, ``tgt_in`` / ``tgt_out`` (B, T) (see :func:`jitnet.data.seq_tasks.make_batch`).
    """

    def __init__(self, src_vocab, tgt_vocab, embed=32, hidden=128, layers=1, cell="lstm", attention_units=None,
                 reverse_source=False, dtype=jn.float32):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"Seq2Seq: cell must be 'lstm' or 'gru', got {cell!r}")
        if layers < 1:
            raise ValueError(f"Seq2Seq: layers must be >= 1, got {layers}")
        self.src_vocab, self.tgt_vocab = int(src_vocab), int(tgt_vocab)
        self.embed_dim, self.hidden, self.layers, self.cell = int(embed), int(hidden), int(layers), cell
        self.units = int(attention_units or hidden)
        self.reverse_source = bool(reverse_source)
        self.src_embed = nn.Embedding(self.src_vocab, self.embed_dim, dtype=dtype)
        self.tgt_embed = nn.Embedding(self.tgt_vocab, self.embed_dim, dtype=dtype)
        Cell = nn.LSTMCell if cell == "lstm" else nn.GRUCell
        for i in range(self.layers):
            self.add_module(f"encoder_{i}", Cell(self.embed_dim if i == 0 else self.hidden, self.hidden, dtype=dtype))
        for i in range(self.layers):
            d_in = self.embed_dim + self.hidden if i == 0 else self.hidden
            self.add_module(f"decoder_{i}", Cell(d_in, self.hidden, dtype=dtype))
        self.attention = nn.BahdanauAttention(self.hidden, self.hidden, self.units, dtype=dtype)
        self.out = nn.Linear(2 * self.hidden, self.tgt_vocab, dtype=dtype)

    def extra_repr(self):
        return (f"src_vocab={self.src_vocab}, tgt_vocab={self.tgt_vocab}, embed={self.embed_dim}, "
                f"hidden={self.hidden}, layers={self.layers}, cell={self.cell!r}, units={self.units}, "
                f"reverse_source={self.reverse_source}")

    # -- inputs ------------------------------------------------------------------------------------------------
    def source_arrays(self, src, lengths):
        """Return (src ids, uint8 mask) NumPy arrays for padded ``src`` (B, S) with ``lengths`` (reversed if set)."""
        src = np.array(src, dtype=np.int64, copy=True)
        lengths = np.asarray(lengths, np.int64)
        if self.reverse_source:
            for i, n in enumerate(lengths):
                src[i, :n] = src[i, :n][::-1]
        mask = (np.arange(src.shape[1])[None, :] < lengths[:, None]).astype(np.uint8)
        return src, mask

    # -- pieces ------------------------------------------------------------------------------------------------
    def _cells(self, side):
        return [getattr(self, f"{side}_{i}") for i in range(self.layers)]

    def _h(self, state):
        return state[:, :self.hidden] if self.cell == "lstm" else state

    def _zero_state(self, bsz, dtype):
        width = 6 * self.hidden if self.cell == "lstm" else self.hidden
        return ops.zeros((bsz, width), dtype)

    def encode(self, src, src_mask):
        """Return (outputs (S, B, H) time-major, final state per layer) of the encoder over src (B, S)."""
        src, m = _t(src), _t(src_mask)
        if src.ndim != 2 or m.shape != src.shape:
            raise ValueError(f"Seq2Seq.encode: src (B, S) and src_mask (B, S) expected, got {src.shape} and "
                             f"{m.shape}")
        if m.dtype != np.uint8:
            m = ops.astype(m != 0, np.uint8)
        x = ops.take(self.src_embed.W, ops.transpose(src), axis=0)           # (S, B, E)
        mt = ops.copy(ops.transpose(m))                         # (S, B), contiguous: scan slices rows of it
        finals = []
        for cell in self._cells("encoder"):
            s0 = self._zero_state(src.shape[0], x.dtype)
            if self.cell == "lstm":
                xw = _mm(x, cell.W_ih)                                    # every step's input projection: one GEMM

                def body(s, inp, cell=cell):
                    xw_t, m_t = inp
                    # the bias is added per step: the body is then 3 ops, a native segment and loop when the
                    # compiler builds those (runs of fewer steps stay Python calls)
                    s2 = lstm_step_fused(xw_t + cell.b, s, cell.W_hh, m_t)
                    return s2, s2[:, :self.hidden]
            else:
                xw = _mm(x, cell.W_ih) + cell.b_ih

                def body(h, inp, cell=cell):
                    xw_t, m_t = inp
                    h2 = _gru_step(xw_t, h, cell.W_hh, cell.b_hh, m_t)
                    return h2, h2
            s, x = jn.scan(body, s0, (xw, mt))
            finals.append(s)
        return x, finals

    def _attention_inputs(self, enc):
        """Return (values (B, S, H) contiguous, projected keys (B, S, U), score vector v (U,))."""
        att = self.attention
        vals = ops.copy(ops.transpose(enc, (1, 0, 2)))
        pk = _mm(vals, att.key_proj.W) + att.key_proj.b
        return vals, pk, ops.reshape(att.v.W, (-1,))

    def _dec_weights(self):
        c0 = self.decoder_0
        e = self.embed_dim
        b0 = c0.b if self.cell == "lstm" else c0.b_ih
        return c0.W_ih[:e], c0.W_ih[e:], b0

    def _dec_step(self, states, xe_t, att_in, mask, w_c, want_weights=False):
        """One decoder step from the projected input embedding xe_t; return (new states, h_top, ctx[, w])."""
        vals, pk, v = att_in
        if mask.dtype != np.uint8:
            mask = ops.astype(mask != 0, np.uint8)
        q = ops.matmul(self._h(states[-1]), self.attention.query_proj.W)
        th = additive_attention_tanh(q, pk, mask)
        ctx = additive_attention_context(th, v, mask, vals)
        x = xe_t + ops.matmul(ctx, w_c)
        new = []
        for i, cell in enumerate(self._cells("decoder")):
            if i > 0:
                x = ops.matmul(self._h(new[-1]), cell.W_ih) + (cell.b if self.cell == "lstm" else cell.b_ih)
            if self.cell == "lstm":
                new.append(lstm_step_fused(x, states[i], cell.W_hh))
            else:
                new.append(_gru_step(x, states[i], cell.W_hh, cell.b_hh))
        out = (tuple(new), self._h(new[-1]), ctx)
        if want_weights:
            out += (apply(ATTN_WEIGHTS, th, v, mask, vals),)
        return out

    def _logits(self, h, ctx):
        hd = self.hidden
        return _mm(h, self.out.W[:hd]) + _mm(ctx, self.out.W[hd:]) + self.out.b

    def decode_teacher_forced(self, enc, finals, src_mask, tgt_in):
        """Return (top states (T, B, H), contexts (T, B, H)) of the decoder fed the gold previous tokens."""
        m = _t(src_mask)
        if m.dtype != np.uint8:
            m = ops.astype(m != 0, np.uint8)
        att_in = self._attention_inputs(enc)
        w_e, w_c, b0 = self._dec_weights()
        emb = ops.take(self.tgt_embed.W, ops.transpose(_t(tgt_in)), axis=0)     # (T, B, E)
        xe = _mm(emb, w_e) + b0                                                # (T, B, G): one GEMM

        def body(states, xe_t):
            new, h, ctx = self._dec_step(states, xe_t, att_in, m, w_c)
            return new, (h, ctx)
        _, (hs, ctxs) = jn.scan(body, tuple(finals), xe)
        return hs, ctxs

    def forward(self, src, src_mask, tgt_in):
        """Return the teacher-forced logits (B, T, tgt_vocab)."""
        enc, finals = self.encode(src, src_mask)
        hs, ctxs = self.decode_teacher_forced(enc, finals, src_mask, tgt_in)
        return ops.transpose(self._logits(hs, ctxs), (1, 0, 2))

    def loss(self, src, src_mask, tgt_in, tgt_out, sampled=None, num_sampled=0):
        """Return the mean cross entropy over the non-PAD target positions (teacher forcing).

        With ``num_sampled`` > 0 the loss is TensorFlow's sampled softmax over ``num_sampled`` candidates;
        ``sampled`` = (ids, true expected counts, sampled expected counts) from
        ``F.log_uniform_candidate_sampler`` (drawn outside a compiled step).
        """
        enc, finals = self.encode(src, src_mask)
        hs, ctxs = self.decode_teacher_forced(enc, finals, src_mask, tgt_in)
        labels = ops.transpose(_t(tgt_out))                                   # (T, B)
        n_rows = labels.shape[0] * labels.shape[1]
        lab = ops.reshape(labels, (-1,))
        mask = ops.astype(lab != T.PAD, hs.dtype)
        if num_sampled:
            x = ops.reshape(ops.concatenate([hs, ctxs], axis=-1), (n_rows, 2 * self.hidden))
            per = F.sampled_softmax_loss(ops.transpose(self.out.W), self.out.b, ops.reshape(lab, (-1, 1)), x,
                                         num_sampled, self.tgt_vocab, sampled_values=sampled)
        else:
            logits = ops.reshape(self._logits(hs, ctxs), (n_rows, self.tgt_vocab))
            per = F.cross_entropy(logits, lab, reduction="none")
        return ops.sum(per * mask) / ops.maximum(ops.sum(mask), 1.0)

    # -- inference -------------------------------------------------------------------------------------------
    def encode_for_decoding(self, src, src_mask):
        """Return (final states, attention inputs (values, keys, v)) for decoding."""
        enc, finals = self.encode(src, src_mask)
        return tuple(finals), self._attention_inputs(enc)

    def decode_step(self, states, tokens, att_in, src_mask):
        """Return (new states, log-probabilities (B, V), attention weights (B, S)) after feeding ``tokens`` (B,)."""
        w_e, w_c, b0 = self._dec_weights()
        xe = ops.matmul(ops.take(self.tgt_embed.W, _t(tokens), axis=0), w_e) + b0
        new, h, ctx, w = self._dec_step(states, xe, att_in, _t(src_mask), w_c, want_weights=True)
        return new, ops.log_softmax(self._logits(h, ctx), -1), w

    def greedy(self, src, src_mask, max_len):
        """Return (tokens (B, max_len) int64, attention weights (B, max_len, S)) by greedy decoding (a scan).

        Each step feeds back the most likely token (PAD and SOS are never chosen); the tokens after the first
        EOS are whatever the decoder goes on to produce (:meth:`CharVocab.decode` stops at EOS).
        """
        m = _t(src_mask)
        if m.dtype != np.uint8:
            m = ops.astype(m != 0, np.uint8)
        with jn.no_grad():
            states, att_in = self.encode_for_decoding(src, m)
            w_e, w_c, b0 = self._dec_weights()
            bsz = states[0].shape[0]
            tok0 = ops.full((bsz,), T.SOS, np.int64)
            never = np.zeros(self.tgt_vocab, np.float32)
            never[[T.PAD, T.SOS]] = -np.inf                                   # never emitted
            never = Tensor._wrap(never.astype(states[0].dtype))

            def body(carry, _):
                states, tok = carry
                xe = ops.matmul(ops.take(self.tgt_embed.W, tok, axis=0), w_e) + b0
                new, h, ctx, w = self._dec_step(states, xe, att_in, m, w_c, want_weights=True)
                nxt = ops.argmax(self._logits(h, ctx) + never, axis=-1)
                return (new, nxt), (nxt, w)
            _, (toks, ws) = jn.scan(body, (states, tok0), length=int(max_len))
        return ops.transpose(toks), ops.transpose(ws, (1, 0, 2))


# ==============================================================================================================
# Training and evaluation
# ==============================================================================================================

class Seq2SeqTrainer:
    """Adam on a :class:`Seq2Seq` with one jitted step, plus decoding and exact-match evaluation.

    The step (``jitnet.jit``, compiled once per source bucket length) is: forward with teacher forcing, the
    padding-masked loss, backward, ``clip_by_global_norm`` of all gradients to ``clip_norm`` and the Adam
    update. With ``num_sampled`` > 0 the loss is a sampled softmax whose candidates are drawn per step outside
    the compiled function. ``net`` and ``opt`` are what checkpoints save.
    """

    def __init__(self, net, src_vocab, tgt_vocab, lr=1e-3, clip_norm=5.0, num_sampled=0, max_len=None,
                 eval_batch=256, jit=True):
        self.net = net
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.opt = jn.optim.Adam(net.parameters(), lr=lr)
        self.clip_norm, self.num_sampled = float(clip_norm), int(num_sampled)
        if self.num_sampled >= net.tgt_vocab:
            raise ValueError(f"Seq2SeqTrainer: num_sampled={self.num_sampled} must be less than the target "
                             f"vocabulary ({net.tgt_vocab})")
        self.max_len = max_len
        self.eval_batch = int(eval_batch)
        self.jit = jit
        self._step = jn.jit(self._train_step) if jit else self._train_step
        self._greedy = jn.jit(self._greedy_fn) if jit else self._greedy_fn
        self._encode = jn.jit(self._encode_fn) if jit else self._encode_fn
        self._dstep = jn.jit(self._decode_step_fn) if jit else self._decode_step_fn

    # -- the compiled functions ----------------------------------------------------------------------------------
    def _train_step(self, src, src_mask, tgt_in, tgt_out, *sampled):
        self.opt.zero_grad()
        loss = self.net.loss(src, src_mask, tgt_in, tgt_out, tuple(sampled) or None, self.num_sampled)
        loss.backward()
        norm = self.opt.clip_grad_norm(self.clip_norm)
        self.opt.step()
        return loss, norm

    def _greedy_fn(self, src, src_mask, max_len):
        return self.net.greedy(src, src_mask, max_len)

    def _encode_fn(self, src, src_mask):
        with jn.no_grad():
            return self.net.encode_for_decoding(src, src_mask)

    def _decode_step_fn(self, states, tokens, att_in, src_mask):
        with jn.no_grad():
            return self.net.decode_step(states, tokens, att_in, src_mask)

    # -- training ----------------------------------------------------------------------------------------------
    def step_inputs(self, batch):
        """Return the step's tensors (src, src_mask, tgt_in, tgt_out) of a batch dict (see ``make_batch``)."""
        src, mask = self.net.source_arrays(batch["src"], batch["src_len"])
        return [jn.tensor(src), jn.tensor(mask), jn.tensor(np.ascontiguousarray(batch["tgt_in"])),
                jn.tensor(np.ascontiguousarray(batch["tgt_out"]))]

    def train_step(self, batch):
        """Run one optimization step on a batch dict; return (loss, global gradient norm before clipping)."""
        self.net.train()
        args = self.step_inputs(batch)
        if self.num_sampled:
            labels = np.asarray(batch["tgt_out"], np.int64).T.reshape(-1, 1)
            args += list(F.log_uniform_candidate_sampler(jn.tensor(labels), 1, self.num_sampled, True,
                                                         self.net.tgt_vocab))
        return self._step(*args)

    # -- decoding ------------------------------------------------------------------------------------------------
    def _source_batch(self, sources, length=None):
        ids = [s if isinstance(s, np.ndarray) else self.src_vocab.encode(s) for s in sources]
        padded, lens = T.pad_batch(ids, length)
        return self.net.source_arrays(padded, lens)

    def greedy_decode(self, sources, max_len=None, return_weights=False, src_len=None):
        """Return the greedy decodings (strings) of ``sources`` (strings or id arrays), batched and jitted.

        Batches are padded to ``eval_batch`` rows and to ``src_len`` (default: the longest source) so that
        one compiled decoder serves every batch. With ``return_weights`` also return the attention weights
        (T, S) of each example (over the padded, possibly reversed, source).
        """
        max_len = int(max_len or self.max_len or 32)
        n = len(sources)
        if n == 0:
            return ([], []) if return_weights else []
        ids = [s if isinstance(s, np.ndarray) else self.src_vocab.encode(s) for s in sources]
        length = int(src_len or max(len(i) for i in ids))
        self.net.eval()
        out, weights = [], []
        bs = min(self.eval_batch, n) if not self.jit else self.eval_batch
        for i in range(0, n, bs):
            chunk = ids[i:i + bs]
            k = len(chunk)
            if k < bs:
                chunk = chunk + [chunk[0]] * (bs - k)               # fixed shape: one compiled decoder
            src, mask = self._source_batch(chunk, length)
            toks, ws = self._greedy(jn.tensor(src), jn.tensor(mask), max_len)
            toks = toks.numpy()
            for j in range(k):
                out.append(self.tgt_vocab.decode(toks[j]))
            if return_weights:
                wn = ws.numpy()
                weights.extend(wn[j].copy() for j in range(k))
        self.net.train()
        return (out, weights) if return_weights else out

    def beam_decode(self, sources, beam_size=4, max_len=None, length_penalty=0.0):
        """Return the beam-search decodings (strings) of ``sources`` (see :func:`beam_search`)."""
        max_len = int(max_len or self.max_len or 32)
        src, mask = self._source_batch(sources)
        res = beam_search(self, src, mask, beam_size, max_len, length_penalty)
        return [self.tgt_vocab.decode(toks) for toks, _ in res]

    def evaluate(self, data, limit=None, max_len=None):
        """Return {"exact_match", "char_accuracy", "n"} of greedy decoding on a Seq2SeqData split."""
        srcs, tgts = data.sources, data.targets
        if limit is not None:
            srcs, tgts = srcs[:limit], tgts[:limit]
        pred = self.greedy_decode(srcs, max_len)
        exact = sum(p == t for p, t in zip(pred, tgts))
        chars = sum(sum(a == b for a, b in zip(p, t)) for p, t in zip(pred, tgts))
        total = sum(max(len(p), len(t)) for p, t in zip(pred, tgts))
        n = max(len(tgts), 1)
        return {"exact_match": exact / n, "char_accuracy": chars / max(total, 1), "n": len(tgts)}


def _rows(x, idx):
    """Return tensor x with its rows taken at NumPy indices ``idx`` (a new tensor)."""
    return jn.tensor(np.ascontiguousarray(x.numpy()[idx]))


def beam_search(trainer, src, src_mask, beam_size=4, max_len=20, length_penalty=0.0):
    """Return [(tokens, score)] per source row: the best hypothesis of a beam search of width ``beam_size``.

    ``src`` / ``src_mask`` are NumPy arrays (B, S) as :meth:`Seq2Seq.source_arrays` returns them. A hypothesis
    is finished when it emits EOS (included in its tokens) or reaches ``max_len`` tokens; PAD and SOS are never
    emitted. Its score is the sum of the token log-probabilities; hypotheses are ranked by
    ``score / len ** length_penalty`` (0: the plain sum). The NumPy side keeps the beams; the encoder and one
    decoder step over all B * beam_size rows are jitted functions of ``trainer`` (a :class:`Seq2SeqTrainer`).
    With length_penalty 0 a row stops as soon as its best finished score beats every live beam (scores only
    fall), so with a beam at least as wide as the number of hypotheses the result is the exact optimum.
    """
    k = int(beam_size)
    if k < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {beam_size}")
    src = np.asarray(src, np.int64)
    mask = np.asarray(src_mask, np.uint8)
    bsz = src.shape[0]
    rep = np.repeat(np.arange(bsz), k)
    states, att_in = trainer._encode(jn.tensor(src), jn.tensor(mask))
    states = tuple(_rows(s, rep) for s in states)
    att_in = tuple(_rows(a, rep) if a.ndim == 3 else a for a in att_in)
    mask_r = jn.tensor(np.ascontiguousarray(mask[rep]))
    scores = np.full((bsz, k), -np.inf)
    scores[:, 0] = 0.0
    hist = np.zeros((bsz, k, 0), np.int64)
    tokens = np.full(bsz * k, T.SOS, np.int64)
    finished = [[] for _ in range(bsz)]
    done = np.zeros(bsz, bool)

    def rank(score, n):
        return score / (n ** length_penalty) if length_penalty else score

    for t in range(max_len):
        states, logp, _ = trainer._dstep(states, jn.tensor(tokens), att_in, mask_r)
        lp = logp.numpy().astype(np.float64).reshape(bsz, k, -1)
        lp[:, :, T.PAD] = -np.inf
        lp[:, :, T.SOS] = -np.inf
        vsz = lp.shape[2]
        cand = scores[:, :, None] + lp
        last = t == max_len - 1
        new_scores = np.full((bsz, k), -np.inf)
        parents = np.zeros((bsz, k), np.int64)
        new_tok = np.full((bsz, k), T.EOS, np.int64)
        for b in range(bsz):
            if done[b]:
                continue
            flat = cand[b].reshape(-1)
            order = np.argsort(-flat, kind="stable")
            j = nfin = 0
            for idx in order:
                sc = flat[idx]
                if not np.isfinite(sc) or j == k or (last and nfin == k):
                    break
                p, tok = divmod(int(idx), vsz)
                if tok == T.EOS or last:
                    seq = list(hist[b, p]) + [tok]
                    finished[b].append((rank(sc, len(seq)), sc, seq))
                    nfin += 1
                else:
                    new_scores[b, j], parents[b, j], new_tok[b, j] = sc, p, tok
                    j += 1
            alive = new_scores[b][np.isfinite(new_scores[b])]
            if last or alive.size == 0:
                done[b] = True
            elif finished[b] and not length_penalty and max(f[1] for f in finished[b]) >= alive.max():
                done[b] = True
            if done[b]:
                new_scores[b] = -np.inf
        if done.all():
            break
        hist = np.concatenate([np.take_along_axis(hist, parents[:, :, None], 1), new_tok[:, :, None]], axis=2)
        scores = new_scores
        rows = (np.arange(bsz)[:, None] * k + parents).reshape(-1)
        states = tuple(_rows(s, rows) for s in states)
        tokens = new_tok.reshape(-1)
    out = []
    for b in range(bsz):
        if not finished[b]:
            out.append(([], -np.inf))
            continue
        best = max(finished[b], key=lambda f: f[0])
        out.append(([int(x) for x in best[2]], float(best[1])))
    return out


def sequence_log_prob(net, src, src_mask, sequences):
    """Return the log-probability (float64) the model gives each token sequence (ending in EOS or not).

    ``src`` / ``src_mask`` are NumPy (1, S) or (N, S) arrays (one row is repeated for every sequence).
    """
    seqs = [np.asarray(s, np.int64) for s in sequences]
    n = len(seqs)
    src = np.asarray(src, np.int64)
    mask = np.asarray(src_mask, np.uint8)
    if src.shape[0] == 1 and n > 1:
        src, mask = np.repeat(src, n, 0), np.repeat(mask, n, 0)
    length = max(len(s) for s in seqs)
    b = T.make_batch([np.zeros(1)] * n, seqs, 1, length)
    with jn.no_grad():
        logits = net(jn.tensor(src), jn.tensor(mask), jn.tensor(b["tgt_in"]))
        lp = ops.log_softmax(logits.astype(np.float64), -1).numpy()
    out = np.zeros(n)
    for i, s in enumerate(seqs):
        out[i] = sum(lp[i, t, tok] for t, tok in enumerate(s))
    return out


def exhaustive_search(net, src, src_mask, max_len, tokens=None):
    """Return (best tokens, score) over every output sequence of at most ``max_len`` tokens (tiny vocabularies).

    A sequence is some non-EOS tokens then EOS, or ``max_len`` non-EOS tokens (the hypotheses of
    :func:`beam_search`). ``tokens`` are the non-special ids to enumerate (default: every id after EOS).
    ``src`` / ``src_mask`` hold one source row (1, S).
    """
    import itertools
    toks = list(range(T.EOS + 1, net.tgt_vocab)) if tokens is None else list(tokens)
    seqs = []
    for n in range(max_len + 1):
        for body in itertools.product(toks, repeat=n):
            if n < max_len:
                seqs.append(list(body) + [T.EOS])
            else:
                seqs.append(list(body))
    if len(seqs) > 200000:
        raise ValueError(f"exhaustive_search: {len(seqs)} sequences is too many; use a smaller vocabulary or "
                         f"max_len")
    scores = sequence_log_prob(net, src, src_mask, seqs)
    i = int(np.argmax(scores))
    return seqs[i], float(scores[i])


def plot_attention(weights, src_tokens, out_tokens, path, title=None):
    """Save a heat map of attention ``weights`` (T, S) with source tokens on x and outputs on y; return path.

    Returns None (after printing why) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("seq2seq: matplotlib is not installed, skipping the attention plot (pip install matplotlib)",
              flush=True)
        return None
    w = np.asarray(weights)[:len(out_tokens), :len(src_tokens)]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(src_tokens) + 2), max(3, 0.35 * len(out_tokens) + 1.5)))
    im = ax.imshow(w, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(w.max()), 1e-6))
    ax.set_xticks(range(len(src_tokens)))
    ax.set_xticklabels([repr(c)[1:-1] if c != " " else "␣" for c in src_tokens], fontsize=8)
    ax.set_yticks(range(len(out_tokens)))
    ax.set_yticklabels(out_tokens, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ascii_attention(weights, src_tokens, out_tokens):
    """Return the attention weights (T, S) as a text heat map (one character per cell, darker = larger)."""
    shades = " .:-=+*#%@"
    w = np.asarray(weights)[:len(out_tokens), :len(src_tokens)]
    lines = ["     " + "".join(c if c != " " else "_" for c in src_tokens)]
    for t, o in enumerate(out_tokens):
        row = "".join(shades[min(int(x * (len(shades) - 1) + 0.5), len(shades) - 1)] for x in w[t])
        lines.append(f"{o:>4} {row}")
    return "\n".join(lines)


# ==============================================================================================================
# Training commands
# ==============================================================================================================

def _parser(name, description, *, epochs, batch_size, lr, hidden, embed, target):
    p = ArgumentParser(prog=f"python -m jitnet train {name}", description=description)
    add_nonfinite_args(p)
    p.add_argument("--train-size", type=int, default=None, help="training examples (default: the task's)")
    p.add_argument("--test-size", type=int, default=None, help="held-out test examples (default: the task's)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"maximum epochs (default {epochs})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr})")
    p.add_argument("--clip-norm", type=float, default=5.0, help="clip gradients to this global norm (default 5)")
    p.add_argument("--embed", type=int, default=embed, help=f"embedding size (default {embed})")
    p.add_argument("--hidden", type=int, default=hidden, help=f"encoder/decoder units (default {hidden})")
    p.add_argument("--layers", type=int, default=1, help="recurrent layers in the encoder and decoder (default 1)")
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm", help="recurrent cell (default lstm)")
    p.add_argument("--attention-units", type=int, default=None, help="attention units (default: --hidden)")
    p.add_argument("--reverse-source", action="store_true", help="read each source sequence reversed")
    p.add_argument("--num-sampled", type=int, default=0,
                   help="sampled softmax with this many candidates (default 0: full softmax)")
    p.add_argument("--buckets", type=int, default=3, help="source length buckets (compiled shapes, default 3)")
    p.add_argument("--target", type=float, default=target,
                   help=f"stop once the held-out exact match reaches this (default {target}; 0: never)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps (default 0: at the end of each epoch)")
    p.add_argument("--eval-batch", type=int, default=256,
                   help="rows per decoding batch (every batch is padded to it: one compiled decoder; default 256)")
    p.add_argument("--beam", type=int, default=4, help="beam width of the decoded samples (default 4; 0: none)")
    p.add_argument("--samples", type=int, default=6, help="decoded test samples to print (default 6)")
    p.add_argument("--seed", type=int, default=0, help="data and initialization seed (default 0)")
    p.add_argument("--logdir", default=None, help=f"TensorBoard events, metrics.csv, checkpoints/ and the "
                                                  f"attention plot (default runs/{name})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --logdir")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--no-plot", action="store_true", help="skip the attention heat map")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--no-jit", action="store_true", help="run the steps eagerly")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    return p


def build(task, args):
    """Return the :class:`Seq2SeqTrainer` (with its :class:`Seq2Seq`) that ``args`` describe for ``task``."""
    net = Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=args.embed, hidden=args.hidden,
                  layers=args.layers, cell=args.cell, attention_units=args.attention_units,
                  reverse_source=args.reverse_source)
    return Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, lr=args.lr, clip_norm=args.clip_norm,
                          num_sampled=args.num_sampled, max_len=task.max_target_len, eval_batch=args.eval_batch,
                          jit=not args.no_jit)


def fit(trainer, task, args, name):
    """Train on ``task`` with evaluation, early stop at ``args.target``, checkpoints and logs; return metrics.

    Returns the last evaluation's metrics plus "step", "epochs", "train_seconds" (the clock stops while
    evaluating) and "reached_target_s" (training seconds when the target was first reached, else None).
    """
    logdir = args.logdir or os.path.join("runs", name)
    os.makedirs(logdir, exist_ok=True)
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    batcher = T.BucketBatcher(src, tgt, args.batch_size, n_buckets=args.buckets, seed=args.seed)
    if len(batcher) == 0:
        raise SystemExit(f"{name}: {len(src)} training examples make no full batch of {args.batch_size}")
    saver = jn.io.Saver(os.path.join(logdir, "checkpoints"), max_to_keep=args.keep)
    start_epoch, step = 0, 0
    if args.resume:
        path = saver.latest_checkpoint()
        if path is None:
            print(f"{name}: no checkpoint in {saver.directory}, starting from scratch", flush=True)
        else:
            start_epoch, step = restore_checkpoint(path, trainer)
            print(f"{name}: resumed from {path} (epoch {start_epoch}, step {step})", flush=True)
    writer = jn.io.SummaryWriter(logdir)
    csv = jn.io.CSVLogger(os.path.join(logdir, "metrics.csv"))
    metrics, train_s, reached, last_eval = {}, 0.0, None, -1
    guard = NonFiniteGuard(trainer, saver, name, getattr(args, "skip_nonfinite", None))
    test_len = max(len(s) for s in task.test.sources)

    def evaluate(epoch):
        nonlocal reached, last_eval
        last_eval = step
        m = trainer.evaluate(task.test)
        row = {"epoch": epoch, "step": step, "train_seconds": round(train_s, 3), **m}
        csv.log(row)
        writer.add_scalar("test/exact_match", m["exact_match"], step)
        writer.add_scalar("test/char_accuracy", m["char_accuracy"], step)
        writer.flush()
        if reached is None and args.target and m["exact_match"] >= args.target:
            reached = train_s
        return m

    try:
        stop = False
        epoch = start_epoch
        for epoch in range(start_epoch, args.epochs):
            bar = Progress(len(batcher), f"{name} epoch {epoch + 1}/{args.epochs}", enabled=not args.no_progress)
            losses = []
            for i, batch in enumerate(batcher.batches(epoch)):
                guard.before()
                t0 = time.perf_counter()
                with np.errstate(over="ignore", invalid="ignore"):       # the guard reports a diverging run
                    loss, norm = trainer.train_step(batch)
                    lv = float(loss.item())
                train_s += time.perf_counter() - t0
                if not guard.after(lv, f"epoch {epoch + 1}, batch {i + 1} (step {step + 1})"):
                    bar.update(None)
                    continue
                step += 1
                losses.append(lv)
                bar.update(lv)
                if step % 20 == 0:
                    writer.add_scalar("train/loss", lv, step)
                    writer.add_scalar("train/grad_norm", float(norm.item()), step)
                if args.eval_every and step % args.eval_every == 0:
                    metrics = evaluate(epoch + 1)
                    if reached is not None:
                        stop = True
                        break
                if args.max_steps and step >= args.max_steps:
                    stop = True
                    break
            bar.close()
            guard.check_state(epoch + 1, step, float(np.mean(losses)) if losses else None)
            if last_eval != step:
                metrics = evaluate(epoch + 1)
            print(f"{name} epoch {epoch + 1}: step {step}, train loss {np.mean(losses or [np.nan]):.4f}, held-out exact match "
                  f"{metrics['exact_match']:.4f} (char accuracy {metrics['char_accuracy']:.4f}), "
                  f"{train_s:.1f} s training", flush=True)
            save_checkpoint(saver, trainer, epoch + 1, step)
            if stop or reached is not None:
                break
    finally:
        writer.close()
        csv.close()
        if guard.report():
            print(guard.report(), file=sys.stderr, flush=True)
    metrics.update(step=step, epochs=epoch + 1, train_seconds=train_s, reached_target_s=reached, logdir=logdir,
                   test_src_len=test_len)
    return metrics


def show_samples(trainer, task, n=6, beam=4, plot_path=None):
    """Print ``n`` held-out sources with their greedy and beam decodings, and an attention map of the first."""
    srcs, tgts = task.test.sources[:n], task.test.targets[:n]
    if not srcs:
        return None
    greedy, weights = trainer.greedy_decode(srcs, return_weights=True)
    beams = trainer.beam_decode(srcs, beam_size=beam) if beam else [None] * len(srcs)
    for s, t, g, b in zip(srcs, tgts, greedy, beams):
        mark = "ok " if g == t else "BAD"
        extra = f"   beam{beam}: {b!r}" if b is not None else ""
        print(f"  [{mark}] {s!r:34} -> {g!r:14} (target {t!r}){extra}", flush=True)
    src_toks = list(srcs[0][::-1] if trainer.net.reverse_source else srcs[0])
    out_toks = list(greedy[0]) + ["</s>"]
    print(ascii_attention(weights[0], src_toks, out_toks), flush=True)
    if plot_path:
        p = plot_attention(weights[0], src_toks, out_toks, plot_path, title=f"{srcs[0]!r} -> {greedy[0]!r}")
        if p:
            print(f"seq2seq: attention heat map written to {p}", flush=True)
        return p
    return None


def _run(name, args, task):
    if args.threads:
        jn.set_num_threads(args.threads)
    jn.random.seed(args.seed)
    trainer = build(task, args)
    print(f"{name}: {len(task.train)} training / {len(task.test)} held-out pairs; vocabularies "
          f"{len(task.src_vocab)} -> {len(task.tgt_vocab)}; {trainer.net.extra_repr()}", flush=True)
    m = fit(trainer, task, args, name)
    reached = (f"reached {args.target:.0%} after {m['reached_target_s']:.1f} s of training"
               if m["reached_target_s"] is not None else f"did not reach {args.target:.0%}")
    print(f"{name}: held-out exact match {m['exact_match']:.4f} after {m['step']} steps; {reached}", flush=True)
    plot = None if args.no_plot else os.path.join(m["logdir"], "attention.png")
    show_samples(trainer, task, args.samples, args.beam, plot)
    return trainer, m


def dates_parser():
    """Return the ArgumentParser of ``python -m jitnet train seq2seq-dates``."""
    return _parser("seq2seq-dates", "Seq2seq with attention: human-written dates -> ISO YYYY-MM-DD "
                   "(character level, held-out dates and format/month pairs)", epochs=20, batch_size=64,
                   lr=2e-3, hidden=64, embed=32, target=0.99)


def reverse_parser():
    """Return the ArgumentParser of ``python -m jitnet train seq2seq-reverse``."""
    p = _parser("seq2seq-reverse", "Seq2seq with attention: reverse random letter strings", epochs=10,
                batch_size=64, lr=2e-3, hidden=64, embed=16, target=0.99)
    p.add_argument("--min-len", type=int, default=3)
    p.add_argument("--max-len", type=int, default=12)
    p.add_argument("--alphabet", default="abcdefghijklmnopqrstuvwxyz")
    return p


def run_dates(argv=None):
    """Train on the date task with the options in argv; return (trainer, final metrics)."""
    args = dates_parser().parse_args(argv)
    task = T.date_task(args.train_size or 20000, args.test_size or 2000, seed=args.seed)
    return _run("seq2seq-dates", args, task)


def run_reverse(argv=None):
    """Train on the reversal task with the options in argv; return (trainer, final metrics)."""
    args = reverse_parser().parse_args(argv)
    task = T.reverse_task(args.train_size or 10000, args.test_size or 1000, args.min_len, args.max_len,
                          args.alphabet, seed=args.seed)
    return _run("seq2seq-reverse", args, task)


def train_seq2seq_dates(argv=None):
    """Command ``seq2seq-dates``; return the exit code."""
    run_dates(argv)
    return 0


def train_seq2seq_reverse(argv=None):
    """Command ``seq2seq-reverse``; return the exit code."""
    run_reverse(argv)
    return 0


TRAINERS = {"seq2seq-dates": train_seq2seq_dates, "seq2seq-reverse": train_seq2seq_reverse}


jn.cache.protect_module(__name__)    # imported after jitnet: give this module's kernels the self-repairing cache
