"""Index bounds: one check and one message for every primitive that reads integer indices, labels or ids.

Each such primitive marks its registry row with :func:`mark` (``prim.extra["indices"]``: input position ->
(what the values are called, what a negative value means)), and its CPU impl, native emitter and CUDA kernels
report the first bad value through :func:`index_error`, whatever runs it: eager calls and jitted plans call the
impl; native drivers (generated ``@njit`` code, where a formatted message cannot be built) raise
``IndexError(NATIVE_TAG, op, what, position, value, bound, desc)``, which :func:`reraise_native` turns into the
same message; CUDA kernels write an error record that :func:`jitnet.cuda.check_errors` reads.

Negative values: ``"wrap"`` counts from the end as NumPy does (valid from -n), ``"error"`` is out of range
(ids, rows), ``"ignore"`` is valid and skipped by the kernel (cross-entropy's ignored label, one_hot's row of
``off_value``).
"""
from __future__ import annotations

import numpy as np

from . import kernels_cpu as K

__all__ = ["NATIVE_TAG", "mark", "index_error", "check", "reraise_native", "native_raise_lines"]

#: First argument of the IndexError a native driver raises for an index out of range.
NATIVE_TAG = "jitnet-bounds"

_LOWER = {"wrap": None, "error": 0, "ignore": np.iinfo(np.int64).min}


def mark(prim, **positions):
    """Record on ``prim`` which inputs are index arrays: ``mark(P, i1=("index", "wrap"))``; return ``prim``."""
    spec = {}
    for key, (what, negative) in positions.items():
        if negative not in _LOWER:
            raise ValueError(f"bounds.mark: negative policy {negative!r} is not one of {sorted(_LOWER)}")
        spec[int(key[1:])] = (what, negative)
    prim.extra["indices"] = spec
    return prim


def _position(pos, shape):
    if shape is None or len(shape) == 1:
        return str(int(pos))
    if len(shape) == 0:
        return "()"
    return str(tuple(int(v) for v in np.unravel_index(int(pos), tuple(shape))))


_PLURAL = {"index": "indices"}


def index_error(op, what, value, pos, desc, shape=None, device=False):
    """Return the IndexError for ``value`` at flat position ``pos`` of an index array of ``shape``."""
    where = _position(pos, shape) if not device else f"{int(pos)} (flat)"
    many = _PLURAL.get(what, what + "s")
    msg = f"{op}: {what} {int(value)} is out of bounds for {desc} (at position {where} of the {many})"
    if device:
        msg += " (checked on the device)"
    return IndexError(msg)


def check(idx, bound, op, desc, what="index", negative="wrap"):
    """Return ``idx`` as a C-contiguous int64 array (negatives wrapped under "wrap"); raise if one is out of range.

    Valid values are [-bound, bound) for "wrap", [0, bound) for "error", and anything below bound for "ignore".
    """
    if idx.dtype.kind not in "iu":
        if idx.dtype == np.bool_:
            raise TypeError(f"{op}: boolean {what} where an integer {what} was expected")
        raise TypeError(f"{op}: {what}s must be integers, got dtype {idx.dtype}")
    if idx.dtype == np.uint64 and idx.size and int(idx.max()) > np.iinfo(np.int64).max:
        flat = idx.reshape(-1)
        p = int(np.argmax(flat > np.iinfo(np.int64).max))
        raise index_error(op, what, int(flat[p]), p, desc, idx.shape)
    idx = np.asarray(idx, dtype=np.int64, order="C")      # (ascontiguousarray would make a 0-d index 1-d)
    flat = idx.reshape(-1)
    if not flat.size:
        return idx
    lo = _LOWER[negative]
    code = K.check_indices(flat, -bound if lo is None else lo, bound)
    if code >= 0:
        raise index_error(op, what, int(flat[code]), code, desc, idx.shape)
    if code == -2 and negative == "wrap":
        flat = flat.copy()
        K.wrap_negative(flat, bound)
        idx = flat.reshape(idx.shape)
    return idx


def reraise_native(e):
    """Raise the formatted IndexError when ``e`` is a native driver's bounds error; else return."""
    a = e.args
    if isinstance(e, IndexError) and len(a) == 7 and a[0] == NATIVE_TAG:
        _, op, what, pos, value, bound, desc = a
        raise index_error(op, what, value, pos, desc.format(bound)) from None


def native_raise_lines(code, labels, op, what, bound, desc):
    """Return driver source lines raising the bounds error when kernel result ``code`` is a position (>= 0)."""
    return [f"if {code} >= 0:",
            f"    raise IndexError({NATIVE_TAG!r}, {op!r}, {what!r}, {code}, {labels}[{code}], {int(bound)}, "
            f"{desc!r})"]
