"""Gradient clipping with TensorFlow's semantics, for dense tensors and IndexedSlices alike.

IndexedSlices are deduplicated (duplicate rows summed) before a norm or a clip is taken, so the result is that
of the dense gradient they stand for.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..autodiff.sparse import IndexedSlices
from ..tensor import Tensor

__all__ = ["clip_by_value", "clip_by_norm", "clip_by_global_norm", "global_norm"]


def _dense_part(t):
    return t.deduplicate().values if isinstance(t, IndexedSlices) else t


def _sq_sum(t):
    return ops.sum(ops.square(ops.astype(_dense_part(t), np.float64)))


def clip_by_value(t, clip_value_min, clip_value_max):
    """Return ``t`` (a tensor, IndexedSlices, or a list of them, None kept) clipped elementwise to [min, max]."""
    if isinstance(t, (list, tuple)):
        return type(t)(clip_by_value(x, clip_value_min, clip_value_max) for x in t)
    if t is None:
        return None
    if isinstance(t, IndexedSlices):
        d = t.deduplicate()
        return IndexedSlices(ops.clip(d.values, clip_value_min, clip_value_max), d.indices, d.dense_shape)
    return ops.clip(t, clip_value_min, clip_value_max)


def clip_by_norm(t, clip_norm, axes=None):
    """Return ``t * clip_norm / max(l2norm(t), clip_norm)`` (norm over ``axes``, all when None)."""
    if isinstance(t, IndexedSlices):
        if axes is not None:
            raise ValueError("clip_by_norm: axes is not supported for IndexedSlices")
        d = t.deduplicate()
        return IndexedSlices(clip_by_norm(d.values, clip_norm), d.indices, d.dense_shape)
    t = t if isinstance(t, Tensor) else Tensor(t)
    sq = ops.sum(ops.square(t), axis=axes, keepdims=True)
    norm = ops.sqrt(sq)
    scale = clip_norm / ops.maximum(norm, float(clip_norm))
    return t * scale.astype(t.dtype)


def global_norm(tensors):
    """Return sqrt(sum of squared entries of every tensor in ``tensors``) as a 0-d float tensor (None skipped)."""
    parts = [_sq_sum(t) for t in tensors if t is not None]
    if not parts:
        return ops.zeros((), np.float32)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return ops.sqrt(total).astype(np.float32)


def clip_by_global_norm(t_list, clip_norm, use_norm=None):
    """Return (list scaled by clip_norm / max(global_norm, clip_norm), global_norm) like TensorFlow."""
    t_list = list(t_list)
    norm = global_norm(t_list) if use_norm is None else (use_norm if isinstance(use_norm, Tensor)
                                                          else ops.full((), float(use_norm), np.float32))
    n64 = norm.astype(np.float64)
    scale = clip_norm / ops.maximum(n64, ops.full((), float(clip_norm), np.float64))
    out = []
    for t in t_list:
        if t is None:
            out.append(None)
        elif isinstance(t, IndexedSlices):
            d = t.deduplicate()
            out.append(IndexedSlices(d.values * scale.astype(d.dtype), d.indices, d.dense_shape))
        else:
            out.append(t * scale.astype(t.dtype))
    return out, norm
