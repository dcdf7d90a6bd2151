"""Attention: dot-product (Luong) and additive (Bahdanau) scoring with masks, as functions and layers."""
from __future__ import annotations

import math

from .. import ops
from ..tensor import Tensor, _infer_array, float32
from .layers import Linear
from .module import Module

__all__ = ["dot_product_attention", "additive_attention", "LuongAttention", "BahdanauAttention"]

_NEG = -1e9


def _t(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


def _masked_softmax(scores, mask):
    if mask is not None:
        m = _t(mask)
        if m.dtype.kind != "b":
            m = m != 0
        while m.ndim < scores.ndim:
            m = ops.expand_dims(m, -2)
        scores = ops.where(m, scores, ops.full_like(scores, _NEG))
    return ops.softmax(scores, -1)


def _as_3d(q):
    q = _t(q)
    if q.ndim == 2:
        return ops.expand_dims(q, 1), True
    if q.ndim == 3:
        return q, False
    raise ValueError(f"attention: query must be (batch, dim) or (batch, time, dim), got shape {q.shape}")


def dot_product_attention(query, keys, values=None, mask=None, scale=None):
    """Return (context, weights): softmax(q . k * scale) over keys (masked where mask is 0) applied to values.

    query (B, D) or (B, Tq, D), keys (B, Tk, D), values (B, Tk, Dv) (default: keys), mask (B, Tk) or
    (B, Tq, Tk). context is (B, Dv) or (B, Tq, Dv); weights (B, Tk) or (B, Tq, Tk).
    """
    q, single = _as_3d(query)
    k = _t(keys)
    v = k if values is None else _t(values)
    if k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"dot_product_attention: query {q.shape} and keys {k.shape} do not match "
                         f"(expected keys (batch, time, {q.shape[2]}))")
    scores = ops.matmul(q, ops.swapaxes(k, 1, 2))
    if scale is not None:
        scores = scores * scale
    w = _masked_softmax(scores, mask)
    ctx = ops.matmul(w, v)
    if single:
        return ops.squeeze(ctx, 1), ops.squeeze(w, 1)
    return ctx, w


def additive_attention(query, keys, W_q, W_k, v, values=None, mask=None, b=None):
    """Return (context, weights) with Bahdanau scores v . tanh(q @ W_q + k @ W_k + b) over keys.

    Shapes as in ``dot_product_attention``; W_q (Dq, U), W_k (Dk, U), v (U,).
    """
    q, single = _as_3d(query)
    k = _t(keys)
    vals = k if values is None else _t(values)
    if k.ndim != 3 or k.shape[0] != q.shape[0]:
        raise ValueError(f"additive_attention: query {q.shape} and keys {k.shape} do not match")
    pq = ops.expand_dims(ops.matmul(q, W_q), 2)           # (B, Tq, 1, U)
    pk = ops.expand_dims(ops.matmul(k, W_k), 1)           # (B, 1, Tk, U)
    e = pq + pk if b is None else pq + pk + b
    scores = ops.matmul(ops.tanh(e), ops.reshape(v, (-1, 1)))[..., 0]
    w = _masked_softmax(scores, mask)
    ctx = ops.matmul(w, vals)
    if single:
        return ops.squeeze(ctx, 1), ops.squeeze(w, 1)
    return ctx, w


class LuongAttention(Module):
    """Multiplicative attention: score 'dot' (q . k), 'scaled_dot' (/ sqrt(d)) or 'general' (q W . k)."""

    def __init__(self, query_dim, key_dim=None, score="general", dtype=float32):
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        if score not in ("dot", "scaled_dot", "general"):
            raise ValueError(f"LuongAttention: score must be 'dot', 'scaled_dot' or 'general', got {score!r}")
        if score != "general" and key_dim != query_dim:
            raise ValueError(f"LuongAttention: score {score!r} needs query_dim == key_dim, got {query_dim} and "
                             f"{key_dim}")
        self.score, self.query_dim, self.key_dim = score, query_dim, key_dim
        self.proj = Linear(query_dim, key_dim, bias=False, dtype=dtype) if score == "general" else None

    def forward(self, query, keys, values=None, mask=None):
        """Return (context, weights) for query (B, Dq) or (B, Tq, Dq) over keys (B, Tk, Dk)."""
        q = self.proj(query) if self.proj is not None else _t(query)
        scale = 1.0 / math.sqrt(self.key_dim) if self.score == "scaled_dot" else None
        return dot_product_attention(q, keys, values, mask, scale)

    def extra_repr(self):
        return f"{self.query_dim}, {self.key_dim}, score={self.score!r}"


class BahdanauAttention(Module):
    """Additive attention with score v . tanh(q W_q + k W_k + b)."""

    def __init__(self, query_dim, key_dim, units, dtype=float32):
        super().__init__()
        self.query_dim, self.key_dim, self.units = query_dim, key_dim, units
        self.query_proj = Linear(query_dim, units, bias=False, dtype=dtype)
        self.key_proj = Linear(key_dim, units, bias=True, dtype=dtype)
        self.v = Linear(units, 1, bias=False, dtype=dtype)

    def forward(self, query, keys, values=None, mask=None):
        """Return (context, weights) for query (B, Dq) or (B, Tq, Dq) over keys (B, Tk, Dk)."""
        return additive_attention(query, keys, self.query_proj.W, self.key_proj.W, ops.reshape(self.v.W, (-1,)),
                                  values, mask, self.key_proj.b)

    def extra_repr(self):
        return f"{self.query_dim}, {self.key_dim}, units={self.units}"
