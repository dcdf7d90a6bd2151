"""CUDA kernels of the fused attention-decoder rows (:mod:`jitnet.nn.attention_decoder`; CPU forms in
:mod:`jitnet.kernels_seq2seq`).

Imported only when a CUDA implementation of those rows first runs. Every kernel is a 1-D grid-stride loop over
its outputs, one thread per output element (per row where a row's softmax is needed); launch them with
``backend_cuda.launch(kernel, n, ...)``. The LSTM step reuses :mod:`jitnet.kernels_gpu`'s LSTM kernels.
``zero`` and ``one`` arguments are scalars of the arrays' dtype (so float32 stays float32).
"""
from __future__ import annotations

import math

from numba import cuda

__all__ = ["attention_tanh", "attention_tanh_bwd_dpk", "attention_tanh_bwd_dq", "attention_softmax",
           "attention_context", "attention_context_bwd_rows", "attention_context_bwd_dvals",
           "attention_context_bwd_dth", "attention_context_bwd_dv"]


@cuda.jit(cache=True)
def attention_tanh(q, pk, mask, th):
    """th[b, s, u] = tanh(pk[b, s, u] + q[b, u]) where mask[b, s] is nonzero, 0 elsewhere."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, nu = th.shape[1], th.shape[2]
    while i < th.shape[0] * nsrc * nu:
        b = i // (nsrc * nu)
        r = i - b * nsrc * nu
        s = r // nu
        u = r - s * nu
        if mask[b, s]:
            th[b, s, u] = math.tanh(pk[b, s, u] + q[b, u])
        else:
            th[b, s, u] = 0
        i += step


@cuda.jit(cache=True)
def attention_tanh_bwd_dpk(g, th, dpk, one):
    """dpk = g * (1 - th^2) (B, S, U)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, nu = th.shape[1], th.shape[2]
    while i < th.shape[0] * nsrc * nu:
        b = i // (nsrc * nu)
        r = i - b * nsrc * nu
        s = r // nu
        u = r - s * nu
        t = th[b, s, u]
        dpk[b, s, u] = g[b, s, u] * (one - t * t)
        i += step


@cuda.jit(cache=True)
def attention_tanh_bwd_dq(g, th, dq, zero, one):
    """dq[b, u] = sum over s of g * (1 - th^2)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, nu = th.shape[1], th.shape[2]
    while i < th.shape[0] * nu:
        b = i // nu
        u = i - b * nu
        acc = zero
        for s in range(nsrc):
            t = th[b, s, u]
            acc += g[b, s, u] * (one - t * t)
        dq[b, u] = acc
        i += step


@cuda.jit(cache=True)
def attention_softmax(th, v, mask, w, zero, one):
    """w[b] (S,) = the masked softmax of the scores th[b, s] . v (one thread per row); all zeros when no
    position of the row is valid."""
    b = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, nu = th.shape[1], th.shape[2]
    while b < th.shape[0]:
        m = zero
        found = False
        for s in range(nsrc):
            if mask[b, s]:
                acc = zero
                for u in range(nu):
                    acc += v[u] * th[b, s, u]
                w[b, s] = acc
                if not found or acc > m:
                    m = acc
                    found = True
        tot = zero
        for s in range(nsrc):
            e = zero
            if mask[b, s]:
                e = math.exp(w[b, s] - m)
            w[b, s] = e
            tot += e
        inv = zero
        if tot > 0:
            inv = one / tot
        for s in range(nsrc):
            w[b, s] *= inv
        b += step


@cuda.jit(cache=True)
def attention_context(w, vals, ctx, zero):
    """ctx[b, d] = sum over s of w[b, s] * vals[b, s, d] (positions of weight 0 skipped)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, dv = vals.shape[1], vals.shape[2]
    while i < ctx.shape[0] * dv:
        b = i // dv
        d = i - b * dv
        acc = zero
        for s in range(nsrc):
            ws = w[b, s]
            if ws != 0:
                acc += ws * vals[b, s, d]
        ctx[b, d] = acc
        i += step


@cuda.jit(cache=True)
def attention_context_bwd_rows(gc, vals, w, dsc, zero):
    """dsc[b, s] = the gradient of the context w.r.t. the score of (b, s): the softmax backward of
    dw[b, s] = gc[b] . vals[b, s] (one thread per row; 0 at masked positions, whose weight is 0)."""
    b = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, dv = vals.shape[1], vals.shape[2]
    while b < vals.shape[0]:
        wdw = zero
        for s in range(nsrc):
            acc = zero
            for d in range(dv):
                acc += gc[b, d] * vals[b, s, d]
            dsc[b, s] = acc
            wdw += w[b, s] * acc
        for s in range(nsrc):
            dsc[b, s] = w[b, s] * (dsc[b, s] - wdw)
        b += step


@cuda.jit(cache=True)
def attention_context_bwd_dvals(gc, w, dvals):
    """dvals[b, s, d] = w[b, s] * gc[b, d]."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, dv = dvals.shape[1], dvals.shape[2]
    while i < dvals.shape[0] * nsrc * dv:
        b = i // (nsrc * dv)
        r = i - b * nsrc * dv
        s = r // dv
        d = r - s * dv
        dvals[b, s, d] = w[b, s] * gc[b, d]
        i += step


@cuda.jit(cache=True)
def attention_context_bwd_dth(dsc, v, dth):
    """dth[b, s, u] = dsc[b, s] * v[u]."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nsrc, nu = dth.shape[1], dth.shape[2]
    while i < dth.shape[0] * nsrc * nu:
        b = i // (nsrc * nu)
        r = i - b * nsrc * nu
        s = r // nu
        u = r - s * nu
        dth[b, s, u] = dsc[b, s] * v[u]
        i += step


@cuda.jit(cache=True)
def attention_context_bwd_dv(dsc, th, dv_out, zero):
    """dv_out[u] = sum over (b, s) of dsc[b, s] * th[b, s, u]."""
    u = cuda.grid(1)
    step = cuda.gridsize(1)
    bsz, nsrc = th.shape[0], th.shape[1]
    while u < th.shape[2]:
        acc = zero
        for b in range(bsz):
            for s in range(nsrc):
                acc += dsc[b, s] * th[b, s, u]
        dv_out[u] = acc
        u += step
