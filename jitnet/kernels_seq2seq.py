"""CPU kernels of the fused attention-decoder rows (:mod:`jitnet.nn.attention_decoder`).

* ``lstm_fwd_kernel``: one LSTM step over a packed state ``s = [h, c, i, f, g, o]`` (B, 6H) with a zero bias
  (the decoder folds its bias into ``xw``); its backward kernels are :mod:`jitnet.kernels_cpu`'s own;
* additive (Bahdanau) attention for one decoder step, in two kernels and two backward kernels:
  ``th = tanh(pk + q)`` (``attention_tanh_kernel``) and the masked softmax of ``th . v`` with the context it
  weights (``attention_context_kernel``).

Every kernel is ``@njit(cache=True)`` over NumPy arrays; their CUDA forms are in
:mod:`jitnet.kernels_seq2seq_gpu`.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import cache
from .kernels_cpu import nn_lstm_step, nn_lstm_step_dprev, nn_lstm_step_dz
from .kernels_scalar import tanh_v

__all__ = ["lstm_fwd_kernel", "lstm_dz_kernel", "lstm_dprev_kernel", "attention_tanh_kernel",
           "attention_tanh_bwd_kernel", "attention_context_kernel", "attention_context_bwd_kernel"]

_CACHE_DEPENDS = ("kernels_scalar.py",)

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


cache.protect_module(__name__)    # imported after jitnet: give these kernels the self-repairing cache
