"""Sparse gradients: :class:`IndexedSlices`, the gradient of an embedding lookup with respect to its table.

An ``IndexedSlices`` stands for the dense tensor of shape ``dense_shape`` that is zero except at rows
``indices``, where it holds ``values`` (duplicate indices add up). The backward pass accumulates it like a
dense gradient (``IndexedSlices + IndexedSlices`` concatenates, ``+`` with a dense tensor densifies), and the
optimizers in :mod:`jitnet.optim` update only the rows it names.

Sparse gradients are built from jitnet ops, so this module sits above ``tensor`` and ``ops`` (with
``autodiff.backprop``, which accumulates them). Loading it gives the ``getitem`` row its sparse rule: the
gradient of ``x[t]`` (one index along the first axis: a loop over time, unstacking) is one row at ``t``, so
that T slices accumulate in O(T) and become dense once, where they meet a computed tensor or a leaf; every
other index keeps the row's dense VJP.
"""
from __future__ import annotations

import numpy as np

from .. import kernels_cpu as K
from .. import ops
from ..tensor import Tensor

__all__ = ["IndexedSlices", "unique_sum"]


def unique_sum(indices, values):
    """Return (unique sorted int64 indices, values with the rows of duplicate indices summed) as NumPy arrays."""
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    vals = np.asarray(values)
    vals2 = np.ascontiguousarray(vals.reshape(idx.shape[0], -1))
    if idx.shape[0] < 2 or np.all(idx[1:] > idx[:-1]):
        return idx, vals                                  # already unique and sorted
    order, uniq, starts = K.unique_segments(idx)
    out = np.empty((uniq.shape[0], vals2.shape[1]), vals.dtype)
    K.segment_sum_rows(vals2, order, starts, out)
    return uniq, out.reshape((uniq.shape[0],) + vals.shape[1:])


class IndexedSlices:
    """A sparse gradient: rows ``values`` (k, ...) at int64 ``indices`` (k,) of a dense ``dense_shape`` tensor."""

    __slots__ = ("_parts", "dense_shape", "dense_at_leaf")
    __array_priority__ = 2000

    def __init__(self, values, indices, dense_shape, dense_at_leaf=False):
        values = values if isinstance(values, Tensor) else Tensor(values)
        indices = indices if isinstance(indices, Tensor) else Tensor(np.asarray(indices, dtype=np.int64))
        if indices.dtype != np.int64:
            indices = indices.astype(np.int64)
        self.dense_shape = tuple(int(s) for s in dense_shape)
        self.dense_at_leaf = bool(dense_at_leaf)   # a slice's gradient: dense by the time it reaches a leaf
        if indices.ndim != 1:
            raise ValueError(f"IndexedSlices: indices must be 1-D, got shape {indices.shape}")
        if values.shape != (indices.shape[0],) + self.dense_shape[1:]:
            raise ValueError(f"IndexedSlices: values of shape {values.shape} do not match "
                             f"{indices.shape[0]} indices into a tensor of shape {self.dense_shape}")
        self._parts = [(values, indices)]

    @classmethod
    def _from_parts(cls, parts, dense_shape, dense_at_leaf):
        obj = object.__new__(cls)
        obj._parts = parts
        obj.dense_shape = dense_shape
        obj.dense_at_leaf = dense_at_leaf
        return obj

    def _collapse(self):
        """Join the parts (sums of several IndexedSlices) into one (values, indices): one concatenation."""
        if len(self._parts) > 1:
            dt = self._parts[0][0].dtype
            vals = ops.concatenate([v if v.dtype == dt else v.astype(dt) for v, _ in self._parts], 0)
            idx = ops.concatenate([i for _, i in self._parts], 0)
            self._parts = [(vals, idx)]
        return self._parts[0]

    @property
    def values(self):
        """The rows (k, ...) as one tensor."""
        return self._collapse()[0]

    @property
    def indices(self):
        """The int64 row indices (k,) as one tensor."""
        return self._collapse()[1]

    # -- metadata (those of the dense tensor it stands for) --------------------------------------------------
    @property
    def shape(self):
        """The dense shape."""
        return self.dense_shape

    @property
    def dtype(self):
        """The dtype of the values."""
        return self._parts[0][0].dtype

    @property
    def ndim(self):
        """The number of dimensions of the dense tensor."""
        return len(self.dense_shape)

    @property
    def device(self):
        """The Device holding the values."""
        return self.values.device

    @property
    def requires_grad(self):
        """True when the values carry a tape (higher-order gradients)."""
        return self.values.requires_grad

    def __repr__(self):
        return (f"IndexedSlices(indices={self.indices.numpy().tolist()}, values shape={self.values.shape}, "
                f"dense_shape={self.dense_shape}, dtype={self.dtype})")

    # -- conversions -----------------------------------------------------------------------------------------
    def to_dense(self):
        """Return the dense Tensor (zeros with ``values`` scatter-added at ``indices``)."""
        zeros = ops.zeros(self.dense_shape, self.dtype, device=self.values.device if self.values.is_cuda else None)
        return ops.scatter_add(zeros, self.indices, self.values, 0)

    def numpy(self):
        """Return the dense tensor as a NumPy array."""
        return self.to_dense().numpy()

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def detach(self):
        """Return an IndexedSlices whose values and indices are cut from the tape."""
        return IndexedSlices(self.values.detach(), self.indices.detach(), self.dense_shape)

    def astype(self, dtype):
        """Return an IndexedSlices with values cast to ``dtype``."""
        return IndexedSlices(self.values.astype(dtype), self.indices, self.dense_shape)

    def deduplicate(self):
        """Return an equal IndexedSlices with unique sorted indices (duplicate rows summed; not differentiable)."""
        idx, vals = unique_sum(self.indices.numpy(), self.values.numpy())
        return IndexedSlices(Tensor._wrap(vals), Tensor._wrap(idx), self.dense_shape)

    # -- arithmetic ------------------------------------------------------------------------------------------
    def __add__(self, other):
        if other is None:
            return self
        if isinstance(other, IndexedSlices):
            if other.dense_shape != self.dense_shape:
                raise ValueError(f"IndexedSlices +: dense shapes {self.dense_shape} and {other.dense_shape} "
                                 "differ")
            return IndexedSlices._from_parts(self._parts + other._parts, self.dense_shape,
                                             self.dense_at_leaf and other.dense_at_leaf)
        return ops.add(self.to_dense(), other)

    def __radd__(self, other):
        if other is None or (isinstance(other, (int, float)) and other == 0):
            return self
        if isinstance(other, IndexedSlices):
            return other.__add__(self)
        return ops.add(other, self.to_dense())

    def __mul__(self, scale):
        """Return the IndexedSlices scaled by a scalar (Python number or 0-d tensor)."""
        return IndexedSlices(self.values * scale, self.indices, self.dense_shape)

    __rmul__ = __mul__

    def __neg__(self):
        return IndexedSlices(-self.values, self.indices, self.dense_shape)

    def __truediv__(self, scale):
        return IndexedSlices(self.values / scale, self.indices, self.dense_shape)


_dense_getitem_vjp = ops.GETITEM.vjp


def _getitem_vjp(g, ans, ins, needs, template):
    """The VJP of ``getitem``: one row (an IndexedSlices) for ``x[t]`` along the first axis, else dense (and on a
    GPU, where the row's index would be a host array)."""
    x = ins[0]
    if len(ins) == 1 and len(template) == 1 and type(template[0]) is int and x.ndim >= 1 and not x.is_cuda:
        t = template[0] % x.shape[0]
        return (IndexedSlices(ops.reshape(g, (1,) + x.shape[1:]), Tensor._wrap(np.array([t], dtype=np.int64)),
                              x.shape, dense_at_leaf=True),)
    return _dense_getitem_vjp(g, ans, ins, needs, template)


ops.GETITEM.vjp = _getitem_vjp
