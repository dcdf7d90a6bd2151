"""Array operations with NumPy names: one registry row per primitive, next to its public function.

Each primitive is defined by ``Primitive(name, impl=..., vjp=..., template=...)``:

* ``impl["cpu"]`` computes it on NumPy arrays with a kernel from ``kernels_cpu`` (or, for elementwise
  primitives, a kernel generated from ``template`` by ``kernelgen``);
* ``vjp(g, ans, inputs, needs, **params)`` returns one gradient per input (or None), written in jitnet ops so
  that it runs eagerly, traces into graphs and can be differentiated again. VJPs never undo broadcasting: the
  backward pass sums each gradient back to its input's shape in one place (``autodiff.core``).
"""
from __future__ import annotations

import builtins
import numbers

import numba
import numpy as np

from . import backends as _backends
from . import kernelgen
from . import bounds
from . import lowp as _lowp
from . import kernels_cpu as K
from . import tensor as _tensor
from .lazy import LazyModule
from .autodiff.core import Primitive, apply, current_interpreter
from .kernelgen import cast_template as _cast_template, collapse_dims as _collapse, template_expr as _expr
from .tensor import (Tensor, _infer_array, _normalize_dtype, bool_, float32, float64, int64)

# the CUDA backend's services and kernels, imported when a CUDA implementation first runs (never on the CPU)
_G = LazyModule("jitnet.backend_cuda")
_KG = LazyModule("jitnet.kernels_gpu")
_C = LazyModule("jitnet.cuda")

_isf = _lowp.is_floating        # floating dtype, bfloat16 included (NumPy gives it kind 'V')
_abs = builtins.abs
_min = builtins.min
_max = builtins.max
_sum = builtins.sum
_all = builtins.all
_any = builtins.any

# ==============================================================================================================
# Helpers: argument coercion and dtype promotion
# ==============================================================================================================

_SCALAR_CACHE: dict = {}


def _scalar_tensor(value, dtype):
    key = (type(value), value, dtype)
    t = _SCALAR_CACHE.get(key)
    if t is None:
        if len(_SCALAR_CACHE) > 4096:
            _SCALAR_CACHE.clear()
        t = Tensor._wrap(np.array(value, dtype=dtype))
        _SCALAR_CACHE[key] = t
    return t


def _weak_dtype(value, strong):
    """dtype for a Python scalar combined with tensors of dtype ``strong`` (scalars do not widen tensors)."""
    if isinstance(value, (bool, np.bool_)):
        return strong if strong is not None else bool_
    if isinstance(value, numbers.Integral):
        if strong is None or strong == bool_:
            return int64
        return strong
    if isinstance(value, numbers.Real):
        if strong is None or not _isf(strong):
            return float32
        return strong
    raise TypeError(f"unsupported operand type {type(value).__name__}")


def _coerce(*args):
    """Return the arguments as tensors; Python scalars take the dtype of the tensor operands."""
    strong = None
    for a in args:
        if isinstance(a, Tensor):
            strong = a.dtype if strong is None else _promote(strong, a.dtype)
    out = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (numbers.Number, np.bool_)) and not isinstance(a, np.ndarray):
            out.append(_scalar_tensor(a.item() if isinstance(a, np.generic) else a, _weak_dtype(a, strong)))
        else:
            out.append(Tensor._wrap(_infer_array(a)))
    return out


def _as_tensor(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


def _float_dtype(dt):
    return dt if _isf(dt) else float32


def _norm_axis(axis, ndim, op):
    if axis < -ndim or axis >= ndim:
        raise ValueError(f"{op}: axis {axis} is out of bounds for a tensor of {ndim} dimensions")
    return axis % _max(ndim, 1)


def _norm_axes(axis, ndim, op):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    axes = tuple(sorted({_norm_axis(int(a), ndim, op) for a in axis}))
    return axes


# ==============================================================================================================
# Elementwise execution: plans cached by (primitive, dtypes, shapes, strides)
# ==============================================================================================================

class _EwPlan:
    """How to run one elementwise kernel for one signature (dtypes, shapes, strides) of its operands."""

    __slots__ = ("oshape", "odtype", "flat", "serial", "parallel", "cshape", "cstrides", "size", "scalar",
                 "entry")

    def run(self, arrays):
        out = np.empty(self.oshape, self.odtype)
        if self.flat:
            ep = self.entry
            if ep is not None:
                try:
                    ep(*arrays, out)
                    return out
                except TypeError:         # an operand of another Numba type (read-only, a NumPy scalar)
                    pass
            k = self.parallel if self.size >= kernelgen.PARALLEL_THRESHOLD else self.serial
            k(*arrays, out)
            self.entry = kernelgen.entry_point(k, (*arrays, out))
            return out
        k = self.parallel if self.size >= kernelgen.PARALLEL_THRESHOLD else self.serial
        if self.flat:
            k(*arrays, out)
        else:
            as_strided = np.lib.stride_tricks.as_strided
            k(*[a if sc else as_strided(a, self.cshape, st)
                for a, sc, st in zip(arrays, self.scalar, self.cstrides)], out.reshape(self.cshape))
        return out


def _ew_build(prim, arrays, odtype, expr):
    shapes = [a.shape for a in arrays]
    try:
        oshape = np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"{prim.name}: operands could not be broadcast together with shapes "
                         + " and ".join(str(s) for s in shapes)) from None
    size = int(np.prod(oshape)) if oshape else 1
    p = _EwPlan()
    p.entry = None
    p.oshape, p.odtype, p.size = oshape, odtype, size
    p.scalar = tuple(a.size == 1 and size != 1 for a in arrays)
    p.flat = _all(sc or (a.shape == oshape and a.flags.c_contiguous) for a, sc in zip(arrays, p.scalar))
    if p.flat:
        rank = 0
    else:
        strides = []
        for a, sc in zip(arrays, p.scalar):
            if sc:
                strides.append((0,) * len(oshape))
                continue
            pad = len(oshape) - a.ndim
            strides.append(tuple([0] * pad + [0 if d == 1 else s for d, s in zip(a.shape, a.strides)]))
        isz = np.dtype(odtype).itemsize
        ostr = tuple(isz * int(np.prod(oshape[i + 1:])) for i in range(len(oshape)))
        cshape, cstr = _collapse(oshape, strides + [ostr])
        p.cshape, p.cstrides = cshape, cstr[:-1]
        rank = len(cshape)
    prog = kernelgen.ElementwiseProgram([(a.dtype, sc) for a, sc in zip(arrays, p.scalar)],
                                        [(expr, odtype)], [("t0", odtype)])
    p.serial, p.parallel = kernelgen.elementwise_kernels(prog, rank)
    return p


_EXPR_CACHE: dict = {}


def _ew_plan(prim, arrays, params, sig=None):
    """Return the cached plan for running elementwise ``prim`` on these arrays (built on first use)."""
    plans = prim.extra["plans"]
    if sig is None:
        sig = tuple([(a.dtype, a.shape, a.strides) for a in arrays])
        if params:
            sig += (tuple(params.items()),)
    p = plans.get(sig)
    if p is None:
        dts = tuple(a.dtype for a in arrays)
        cdt, odt = prim.dtype_rule(dts, params)
        tpl = prim.template(params) if callable(prim.template) else prim.template
        p = _ew_build(prim, arrays, odt, _expr(tpl, dts, cdt, odt))
        if len(plans) > 4096:
            plans.clear()
        plans[sig] = p
    return p


def _make_ew_impl(prim):
    """Build the CPU impl of an elementwise primitive from its template and dtype rule."""
    plans = prim.extra["plans"]

    def impl(*arrays, **params):
        if len(arrays) == 2 and not params:      # the hot path: a binary operator
            a, b = arrays
            sig = (a.dtype, a.shape, a.strides, b.dtype, b.shape, b.strides)
            p = plans.get(sig)
            if p is None:
                p = _ew_plan(prim, arrays, params, sig)
            ep = p.entry                         # (_EwPlan.run's first branch, inlined: ~0.1 us a call)
            if ep is not None:
                out = np.empty(p.oshape, p.odtype)
                try:
                    ep(a, b, out)
                    return out
                except TypeError:
                    pass
            return p.run(arrays)
        return _ew_plan(prim, arrays, params).run(arrays)
    return impl


def _promote(a, b):
    """Promote two dtypes; an integer or bool meeting a float takes the float's dtype (so ``int + 1.5`` is
    float32, as in PyTorch and JAX, where NumPy would widen to float64)."""
    if _isf(a) and not _isf(b):
        return a
    if _isf(b) and not _isf(a):
        return b
    return np.promote_types(a, b)


def _rule_arith(dts, params):
    d = dts[0]
    for x in dts[1:]:
        if x != d:
            d = _promote(d, x)
    return d, d


def _rule_float(dts, params):
    d, _ = _rule_arith(dts, params)
    d = _float_dtype(d)
    return d, d


def _rule_compare(dts, params):
    d = dts[0]
    for x in dts[1:]:
        if x != d:
            d = np.promote_types(d, x)        # compare exactly (int64 vs float in float64)
    return d, bool_


def _rule_logical(dts, params):
    return bool_, bool_


def _rule_cast(dts, params):
    return dts[0], params["dtype"]


def elementwise(name, template, rule, vjp=None, nondiff=False):
    """Register an elementwise primitive with a scalar ``template`` over {0}, {1}, ... ({T}: compute dtype)."""
    prim = Primitive(name, vjp=vjp, template=template, kind="elementwise", nondiff=nondiff or vjp is None)
    prim.dtype_rule = rule
    prim.extra["plans"] = {}
    prim.impl = {"cpu": _make_ew_impl(prim)}
    return prim


def _where_template(p):
    return "({1} if {0} else {2})"


# ==============================================================================================================
# Elementwise primitives
# ==============================================================================================================

def _zeros_grad(g, ans, ins, needs, **p):
    return tuple(None for _ in ins)


NEG = elementwise("negative", "-{0}", _rule_arith, lambda g, ans, ins, needs: (-g,))
ADD = elementwise("add", "{0} + {1}", _rule_arith, lambda g, ans, ins, needs: (g, g))
SUB = elementwise("subtract", "{0} - {1}", _rule_arith, lambda g, ans, ins, needs: (g, -g))
MUL = elementwise("multiply", "{0} * {1}", _rule_arith,
                  lambda g, ans, ins, needs: (g * ins[1] if needs[0] else None,
                                              g * ins[0] if needs[1] else None))
DIV = elementwise("divide", "{0} / {1}", _rule_float,
                  lambda g, ans, ins, needs: (g / ins[1] if needs[0] else None,
                                              -g * ans / ins[1] if needs[1] else None))


def _pow_vjp(g, ans, ins, needs):
    x, y = ins
    gx = g * y * power(x, y - 1) if needs[0] else None
    gy = g * ans * log(where(x > 0, x, ones_like(x))) if needs[1] else None
    return gx, gy


POW = elementwise("power", "{0} ** {1}", _rule_arith, _pow_vjp)
MAXIMUM = elementwise("maximum", "maximum_s({0}, {1})", _rule_arith,
                      lambda g, ans, ins, needs: (where(ins[0] >= ins[1], g, 0),
                                                  where(ins[0] >= ins[1], 0, g)))
MINIMUM = elementwise("minimum", "minimum_s({0}, {1})", _rule_arith,
                      lambda g, ans, ins, needs: (where(ins[0] <= ins[1], g, 0),
                                                  where(ins[0] <= ins[1], 0, g)))
EXP = elementwise("exp", "fexp({0})", _rule_float, lambda g, ans, ins, needs: (g * ans,))
LOG = elementwise("log", "math.log({0}) if {0} > 0 else ({T}(-np.inf) if {0} == 0 else {T}(np.nan))",
                  _rule_float, lambda g, ans, ins, needs: (g / ins[0],))
LOG1P = elementwise("log1p", "math.log1p({0}) if {0} > -1 else ({T}(-np.inf) if {0} == -1 else {T}(np.nan))",
                    _rule_float, lambda g, ans, ins, needs: (g / (ins[0] + 1),))
SQRT = elementwise("sqrt", "math.sqrt({0}) if {0} >= 0 else {T}(np.nan)", _rule_float,
                   lambda g, ans, ins, needs: (g / (ans * 2),))
ABS = elementwise("abs", "abs({0})", _rule_arith, lambda g, ans, ins, needs: (g * sign(ins[0]),))
SIGN = elementwise("sign", "sign_s({0}, {T}(0))", _rule_arith, None)
SQUARE = elementwise("square", "{0} * {0}", _rule_arith, lambda g, ans, ins, needs: (g * ins[0] * 2,))
RECIP = elementwise("reciprocal", "{T}(1) / {0}", _rule_float, lambda g, ans, ins, needs: (-g * ans * ans,))
SIN = elementwise("sin", "math.sin({0})", _rule_float, lambda g, ans, ins, needs: (g * cos(ins[0]),))
COS = elementwise("cos", "math.cos({0})", _rule_float, lambda g, ans, ins, needs: (-g * sin(ins[0]),))
TANH = elementwise("tanh", "tanh_v({0})", _rule_float, lambda g, ans, ins, needs: (g * (1 - ans * ans),))
SIGMOID = elementwise("sigmoid", "sigmoid_s({0}, {T}(1))", _rule_float,
                      lambda g, ans, ins, needs: (g * ans * (1 - ans),))
RELU = elementwise("relu", "{T}(0) if {0} <= {T}(0) else {0}", _rule_arith,
                   lambda g, ans, ins, needs: (where(ans > 0, g, 0),))  # ans: fuses with fwd; 0: a scalar
SOFTPLUS = elementwise("softplus", "softplus_s({0}, {T}(0))", _rule_float,
                       lambda g, ans, ins, needs: (g * sigmoid(ins[0]),))
FLOOR = elementwise("floor", "math.floor({0})", _rule_arith, None)
CEIL = elementwise("ceil", "math.ceil({0})", _rule_arith, None)
ISNAN = elementwise("isnan", "{0} != {0}", _rule_compare, None)
ISFINITE = elementwise("isfinite", "({0} - {0}) == 0", _rule_compare, None)
FLOORDIV = elementwise(
    "floor_divide", lambda p: "floordiv_s({0}, {1})", _rule_arith, None)
REMAINDER = elementwise("remainder", "fmod_s({0}, {1})", _rule_arith,
                        lambda g, ans, ins, needs: (g, -g * floor(ins[0] / ins[1]) if needs[1] else None))
IFLOORDIV = elementwise("ifloor_divide", "ifloordiv_s({0}, {1})", _rule_arith, None)
IREMAINDER = elementwise("iremainder", "imod_s({0}, {1})", _rule_arith, None)


def _clip_vjp(g, ans, ins, needs):
    x, lo, hi = ins
    z = 0                                   # a scalar operand: no array of zeros to allocate and read
    inside = logical_and(x >= lo, x <= hi)
    return (where(inside, g, z), where(x < lo, g, z) if needs[1] else None,
            where(x > hi, g, z) if needs[2] else None)


CLIP = elementwise("clip", "minimum_s(maximum_s({0}, {1}), {2})", _rule_arith, _clip_vjp)
WHERE = elementwise("where", "({1} if {0} else {2})",
                    lambda dts, p: (_promote(dts[1], dts[2]),) * 2,
                    lambda g, ans, ins, needs: (None, where(ins[0], g, 0), where(ins[0], 0, g)))

_CMP = {}
for _name, _sym in [("less", "<"), ("less_equal", "<="), ("greater", ">"), ("greater_equal", ">="),
                    ("equal", "=="), ("not_equal", "!=")]:
    _CMP[_name] = elementwise(_name, "{0} %s {1}" % _sym, _rule_compare, None)
LAND = elementwise("logical_and", "bool_({0}) and bool_({1})", _rule_logical, None)
LOR = elementwise("logical_or", "bool_({0}) or bool_({1})", _rule_logical, None)
LXOR = elementwise("logical_xor", "bool_({0}) != bool_({1})", _rule_logical, None)
LNOT = elementwise("logical_not", "not {0}", _rule_logical, None)
BAND = elementwise("bitwise_and", "{0} & {1}", _rule_arith, None)
BOR = elementwise("bitwise_or", "{0} | {1}", _rule_arith, None)
BXOR = elementwise("bitwise_xor", "{0} ^ {1}", _rule_arith, None)
BNOT = elementwise("bitwise_not", "~{0}", _rule_arith, None)


CAST = elementwise("cast", _cast_template, _rule_cast,
                   lambda g, ans, ins, needs, dtype: (g.astype(ins[0].dtype) if _isf(ins[0].dtype)
                                                      else None,))
COPY = elementwise("copy", "{0}", _rule_arith, lambda g, ans, ins, needs: (g,))


def _un(prim):
    def f(x):
        return apply(prim, x if isinstance(x, Tensor) else _as_tensor(x))
    f.__name__ = prim.name
    f.__doc__ = f"Return the elementwise {prim.name} of x."
    return f


def _bin(prim):
    def f(x, y):
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            return apply(prim, x, y)
        a, b = _coerce(x, y)
        return apply(prim, a, b)
    f.__name__ = prim.name
    f.__doc__ = f"Return the elementwise {prim.name} of x and y (broadcasting)."
    return f


negative = _un(NEG)
add = _bin(ADD)
subtract = _bin(SUB)
multiply = _bin(MUL)
divide = _bin(DIV)
true_divide = divide
maximum = _bin(MAXIMUM)
minimum = _bin(MINIMUM)
exp = _un(EXP)
log = _un(LOG)
log1p = _un(LOG1P)
sqrt = _un(SQRT)
abs = _un(ABS)  # noqa: A001
absolute = abs
sign = _un(SIGN)
square = _un(SQUARE)
reciprocal = _un(RECIP)
sin = _un(SIN)
cos = _un(COS)
tanh = _un(TANH)
sigmoid = _un(SIGMOID)
relu = _un(RELU)
softplus = _un(SOFTPLUS)
floor = _un(FLOOR)
ceil = _un(CEIL)
isnan = _un(ISNAN)
isfinite = _un(ISFINITE)
less = _bin(_CMP["less"])
less_equal = _bin(_CMP["less_equal"])
greater = _bin(_CMP["greater"])
greater_equal = _bin(_CMP["greater_equal"])
equal = _bin(_CMP["equal"])
not_equal = _bin(_CMP["not_equal"])
logical_and = _bin(LAND)
logical_or = _bin(LOR)
logical_xor = _bin(LXOR)
logical_not = _un(LNOT)


def power(x, y):
    """Return x ** y elementwise (broadcasting)."""
    a, b = _coerce(x, y)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        bv = b._data if current_interpreter() is None else None
        if isinstance(bv, np.ndarray) and (bv < 0).any():
            raise ValueError("power: integers to negative integer powers are not allowed")
    return apply(POW, a, b)


def floor_divide(x, y):
    """Return floor(x / y) elementwise (integer division for integer tensors)."""
    a, b = _coerce(x, y)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        return apply(IFLOORDIV, a, b)
    return apply(FLOORDIV, a, b)


def remainder(x, y):
    """Return x mod y elementwise with the sign of y (NumPy's remainder)."""
    a, b = _coerce(x, y)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        return apply(IREMAINDER, a, b)
    return apply(REMAINDER, a, b)


mod = remainder


def _logic_or_bit(lprim, bprim):
    def f(x, y):
        a, b = _coerce(x, y)
        if a.dtype == bool_ and b.dtype == bool_:
            return apply(lprim, a, b)
        if a.dtype.kind not in "iub" or b.dtype.kind not in "iub":
            raise TypeError(f"{bprim.name}: operands must be integer or bool tensors, got {a.dtype} and "
                            f"{b.dtype}")
        return apply(bprim, a, b)
    return f


logical_and_or_bitwise = _logic_or_bit(LAND, BAND)
logical_or_or_bitwise = _logic_or_bit(LOR, BOR)
logical_xor_or_bitwise = _logic_or_bit(LXOR, BXOR)


def logical_not_or_bitwise(x):
    """Return ~x: logical not for bool tensors, bitwise not for integers."""
    x = _as_tensor(x)
    if x.dtype == bool_:
        return apply(LNOT, x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"bitwise_not: operand must be an integer or bool tensor, got {x.dtype}")
    return apply(BNOT, x)


def clip(x, a_min=None, a_max=None):
    """Return x with values limited to [a_min, a_max] (either bound may be None)."""
    x = _as_tensor(x)
    if a_min is None and a_max is None:
        raise ValueError("clip: at least one of a_min and a_max must be given")
    if a_min is None:
        return minimum(x, a_max)
    if a_max is None:
        return maximum(x, a_min)
    a, lo, hi = _coerce(x, a_min, a_max)
    return apply(CLIP, a, lo, hi)


def where(condition, x=None, y=None):
    """Return elements of x where condition is true, else of y (broadcasting)."""
    if x is None and y is None:
        return nonzero(condition)
    c = _as_tensor(condition)
    a, b = _coerce(x, y)
    if c.dtype != bool_:
        c = c.astype(bool_)
    return apply(WHERE, c, a, b)


def astype(x, dtype):
    """Return x cast to ``dtype``."""
    x = _as_tensor(x)
    dt = _normalize_dtype(dtype)
    if dt == x.dtype:
        return x
    return apply(CAST, x, dtype=dt)


def copy(x):
    """Return a new contiguous copy of x."""
    return apply(COPY, _as_tensor(x))


def _contiguous(a):
    """Return a C-contiguous version of array ``a`` (copied by the generated copy kernel if needed)."""
    if a.flags.c_contiguous:
        return a
    if _lowp.is_lowp(a.dtype):                   # views of float16/bfloat16 data: NumPy copies them
        return np.array(a, order="C")
    return COPY.impl["cpu"](a)


# ==============================================================================================================
# Views: identity, reshape, transpose, broadcast_to, flip, stop_gradient
# ==============================================================================================================

IDENTITY = Primitive("identity", impl={"cpu": lambda x: x, "cuda": lambda x: x}, kind="view",
                     vjp=lambda g, ans, ins, needs: (g,))
STOP_GRADIENT = Primitive("stop_gradient", impl={"cpu": lambda x: x, "cuda": lambda x: x}, kind="view",
                          nondiff=True)


def identity(x):
    """Return x through a new tape node (shares the data)."""
    return apply(IDENTITY, _as_tensor(x))


def stop_gradient(x):
    """Return x with no gradient flowing back through it."""
    return apply(STOP_GRADIENT, _as_tensor(x))


def _reshape_impl(x, shape):
    if x.flags.c_contiguous:
        return x.reshape(shape)
    return _contiguous(x).reshape(shape)


def _reshape_cuda(x, shape):
    return _G.reshape(x, shape)


RESHAPE = Primitive("reshape", impl={"cpu": _reshape_impl, "cuda": _reshape_cuda}, kind="view",
                    vjp=lambda g, ans, ins, needs, shape: (reshape(g, ins[0].shape),))


def _resolve_shape(shape, size, op="reshape", src=None):
    shape = tuple(int(s) for s in shape)
    neg = [i for i, s in enumerate(shape) if s == -1]
    if len(neg) > 1:
        raise ValueError(f"{op}: can only specify one unknown dimension (-1), got {shape}")
    known = 1
    for s in shape:
        if s != -1:
            if s < 0:
                raise ValueError(f"{op}: negative dimension {s} in {shape}")
            known *= s
    if neg:
        if known == 0 or size % known:
            raise ValueError(f"{op}: cannot reshape tensor of shape {src} (size {size}) into shape {shape}")
        shape = tuple(size // known if s == -1 else s for s in shape)
    elif known != size:
        raise ValueError(f"{op}: cannot reshape tensor of shape {src} (size {size}) into shape {shape}")
    return shape


def reshape(x, *shape):
    """Return x with a new shape (one dimension may be -1)."""
    x = _as_tensor(x)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    shape = _resolve_shape(shape, x.size, "reshape", x.shape)
    if shape == x.shape:
        return x
    return apply(RESHAPE, x, shape=shape)


def flatten(x, start_axis=0, end_axis=-1):
    """Return x with axes start_axis..end_axis merged into one (all axes by default)."""
    x = _as_tensor(x)
    if x.ndim == 0:
        return reshape(x, (1,))
    s = _norm_axis(start_axis, x.ndim, "flatten")
    e = _norm_axis(end_axis, x.ndim, "flatten")
    shp = x.shape[:s] + (-1,) + x.shape[e + 1:]
    return reshape(x, shp)


def _inv_perm(p):
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return tuple(inv)


def _transpose_cuda(x, axes):
    return _G.transpose_view(x, axes)


TRANSPOSE = Primitive("transpose", impl={"cpu": lambda x, axes: x.transpose(axes), "cuda": _transpose_cuda}, kind="view",
                      vjp=lambda g, ans, ins, needs, axes: (transpose(g, _inv_perm(axes)),))


def transpose(x, axes=None, *more):
    """Return x with its axes permuted (reversed when axes is None)."""
    x = _as_tensor(x)
    if more:
        axes = (axes,) + more
    if axes is None:
        axes = tuple(range(x.ndim))[::-1]
    if _any(not -x.ndim <= int(a) < _max(x.ndim, 1) for a in axes):
        raise ValueError(f"transpose: axes {tuple(axes)} are out of range for {x.ndim} dimensions")
    axes = tuple(int(a) % _max(x.ndim, 1) for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of {x.ndim} dimensions")
    if axes == tuple(range(x.ndim)):
        return x
    return apply(TRANSPOSE, x, axes=axes)


def swapaxes(x, a1, a2):
    """Return x with axes a1 and a2 exchanged."""
    x = _as_tensor(x)
    p = list(range(x.ndim))
    a1, a2 = _norm_axis(a1, x.ndim, "swapaxes"), _norm_axis(a2, x.ndim, "swapaxes")
    p[a1], p[a2] = p[a2], p[a1]
    return transpose(x, tuple(p))


def moveaxis(x, source, destination):
    """Return x with axis ``source`` moved to position ``destination``."""
    x = _as_tensor(x)
    s = _norm_axis(source, x.ndim, "moveaxis")
    d = _norm_axis(destination, x.ndim, "moveaxis")
    p = [i for i in range(x.ndim) if i != s]
    p.insert(d, s)
    return transpose(x, tuple(p))


def _broadcast_cuda(x, shape):
    return _G.broadcast_view(x, shape)


BROADCAST_TO = Primitive("broadcast_to", impl={"cpu": lambda x, shape: np.broadcast_to(x, shape), "cuda": _broadcast_cuda}, kind="view",
                         vjp=lambda g, ans, ins, needs, shape: (g,))


def broadcast_to(x, shape):
    """Return a read-only view of x broadcast to ``shape``."""
    x = _as_tensor(x)
    shape = tuple(int(s) for s in shape)
    try:
        np.broadcast_shapes(x.shape, shape)
        if np.broadcast_shapes(x.shape, shape) != shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"broadcast_to: cannot broadcast shape {x.shape} to {shape}") from None
    if shape == x.shape:
        return x
    return apply(BROADCAST_TO, x, shape=shape)


def broadcast_shapes(*shapes):
    """Return the broadcast shape of the given shapes."""
    return np.broadcast_shapes(*shapes)


def sum_to(x, shape):
    """Return x summed over broadcast dimensions so that it has ``shape`` (undoes broadcasting)."""
    x = _as_tensor(x)
    shape = tuple(shape)
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and x.shape[i + lead] != 1)
    r = sum(x, axis=axes, keepdims=True) if axes else x
    if lead:
        r = reshape(r, shape)
    elif r.shape != shape:
        r = reshape(r, shape)
    return r


def _probe_cuda(shape, strides, itemsize, idx):
    """Return (shape, strides, byte offset) of NumPy basic indexing ``idx`` on a layout (no data touched)."""
    probe = np.lib.stride_tricks.as_strided(np.zeros(1, np.dtype((np.void, itemsize))), tuple(shape),
                                            tuple(strides))
    idx2 = idx if builtins.any(v is Ellipsis for v in idx) else tuple(idx) + (Ellipsis,)
    r = probe[idx2]
    off = r.__array_interface__["data"][0] - probe.__array_interface__["data"][0]
    return tuple(r.shape), tuple(r.strides), off


def _extent_flat_cuda(x):
    """Return a 1-D view of every element x spans, from its first element (strides must be >= 0)."""
    isz = x.dtype.itemsize
    ext = 1 + builtins.sum((s - 1) * st for s, st in zip(x.shape, x.strides)) // isz
    return _C.view(x, (ext,), (isz,), 0)


def _gather_view_cuda(x, shape, strides, off):
    """Return a contiguous copy of the view (shape, byte strides of any sign, byte offset) of x's memory."""
    out = _C.empty(shape, x.dtype)
    n = out.size
    if n:
        isz = x.dtype.itemsize
        sh = tuple(shape) or (1,)
        st = tuple(s // isz for s in strides) or (0,)
        _G.launch(_KG.gather_strided, n, _extent_flat_cuda(x), off // isz, sh, st, _G.flat_view(out))
    return out


def _basic_getitem_cuda(x, idx):
    try:
        shape, strides, off = _probe_cuda(x.shape, x.strides, x.dtype.itemsize, idx)
    except IndexError as e:
        raise IndexError(f"getitem: {e} (tensor shape {tuple(x.shape)})") from None
    if _G.shape_size(shape) == 0:
        return _C.empty(shape, x.dtype)
    if builtins.all(s >= 0 for s in strides):
        return _C.view(x, shape, strides, off)
    return _gather_view_cuda(x, shape, strides, off)


def _flip_cuda(x, axes):
    idx = tuple(slice(None, None, -1) if i in axes else slice(None) for i in range(x.ndim))
    return _basic_getitem_cuda(x, idx)


FLIP = Primitive("flip", impl={"cpu": lambda x, axes: x[tuple(slice(None, None, -1) if i in axes else slice(None)
                                                          for i in range(x.ndim))], "cuda": _flip_cuda},
                 kind="view", vjp=lambda g, ans, ins, needs, axes: (flip(g, axes),))


def flip(x, axis=None):
    """Return x with the order of elements reversed along ``axis`` (all axes when None)."""
    x = _as_tensor(x)
    axes = _norm_axes(axis, x.ndim, "flip")
    return apply(FLIP, x, axes=axes)


def expand_dims(x, axis):
    """Return x with a new axis of length 1 inserted at ``axis``."""
    x = _as_tensor(x)
    axes = (int(axis),) if isinstance(axis, (int, np.integer)) else tuple(int(a) for a in axis)
    nd = x.ndim + len(axes)
    axes = sorted(a % nd for a in axes)
    shp = list(x.shape)
    for a in axes:
        shp.insert(a, 1)
    return reshape(x, tuple(shp))


def squeeze(x, axis=None):
    """Return x without axes of length 1 (only ``axis`` when given)."""
    x = _as_tensor(x)
    if axis is None:
        shp = tuple(s for s in x.shape if s != 1)
    else:
        axes = _norm_axes(axis, x.ndim, "squeeze")
        for a in axes:
            if x.shape[a] != 1:
                raise ValueError(f"squeeze: cannot squeeze axis {a} of size {x.shape[a]} (shape {x.shape})")
        shp = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    return reshape(x, shp)


def atleast_2d(x):
    """Return x viewed with at least two dimensions."""
    x = _as_tensor(x)
    return reshape(x, (1,) * (2 - x.ndim) + x.shape) if x.ndim < 2 else x


# ==============================================================================================================
# Reductions
# ==============================================================================================================

_RED_CODE = {"sum": 0, "prod": 1, "max": 2, "min": 3}


def _to_rows(x, axes):
    """Return (2-D array, reduce_first) with the reduced axes either last (rows) or first (columns)."""
    nd = x.ndim
    kept = [i for i in range(nd) if i not in axes]
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    m = int(np.prod([x.shape[a] for a in kept])) if kept else 1
    if x.flags.c_contiguous:
        if list(axes) == list(range(nd - len(axes), nd)):
            return x.reshape(m, n), False
        if list(axes) == list(range(len(axes))):
            return x.reshape(n, m), True
    xt = _contiguous(x.transpose(kept + list(axes)))
    return xt.reshape(m, n), False


def _middle_split(shape, axes):
    """(A, M, B) when the reduced axes are a leading and a trailing block around the kept ones, else None."""
    nd = len(shape)
    kept = [i for i in range(nd) if i not in axes]
    if not kept or not axes or kept != list(range(kept[0], kept[-1] + 1)) or kept[0] == 0 or kept[-1] == nd - 1:
        return None
    prod = lambda dims: int(np.prod([shape[i] for i in dims])) if dims else 1  # noqa: E731
    return prod(range(kept[0])), prod(kept), prod(range(kept[-1] + 1, nd))


#: float sums over the leading axis of at most this many elements run in NumPy, whose row-by-row accumulation
#: is ``reduce_first``'s bit for bit: a cold start's first steps (a small network's bias gradients) compile no
#: reduction kernel (0.31 s). Native drivers call the kernel.
_NUMPY_SUM_MAX = 1 << 16


def _numpy_sum(op, dtype, size):
    """Whether a reduction over leading axes of a C-contiguous array runs in NumPy (``_NUMPY_SUM_MAX``)."""
    return op == "sum" and dtype in (float32, float64) and size <= _NUMPY_SUM_MAX


def _reduce_impl(x, op, axes, keepdims):
    code = _RED_CODE[op]
    odt = x.dtype
    if op in ("sum", "prod") and x.dtype.kind in "biu":
        odt = int64
    elif op in ("max", "min") and x.dtype == bool_:
        odt = bool_
    if x.dtype != odt or x.dtype == bool_:
        x = CAST.impl["cpu"](x, dtype=odt if odt != bool_ else np.dtype(np.uint8))
    oshape_keep = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
    oshape = oshape_keep if keepdims else tuple(s for i, s in enumerate(x.shape) if i not in axes)
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    if n == 0:
        if op in ("max", "min"):
            raise ValueError(f"{op}: zero-size reduction over axes {axes} of shape {x.shape} has no identity")
        return np.full(oshape, 0 if op == "sum" else 1, dtype=odt)
    if x.size == 0:
        return np.empty(oshape, dtype=odt)
    mid = _middle_split(x.shape, axes) if x.flags.c_contiguous else None
    if mid is not None:                      # kept axes in the middle: reduce in place, no transposed copy
        out = np.empty(mid[1], dtype=x.dtype)
        (K.reduce_middle_par if x.size >= kernelgen.PARALLEL_THRESHOLD else K.reduce_middle)(
            x.reshape(mid), out, code)
        out = out.reshape(oshape)
        return out.astype(bool_) if odt == bool_ else out
    x2, first = _to_rows(x, axes)
    if first:
        out = np.empty(x2.shape[1], dtype=x2.dtype)
        if _numpy_sum(op, x2.dtype, x2.size) and x2.flags.c_contiguous:
            np.add.reduce(x2, axis=0, out=out)
        elif x2.size >= kernelgen.PARALLEL_THRESHOLD and x2.shape[0] >= 4 * numba.get_num_threads():
            K.reduce_first_par(x2, out, code, int(numba.get_num_threads()))
        else:
            K.reduce_first(x2, out, code)
    else:
        out = np.empty(x2.shape[0], dtype=x2.dtype)
        (K.reduce_last_par if x2.size >= kernelgen.PARALLEL_THRESHOLD else K.reduce_last)(x2, out, code)
    out = out.reshape(oshape)
    if odt == bool_:
        out = out.astype(bool_)
    return out


def _keep_shape(shape, axes):
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def _reduce_vjp(g, ans, ins, needs, op, axes, keepdims):
    x = ins[0]
    ks = _keep_shape(x.shape, axes)
    gk = reshape(g, ks)
    if op == "sum":
        return (broadcast_to(gk, x.shape),)
    if op == "prod":
        # prod of the others, without dividing by x (exact where x has zeros): exclusive cumprods both ways
        kept = [i for i in range(x.ndim) if i not in axes]
        perm = tuple(kept + list(axes))
        xt = transpose(x, perm)
        n = int(np.prod([x.shape[a] for a in axes]))
        xf = reshape(xt, tuple(x.shape[i] for i in kept) + (n,))
        others = cumprod(xf, -1, exclusive=True) * cumprod(xf, -1, exclusive=True, reverse=True)
        return (transpose(reshape(others, xt.shape), _inv_perm(perm)) * gk,)
    ak = reshape(ans, ks)
    mask = (x == ak).astype(x.dtype)
    count = sum(mask, axis=axes, keepdims=True)
    return (mask * (gk / count),)


# CUDA: rows reduced one block per (row, chunk) then a second pass; leading axes one thread per column

def _reduce_identity_cuda(code, dtype):
    dtype = np.dtype(dtype)
    if code == 0:
        return dtype.type(0)
    if code == 1:
        return dtype.type(1)
    if dtype.kind == "f":
        return dtype.type(-np.inf if code == 2 else np.inf)
    info = np.iinfo(dtype)
    return dtype.type(info.min if code == 2 else info.max)


def _rows_view_cuda(x, axes):
    """Return (2-D array, reduce_first) with the reduced axes last (rows) or first (columns)."""
    nd = x.ndim
    kept = [i for i in range(nd) if i not in axes]
    n = _G.shape_size(x.shape[a] for a in axes)
    m = _G.shape_size(x.shape[a] for a in kept)
    if _C.is_contiguous(x):
        if list(axes) == list(range(nd - len(axes), nd)):
            return _C.reshape(x, (m, n)), False
        if list(axes) == list(range(len(axes))):
            return _C.reshape(x, (n, m)), True
    xt = _G.contiguous(_G.transpose_view(x, kept + list(axes)))
    return _C.reshape(xt, (m, n)), False


def _reduce_rows_cuda(x2, code):
    """Return the reduction (code) of each row of contiguous 2-D x2: shape (rows,)."""
    ident = _reduce_identity_cuda(code, x2.dtype)
    while True:
        m, n = x2.shape
        nch = _max(1, -(-n // _KG.ROW_CHUNK))
        part = _C.empty((m, nch), x2.dtype)
        _G.launch_rows(_KG.reduce_rows, m * nch, x2, part, np.int64(code), ident, np.int64(_KG.ROW_CHUNK))
        if nch == 1:
            return _C.reshape(part, (m,))
        x2 = part


def _reduce_cols_cuda(x2, code):
    """Return the reduction (code) of each column of 2-D x2 (n, m): shape (m,)."""
    ident = _reduce_identity_cuda(code, x2.dtype)
    while True:
        n, m = x2.shape
        nch = _max(1, -(-n // _KG.COL_CHUNK))
        part = _C.empty((nch, m), x2.dtype)
        _G.launch(_KG.reduce_cols, nch * m, x2, part, np.int64(code), ident, np.int64(_KG.COL_CHUNK))
        if nch == 1:
            return _C.reshape(part, (m,))
        x2 = part


def _reduce_cuda(x, op, axes, keepdims):
    code = _RED_CODE[op]
    odt = x.dtype
    if op in ("sum", "prod") and x.dtype.kind in "biu":
        odt = int64
    elif op in ("max", "min") and x.dtype == bool_:
        odt = bool_
    work = np.dtype(np.uint8) if odt == bool_ else odt
    if x.dtype != work:
        x = _G.cast(x, work) if x.dtype != bool_ else _G.run_primitive("cast", x, dtype=work)
    oshape_keep = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
    oshape = oshape_keep if keepdims else tuple(s for i, s in enumerate(x.shape) if i not in axes)
    n = _G.shape_size(x.shape[a] for a in axes)
    if n == 0:
        if op in ("max", "min"):
            raise ValueError(f"{op}: zero-size reduction over axes {axes} of shape {tuple(x.shape)} has no identity")
        return _G.full(oshape, 0 if op == "sum" else 1, odt)
    if x.size == 0:
        return _C.empty(oshape, odt)
    x2, first = _rows_view_cuda(x, axes)
    out = _reduce_cols_cuda(x2, code) if first else _reduce_rows_cuda(x2, code)
    out = _C.reshape(out, oshape)
    if odt == bool_:
        out = _G.cast(out, bool_)
    return out


REDUCE = Primitive("reduce", impl={"cpu": _reduce_impl, "cuda": _reduce_cuda}, vjp=_reduce_vjp, kind="reduce")


# Under jit: a plan step specialized to the node's static shapes (``extra["specialize"]``), and the source a
# native driver runs (``extra["native"]``); both decline (None) for layouts they do not cover.

def _reduce_specialize(ins, params, out):
    (x,) = ins
    op, axes = params["op"], params["axes"]
    if x.dtype not in (float32, float64) or out.dtype != x.dtype or not axes or x.size == 0:
        return None
    nd = len(x.shape)
    code = _RED_CODE[op]
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
    mid = _middle_split(tuple(x.shape), axes)
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
        if _numpy_sum(op, x.dtype, x.size):          # as _reduce_impl: the same bits eagerly and in a plan
            def fn(a, o):
                if not a.flags.c_contiguous:
                    return False
                np.add.reduce(a.reshape(n, m), axis=0, out=o.reshape(m))
                return True
        elif par and n >= 4 * nthreads:
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


def _reduce_native(n, a, o, kernels):
    (x,) = n.inputs
    op, axes = n.params["op"], tuple(n.params["axes"])
    if x.dtype not in (float32, float64) or n.out.dtype != x.dtype or not axes or x.size == 0:
        return None
    nd = len(x.shape)
    code = _RED_CODE[op]
    cnt = int(np.prod([x.shape[i] for i in axes]))
    m = x.size // cnt
    dt = kernelgen.dtype_source(x.dtype)
    lines = [f"_c = np.ascontiguousarray({a[0]})", f"_r = np.empty(({m},), {dt})"]
    if axes == tuple(range(nd - len(axes), nd)):
        lines.append(f"K.reduce_last(_c.reshape(({m}, {cnt})), _r, {kernelgen.flag_source(code)})")
    elif axes == tuple(range(len(axes))):
        lines.append(f"K.reduce_first(_c.reshape(({cnt}, {m})), _r, {kernelgen.flag_source(code)})")
    elif (mid := _middle_split(tuple(x.shape), axes)) is not None:
        kname = "reduce_middle_par" if x.size >= kernelgen.PARALLEL_THRESHOLD else "reduce_middle"
        lines.append(f"K.{kname}(_c.reshape({kernelgen.shape_source(mid)}), _r, {kernelgen.flag_source(code)})")
    else:
        return None
    lines.append(f"{o} = _r.reshape({kernelgen.shape_source(n.out.shape)})")
    return lines


REDUCE.extra["specialize"] = _reduce_specialize
REDUCE.extra["native"] = _reduce_native



def _reduce(x, op, axis, keepdims):
    x = _as_tensor(x)
    axes = _norm_axes(axis, x.ndim, op)
    if not axes and x.ndim > 0:
        return x if op in ("max", "min") or _isf(x.dtype) else astype(x, int64)
    return apply(REDUCE, x, op=op, axes=axes, keepdims=bool(keepdims))


def sum(x, axis=None, keepdims=False):  # noqa: A001
    """Return the sum over ``axis`` (all axes when None)."""
    return _reduce(x, "sum", axis, keepdims)


def prod(x, axis=None, keepdims=False):
    """Return the product over ``axis``."""
    return _reduce(x, "prod", axis, keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    """Return the maximum over ``axis`` (the gradient is shared among ties)."""
    return _reduce(x, "max", axis, keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    """Return the minimum over ``axis``."""
    return _reduce(x, "min", axis, keepdims)


amax, amin = max, min


def mean(x, axis=None, keepdims=False):
    """Return the arithmetic mean over ``axis``."""
    x = _as_tensor(x)
    if not _isf(x.dtype):
        x = astype(x, float32)
    axes = _norm_axes(axis, x.ndim, "mean")
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    return sum(x, axes, keepdims) * (1.0 / n if n else float("nan"))


def var(x, axis=None, keepdims=False, ddof=0):
    """Return the variance over ``axis`` (``ddof`` as in NumPy)."""
    x = _as_tensor(x)
    if not _isf(x.dtype):
        x = astype(x, float32)
    axes = _norm_axes(axis, x.ndim, "var")
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    d = x - mean(x, axes, keepdims=True)
    return sum(d * d, axes, keepdims) * (1.0 / _max(n - ddof, 0) if n - ddof > 0 else float("nan"))


def std(x, axis=None, keepdims=False, ddof=0):
    """Return the standard deviation over ``axis``."""
    return sqrt(var(x, axis, keepdims, ddof))


def norm(x, axis=None, keepdims=False):
    """Return the Euclidean (L2) norm over ``axis``."""
    return sqrt(sum(square(x), axis, keepdims))


def all(x, axis=None, keepdims=False):  # noqa: A001
    """Return True where every element over ``axis`` is true."""
    x = _as_tensor(x)
    if x.dtype != bool_:
        x = astype(x, bool_)
    return _reduce(x, "min", axis, keepdims)


def any(x, axis=None, keepdims=False):  # noqa: A001
    """Return True where some element over ``axis`` is true."""
    x = _as_tensor(x)
    if x.dtype != bool_:
        x = astype(x, bool_)
    return _reduce(x, "max", axis, keepdims)


def _last_axis_rows(x, axis):
    """Return (2-D contiguous rows array, moved shape) with ``axis`` moved last."""
    nd = x.ndim
    if axis != nd - 1:
        perm = [i for i in range(nd) if i != axis] + [axis]
        x = x.transpose(perm)
    xc = _contiguous(x)
    n = x.shape[-1] if nd else 1
    return xc.reshape(int(np.prod(x.shape[:-1])) if nd else 1, n), x.shape   # (not -1: n may be 0)


def _restore_axis(arr, moved_shape, axis, nd):
    arr = arr.reshape(moved_shape)
    if axis != nd - 1:
        perm = list(range(nd - 1))
        perm.insert(axis, nd - 1)
        arr = arr.transpose(perm)
    return arr


def _logsumexp_impl(x, axis, keepdims):
    if x.shape[axis] == 0:
        raise ValueError(f"logsumexp: zero-size axis {axis} of shape {x.shape}")
    rows, mshape = _last_axis_rows(x, axis)
    out = np.empty(rows.shape[0], x.dtype)
    K.logsumexp_last(rows, out)
    shp = tuple(1 if i == axis else s for i, s in enumerate(x.shape))
    out = out.reshape(shp)
    return out if keepdims else out.reshape(tuple(s for i, s in enumerate(x.shape) if i != axis))


def _logsumexp_vjp(g, ans, ins, needs, axis, keepdims):
    x = ins[0]
    ks = _keep_shape(x.shape, (axis,))
    return (reshape(g, ks) * exp(x - reshape(ans, ks)),)


def _logsumexp_cuda(x, axis, keepdims):
    if x.shape[axis] == 0:
        raise ValueError(f"logsumexp: zero-size axis {axis} of shape {tuple(x.shape)}")
    rows, _ = _G.last_axis_rows(x, axis)
    m, n = rows.shape
    out = _C.empty((m,), x.dtype)
    if n <= _KG.SMALL_ROW:
        _G.launch(_KG.logsumexp_rows_small, m, rows, out)
    else:
        _G.launch_rows(_KG.logsumexp_rows, m, rows, out)
    shp = tuple(1 if i == axis else s for i, s in enumerate(x.shape))
    if not keepdims:
        shp = tuple(s for i, s in enumerate(x.shape) if i != axis)
    return _C.reshape(out, shp)


LOGSUMEXP = Primitive("logsumexp", impl={"cpu": _logsumexp_impl, "cuda": _logsumexp_cuda}, vjp=_logsumexp_vjp, kind="reduce")


def logsumexp(x, axis=-1, keepdims=False):
    """Return log(sum(exp(x))) over ``axis`` (one stable kernel; several axes are reduced in turn)."""
    x = _as_tensor(x)
    if not _isf(x.dtype):
        x = astype(x, float32)
    if axis is None or isinstance(axis, (tuple, list)):
        axes = _norm_axes(axis, x.ndim, "logsumexp")
        if len(axes) != 1:
            m = stop_gradient(max(x, axes, keepdims=True))
            r = log(sum(exp(x - m), axes, keepdims=True)) + m
            return r if keepdims else squeeze(r, axes) if axes else r
        axis = axes[0]
    return apply(LOGSUMEXP, x, axis=_norm_axis(axis, x.ndim, "logsumexp"), keepdims=bool(keepdims))


def _arg_impl(x, axis, is_max, keepdims):
    if axis is None:
        rows = _contiguous(x).reshape(1, -1)
        oshape = (1,) * x.ndim if keepdims else ()
    else:
        rows, _ = _last_axis_rows(x, axis)
        oshape = tuple(1 if i == axis else s for i, s in enumerate(x.shape)) if keepdims else \
            tuple(s for i, s in enumerate(x.shape) if i != axis)
    if rows.shape[1] == 0:
        raise ValueError(f"{'argmax' if is_max else 'argmin'}: attempt to get the index of an empty sequence")
    if rows.dtype == bool_:
        rows = rows.astype(np.uint8)
    out = np.empty(rows.shape[0], int64)
    K.arg_reduce_last(rows, out, is_max)
    return out.reshape(oshape)


def _arg_cuda(x, axis, is_max, keepdims):
    if axis is None:
        rows = _C.reshape(_G.contiguous(x), (1, x.size))
        oshape = (1,) * x.ndim if keepdims else ()
    else:
        rows, _ = _G.last_axis_rows(x, axis)
        oshape = tuple(1 if i == axis else s for i, s in enumerate(x.shape)) if keepdims else \
            tuple(s for i, s in enumerate(x.shape) if i != axis)
    if rows.shape[1] == 0:
        raise ValueError(f"{'argmax' if is_max else 'argmin'}: attempt to get the index of an empty sequence")
    if rows.dtype == bool_:
        rows = _G.run_primitive("cast", rows, dtype=np.dtype(np.uint8))
    m, n = rows.shape
    out = _C.empty((m,), int64)
    if n <= _KG.SMALL_ROW:
        _G.launch(_KG.argreduce_rows_small, m, rows, out, bool(is_max))
    else:
        _G.launch_rows(_KG.argreduce_rows, m, rows, out, bool(is_max))
    return _C.reshape(out, oshape)


ARG = Primitive("argreduce", impl={"cpu": _arg_impl, "cuda": _arg_cuda}, nondiff=True, kind="reduce")


def argmax(x, axis=None, keepdims=False):
    """Return the int64 indices of the maxima along ``axis`` (of the flattened tensor when None)."""
    x = _as_tensor(x)
    ax = None if axis is None else _norm_axis(axis, x.ndim, "argmax")
    return apply(ARG, x, axis=ax, is_max=True, keepdims=bool(keepdims))


def argmin(x, axis=None, keepdims=False):
    """Return the int64 indices of the minima along ``axis``."""
    x = _as_tensor(x)
    ax = None if axis is None else _norm_axis(axis, x.ndim, "argmin")
    return apply(ARG, x, axis=ax, is_max=False, keepdims=bool(keepdims))


def _cum_impl(x, axis, op, exclusive, reverse):
    odt = int64 if x.dtype.kind in "biu" else x.dtype
    if x.dtype != odt:
        x = CAST.impl["cpu"](x, dtype=odt)
    x = _contiguous(x)
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    x3 = x.reshape(outer, x.shape[axis], inner)
    out = np.empty_like(x3)
    K.cumulative(x3, out, 0 if op == "sum" else 1, bool(exclusive), bool(reverse))
    return out.reshape(x.shape)


def _cum_vjp(g, ans, ins, needs, axis, op, exclusive, reverse):
    x = ins[0]
    if op == "sum":
        return (cumsum(g, axis, exclusive=exclusive, reverse=not reverse),)
    # d out_j / d x_i = prod_{k in scan(j), k != i} x_k. Where x_i != 0 that is out_j / x_i. Where x_i == 0 it
    # is zero unless x_i is the first zero of the scan, whose products skip it: recompute them with it set to 1
    # (zeros after the first still zero every product that contains them, so their gradient comes out 0).
    zero = equal(x, 0)
    safe = where(zero, 1, x)
    first = logical_and(zero, equal(cumsum(zero, axis, reverse=reverse), 1))
    skip = cumprod(where(first, 1, x), axis, exclusive=exclusive, reverse=reverse)
    at_zero = cumsum(g * skip, axis, exclusive=exclusive, reverse=not reverse)
    return (where(zero, at_zero, cumsum(g * ans, axis, exclusive=exclusive, reverse=not reverse) / safe),)


def _cum_cuda(x, axis, op, exclusive, reverse):
    odt = int64 if x.dtype.kind in "biu" else x.dtype
    if x.dtype != odt:
        x = _G.cast(x, odt)
    x = _G.contiguous(x)
    outer = _G.shape_size(tuple(x.shape)[:axis])
    inner = _G.shape_size(tuple(x.shape)[axis + 1:])
    x3 = _C.reshape(x, (outer, x.shape[axis], inner))
    out = _C.empty(x3.shape, odt)
    if out.size:
        _G.launch(_KG.cumulative_lines, outer * inner, x3, out, np.int64(0 if op == "sum" else 1), bool(exclusive),
                bool(reverse), odt.type(0 if op == "sum" else 1))
    return _C.reshape(out, x.shape)


CUMULATIVE = Primitive("cumulative", impl={"cpu": _cum_impl, "cuda": _cum_cuda}, vjp=_cum_vjp)


def cumsum(x, axis=0, exclusive=False, reverse=False):
    """Return the cumulative sum along ``axis`` (``exclusive`` and ``reverse`` as in TensorFlow)."""
    x = _as_tensor(x)
    if x.ndim == 0:
        x = reshape(x, (1,))
    return apply(CUMULATIVE, x, axis=_norm_axis(axis, x.ndim, "cumsum"), op="sum", exclusive=bool(exclusive),
                 reverse=bool(reverse))


def cumprod(x, axis=0, exclusive=False, reverse=False):
    """Return the cumulative product along ``axis`` (``exclusive`` and ``reverse`` as in TensorFlow)."""
    x = _as_tensor(x)
    if x.ndim == 0:
        x = reshape(x, (1,))
    return apply(CUMULATIVE, x, axis=_norm_axis(axis, x.ndim, "cumprod"), op="prod",
                 exclusive=bool(exclusive), reverse=bool(reverse))


# ==============================================================================================================
# Softmax family (one fused, numerically stable kernel each)
# ==============================================================================================================

def _softmax_impl(x, axis, mode):
    rows, mshape = _last_axis_rows(x, axis)
    out = np.empty_like(rows)
    if rows.shape[1]:
        (K.softmax_last_par if rows.size >= kernelgen.PARALLEL_THRESHOLD else K.softmax_last)(rows, out, mode)
    return _restore_axis(out, mshape, axis, x.ndim)


# CUDA: a block per row (three tree reductions), or a thread per row for rows of at most SMALL_ROW

def _softmax_cuda(x, axis, mode):
    rows, mshape = _G.last_axis_rows(x, axis)
    m, n = rows.shape
    out = _C.empty((m, n), x.dtype)
    if n and m:
        if n <= _KG.SMALL_ROW:
            _G.launch(_KG.softmax_rows_small, m, rows, out, np.int64(mode))
        else:
            _G.launch_rows(_KG.softmax_rows, m, rows, out, np.int64(mode))
    return _G.restore_axis(out, mshape, axis, x.ndim)


SOFTMAX = Primitive("softmax", impl={"cpu": lambda x, axis: _softmax_impl(x, axis, 0),
                                     "cuda": lambda x, axis: _softmax_cuda(x, axis, 0)},
                    vjp=lambda g, ans, ins, needs, axis: (ans * (g - sum(g * ans, axis, keepdims=True)),))
LOG_SOFTMAX = Primitive("log_softmax", impl={"cpu": lambda x, axis: _softmax_impl(x, axis, 1),
                                             "cuda": lambda x, axis: _softmax_cuda(x, axis, 1)},
                        vjp=lambda g, ans, ins, needs, axis: (g - exp(ans) * sum(g, axis, keepdims=True),))


def _softmax_specialize(mode):
    def spec(ins, params, out):
        (x,) = ins
        if x.dtype not in (float32, float64) or params["axis"] != len(x.shape) - 1 or x.size == 0:
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


def _softmax_native(mode):
    def emit(n, a, o, kernels):
        (x,) = n.inputs
        if x.dtype not in (float32, float64) or n.params["axis"] != len(x.shape) - 1 or not x.size:
            return None
        cols = x.shape[-1]
        rows = x.size // cols
        k = kernelgen.use_kernel(kernels, K.softmax_last_par if x.size >= kernelgen.PARALLEL_THRESHOLD
                                 else K.softmax_last)
        return [f"{o} = np.empty(({rows}, {cols}), {kernelgen.dtype_source(x.dtype)})",
                f"{k}(np.ascontiguousarray({a[0]}).reshape(({rows}, {cols})), {o}, {kernelgen.flag_source(mode)})",
                f"{o} = {o}.reshape({kernelgen.shape_source(x.shape)})"]
    return emit


for _mode, _row in ((0, SOFTMAX), (1, LOG_SOFTMAX)):
    _row.extra["specialize"] = _softmax_specialize(_mode)
    _row.extra["native"] = _softmax_native(_mode)



def softmax(x, axis=-1):
    """Return exp(x) / sum(exp(x)) along ``axis``, computed stably in one kernel."""
    x = _as_tensor(x)
    if not _isf(x.dtype):
        x = astype(x, float32)
    return apply(SOFTMAX, x, axis=_norm_axis(axis, x.ndim, "softmax"))


def log_softmax(x, axis=-1):
    """Return x - logsumexp(x) along ``axis``, computed stably in one kernel."""
    x = _as_tensor(x)
    if not _isf(x.dtype):
        x = astype(x, float32)
    return apply(LOG_SOFTMAX, x, axis=_norm_axis(axis, x.ndim, "log_softmax"))


# ==============================================================================================================
# Matmul
# ==============================================================================================================

def _matmul_impl(a, b):
    """a @ b through NumPy's BLAS gemm (transposed views go to BLAS as transpose flags, not copies)."""
    dt = np.promote_types(a.dtype, b.dtype)
    cdt = dt if dt in (float32, float64) else float64 if not _isf(dt) else float32
    if a.dtype != cdt:
        a = a.astype(cdt)
    if b.dtype != cdt:
        b = b.astype(cdt)
    if a.ndim > 2 and b.ndim == 2:
        # (..., m, k) @ (k, n) is one GEMM over all rows: NumPy's stacked matmul runs one GEMM per matrix,
        # and none at all (a plain loop, 10x slower) when the stack is a strided view (a time-major sequence)
        out = np.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[1],))
    else:
        out = np.matmul(a, b)
    return out if cdt == dt else out.astype(dt)


# CUDA: the tiled shared-memory kernel (kernels_gpu._matmul_tiles), batches broadcast as zero strides

def _batch3_cuda(a, batch):
    """View ``a`` (..., R, C) as (prod(batch), R, C) broadcast over ``batch`` (a copy when dims don't merge)."""
    r, c = tuple(a.shape)[-2:]
    full_shape = tuple(batch) + (r, c)
    v = _G.broadcast_view(a, full_shape)
    bs = [(s, st) for s, st in zip(full_shape[:-2], v.strides[:-2]) if s != 1]
    B = _G.shape_size(batch)
    stride = 0
    ok = True
    if bs:
        stride = bs[-1][1]
        for (s0, st0), (s1, st1) in zip(bs[:-1], bs[1:]):
            if st0 != st1 * s1:
                ok = False
                break
        if ok:
            stride = bs[-1][1]
    if not ok:
        v = _G.copy(v)
        stride = v.strides[-3] if v.ndim >= 3 else 0
        return _C.view(v, (B, r, c), (stride if B > 1 else 0, v.strides[-2], v.strides[-1]), 0)
    return _C.view(v, (B, r, c), (stride, v.strides[-2], v.strides[-1]), 0)


def _matmul_arrays_cuda(a, b):
    """Return a @ b for device arrays of at least 2 dims (broadcast batches) with the tiled kernel."""
    dt = np.promote_types(a.dtype, b.dtype)
    cdt = dt if dt in (float32, float64) else (float64 if dt.kind != "f" else float32)
    if dt != _lowp.float16 or a.dtype != b.dtype:     # float16 operands: read as stored, summed in float32
        if a.dtype != cdt:
            a = _G.cast(a, cdt)
        if b.dtype != cdt:
            b = _G.cast(b, cdt)
    batch = np.broadcast_shapes(tuple(a.shape)[:-2], tuple(b.shape)[:-2])
    M, K = tuple(a.shape)[-2:]
    N = tuple(b.shape)[-1]
    out = _C.empty(tuple(batch) + (M, N), cdt)
    B = _G.shape_size(batch)
    if out.size:
        if K == 0:
            out = _G.zeros(out.shape, cdt)
        else:
            a3, b3 = _batch3_cuda(a, batch), _batch3_cuda(b, batch)
            c3 = _C.reshape(out, (B, M, N))
            if M * N >= _KG.MB_MIN_OUTPUTS:
                grid = (-(-N // _KG.MB_BN), -(-M // _KG.MB_BM), _min(B, 65535))
                _KG.matmul_tiled_big[grid, _KG.MB_THREADS, _C.launch_stream()](a3, b3, c3, cdt.type(0))
            else:
                grid = (-(-N // _KG.MM_BN), -(-M // _KG.MM_BM), _min(B, 65535))
                _KG.matmul_tiled[grid, _KG.MM_THREADS, _C.launch_stream()](a3, b3, c3, cdt.type(0))
    return out if cdt == dt else _G.cast(out, dt)


def _matmul_cuda(a, b):
    return _matmul_arrays_cuda(a, b)


def _matmul_vjp(g, ans, ins, needs):
    a, b = ins
    ga = matmul(g, swapaxes(b, -1, -2)) if needs[0] else None
    if needs[1] and a.ndim > 2 and b.ndim == 2:
        # the weight of a (..., m, k) @ (k, n) product: one GEMM over all rows, not a stack of them summed
        k, n = b.shape
        gb = matmul(swapaxes(reshape(a, (-1, k)), 0, 1), reshape(g, (-1, n)))
    else:
        gb = matmul(swapaxes(a, -1, -2), g) if needs[1] else None
    return ga, gb


MATMUL = Primitive("matmul", impl={"cpu": _matmul_impl, "cuda": _matmul_cuda}, vjp=_matmul_vjp)


def _matmul_specialize(ins, params, out):
    a, b = ins
    if a.dtype != b.dtype or a.dtype not in (float32, float64) or out.dtype != a.dtype or not out.size:
        return None
    mm = np.matmul
    if len(a.shape) > 2 and len(b.shape) == 2:          # one GEMM over all rows (see _matmul_impl)
        rows, k, n = int(np.prod(a.shape[:-1])), a.shape[-1], b.shape[1]

        def fn3(x, y, o):
            mm(x.reshape(rows, k), y, out=o.reshape(rows, n))
            return True
        return fn3

    def fn(x, y, o):
        mm(x, y, out=o)
        return True
    return fn


def _matmul_native(n, a, o, kernels):
    # K.gemm: NumPy's own OpenBLAS cblas_?gemm, callable from compiled code (jitnet.blas)
    x, y = n.inputs
    if x.dtype != y.dtype or x.dtype not in (float32, float64) or n.out.dtype != x.dtype or not n.out.size:
        return None
    dt = kernelgen.dtype_source(x.dtype)
    shp = kernelgen.shape_source(n.out.shape)
    if len(x.shape) == 2 and len(y.shape) == 2:
        return [f"{o} = np.empty({shp}, {dt})", f"K.gemm({a[0]}, {a[1]}, {o})"]
    if len(x.shape) == 3 and len(y.shape) == 3 and x.shape[0] == y.shape[0]:
        return [f"{o} = np.empty({shp}, {dt})",
                f"for _i in range({x.shape[0]}):",
                f"    K.gemm({a[0]}[_i], {a[1]}[_i], {o}[_i])"]
    if len(x.shape) == 3 and len(y.shape) == 2:          # (B, m, k) @ (k, n): one GEMM over B*m rows
        b, m, k = x.shape
        return [f"{o} = np.empty({shp}, {dt})",
                f"K.gemm(np.ascontiguousarray({a[0]}).reshape(({b * m}, {k})), {a[1]}, "
                f"{o}.reshape(({b * m}, {y.shape[1]})))"]
    return None


MATMUL.extra["specialize"] = _matmul_specialize
MATMUL.extra["native"] = _matmul_native



def matmul(a, b):
    """Return the matrix product a @ b (NumPy semantics: vectors, matrices, broadcast batches)."""
    a, b = _as_tensor(a), _as_tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least one dimension, got shapes {a.shape} and "
                         f"{b.shape}")
    ka = a.shape[-1]
    kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if ka != kb:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are not aligned: {ka} (last dim of the first) "
                         f"!= {kb} (dim {-1 if b.ndim == 1 else -2} of the second)")
    if a.ndim > 2 or b.ndim > 2:
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2] if b.ndim > 1 else ())
        except ValueError:
            raise ValueError(f"matmul: batch dimensions of shapes {a.shape} and {b.shape} do not broadcast") \
                from None
    va, vb = a.ndim == 1, b.ndim == 1
    if va:
        a = reshape(a, (1, ka))
    if vb:
        b = reshape(b, (kb, 1))
    out = apply(MATMUL, a, b)
    if va and vb:
        return reshape(out, ())
    if va:
        return squeeze(out, -2)
    if vb:
        return squeeze(out, -1)
    return out


def dot(a, b):
    """Return the dot product (matmul for 1-D and 2-D operands)."""
    return matmul(a, b)


# ==============================================================================================================
# Joining, splitting, padding
# ==============================================================================================================

#: copies of at most this many elements (of one dtype) go through NumPy: a cold start compiled a copy kernel
#: (0.08 s) for the optimizer's ``global_step.assign`` alone
_SMALL_COPY = 64


def _copy_into(dst, src):
    """Copy ``src`` (broadcast) into the view ``dst`` with the generated copy kernel."""
    if dst.size == 0:
        return
    if _lowp.is_lowp(dst.dtype) or _lowp.is_lowp(src.dtype):     # no Numba kernel reads float16/bfloat16
        np.copyto(dst, np.broadcast_to(src if src.dtype == dst.dtype else _lowp.convert(src, dst.dtype), dst.shape))
        return
    if src.dtype == dst.dtype and dst.size <= _SMALL_COPY:      # a step counter, a scalar: no kernel to compile
        np.copyto(dst, src)
        return
    if src.dtype != dst.dtype:
        src = CAST.impl["cpu"](src, dtype=dst.dtype)
    src = np.broadcast_to(src, dst.shape)
    shape, (sst, dstst) = _collapse(dst.shape, [tuple(0 if d == 1 else s for d, s in zip(src.shape, src.strides)),
                                                dst.strides])
    as_strided = np.lib.stride_tricks.as_strided
    prog = kernelgen.ElementwiseProgram([(src.dtype, False)], [("x0", dst.dtype)], [("t0", dst.dtype)])
    ks, kp = kernelgen.elementwise_kernels(prog, len(shape))
    k = kp if dst.size >= kernelgen.PARALLEL_THRESHOLD else ks
    k(as_strided(src, shape, sst), as_strided(dst, shape, dstst))


def _concat_impl(*arrays, axis):
    dt = arrays[0].dtype
    for a in arrays[1:]:
        dt = np.promote_types(dt, a.dtype)
    shp = list(arrays[0].shape)
    shp[axis] = _sum(a.shape[axis] for a in arrays)
    out = np.empty(shp, dt)
    off = 0
    for a in arrays:
        n = a.shape[axis]
        sl = (slice(None),) * axis + (slice(off, off + n),)
        _copy_into(out[sl], a)
        off += n
    return out


def _concat_vjp(g, ans, ins, needs, axis):
    res, off = [], 0
    for t, need in zip(ins, needs):
        n = t.shape[axis]
        res.append(getitem(g, (slice(None),) * axis + (slice(off, off + n),)) if need else None)
        off += n
    return tuple(res)


def _concat_cuda(*arrays, axis):
    dt = arrays[0].dtype
    for a in arrays[1:]:
        dt = np.promote_types(dt, a.dtype)
    shp = list(arrays[0].shape)
    shp[axis] = builtins.sum(a.shape[axis] for a in arrays)
    out = _C.empty(shp, dt)
    off = 0
    st = out.strides
    for a in arrays:
        n = a.shape[axis]
        vshape = list(shp)
        vshape[axis] = n
        if n and out.size:
            _G.copy_into(_C.view(out, vshape, st, off * st[axis]), a)
        off += n
    return out


CONCAT = Primitive("concatenate", impl={"cpu": _concat_impl, "cuda": _concat_cuda}, vjp=_concat_vjp)


def concatenate(tensors, axis=0):
    """Return the tensors joined along an existing ``axis``."""
    ts = [_as_tensor(t) for t in tensors]
    if not ts:
        raise ValueError("concatenate: need at least one tensor")
    nd = ts[0].ndim
    if nd == 0:
        raise ValueError("concatenate: zero-dimensional tensors cannot be concatenated")
    ax = _norm_axis(axis, nd, "concatenate")
    for i, t in enumerate(ts[1:], 1):
        if t.ndim != nd or _any(t.shape[d] != ts[0].shape[d] for d in range(nd) if d != ax):
            raise ValueError(f"concatenate: shapes {ts[0].shape} and {t.shape} (tensor {i}) differ outside "
                             f"axis {ax}")
    if len(ts) == 1:
        return ts[0]
    return apply(CONCAT, *ts, axis=ax)


concat = concatenate


def stack(tensors, axis=0):
    """Return the tensors joined along a new ``axis``."""
    ts = [_as_tensor(t) for t in tensors]
    if not ts:
        raise ValueError("stack: need at least one tensor")
    for i, t in enumerate(ts[1:], 1):
        if t.shape != ts[0].shape:
            raise ValueError(f"stack: all tensors must have the same shape, got {ts[0].shape} and {t.shape} "
                             f"(tensor {i})")
    ax = axis % (ts[0].ndim + 1)
    return concatenate([expand_dims(t, ax) for t in ts], ax)


def split(x, indices_or_sections, axis=0):
    """Return a list of sub-tensors of x split along ``axis`` (equal sections or at indices)."""
    x = _as_tensor(x)
    ax = _norm_axis(axis, x.ndim, "split")
    n = x.shape[ax]
    if isinstance(indices_or_sections, (int, np.integer)):
        s = int(indices_or_sections)
        if s <= 0 or n % s:
            raise ValueError(f"split: axis {ax} of size {n} cannot be split into {s} equal sections")
        bounds = [i * (n // s) for i in range(s + 1)]
    else:
        bounds = [0] + [int(i) for i in indices_or_sections] + [n]
    pre = (slice(None),) * ax
    return [getitem(x, pre + (slice(bounds[i], bounds[i + 1]),)) for i in range(len(bounds) - 1)]


def _pad_impl(x, pad_width, value):
    shp = tuple(s + lo + hi for s, (lo, hi) in zip(x.shape, pad_width))
    out = np.full(shp, value, dtype=x.dtype)
    sl = tuple(slice(lo, lo + s) for s, (lo, hi) in zip(x.shape, pad_width))
    _copy_into(out[sl], x)
    return out


def _pad_cuda(x, pad_width, value):
    shp = tuple(s + lo + hi for s, (lo, hi) in zip(x.shape, pad_width))
    out = _G.full(shp, value, x.dtype)
    if x.size:
        st = out.strides
        off = builtins.sum(lo * s for (lo, hi), s in zip(pad_width, st))
        _G.copy_into(_C.view(out, x.shape, st, off), x)
    return out


PAD = Primitive("pad", impl={"cpu": _pad_impl, "cuda": _pad_cuda},
                vjp=lambda g, ans, ins, needs, pad_width, value: (
                    getitem(g, tuple(slice(lo, lo + s) for s, (lo, hi) in zip(ins[0].shape, pad_width))),))


def pad(x, pad_width, mode="constant", constant_values=0):
    """Return x padded with ``constant_values`` (``pad_width`` as in NumPy; only mode='constant')."""
    x = _as_tensor(x)
    if mode != "constant":
        raise ValueError(f"pad: mode {mode!r} is not supported (only 'constant')")
    pw = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (x.ndim, 2))
    if (pw < 0).any():
        raise ValueError(f"pad: negative pad width {pad_width}")
    pw = tuple((int(a), int(b)) for a, b in pw)
    return apply(PAD, x, pad_width=pw, value=constant_values)


# ==============================================================================================================
# Indexing: getitem, take, scatter_add, one_hot, take_along_axis, sort
# ==============================================================================================================

def _check_index_array(idx, bound, op, axis):
    """Return ``idx`` as int64 with negatives wrapped; raise IndexError naming the index, its position and the bound."""
    return bounds.check(idx, bound, op, f"axis {axis} with size {bound}")


def _take_impl(x, idx, axis):
    idx = _check_index_array(idx, x.shape[axis], "take", axis)
    x = _contiguous(x)
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    out = np.empty((outer, idx.size, inner), x.dtype)
    if out.size:
        K.take_axis(x.reshape(outer, x.shape[axis], inner), idx.reshape(-1), out)
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _take_vjp(g, ans, ins, needs, axis):
    x, idx = ins
    return scatter_add(_zeros_on(x.shape, g), idx, g, axis), None


def _zeros_on(shape, like):
    """Return zeros of ``shape`` with the dtype and device of tensor ``like``."""
    if isinstance(like._data, np.ndarray):
        return Tensor._wrap(np.zeros(shape, like.dtype))
    return _filled(shape, 0, like.dtype, like.device)


def _take_cuda(x, idx, axis, name="take"):
    idx = _G.index_array(idx, x.shape[axis], name, axis)
    x = _G.contiguous(x)
    outer = _G.shape_size(tuple(x.shape)[:axis])
    inner = _G.shape_size(tuple(x.shape)[axis + 1:])
    n = x.shape[axis]
    out = _C.empty((outer, idx.size, inner), x.dtype)
    if out.size:
        err, opid = _G.error_slot(name)
        _G.launch(_KG.take_axis, out.size, _C.reshape(x, (outer, n, inner)), _G.flat_view(_G.contiguous(idx)), out,
                name != "embedding", err, opid)
    return _C.reshape(out, tuple(x.shape)[:axis] + tuple(idx.shape) + tuple(x.shape)[axis + 1:])


TAKE = bounds.mark(Primitive("take", impl={"cpu": _take_impl, "cuda": _take_cuda}, vjp=_take_vjp), i1=("index", "wrap"))


def take(x, indices, axis=None):
    """Return elements of x at integer ``indices`` along ``axis`` (of the flattened x when None)."""
    x = _as_tensor(x)
    idx = _as_tensor(indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"take: indices must be integers, got dtype {idx.dtype}")
    if axis is None:
        x = reshape(x, (-1,))
        axis = 0
    return apply(TAKE, x, idx, axis=_norm_axis(axis, x.ndim, "take"))


gather = take


def _scatter_add_impl(x, idx, upd, axis):
    idx = _check_index_array(idx, x.shape[axis], "scatter_add", axis)
    out = np.array(x, copy=True, order="C")
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    want = x.shape[:axis] + idx.shape + x.shape[axis + 1:]
    if upd.shape != want:
        try:
            upd = np.broadcast_to(upd, want)
        except ValueError:
            raise ValueError(f"scatter_add: updates of shape {upd.shape} do not match {want} (x {x.shape}, "
                             f"indices {idx.shape}, axis {axis})") from None
    if upd.dtype != out.dtype:
        upd = upd.astype(out.dtype)
    upd = _contiguous(upd)
    if upd.size:
        K.scatter_add_axis(out.reshape(outer, x.shape[axis], inner), idx.reshape(-1),
                           upd.reshape(outer, idx.size, inner))
    return out


def _scatter_add_cuda(x, idx, upd, axis):
    idx = _G.index_array(idx, x.shape[axis], "scatter_add", axis)
    if x.dtype not in _G.ATOMIC:
        raise TypeError(f"scatter_add: dtype {x.dtype} has no atomic add on the GPU (use float32/64 or int32/64)")
    out = _G.copy(x)
    outer = _G.shape_size(tuple(x.shape)[:axis])
    inner = _G.shape_size(tuple(x.shape)[axis + 1:])
    want = tuple(x.shape)[:axis] + tuple(idx.shape) + tuple(x.shape)[axis + 1:]
    if tuple(upd.shape) != want:
        try:
            if np.broadcast_shapes(tuple(upd.shape), want) != want:
                raise ValueError
        except ValueError:
            raise ValueError(f"scatter_add: updates of shape {tuple(upd.shape)} do not match {want} (x "
                             f"{tuple(x.shape)}, indices {tuple(idx.shape)}, axis {axis})") from None
        upd = _G.broadcast_view(upd, want) if not _G.is_host(upd) else _G.full(want, upd.reshape(-1)[0], x.dtype)
    if upd.dtype != out.dtype:
        upd = _G.cast(upd, out.dtype)
    upd = _G.contiguous(upd)
    if upd.size:
        err, opid = _G.error_slot("scatter_add")
        _G.launch(_KG.scatter_add_axis, upd.size, _C.reshape(out, (outer, x.shape[axis], inner)),
                _G.flat_view(_G.contiguous(idx)), _C.reshape(upd, (outer, idx.size, inner)), True, err, opid)
    return out


SCATTER_ADD = Primitive("scatter_add", impl={"cpu": _scatter_add_impl, "cuda": _scatter_add_cuda},
                        vjp=lambda g, ans, ins, needs, axis: (g, None, take(g, ins[1], axis) if needs[2] else None))
bounds.mark(SCATTER_ADD, i1=("index", "wrap"))


def scatter_add(x, indices, updates, axis=0):
    """Return a copy of x with ``updates`` added at ``indices`` along ``axis`` (duplicates accumulate)."""
    x, idx, upd = _as_tensor(x), _as_tensor(indices), _as_tensor(updates)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"scatter_add: indices must be integers, got dtype {idx.dtype}")
    return apply(SCATTER_ADD, x, idx, upd, axis=_norm_axis(axis, x.ndim, "scatter_add"))


def _one_hot_impl(idx, depth, dtype, on, off):
    flat = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    out = np.empty((flat.size, depth), dtype)
    bad = K.one_hot_kernel(flat, out, dtype.type(on), dtype.type(off))
    if bad >= 0:
        raise bounds.index_error("one_hot", "index", int(flat[bad]), bad, f"depth {depth}", idx.shape)
    return out.reshape(idx.shape + (depth,))


def _one_hot_cuda(idx, depth, dtype, on, off):
    dtype = np.dtype(dtype)
    if _G.is_host(idx):
        idx = _G.full(idx.shape, int(idx.reshape(-1)[0]), int64)
    flat = _G.flat_view(_G.contiguous(idx))
    out = _C.empty((flat.size, depth), dtype)
    if out.size:
        err, opid = _G.error_slot("one_hot")
        if dtype == bool_:
            o8 = _G.as_u8(out)
            _G.launch(_KG.one_hot_fill, out.size, flat, o8, np.uint8(bool(on)), np.uint8(bool(off)), err, opid)
        else:
            _G.launch(_KG.one_hot_fill, out.size, flat, out, dtype.type(on), dtype.type(off), err, opid)
    return _C.reshape(out, tuple(idx.shape) + (depth,))


ONE_HOT = bounds.mark(Primitive("one_hot", impl={"cpu": _one_hot_impl, "cuda": _one_hot_cuda}, nondiff=True), i0=("index", "ignore"))


def one_hot(indices, depth, dtype=float32, on_value=1, off_value=0):
    """Return a one-hot encoding of integer ``indices`` with a new last axis of size ``depth``."""
    idx = _as_tensor(indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"one_hot: indices must be integers, got dtype {idx.dtype}")
    return apply(ONE_HOT, idx, depth=int(depth), dtype=_normalize_dtype(dtype), on=on_value, off=off_value)


def _tal_impl(x, idx, axis):
    idx = _check_index_array(idx, x.shape[axis], "take_along_axis", axis)
    rows, mshape = _last_axis_rows(x, axis)
    irows, imshape = _last_axis_rows(idx, axis)
    if rows.shape[0] != irows.shape[0]:
        raise ValueError(f"take_along_axis: x {x.shape} and indices {idx.shape} differ outside axis {axis}")
    out = np.empty(irows.shape, x.dtype)
    K.take_along_last(rows, irows, out)
    return _restore_axis(out, imshape, axis, x.ndim)


def _pal_impl(g, idx, shape, axis):
    idx = _check_index_array(idx, shape[axis], "put_along_axis_add", axis)
    target = np.zeros(shape, g.dtype)
    tmoved = np.moveaxis(target, axis, -1)
    trows = _contiguous(tmoved).reshape(-1, shape[axis])
    irows, _ = _last_axis_rows(idx, axis)
    grows, _ = _last_axis_rows(g, axis)
    K.put_along_last_add(trows, irows, grows)
    return _restore_axis(trows, tmoved.shape, axis, len(shape))


def _pal_cuda(g, idx, shape, axis):
    shape = tuple(shape)
    nd = len(shape)
    moved = tuple(s for i, s in enumerate(shape) if i != axis) + (shape[axis],)
    target = _G.zeros((_G.shape_size(moved[:-1]), moved[-1]), g.dtype)
    irows, _ = _G.last_axis_rows(idx, axis)
    grows, _ = _G.last_axis_rows(g, axis)
    if grows.size:
        err, opid = _G.error_slot("put_along_axis_add")
        _G.launch(_KG.put_along_rows_add, grows.size, target, irows, grows, np.int64(_G.shape_size(tuple(idx.shape)[axis + 1:])),
                err, opid)
    return _G.restore_axis(target, moved, axis, nd)


PUT_ALONG_ADD = Primitive("put_along_axis_add", impl={"cpu": _pal_impl, "cuda": _pal_cuda},
                          vjp=lambda g, ans, ins, needs, shape, axis: (take_along_axis(g, ins[1], axis), None))
def _tal_cuda(x, idx, axis):
    idx = _G.index_array(idx, x.shape[axis], "take_along_axis", axis)
    rows, _ = _G.last_axis_rows(x, axis)
    irows, imshape = _G.last_axis_rows(idx, axis)
    if rows.shape[0] != irows.shape[0]:
        raise ValueError(f"take_along_axis: x {tuple(x.shape)} and indices {tuple(idx.shape)} differ outside "
                         f"axis {axis}")
    out = _C.empty(irows.shape, x.dtype)
    if out.size:
        err, opid = _G.error_slot("take_along_axis")
        _G.launch(_KG.take_along_rows, out.size, rows, irows, out, np.int64(_G.shape_size(tuple(idx.shape)[axis + 1:])), err,
                opid)
    return _G.restore_axis(out, imshape, axis, x.ndim)


TAKE_ALONG = Primitive("take_along_axis", impl={"cpu": _tal_impl, "cuda": _tal_cuda},
                       vjp=lambda g, ans, ins, needs, axis: (
                           apply(PUT_ALONG_ADD, g, ins[1], shape=ins[0].shape, axis=axis), None))
bounds.mark(PUT_ALONG_ADD, i1=("index", "wrap"))
bounds.mark(TAKE_ALONG, i1=("index", "wrap"))


def take_along_axis(x, indices, axis=-1):
    """Return x[..., indices[..., j], ...] along ``axis`` (NumPy's take_along_axis)."""
    x, idx = _as_tensor(x), _as_tensor(indices)
    if idx.ndim != x.ndim:
        raise ValueError(f"take_along_axis: indices must have the same number of dimensions as x, got "
                         f"{idx.shape} and {x.shape}")
    return apply(TAKE_ALONG, x, idx, axis=_norm_axis(axis, x.ndim, "take_along_axis"))


def _argsort_impl(x, axis, descending):
    rows, mshape = _last_axis_rows(x, axis)
    out = np.empty(rows.shape, int64)
    if rows.size:
        K.argsort_last(rows, out, descending)
    return _restore_axis(out, mshape, axis, x.ndim)


def _argsort_cuda(x, axis, descending):
    rows, mshape = _G.last_axis_rows(x, axis)
    out = _C.empty(rows.shape, int64)
    if rows.size:
        if rows.dtype == bool_:
            rows = _G.run_primitive("cast", rows, dtype=np.dtype(np.uint8))
        _G.launch(_KG.rank_sort_rows, rows.size, rows, out, bool(descending), np.int64(rows.shape[1]))
    return _G.restore_axis(out, mshape, axis, x.ndim)


ARGSORT = Primitive("argsort", impl={"cpu": _argsort_impl, "cuda": _argsort_cuda}, nondiff=True)


def argsort(x, axis=-1, descending=False):
    """Return the int64 indices that sort x along ``axis`` (stable)."""
    x = _as_tensor(x)
    return apply(ARGSORT, x, axis=_norm_axis(axis, x.ndim, "argsort"), descending=bool(descending))


def sort(x, axis=-1, descending=False):
    """Return x sorted along ``axis`` (differentiable: the gradient follows the permutation)."""
    x = _as_tensor(x)
    return take_along_axis(x, argsort(x, axis, descending), axis)


def _topk_impl(x, k):
    rows, mshape = _last_axis_rows(x, x.ndim - 1)
    out = np.empty((rows.shape[0], k), int64)
    K.topk_last(rows, k, out)
    return out.reshape(x.shape[:-1] + (k,))


def _topk_cuda(x, k):
    rows, _ = _G.last_axis_rows(x, x.ndim - 1)
    out = _C.empty((rows.shape[0], k), int64)
    if rows.size and k:
        if rows.dtype == bool_:
            rows = _G.run_primitive("cast", rows, dtype=np.dtype(np.uint8))
        _G.launch(_KG.rank_sort_rows, rows.size, rows, out, True, np.int64(k))
    return _C.reshape(out, tuple(x.shape)[:-1] + (k,))


TOPK = Primitive("top_k_indices", impl={"cpu": _topk_impl, "cuda": _topk_cuda}, nondiff=True)


def top_k(x, k=1):
    """Return (values, indices) of the k largest entries along the last axis, largest first."""
    x = _as_tensor(x)
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"top_k: k={k} is out of range for last axis of size {x.shape[-1]}")
    idx = apply(TOPK, x, k=int(k))
    return take_along_axis(x, idx, -1), idx


# getitem ------------------------------------------------------------------------------------------------------

def _rebuild_index(template, arrays):
    return tuple(arrays[v[1]] if isinstance(v, tuple) and len(v) == 2 and v[0] == "__arr__" else v
                 for v in template)


def _getitem_error(shape, idx, e):
    """Return the IndexError for a failed ``x[idx]``: the first integer-array entry out of range and its position,
    else NumPy's message with the op and shape."""
    def width(v):
        if v is None or v is Ellipsis:
            return 0
        if isinstance(v, np.ndarray) and v.dtype == bool_:
            return v.ndim
        return 1
    used = builtins.sum(width(v) for v in idx)
    axis = 0
    for v in idx:
        if v is Ellipsis:
            axis += len(shape) - used
            continue
        if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and axis < len(shape):
            try:
                bounds.check(v, shape[axis], "getitem", f"axis {axis} with size {shape[axis]}")
            except IndexError as err:
                return IndexError(f"{err} (tensor shape {tuple(shape)})")
        axis += width(v)
    return IndexError(f"getitem: {e} (tensor shape {tuple(shape)})")


def _getitem_impl(x, *arrays, template):
    idx = _rebuild_index(template, arrays)
    try:
        r = x[idx]
        return r if isinstance(r, np.ndarray) else np.asarray(r)     # an all-integer index gives a scalar
    except IndexError as e:
        raise _getitem_error(x.shape, idx, e) from None


def _getitem_grad_impl(g, *arrays, template, shape):
    idx = _rebuild_index(template, arrays)
    out = np.zeros(shape, g.dtype)
    if not arrays:
        dst = out[idx]
        if isinstance(dst, np.ndarray):
            _copy_into(dst, g)
        else:                                   # an all-integer index selects one element, not a view
            out[idx] = g
        return out
    try:
        pos = np.arange(out.size, dtype=np.int64).reshape(shape)[idx]
    except IndexError as e:
        raise _getitem_error(shape, idx, e) from None
    upd = _contiguous(np.broadcast_to(g, pos.shape)).reshape(-1)
    K.scatter_add_flat(out.reshape(-1), np.ascontiguousarray(pos).reshape(-1), upd)
    return out


def _getitem_grad_cuda(g, *arrays, template, shape):
    idx = _rebuild_index(template, arrays)
    shape = tuple(shape)
    out = _G.zeros(shape, g.dtype)
    if out.size == 0:
        return out
    isz = g.dtype.itemsize
    cst = _C.c_strides(shape, isz)
    if not arrays:
        vshape, vstrides, voff = _probe_cuda(shape, cst, isz, idx)
        n = _G.shape_size(vshape)
        if n:
            gb = _G.contiguous(_G.broadcast_view(g, vshape))
            _G.launch(_KG.scatter_strided, n, _G.flat_view(gb), _G.flat_view(out), voff // isz, vshape or (1,),
                    tuple(s // isz for s in vstrides) or (0,))
        return out
    full_idx = _expand_index_cuda(list(idx), len(shape))
    vshape, vstrides, voff, adv, rest, lin, adjacent = _adv_plan_cuda(shape, cst, isz, full_idx, "getitem")
    if _G.is_host(lin):
        lin = _G.full((), int(lin), int64)
    q, p = lin.ndim, adv[0]
    rest_shape = tuple(vshape[k] for k in rest)
    r = len(rest_shape)
    gR = g
    if adjacent and p > 0 and q:
        gR = _G.transpose_view(g, list(range(p, p + q)) + list(range(p)) + list(range(p + q, q + r)))
    L = lin.size
    rs = _G.shape_size(rest_shape)
    P = _G.shape_size(vshape[k] for k in adv)
    gm = _G.zeros((1, P, rs), g.dtype)
    upd = _C.reshape(_G.contiguous(_G.broadcast_view(gR, tuple(lin.shape) + rest_shape)), (1, L, rs))
    err, opid = _G.error_slot("getitem", "index")
    _G.launch(_KG.scatter_add_axis, upd.size, gm, _G.flat_view(_G.contiguous(lin)), upd, True, err, opid)
    perm = adv + rest
    inv = [0] * len(perm)
    for i, a in enumerate(perm):
        inv[a] = i
    gV = _G.contiguous(_G.transpose_view(_C.reshape(gm, tuple(vshape[k] for k in perm)), inv))
    n = _G.shape_size(vshape)
    if n:
        _G.launch(_KG.scatter_strided, n, _G.flat_view(gV), _G.flat_view(out), voff // isz, vshape,
                tuple(s // isz for s in vstrides))
    return out


GETITEM_GRAD = Primitive("getitem_grad", impl={"cpu": _getitem_grad_impl, "cuda": _getitem_grad_cuda},
                         vjp=lambda g, ans, ins, needs, template, shape: (
                             apply(GETITEM, g, *ins[1:], template=template),) + (None,) * (len(ins) - 1))


def _getitem_vjp(g, ans, ins, needs, template):
    # (autodiff.sparse, a layer up, wraps this rule: x[t] along the first axis gets a sparse row gradient)
    return (apply(GETITEM_GRAD, g, *ins[1:], template=template, shape=ins[0].shape),) + (None,) * (len(ins) - 1)


def _expand_index_cuda(idx, ndim, op="getitem"):
    """Return ``idx`` as a list of ndim entries (slices, ints, index arrays): Ellipsis expanded, rest padded."""
    items = []
    for v in idx:
        if v is None:
            raise NotImplementedError(f"{op}: None (newaxis) together with an index array is not supported on "
                                      f"the GPU; index first, then jn.expand_dims")
        if isinstance(v, (bool, np.bool_)):
            raise NotImplementedError(f"{op}: a boolean index together with an index array is not supported on "
                                      f"the GPU")
        if _G.is_host(v):
            if v.ndim:
                raise RuntimeError(f"{op}: the index array is on the CPU and the tensor on cuda:0; move it with "
                                   f".to('cuda')")
            v = int(v)
        elif not isinstance(v, (int, np.integer, slice)) and v is not Ellipsis:
            if v.dtype == bool_:
                raise NotImplementedError(f"{op}: boolean mask indexing of a cuda tensor needs the mask's values "
                                          f"on the host (the result's shape depends on them); use jn.where, or "
                                          f"index on the CPU")
        items.append(v)
    n_ell = builtins.sum(1 for v in items if v is Ellipsis)
    if n_ell > 1:
        raise IndexError(f"{op}: an index can only have a single ellipsis ('...')")
    used = len(items) - n_ell
    if used > ndim:
        raise IndexError(f"{op}: too many indices for a tensor of {ndim} dimensions")
    full = []
    for v in items:
        if v is Ellipsis:
            full += [slice(None)] * (ndim - used)
        else:
            full.append(v)
    full += [slice(None)] * (ndim - len(full))
    return full


def _wrap_index_cuda(idx_arr, n, name):
    """Return int64 device indices wrapped into [0, n) (errors recorded for out-of-range ones)."""
    idx_arr = _G.contiguous(idx_arr)
    out = _C.empty(tuple(idx_arr.shape), int64)
    err, opid = _G.error_slot(name, "index")
    _G.launch(_KG.wrap_index, idx_arr.size, _G.flat_view(idx_arr), _G.flat_view(out), np.int64(n), err, opid)
    return out


def _adv_plan_cuda(shape, strides, itemsize, fidx, name):
    """Decompose an advanced index: basic view params, the advanced axes, and the linear device index."""
    adv = [k for k, v in enumerate(fidx) if not isinstance(v, slice)]
    rest = [k for k in range(len(fidx)) if k not in adv]
    basic = tuple(slice(None) if k in adv else v for k, v in enumerate(fidx))
    try:
        vshape, vstrides, voff = _probe_cuda(shape, strides, itemsize, basic)
    except IndexError as e:
        raise IndexError(f"{name}: {e} (tensor shape {tuple(shape)})") from None
    lin = None
    for k in adv:
        v = fidx[k]
        nk = vshape[k]
        if isinstance(v, (int, np.integer)):
            v = int(v)
            if not -nk <= v < nk:
                raise IndexError(f"{name}: index {v} is out of bounds for axis {k} with size {nk}")
            w = np.array(v % nk, np.int64)
        else:
            w = _wrap_index_cuda(v, nk, name)
        if lin is None:
            lin = w
        elif _G.is_host(lin) and _G.is_host(w):
            lin = np.array(int(lin) * nk + int(w), np.int64)
        else:
            lin = _G.run_primitive("add", _G.run_primitive("multiply", lin, np.array(nk, np.int64)), w)
    adjacent = adv == list(range(adv[0], adv[0] + len(adv)))
    return vshape, vstrides, voff, adv, rest, lin, adjacent


def _adv_getitem_cuda(x, idx):
    full_idx = _expand_index_cuda(idx, x.ndim)
    vshape, vstrides, voff, adv, rest, lin, adjacent = _adv_plan_cuda(x.shape, x.strides, x.dtype.itemsize,
                                                                  full_idx, "getitem")
    if builtins.all(s >= 0 for s in vstrides):
        V = _C.view(x, vshape, vstrides, voff) if _G.shape_size(vshape) else _C.empty(vshape, x.dtype)
    else:
        V = _gather_view_cuda(x, vshape, vstrides, voff)
    perm = adv + rest
    Vt = _G.contiguous(_G.transpose_view(V, perm))
    P = _G.shape_size(vshape[k] for k in adv)
    rest_shape = tuple(vshape[k] for k in rest)
    merged = _C.reshape(Vt, (P,) + rest_shape)
    if _G.is_host(lin):                     # every advanced index was an int: one position
        lin = _G.full((), int(lin), int64)
    R = _G.run_primitive("take", merged, lin, axis=0, name="getitem")
    q = lin.ndim
    p = adv[0]
    if adjacent and p > 0 and q:
        r = len(rest_shape)
        R = _G.transpose_view(R, list(range(q, q + p)) + list(range(q)) + list(range(q + p, q + r)))
    return R


def _getitem_cuda(x, *arrays, template):
    idx = _rebuild_index(template, arrays)
    if not arrays:
        return _basic_getitem_cuda(x, idx)
    return _adv_getitem_cuda(x, list(idx))


GETITEM = Primitive("getitem", impl={"cpu": _getitem_impl, "cuda": _getitem_cuda}, kind="view", vjp=_getitem_vjp)
# (a getitem's index arrays follow its tensor input; the marker names the first)
bounds.mark(GETITEM, i1=("index", "wrap"))
bounds.mark(GETITEM_GRAD, i1=("index", "wrap"))


# -- under jit: what a native driver runs for the views (plain NumPy views and copies in the driver's source) --

def _index_source(template):
    """Return the source of a basic index (ints and slices only), or None."""
    parts = []
    for it in template:
        if isinstance(it, bool):
            return None
        if isinstance(it, int):
            parts.append(str(it))
        elif isinstance(it, slice):
            a, b, c = (("" if v is None else str(int(v))) for v in (it.start, it.stop, it.step))
            parts.append(f"{a}:{b}" + (f":{c}" if c else ""))
        else:
            return None
    if not parts:
        return None
    return ", ".join(parts) if len(parts) > 1 else parts[0]


def _getitem_native(n, a, o, kernels):
    if len(n.inputs) != 1 or not n.out.shape:
        return None
    idx = _index_source(n.params["template"])
    return None if idx is None else [f"{o} = {a[0]}[{idx}]"]


def _getitem_grad_native(n, a, o, kernels):
    if len(n.inputs) != 1 or not n.inputs[0].shape:
        return None
    idx = _index_source(n.params["template"])
    if idx is None:
        return None
    # K.copy_into, not ``o[idx] = a``: Numba's array setitem compiles its error formatting (3 s, once a process)
    return [f"{o} = np.zeros({kernelgen.shape_source(n.out.shape)}, {kernelgen.dtype_source(n.out.dtype)})",
            f"K.copy_into({o}[{idx}], {a[0]})"]


def _transpose_native(n, a, o, kernels):
    axes = tuple(n.params["axes"])
    return [f"{o} = {a[0]}.T"] if axes == (1, 0) else [f"{o} = np.transpose({a[0]}, {kernelgen.shape_source(axes)})"]


RESHAPE.extra["native"] = lambda n, a, o, kernels: [
    f"{o} = np.ascontiguousarray({a[0]}).reshape({kernelgen.shape_source(n.out.shape)})"]
TRANSPOSE.extra["native"] = _transpose_native
STOP_GRADIENT.extra["native"] = lambda n, a, o, kernels: [f"{o} = {a[0]}"]
GETITEM.extra["native"] = _getitem_native
GETITEM_GRAD.extra["native"] = _getitem_grad_native



def _freeze(v):
    if isinstance(v, slice):
        return slice(*(int(s) if isinstance(s, (np.integer, Tensor)) else s for s in (v.start, v.stop, v.step)))
    return v


def getitem(x, index):
    """Return x[index] with NumPy semantics (basic slicing gives views; integer arrays gather)."""
    x = _as_tensor(x)
    if not isinstance(index, tuple):
        index = (index,)
    template, arrays = [], []
    for v in index:
        if isinstance(v, (Tensor, np.ndarray, list)):
            t = _as_tensor(v)
            if not isinstance(v, Tensor) and t.ndim and not isinstance(x._data, np.ndarray):
                t = t.to(x.device)
            if _isf(t.dtype):
                raise TypeError(f"getitem: float index of dtype {t.dtype}; indices must be integers or bools")
            template.append(("__arr__", len(arrays)))
            arrays.append(t)
        elif isinstance(v, (float, np.floating)):
            raise TypeError(f"getitem: float index {v!r}; indices must be integers, slices or bools")
        elif isinstance(v, (bool, np.bool_)):
            template.append(bool(v))
        elif isinstance(v, (int, np.integer)):
            template.append(int(v))
        elif v is None or v is Ellipsis or isinstance(v, slice):
            template.append(_freeze(v))
        else:
            raise TypeError(f"getitem: unsupported index {v!r} of type {type(v).__name__}")
    for v, ax in zip(template, range(x.ndim)):
        if isinstance(v, int) and not isinstance(v, bool) and not -x.shape[ax] <= v < x.shape[ax]:
            if Ellipsis not in template[:ax] and None not in template[:ax]:
                raise IndexError(f"getitem: index {v} is out of bounds for axis {ax} with size {x.shape[ax]}")
    return apply(GETITEM, x, *arrays, template=tuple(template))


def nonzero(x):
    """Return a tuple of int64 index tensors where x is nonzero (eager only)."""
    x = _as_tensor(x)
    return tuple(Tensor._wrap(np.asarray(i, dtype=np.int64)) for i in np.nonzero(x.numpy()))


# ==============================================================================================================
# Constructors
# ==============================================================================================================

def _shape_arg(shape):
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _on(device):
    """Return the Device a constructor targets: ``device``, else the default device (see ``jn.device``)."""
    return _tensor._DEVICE_STACK[-1] if device is None else _tensor.device(device)


def _filled(shape, value, dtype, device):
    """Return a tensor of ``shape`` filled with ``value`` on ``device`` (a fill kernel on a GPU)."""
    shape, dtype = _shape_arg(shape), _normalize_dtype(dtype)
    dev = _on(device)
    if dev.type == "cpu":
        return Tensor._wrap(np.full(shape, value, dtype))
    return Tensor._wrap(_backends.get(dev.type).full(shape, value, dtype))


def zeros(shape, dtype=float32, device=None):
    """Return a tensor of zeros (on ``device``; default: the default device)."""
    if device is not None or _tensor._DEVICE_STACK[-1].type != "cpu":
        return _filled(shape, 0, dtype, device)
    return Tensor._wrap(np.zeros(_shape_arg(shape), _normalize_dtype(dtype)))


def ones(shape, dtype=float32, device=None):
    """Return a tensor of ones (on ``device``; default: the default device)."""
    if device is not None or _tensor._DEVICE_STACK[-1].type != "cpu":
        return _filled(shape, 1, dtype, device)
    return Tensor._wrap(np.ones(_shape_arg(shape), _normalize_dtype(dtype)))


def full(shape, fill_value, dtype=None, device=None):
    """Return a tensor filled with ``fill_value`` (on ``device``; default: the default device)."""
    if dtype is None:
        dtype = _weak_dtype(fill_value, None)
    if device is not None or _tensor._DEVICE_STACK[-1].type != "cpu":
        return _filled(shape, fill_value, dtype, device)
    return Tensor._wrap(np.full(_shape_arg(shape), fill_value, _normalize_dtype(dtype)))


def zeros_like(x, dtype=None):
    """Return zeros with the shape (and dtype, and device) of x."""
    x = _as_tensor(x)
    if isinstance(x._data, np.ndarray):
        return Tensor._wrap(np.zeros(x.shape, _normalize_dtype(dtype or x.dtype)))
    return _filled(x.shape, 0, dtype or x.dtype, x.device)


def ones_like(x, dtype=None):
    """Return ones with the shape (and dtype, and device) of x."""
    x = _as_tensor(x)
    if isinstance(x._data, np.ndarray):
        return Tensor._wrap(np.ones(x.shape, _normalize_dtype(dtype or x.dtype)))
    return _filled(x.shape, 1, dtype or x.dtype, x.device)


def full_like(x, fill_value, dtype=None):
    """Return a tensor like x (shape, dtype, device) filled with ``fill_value``."""
    x = _as_tensor(x)
    return _filled(x.shape, fill_value, dtype or x.dtype, x.device)


def empty(shape, dtype=float32, device=None):
    """Return an uninitialised tensor (on ``device``; default: the default device)."""
    dev = _on(device)
    if dev.type != "cpu":
        return Tensor._wrap(_backends.get(dev.type).empty(_shape_arg(shape), _normalize_dtype(dtype)))
    return Tensor._wrap(np.empty(_shape_arg(shape), _normalize_dtype(dtype)))


def arange(start, stop=None, step=1, dtype=None, device=None):
    """Return evenly spaced values in [start, stop) (int64 for integer arguments, else float32)."""
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        dtype = int64 if _all(isinstance(v, (int, np.integer)) for v in (start, stop, step)) else float32
    dev = _on(device)
    if dev.type != "cpu":
        return Tensor._wrap(_backends.get(dev.type).arange(start, stop, step, _normalize_dtype(dtype)))
    return Tensor._wrap(np.arange(start, stop, step, dtype=_normalize_dtype(dtype)))


def linspace(start, stop, num=50, dtype=float32, device=None):
    """Return ``num`` evenly spaced values from start to stop inclusive."""
    dev = _on(device)
    if dev.type != "cpu":
        return Tensor._wrap(_backends.get(dev.type).linspace(start, stop, int(num), _normalize_dtype(dtype)))
    return Tensor._wrap(np.linspace(start, stop, num, dtype=_normalize_dtype(dtype)))


def eye(n, m=None, dtype=float32, device=None):
    """Return an identity matrix (n x m)."""
    dev = _on(device)
    if dev.type != "cpu":
        return Tensor._wrap(_backends.get(dev.type).eye(int(n), int(n if m is None else m), _normalize_dtype(dtype)))
    return Tensor._wrap(np.eye(n, m, dtype=_normalize_dtype(dtype)))


__all_ops__ = [n for n in dir() if not n.startswith("_") and n not in (
    "annotations", "bounds", "builtins", "math", "numbers", "np", "kernelgen", "K", "Primitive", "apply",
    "current_interpreter", "Tensor", "bool_", "float32", "float64", "int64")]


def _bind_operators():
    """Bind Tensor's operators and op methods straight to the op functions (no extra Python frame per call).

    ``tensor.py`` sits below this module and does not import it: the class gets its operators here."""
    def rev(f):
        def r(self, other):
            return f(other, self)
        return r
    for n, f in [("add", add), ("sub", subtract), ("mul", multiply), ("truediv", divide),
                 ("floordiv", floor_divide), ("mod", remainder), ("pow", power), ("matmul", matmul),
                 ("and", logical_and_or_bitwise), ("or", logical_or_or_bitwise), ("xor", logical_xor_or_bitwise)]:
        setattr(Tensor, f"__{n}__", f)
        setattr(Tensor, f"__r{n}__", f if n in ("add", "mul") else rev(f))
    for n, f in [("lt", less), ("le", less_equal), ("gt", greater), ("ge", greater_equal), ("eq", equal),
                 ("ne", not_equal)]:
        setattr(Tensor, f"__{n}__", f)
    Tensor.__neg__ = negative
    Tensor.__pos__ = lambda self: self
    Tensor.__abs__ = abs
    Tensor.__invert__ = logical_not_or_bitwise
    Tensor.__getitem__ = getitem
    g = globals()
    for n in ["sum", "mean", "max", "min", "prod", "var", "std", "argmax", "argmin", "logsumexp", "cumsum",
              "cumprod", "reshape", "transpose", "flatten", "squeeze", "expand_dims", "astype", "exp", "log",
              "log1p", "sqrt", "abs", "sign", "square", "reciprocal", "sin", "cos", "tanh", "sigmoid", "relu",
              "softplus", "clip", "matmul", "take", "broadcast_to", "flip", "all", "any", "sort", "argsort",
              "maximum", "minimum", "swapaxes", "moveaxis", "dot", "norm"]:
        setattr(Tensor, n, g[n])
    Tensor.unsqueeze = expand_dims
    Tensor.T = property(transpose, doc="The tensor with its axes reversed.")

    def view(self, *shape):
        """Return ``jitnet.reshape(self, shape)`` (the shape as one tuple or as separate ints)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)
    Tensor.view = view


_bind_operators()
