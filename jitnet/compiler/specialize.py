"""Specialized plan steps for library primitives whose shapes are known when a plan is built.

An eager ``impl`` re-derives layout decisions on every call (axis bookkeeping, reshapes, dtype checks: tens
of microseconds of Python). In a plan the shapes and dtypes are fixed, so a specializer decides once and
returns ``fn(*arrays, out)`` that calls the kernel straight into a buffer the plan owns. A specializer
returns None when it does not apply; ``fn`` returns False at run time when an operand's layout does not
fit (the plan then falls back to the general ``impl``).
"""
from __future__ import annotations

import numba
import numpy as np

from .. import kernelgen
from .. import kernels_cpu as K
from .. import ops

__all__ = ["specializer"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _matmul(ins, params, out):
    a, b = ins
    if a.dtype != b.dtype or a.dtype not in _FLOATS or out.dtype != a.dtype or not out.size:
        return None
    matmul = np.matmul
    if len(a.shape) > 2 and len(b.shape) == 2:          # one GEMM over all rows (see ops._matmul_impl)
        rows, k, n = int(np.prod(a.shape[:-1])), a.shape[-1], b.shape[1]

        def fn3(x, y, o):
            matmul(x.reshape(rows, k), y, out=o.reshape(rows, n))
            return True
        return fn3

    def fn(x, y, o):
        matmul(x, y, out=o)
        return True
    return fn


def _reduce(ins, params, out):
    (x,) = ins
    op, axes = params["op"], params["axes"]
    if x.dtype not in _FLOATS or out.dtype != x.dtype or not axes or x.size == 0:
        return None
    nd = len(x.shape)
    code = ops._RED_CODE[op]
    n = int(np.prod([x.shape[a] for a in axes]))
    m = x.size // n
    par = x.size >= kernelgen.PARALLEL_THRESHOLD
    if list(axes) == list(range(nd - len(axes), nd)):
        kern = K.reduce_last_par if par else K.reduce_last

        def fn(a, o):
            if not a.flags.c_contiguous:
                return False
            kern(a.reshape(m, n), o.reshape(m), code)
            return True
        return fn
    mid = ops._middle_split(tuple(x.shape), axes)
    if mid is not None:
        kern = K.reduce_middle_par if par else K.reduce_middle

        def fn(a, o):
            if not a.flags.c_contiguous:
                return False
            kern(a.reshape(mid), o.reshape(mid[1]), code)
            return True
        return fn
    if list(axes) == list(range(len(axes))):
        nthreads = numba.get_num_threads()
        if par and n >= 4 * nthreads:
            kern = K.reduce_first_par

            def fn(a, o):
                if not a.flags.c_contiguous:
                    return False
                kern(a.reshape(n, m), o.reshape(m), code, nthreads)
                return True
        else:
            kern = K.reduce_first

            def fn(a, o):
                if not a.flags.c_contiguous:
                    return False
                kern(a.reshape(n, m), o.reshape(m), code)
                return True
        return fn
    return None


def _softmax(mode):
    def spec(ins, params, out):
        (x,) = ins
        if x.dtype not in _FLOATS or params["axis"] != len(x.shape) - 1 or x.size == 0:
            return None
        n = x.shape[-1]
        m = x.size // n
        kern = K.softmax_last_par if x.size >= kernelgen.PARALLEL_THRESHOLD else K.softmax_last

        def fn(a, o):
            if not a.flags.c_contiguous:
                return False
            kern(a.reshape(m, n), o.reshape(m, n), mode)
            return True
        return fn
    return spec


_SPECS = {"matmul": _matmul, "reduce": _reduce, "softmax": _softmax(0), "log_softmax": _softmax(1)}


def specializer(node):
    """Return ``fn(*arrays, out) -> bool`` for ``node`` with its static shapes, or None."""
    spec = _SPECS.get(node.prim.name) or (node.prim.extra.get("specialize") if node.prim.extra else None)
    if spec is None:
        return None
    return spec(node.inputs, node.params, node.out)
