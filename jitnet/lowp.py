"""Low-precision storage: float16 and bfloat16 tensors, their conversion kernels, and the float32 compute rule.

**Storage.** ``jn.float16`` is NumPy's half type. ``jn.bfloat16`` is the ``ml_dtypes`` bfloat16 type (an optional
package: ``pip install "jitnet[interop]"``). ``jn.bfloat16`` always exists; it is a small stand-in that resolves
to the NumPy dtype on first use, so importing jitnet never imports ``ml_dtypes``, and using bfloat16 without it
raises an ImportError naming the extra. It compares equal to the dtype (``t.dtype == jn.bfloat16``) and NumPy
accepts it wherever a dtype is expected (``np.zeros(3, jn.bfloat16)``).

**Compute rule.** Numba's CPU target has no arithmetic on either type, so no CPU kernel sees one: a primitive on
a float16/bfloat16 input (or asked for such an output through a ``dtype=`` parameter) runs on float32 copies of
those inputs and its float32 outputs are rounded (to nearest, ties to even) back to the storage dtype when
all of its floating inputs share that dtype; mixed with float32/float64 the result is the wider type, and
float16 mixed with bfloat16 gives float32 (as in JAX). In-place primitives (optimizer updates) write their
rounded results back into the low-precision arrays. Views (reshape, transpose, basic indexing, ...) and loop
primitives act on the stored arrays directly. The rule is one hook in ``autodiff.core.apply``: it swaps the
primitive for a derived row (``<name>:f32``) whose impl widens, calls the original impl and rounds, and
whose VJP is the original one, so gradients flow, jitted steps record the derived rows, and backward passes
follow the same rule. The hook is installed the first time a low-precision dtype appears (or ``jn.autocast``
is entered); until then ``apply`` pays one global test. On a GPU float16 runs in the CUDA kernels as is (the
matmul kernels, and so conv2d, read float16 operands and sum in float32); bfloat16 stays on the CPU.

**Mixed precision.** This rule is storage only: it never changes a dtype the program chose. ``jn.autocast``
(:mod:`jitnet.autocast`) chooses them: inside it, the same hook first casts the inputs of GEMM-like rows to
float16/bfloat16 and those of sensitive rows (softmax, losses, sums, exp/log) to float32, and then this rule
runs on the cast tensors. ``jn.optim.GradScaler`` adds loss scaling for float16 gradients.

**Conversions** are ``@njit`` kernels on the 16-bit patterns (``uint16`` views): float32 <-> bfloat16 is a
16-bit shift with round-to-nearest-even, float32 <-> float16 rebiases the exponent and handles subnormals,
infinities and NaN. On 1M elements (2 cores) they took 0.14 ms (to bfloat16) and 0.11 ms (from), against
0.90 and 0.44 ms for NumPy's ``astype`` through ``ml_dtypes``, and 0.51 / 0.67 ms against NumPy's own float16
casts' 2.6 / 1.7 ms (a float32 copy: 0.09 ms). Other sources (float64, integers, bool) use NumPy's ``astype``,
which rounds once.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .autodiff import core as _ad
from .autodiff.core import Primitive, no_cuda
from .kernels_cpu import Adaptive

__all__ = ["bfloat16", "float16", "bfloat16_dtype", "is_lowp", "is_bf16", "is_floating", "convert", "enable"]

INSTALL_HINT = 'pip install "jitnet[interop]"'

float16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_U16 = np.dtype(np.uint16)
_BF16 = None                       # the ml_dtypes dtype, once resolved


def bfloat16_dtype():
    """Return NumPy's bfloat16 dtype from ``ml_dtypes`` (imported on first use); ImportError names the extra."""
    global _BF16
    if _BF16 is None:
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError(f"jitnet.bfloat16 needs the ml_dtypes package: {INSTALL_HINT}") from None
        _BF16 = np.dtype(ml_dtypes.bfloat16)
        enable()
    return _BF16


class BFloat16:
    """``jn.bfloat16``: stands for ml_dtypes' bfloat16 dtype, resolved on first use (``.dtype``)."""

    __slots__ = ()
    name = "bfloat16"
    itemsize = 2

    @property
    def dtype(self):
        """The NumPy dtype (imports ``ml_dtypes``)."""
        return bfloat16_dtype()

    def __eq__(self, other):
        if isinstance(other, BFloat16):
            return True
        if isinstance(other, np.dtype):
            return other.kind == "V" and other.name == "bfloat16"
        if isinstance(other, str):
            return other == "bfloat16"
        if isinstance(other, type) and other.__name__ == "bfloat16":
            return True
        return NotImplemented

    def __hash__(self):
        try:
            return hash(bfloat16_dtype())
        except ImportError:
            return hash("bfloat16")

    def __repr__(self):
        return "jitnet.bfloat16"

    def __str__(self):
        return "bfloat16"


bfloat16 = BFloat16()


def is_lowp(dt) -> bool:
    """Return True for float16 and bfloat16 dtypes (the storage-only types)."""
    return dt.itemsize == 2 and (dt.kind == "f" or (dt.kind == "V" and dt.name == "bfloat16"))


def is_bf16(dt) -> bool:
    """Return True for the bfloat16 dtype (without importing ml_dtypes; False for None)."""
    return dt is not None and dt.kind == "V" and dt.name == "bfloat16"


def is_floating(dt) -> bool:
    """Return True for floating dtypes, bfloat16 included (NumPy gives bfloat16 kind 'V', not 'f')."""
    k = dt.kind
    return k == "f" or (k == "V" and dt.name == "bfloat16")


# --------------------------------------------------------------------------------------------------------------
# Conversion kernels on bit patterns (flat contiguous arrays; the parallel ones run for large inputs)
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, parallel=True)
def _bf16_to_f32(src, out):
    for i in prange(src.size):
        out[i] = np.uint32(src[i]) << np.uint32(16)


@njit(cache=True, nogil=True, parallel=True)
def _f32_to_bf16(src, out):
    for i in prange(src.size):
        u = np.int64(src[i])
        if (u & 0x7FFFFFFF) > 0x7F800000:                  # NaN: keep it a (quiet) NaN
            out[i] = np.uint16((u >> 16) | 0x40)
        else:                                               # round to nearest, ties to even
            out[i] = np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@njit(cache=True, nogil=True, parallel=True)
def _f16_to_f32(src, out):
    for i in prange(src.size):
        h = np.int64(src[i])
        sign = (h & 0x8000) << 16
        e = (h >> 10) & 0x1F
        m = h & 0x3FF
        if e == 0x1F:                                       # inf / NaN (payload kept)
            r = sign | 0x7F800000 | (m << 13)
        elif e != 0:
            r = sign | ((e + 112) << 23) | (m << 13)
        elif m == 0:
            r = sign
        else:                                               # subnormal: normalize
            e = 113
            while (m & 0x400) == 0:
                m <<= 1
                e -= 1
            r = sign | (e << 23) | ((m & 0x3FF) << 13)
        out[i] = np.uint32(r)


@njit(cache=True, nogil=True, parallel=True)
def _f32_to_f16(xf, xu, out):
    for i in prange(xu.size):
        u = np.int64(xu[i])
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        if a >= 0x7F800000:
            r = 0x7C00 if a == 0x7F800000 else 0x7E00 | ((a >> 13) & 0x3FF)
        elif a >= 0x477FF000:                               # rounds past 65504
            r = 0x7C00
        elif a >= 0x38800000:                               # a normal half: rebias, round to nearest even
            m = a - 0x38000000
            r = (m + 0xFFF + ((m >> 13) & 1)) >> 13
        else:                                               # subnormal or zero: units of 2**-24, rounded
            r = np.int64(np.rint(np.abs(xf[i]) * np.float32(16777216.0)))
        out[i] = np.uint16(sign | r)


_BF16_TO_F32 = Adaptive(_bf16_to_f32)
_F32_TO_BF16 = Adaptive(_f32_to_bf16)
_F16_TO_F32 = Adaptive(_f16_to_f32)
_F32_TO_F16 = Adaptive(_f32_to_f16)


def _widen(a):
    """Return float16/bfloat16 array ``a`` as a new float32 array (exact)."""
    if not a.flags.c_contiguous:
        a = np.array(a, order="C")                     # (ascontiguousarray would make 0-d 1-d)
    out = np.empty(a.shape, _F32)
    if a.size:
        k = _F16_TO_F32 if a.dtype.kind == "f" else _BF16_TO_F32
        k(a.reshape(-1).view(_U16), out.reshape(-1).view(np.uint32))
    return out


def _narrow(a, dt):
    """Return float32 array ``a`` rounded to float16/bfloat16 ``dt`` (nearest, ties to even)."""
    if not a.flags.c_contiguous:
        a = np.array(a, order="C")                     # (ascontiguousarray would make 0-d 1-d)
    out = np.empty(a.shape, dt)
    if a.size:
        flat, o = a.reshape(-1), out.reshape(-1).view(_U16)
        if dt.kind == "f":
            _F32_TO_F16(flat, flat.view(np.uint32), o)
        else:
            _F32_TO_BF16(flat.view(np.uint32), o)
    return out


def convert(a, dtype):
    """Return NumPy array ``a`` converted to ``dtype``, through the kernels when a float16/bfloat16 is involved."""
    dt = np.dtype(dtype)
    src = a.dtype
    if is_lowp(dt):
        enable()
    if src == dt:
        return np.array(a, copy=True)
    if is_lowp(src):
        w = _widen(a)
        if dt == _F32:
            return w
        return _narrow(w, dt) if is_lowp(dt) else w.astype(dt)
    if is_lowp(dt) and src == _F32:
        return _narrow(a, dt)
    return a.astype(dt)            # float64, integers, bool: NumPy / ml_dtypes round once


# --------------------------------------------------------------------------------------------------------------
# The compute rule (installed into autodiff.core.apply by enable())
# --------------------------------------------------------------------------------------------------------------

#: primitives that act on low-precision arrays as they are: views and loop plumbing (a loop's body was
#: traced with the low-precision tensors, whose ops follow the rule inside the body). ``cast`` becomes
#: ``convert``; a view with index arrays (``getitem``) gathers in float32 like any other primitive.
NATIVE = frozenset({"scan", "while_loop", "tuple_get", "s2s_unpack", "identity",
                    "stop_gradient", "reshape", "transpose", "broadcast_to", "flip"})


def _convert_vjp(g, ans, ins, needs, dtype):
    src = ins[0].dtype
    if not is_floating(src):
        return (None,)
    return (g if g.dtype == src else _ad.apply(CONVERT, g, dtype=src),)


CONVERT = Primitive("convert", impl={"cpu": convert}, vjp=_convert_vjp)
no_cuda("float16 runs in the CUDA kernels as it is and bfloat16 is refused on the GPU (lowp.rule)", CONVERT)


def _target(arrays, params):
    """Return the dtype the float32 outputs round to, or None when they stay float32."""
    for v in params.values():
        if isinstance(v, np.dtype) and is_lowp(v):
            return v
    tgt = None
    for a in arrays:
        dt = getattr(a, "dtype", None)
        if dt is None or not is_floating(dt):
            continue
        if not is_lowp(dt) or (tgt is not None and dt != tgt):
            return None
        tgt = dt
    return tgt


def _derive(prim):
    """Return the row that runs ``prim`` in float32 on float16/bfloat16 arrays (built once per primitive)."""
    d = prim.extra.get("lowp")
    if d is not None:
        return d
    impl = prim.impl["cpu"]
    inplace = prim.extra.get("inplace", ())

    def run(*arrays, **params):
        tgt = _target(arrays, params)
        wide = [_widen(a) if isinstance(a, np.ndarray) and is_lowp(a.dtype) else a for a in arrays]
        if params and any(isinstance(v, np.dtype) and is_lowp(v) for v in params.values()):
            params = {k: (_F32 if isinstance(v, np.dtype) and is_lowp(v) else v) for k, v in params.items()}
        out = impl(*wide, **params)
        for i in inplace:
            if wide[i] is not arrays[i]:
                arrays[i][...] = _narrow(wide[i], arrays[i].dtype)
                if out is wide[i]:
                    out = arrays[i]
        return _round(out, tgt)

    d = object.__new__(Primitive)
    d.name = prim.name + ":f32"
    d.impl = {"cpu": run}
    d.vjp = prim.vjp
    d.template = None
    d.kind = "update" if prim.kind == "update" else "other"
    d.dtype_rule = d.shape_rule = None
    d.nondiff = prim.nondiff
    d.extra = {k: v for k, v in prim.extra.items() if k in ("inplace", "random", "indices", "any_device")}
    d.extra["lowp_of"] = prim
    prim.extra["lowp"] = d
    return d


def _round(out, tgt):
    if tgt is None:
        return out
    if isinstance(out, tuple):
        return type(out)(_round(o, tgt) for o in out)
    if isinstance(out, np.ndarray) and out.dtype == _F32:
        return _narrow(out, tgt)
    return out


def _lowp_param(params):
    for v in params.values():
        if isinstance(v, np.dtype) and is_lowp(v):
            return True
    return False


def rule(prim, inputs, params):
    """Return the primitive that ``apply`` runs: ``prim`` itself, or its float32 row for low-precision data."""
    for t in inputs:                          # the common case first: no input is float16/bfloat16
        dt = getattr(t._data, "dtype", None)
        if dt is not None and dt.itemsize == 2 and dt.kind in "fV":
            break
    else:
        if not params or not _lowp_param(params):
            return prim
    if prim.name in NATIVE or prim is CONVERT or "lowp_of" in prim.extra:
        return prim
    if prim.kind == "view" and len(inputs) < 2:          # basic indexing and other views: NumPy views
        return prim
    if prim.name == "to_device" or not all(isinstance(t._data, (np.ndarray, tuple)) for t in inputs):
        if any(is_bf16(getattr(t._data, "dtype", None)) for t in inputs):
            raise TypeError(f"{prim.name}: bfloat16 tensors live on the CPU (no GPU kernel reads them); "
                            "convert with .float() or .half() before moving to the GPU")
        return prim                        # float16 moves to a GPU, whose kernels compute it natively
    if prim.name == "cast":
        return CONVERT
    return _derive(prim)


def enable():
    """Install the compute rule into ``apply`` (called when a float16/bfloat16 dtype first appears)."""
    if _ad._LOWP is None:
        _ad._LOWP = rule
