"""Matrix products inside Numba kernels, on the same BLAS (and thread pool) as NumPy.

``np.dot`` inside an ``@njit`` function calls SciPy's BLAS, which on pip installs is a second OpenBLAS with its
own pool of threads. A step that runs GEMMs from both sides (NumPy's ``@`` in Python, ``np.dot`` inside a
generated native loop) then keeps two pools spinning on the same cores: on a 2-core machine a jitted LSTM layer
ran 2x slower than the same plan driven from Python. ``gemm(a, b, out)`` calls NumPy's own OpenBLAS
(``cblas_?gemm`` through its exported symbol, registered with LLVM by name so kernels that use it stay
cacheable) and passes strided operands by leading dimension instead of copying them. Where NumPy's BLAS cannot
be found (a NumPy built on another BLAS) it falls back to ``np.dot``.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

__all__ = ["gemm", "HAVE_NUMPY_BLAS", "blas_library"]

_SYMS = {np.float32: "jitnet_cblas_sgemm", np.float64: "jitnet_cblas_dgemm"}


def _find_numpy_blas():
    """Return (path, ilp64, {dtype: address}) of the cblas gemm NumPy links against, or None."""
    import numpy
    roots = [os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs"),
             os.path.join(os.path.dirname(numpy.__file__), ".dylibs")]
    cands = [p for r in roots for p in sorted(glob.glob(os.path.join(r, "*openblas*")))]
    for path in cands:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, ilp64 in (("scipy_", "64_", True), ("", "64_", True), ("scipy_", "", False),
                                      ("", "", False)):
            try:
                s = getattr(lib, f"{prefix}cblas_sgemm{suffix}")
                d = getattr(lib, f"{prefix}cblas_dgemm{suffix}")
            except AttributeError:
                continue
            return path, ilp64, {np.float32: ctypes.cast(s, ctypes.c_void_p).value,
                                 np.float64: ctypes.cast(d, ctypes.c_void_p).value}
    return None


_found = None if os.environ.get("JITNET_NUMPY_BLAS", "1") == "0" else _find_numpy_blas()
HAVE_NUMPY_BLAS = _found is not None
blas_library = _found[0] if _found else None
_ILP64 = bool(_found and _found[1])
if _found:
    for _dt, _addr in _found[2].items():
        _llvm.add_symbol(_SYMS[_dt], _addr)


@intrinsic
def _cblas_gemm(typingctx, ta, tb, m, n, k, a, lda, b, ldb, c, ldc):
    """out-of-line ``cblas_?gemm(RowMajor, ta, tb, m, n, k, 1, a, lda, b, ldb, 0, c, ldc)``."""
    dt = c.dtype
    if not isinstance(dt, types.Float):
        return None
    sym = _SYMS[np.float32 if dt.bitwidth == 32 else np.float64]

    def codegen(context, builder, sig, args):
        ta_, tb_, m_, n_, k_, a_, lda_, b_, ldb_, c_, ldc_ = args
        fl = context.get_value_type(dt)
        i32, iw = ir.IntType(32), ir.IntType(64 if _ILP64 else 32)
        ptr = ir.PointerType(fl)
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, iw, iw, iw, fl, ptr, iw, ptr, iw, fl, ptr, iw])
        fn = cgutils.get_or_insert_function(builder.module, fnty, sym)

        def data(v, t):
            return context.make_array(t)(context, builder, v).data

        def w(v):
            return builder.trunc(v, iw) if iw.width < 64 else v
        one, zero = ir.Constant(fl, 1.0), ir.Constant(fl, 0.0)
        builder.call(fn, [ir.Constant(i32, 101), builder.trunc(ta_, i32), builder.trunc(tb_, i32),
                          w(m_), w(n_), w(k_), one, data(a_, sig.args[5]), w(lda_), data(b_, sig.args[7]),
                          w(ldb_), zero, data(c_, sig.args[9]), w(ldc_)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64, types.int64, types.int64, types.int64, a, types.int64, b,
                      types.int64, c, types.int64), codegen


@njit(cache=True, inline="always")
def _lead(x):
    """(transpose flag 111/112, leading dimension) of a 2-D operand for row-major cblas, or (0, 0)."""
    isz = x.itemsize
    r, c = x.shape
    s0, s1 = x.strides
    if (s1 == isz or c <= 1) and s0 % isz == 0 and s0 >= max(c, 1) * isz:
        return 111, s0 // isz
    if (s0 == isz or r <= 1) and s1 % isz == 0 and s1 >= max(r, 1) * isz:
        return 112, s1 // isz
    return 0, 0


@intrinsic
def any_layout(typingctx, x):
    """``x`` typed as an array of layout 'A' (the same data: Numba's array structure does not depend on layout).

    ``gemm`` passes its operands through it, so one compiled GEMM per dtype serves every operand layout: a
    native driver calling GEMMs on C-, F- and A-layout views compiled three of them (0.6 s each) before."""
    if not isinstance(x, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return impl_ret_borrowed(context, builder, sig.return_type, args[0])
    return x.copy(layout="A")(x), codegen


@njit(cache=True, inline="always")
def gemm(a, b, out):
    """Write ``a @ b`` into ``out`` (2-D float arrays of one dtype): ``_gemm`` on layout-erased operands."""
    _gemm(any_layout(a), any_layout(b), any_layout(out))


if HAVE_NUMPY_BLAS:
    @njit(cache=True)
    def _gemm(a, b, out):
        """Write ``a @ b`` into ``out`` (2-D float arrays of one dtype) with NumPy's BLAS; no operand copies
        for row-major or column-major strided views with a unit stride."""
        m, k = a.shape
        n = b.shape[1]
        if m == 0 or n == 0:
            return
        if k == 0:
            out[:] = 0
            return
        ta, lda = _lead(a)
        if ta == 0:
            a = np.ascontiguousarray(a)
            ta, lda = 111, k
        tb, ldb = _lead(b)
        if tb == 0:
            b = np.ascontiguousarray(b)
            tb, ldb = 111, n
        tc, ldc = _lead(out)
        if tc == 111:
            _cblas_gemm(ta, tb, m, n, k, a, lda, b, ldb, out, ldc)
        elif tc == 112:            # out column-major: compute out.T = b.T @ a.T
            _cblas_gemm(223 - tb, 223 - ta, n, m, k, b, ldb, a, lda, out, ldc)
        else:
            tmp = np.empty((m, n), out.dtype)
            _cblas_gemm(ta, tb, m, n, k, a, lda, b, ldb, tmp, n)
            # an explicit loop: ``out[:] = tmp`` (an array-to-array slice assignment) makes Numba compile its
            # shape-error message formatting, 3 s of a cold process's first native driver
            for i in range(m):
                for j in range(n):
                    out[i, j] = tmp[i, j]
else:
    @njit(cache=True)
    def _gemm(a, b, out):
        """Write ``a @ b`` into ``out`` (2-D float arrays of one dtype)."""
        if a.shape[0] and b.shape[1]:
            np.dot(a, b, out)
