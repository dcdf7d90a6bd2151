"""Embedding lookup: a gather whose gradient with respect to the table is sparse (an IndexedSlices)."""
from __future__ import annotations

import numpy as np

from .. import bounds
from .. import kernels_cpu as K
from .. import ops
from ..autodiff.core import Primitive, apply
from ..autodiff.sparse import IndexedSlices
from ..lazy import LazyModule
from ..tensor import Tensor, _infer_array

# the CUDA backend, imported when a CUDA implementation first runs (never on the CPU)
_G = LazyModule("jitnet.backend_cuda")

__all__ = ["embedding", "EMBEDDING"]


def _check_ids(ids, vocab):
    """Return ``ids`` as contiguous int64; raise IndexError naming the first bad id, its position and the vocabulary."""
    return bounds.check(ids, vocab, "embedding", f"a table of {vocab} rows (ids must be in [0, {vocab}))",
                        negative="error")


def _embedding_impl(weight, ids):
    vocab, dim = weight.shape
    ids = _check_ids(ids, vocab)
    out = np.empty((1, ids.size, dim), weight.dtype)
    if out.size:
        w = weight if weight.flags.c_contiguous else np.ascontiguousarray(weight)
        K.take_axis(w.reshape(1, vocab, dim), ids.reshape(-1), out)
    return out.reshape(ids.shape + (dim,))


def _embedding_vjp(g, ans, ins, needs):
    weight, ids = ins
    if not needs[0]:
        return None, None
    values = ops.reshape(g, (-1, weight.shape[1]))
    indices = ops.reshape(ids, (-1,))
    if indices.dtype != np.int64:
        indices = indices.astype(np.int64)
    return IndexedSlices(values, indices, weight.shape), None


def _embedding_cuda(weight, ids):
    vocab, dim = weight.shape
    if _G.is_host(ids) or ids.dtype.kind not in "iu":
        ids = _G.index_array(ids, vocab, "embedding", 0)
    out = _G.run_primitive("take", weight, ids, axis=0, name="embedding")
    return out


EMBEDDING = bounds.mark(Primitive("embedding", impl={"cpu": _embedding_impl, "cuda": _embedding_cuda},
                                  vjp=_embedding_vjp),
                        i1=("index", "error"))


def embedding(weight, ids):
    """Return the rows of ``weight`` (vocab, dim) at integer ``ids``: shape ids.shape + (dim,); sparse gradient."""
    weight = weight if isinstance(weight, Tensor) else Tensor._wrap(_infer_array(weight))
    ids = ids if isinstance(ids, Tensor) else Tensor._wrap(_infer_array(ids))
    if weight.ndim != 2:
        raise ValueError(f"embedding: the table must be 2-D (vocab, dim), got shape {weight.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    return apply(EMBEDDING, weight, ids)
