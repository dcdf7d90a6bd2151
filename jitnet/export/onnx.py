"""ONNX export of a traced function or module: ``jitnet.onnx.export(model, x, path="model.onnx")``.

The function is traced once (in evaluation mode for the Modules it uses; see ``export/graph.py``), and each
primitive of the unfused graph becomes one or a few ONNX nodes through the ``onnx`` package (an optional
extra: ``pip install "jitnet[interop]"``). Parameters and buffers become initializers named by their
state-dict names; constants recorded by the trace become initializers too. Shapes are the traced ones.

Exporting from the unfused graph rather than the plan keeps the mapping one table of primitives: fusion
groups, native drivers and specialized kernels are jitnet's runtime choices, and ONNX runtimes fuse for
themselves. Two patterns are recognized so that the model reads like the layers that made it: a 2-D matmul
plus a bias vector becomes ``Gemm``, and an evaluation-mode batch norm (``(x - mean) / sqrt(var + eps) *
gamma + beta`` on variables) becomes ``BatchNormalization``; nodes of a pattern whose values something else
reads are kept.

LSTM layers (``lstm_seq``, the whole sequence in one primitive) become ONNX's ``LSTM`` operator: one node
whatever the length, which runtimes run with their own fused kernels. jitnet packs each step's state as
``[h, c, i, f, g, o]`` and orders the gates i, f, g, o with weights ``W_ih (in, 4H)`` / ``W_hh (H, 4H)``;
ONNX orders them i, o, f, c with ``W (1, 4H, in)``, ``R (1, 4H, H)`` and ``B (1, 8H)`` (input then
recurrent bias). The exporter transposes and reorders the gate blocks with ONNX nodes (Transpose and
Gather on the initializers, which runtimes fold once). ONNX's LSTM returns every step's h but only the last
c, so the readers of the packed states must read h, or c at the last step, which is what ``nn.LSTM`` does;
for anything else (masked sequences, reading the gates or an intermediate c) the steps are unrolled into
elementary ONNX nodes instead, which computes the full packed state exactly.
"""
from __future__ import annotations

import numpy as np

from .. import lowp as _lowp
from ..compiler.ir import Node, Value
from .graph import trace_graph

__all__ = ["export", "supported_primitives", "UnsupportedPrimitiveError"]

OPSET = 17
_INT64_MIN = -(2 ** 63)


class UnsupportedPrimitiveError(NotImplementedError):
    """Raised when a traced graph holds a primitive with no ONNX mapping."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise ImportError('jitnet.onnx.export needs the "onnx" package: pip install "jitnet[interop]" '
                          '(or pip install onnx)') from e
    return onnx, helper, numpy_helper


# ==============================================================================================================
# The builder: ONNX names for graph values, initializers, and node emission
# ==============================================================================================================

class _Builder:
    def __init__(self, traced, helper, numpy_helper, onnx):
        self.t = traced
        self.g = traced.graph
        self.helper, self.nph, self.onnx = helper, numpy_helper, onnx
        self.nodes, self.inits, self.inputs = [], [], []
        self.names = {}           # Value id -> ONNX name
        self.var_names = {}       # id(variable) -> initializer name
        self.used = set()
        self.count = 0
        self.consumers = {}
        for n in self.g.live_nodes():
            for v in n.inputs:
                self.consumers.setdefault(v.id, []).append(n)
        for v in self.g.outputs:
            self.consumers.setdefault(v.id, []).append(None)

    # -- names ------------------------------------------------------------------------------------------------
    def fresh(self, hint):
        hint = "".join(c if c.isalnum() or c in "_./" else "_" for c in str(hint)) or "t"
        name = hint
        while name in self.used:
            self.count += 1
            name = f"{hint}_{self.count}"
        self.used.add(name)
        return name

    def init(self, arr, hint):
        """Add ``arr`` as an initializer; return its name."""
        arr = np.asarray(arr)
        if arr.dtype == object:
            raise UnsupportedPrimitiveError(f"onnx export: a constant of dtype object ({hint}) has no ONNX type")
        name = self.fresh(hint)
        self.inits.append(self.nph.from_array(np.array(arr, order="C", copy=True), name))
        return name

    def i64(self, values, hint="shape"):
        return self.init(np.asarray(values, dtype=np.int64), hint)

    def name(self, v):
        """Return the ONNX name of graph value ``v`` (arguments, variables and constants on first use)."""
        n = self.names.get(v.id)
        if n is not None:
            return n
        if v.kind == "state":
            key = id(v.var)
            n = self.var_names.get(key)
            if n is None:
                n = self.var_names[key] = self.init(_host(v.var._data), self.t.name_of(v.var))
        elif v.kind == "const":
            n = self.init(_host(v.const), "const")
        elif v.kind == "arg":
            raise AssertionError("arguments are named before the nodes")
        else:
            raise UnsupportedPrimitiveError(f"onnx export: value {v!r} of kind {v.kind!r} has no ONNX form "
                                            f"(a gradient input? export an inference function)")
        self.names[v.id] = n
        return n

    # -- nodes --------------------------------------------------------------------------------------------------
    def op(self, op_type, inputs, n_out=1, hint=None, **attrs):
        """Add one ONNX node; return its output name (or the list of names when n_out > 1)."""
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + op_type),
                                                **attrs))
        return outs[0] if n_out == 1 else outs

    def cast(self, name, src, dst):
        src, dst = np.dtype(src), np.dtype(dst)
        if src == dst:
            return name
        return self.op("Cast", [name], to=self.tensor_type(dst))

    def tensor_type(self, dt):
        return self.helper.np_dtype_to_tensor_dtype(np.dtype(dt))

    def vin(self, node, k, dtype=None):
        """The ONNX name of node input k, cast to ``dtype`` when given."""
        v = node.inputs[k]
        n = self.name(v)
        return n if dtype is None else self.cast(n, v.dtype, dtype)


def _host(a):
    """A host copy of a variable's or constant's array (device arrays are copied to the host)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)


# ==============================================================================================================
# Emitters: one function per primitive, returning the ONNX name of the node's output
# ==============================================================================================================

_EMIT = {}


def _emits(*names):
    def deco(f):
        for n in names:
            _EMIT[n] = f
        return f
    return deco


_UNARY = {"negative": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign",
          "reciprocal": "Reciprocal", "sin": "Sin", "cos": "Cos", "tanh": "Tanh", "sigmoid": "Sigmoid",
          "relu": "Relu", "softplus": "Softplus", "floor": "Floor", "ceil": "Ceil", "copy": "Identity",
          "identity": "Identity", "stop_gradient": "Identity"}
_BINARY = {"add": "Add", "subtract": "Sub", "multiply": "Mul", "divide": "Div", "power": "Pow",
           "maximum": "Max", "minimum": "Min"}
_COMPARE = {"equal": "Equal", "less": "Less", "less_equal": "LessOrEqual", "greater": "Greater",
            "greater_equal": "GreaterOrEqual"}
_LOGICAL = {"logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}


@_emits(*_UNARY)
def _unary(b, node):
    dt = node.out.dtype
    return b.op(_UNARY[node.prim.name], [b.vin(node, 0, dt)])


@_emits("square")
def _square(b, node):
    x = b.vin(node, 0, node.out.dtype)
    return b.op("Mul", [x, x])


@_emits("log1p")
def _log1p(b, node):
    dt = node.out.dtype
    return b.op("Log", [b.op("Add", [b.vin(node, 0, dt), b.init(np.ones((), dt), "one")])])


@_emits(*_BINARY)
def _binary(b, node):
    dt = node.out.dtype
    return b.op(_BINARY[node.prim.name], [b.vin(node, 0, dt), b.vin(node, 1, dt)])


def _common(node):
    return np.result_type(*[v.dtype for v in node.inputs])


@_emits(*_COMPARE, "not_equal")
def _compare(b, node):
    dt = _common(node)
    x, y = b.vin(node, 0, dt), b.vin(node, 1, dt)
    if node.prim.name == "not_equal":
        return b.op("Not", [b.op("Equal", [x, y])])
    return b.op(_COMPARE[node.prim.name], [x, y])


@_emits(*_LOGICAL)
def _logical(b, node):
    return b.op(_LOGICAL[node.prim.name], [b.vin(node, 0, np.bool_), b.vin(node, 1, np.bool_)])


@_emits("logical_not")
def _logical_not(b, node):
    return b.op("Not", [b.vin(node, 0, np.bool_)])


@_emits("bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not")
def _bitwise(b, node):
    if node.out.dtype != np.bool_:
        raise UnsupportedPrimitiveError(f"onnx export: {node.prim.name} on {node.out.dtype} needs ONNX opset 18; "
                                        f"only its boolean form is exported")
    ins = [b.vin(node, k, np.bool_) for k in range(len(node.inputs))]
    return b.op({"bitwise_and": "And", "bitwise_or": "Or", "bitwise_xor": "Xor", "bitwise_not": "Not"}
                [node.prim.name], ins)


@_emits("isnan")
def _isnan(b, node):
    v = node.inputs[0]
    if not _lowp.is_floating(v.dtype):
        return b.init(np.zeros(v.shape, np.bool_), "false")
    return b.op("IsNaN", [b.name(v)])


@_emits("isfinite")
def _isfinite(b, node):
    v = node.inputs[0]
    if not _lowp.is_floating(v.dtype):
        return b.init(np.ones(v.shape, np.bool_), "true")
    x = b.name(v)
    return b.op("Not", [b.op("Or", [b.op("IsNaN", [x]), b.op("IsInf", [x])])])


@_emits("floor_divide")
def _floor_divide(b, node):
    dt = node.out.dtype
    return b.op("Floor", [b.op("Div", [b.vin(node, 0, dt), b.vin(node, 1, dt)])])


@_emits("remainder")
def _remainder(b, node):
    # NumPy's remainder has the divisor's sign: C fmod, then add the divisor where the signs differ
    dt = node.out.dtype
    x, y = b.vin(node, 0, dt), b.vin(node, 1, dt)
    r = b.op("Mod", [x, y], fmod=1)
    zero = b.init(np.zeros((), dt), "zero")
    differ = b.op("Xor", [b.op("Less", [r, zero]), b.op("Less", [y, zero])])
    fix = b.op("And", [b.op("Not", [b.op("Equal", [r, zero])]), differ])
    return b.op("Where", [fix, b.op("Add", [r, y]), r])


@_emits("iremainder")
def _iremainder(b, node):
    dt = node.out.dtype
    return b.op("Mod", [b.vin(node, 0, dt), b.vin(node, 1, dt)], fmod=0)


@_emits("ifloor_divide")
def _ifloor_divide(b, node):
    # (x - x mod y) / y is exact, so ONNX's truncating integer division gives the floor
    dt = node.out.dtype
    x, y = b.vin(node, 0, dt), b.vin(node, 1, dt)
    return b.op("Div", [b.op("Sub", [x, b.op("Mod", [x, y], fmod=0)]), y])


@_emits("clip")
def _clip(b, node):
    dt = node.out.dtype
    return b.op("Min", [b.op("Max", [b.vin(node, 0, dt), b.vin(node, 1, dt)]), b.vin(node, 2, dt)])


@_emits("where")
def _where(b, node):
    dt = node.out.dtype
    return b.op("Where", [b.vin(node, 0, np.bool_), b.vin(node, 1, dt), b.vin(node, 2, dt)])


@_emits("cast", "convert")          # (convert: a cast to or from float16/bfloat16)
def _cast(b, node):
    return b.op("Cast", [b.vin(node, 0)], to=b.tensor_type(node.out.dtype))


# -- views and layout ------------------------------------------------------------------------------------------

@_emits("reshape")
def _reshape(b, node):
    return b.op("Reshape", [b.vin(node, 0), b.i64(node.out.shape)])


@_emits("transpose")
def _transpose(b, node):
    return b.op("Transpose", [b.vin(node, 0)], perm=list(node.params["axes"]))


@_emits("broadcast_to")
def _broadcast_to(b, node):
    return b.op("Expand", [b.vin(node, 0), b.i64(node.out.shape)])


@_emits("flip")
def _flip(b, node):
    axes = list(node.params["axes"])
    if not axes:
        return b.op("Identity", [b.vin(node, 0)])
    return b.op("Slice", [b.vin(node, 0), b.i64([-1] * len(axes), "starts"),
                          b.i64([_INT64_MIN] * len(axes), "ends"), b.i64(axes, "axes"),
                          b.i64([-1] * len(axes), "steps")])


@_emits("concatenate")
def _concatenate(b, node):
    dt = node.out.dtype
    return b.op("Concat", [b.vin(node, k, dt) for k in range(len(node.inputs))], axis=int(node.params["axis"]))


@_emits("pad")
def _pad(b, node):
    pw = node.params["pad_width"]
    dt = node.out.dtype
    pads = [lo for lo, _ in pw] + [hi for _, hi in pw]
    value = b.init(np.asarray(node.params["value"], dtype=dt), "pad_value")
    return b.op("Pad", [b.vin(node, 0, dt), b.i64(pads, "pads"), value], mode="constant")


def _index_parts(template, shape, what):
    """Split a basic/advanced index into per-axis slices (start, stop, step), int axes and array positions."""
    consumed = sum(1 for e in template if not (e is None or e is Ellipsis))
    entries = []
    for e in template:
        if e is Ellipsis:
            entries += [slice(None)] * (len(shape) - consumed)
        else:
            entries.append(e)
    entries += [slice(None)] * (len(shape) - sum(1 for e in entries if e is not None))
    slices, ints, arrays, ax = [], [], [], 0
    for e in entries:
        if e is None:
            continue
        if isinstance(e, bool):
            raise UnsupportedPrimitiveError(f"onnx export: {what}: a boolean scalar index is not exported")
        if isinstance(e, tuple) and len(e) == 2 and e[0] == "__arr__":
            arrays.append((ax, e[1]))
        elif isinstance(e, int):
            i = e % shape[ax]
            slices.append((ax, i, i + 1, 1))
            ints.append(ax)
        elif isinstance(e, slice):
            start, stop, step = e.indices(shape[ax])
            if (start, stop, step) != (0, shape[ax], 1):
                slices.append((ax, start, stop, step))
        ax += 1
    return slices, ints, arrays


def _emit_index(b, x, shape, template, array_names, out_shape, what="getitem"):
    """Emit x[template] for an input of ``shape`` (Slice, then Gather for one index array, then Reshape)."""
    slices, ints, arrays = _index_parts(template, shape, what)
    if len(arrays) > 1 or (arrays and ints):
        raise UnsupportedPrimitiveError(f"onnx export: {what}: indexing with several index arrays, or index arrays "
                                        f"mixed with integers, is not exported (template {template})")
    if slices:
        starts = [s[1] for s in slices]
        ends = [(_INT64_MIN if s[2] < 0 else s[2]) for s in slices]
        x = b.op("Slice", [x, b.i64(starts, "starts"), b.i64(ends, "ends"), b.i64([s[0] for s in slices], "axes"),
                           b.i64([s[3] for s in slices], "steps")])
    if arrays:
        ax, k = arrays[0]
        idx = array_names[k]
        if idx[1].kind == "b":
            raise UnsupportedPrimitiveError(f"onnx export: {what}: boolean mask indexing has a data-dependent "
                                            f"shape and is not exported")
        x = b.op("Gather", [x, idx[0]], axis=ax)
    return b.op("Reshape", [x, b.i64(out_shape)])


@_emits("getitem")
def _getitem(b, node):
    arrays = [(b.name(v), v.dtype) for v in node.inputs[1:]]
    src = node.inputs[0]
    if src.kind == "node" and src.node.prim.name == "lstm_seq" and src.id in b.lstm_views:
        view, _ = b.lstm_views[src.id]
        return _emit_index(b, view, src.shape, node.params["template"], arrays, node.out.shape)
    return _emit_index(b, b.name(src), src.shape, node.params["template"], arrays, node.out.shape)


# -- reductions, softmax, indexing ------------------------------------------------------------------------------

@_emits("reduce")
def _reduce(b, node):
    op, axes, keep = node.params["op"], list(node.params["axes"]), int(node.params["keepdims"])
    dt = node.out.dtype
    x = b.vin(node, 0, dt if dt != np.bool_ else np.int64)
    if op == "sum":
        y = b.op("ReduceSum", [x, b.i64(axes, "axes")], keepdims=keep)
    else:
        y = b.op({"prod": "ReduceProd", "max": "ReduceMax", "min": "ReduceMin"}[op], [x], axes=axes, keepdims=keep)
    return b.cast(y, np.int64, np.bool_) if dt == np.bool_ else y


@_emits("logsumexp")
def _logsumexp(b, node):
    p = node.params
    axes = p.get("axes", p.get("axis"))
    axes = [axes] if isinstance(axes, int) else list(axes)
    return b.op("ReduceLogSumExp", [b.vin(node, 0)], axes=axes, keepdims=int(p.get("keepdims", False)))


@_emits("argreduce")
def _argreduce(b, node):
    p = node.params
    x = b.vin(node, 0, np.float64 if node.inputs[0].dtype == np.bool_ else None)
    axis = p["axis"]
    if axis is None:
        x = b.op("Reshape", [x, b.i64([-1])])
        axis = 0
    y = b.op("ArgMax" if p["is_max"] else "ArgMin", [x], axis=int(axis), keepdims=0)
    return b.op("Reshape", [y, b.i64(node.out.shape)])


@_emits("cumulative")
def _cumulative(b, node):
    p = node.params
    if p["op"] != "sum":
        raise UnsupportedPrimitiveError(f"onnx export: cumulative {p['op']} has no ONNX operator (only cumsum)")
    x = b.vin(node, 0, node.out.dtype)
    return b.op("CumSum", [x, b.i64(int(p["axis"]), "axis")], exclusive=int(p["exclusive"]),
                reverse=int(p["reverse"]))


@_emits("softmax", "log_softmax")
def _softmax(b, node):
    return b.op("Softmax" if node.prim.name == "softmax" else "LogSoftmax", [b.vin(node, 0)],
                axis=int(node.params["axis"]))


@_emits("matmul")
def _matmul(b, node):
    a, w = node.inputs
    dt = node.out.dtype
    cdt = dt if dt in (np.float32, np.float64) else np.dtype(np.float64)
    y = b.op("MatMul", [b.vin(node, 0, cdt), b.vin(node, 1, cdt)])
    return b.cast(y, cdt, dt)


@_emits("take")
def _take(b, node):
    return b.op("Gather", [b.vin(node, 0), b.vin(node, 1, np.int64)], axis=int(node.params["axis"]))


@_emits("take_along_axis")
def _take_along(b, node):
    return b.op("GatherElements", [b.vin(node, 0), b.vin(node, 1, np.int64)], axis=int(node.params["axis"]))


@_emits("embedding")
def _embedding(b, node):
    return b.op("Gather", [b.vin(node, 0), b.vin(node, 1, np.int64)], axis=0)


@_emits("one_hot")
def _one_hot(b, node):
    p = node.params
    dt = node.out.dtype
    values = b.init(np.asarray([p["off"], p["on"]], dtype=dt), "one_hot_values")
    return b.op("OneHot", [b.vin(node, 0, np.int64), b.i64(int(p["depth"]), "depth"), values], axis=-1)


# -- convolution, pooling, batch norm ---------------------------------------------------------------------------

@_emits("conv2d")
def _conv2d(b, node):
    p = node.params
    (pt, pb), (pl, pr) = p["pads"]
    w = node.inputs[1]
    ins = [b.vin(node, k) for k in range(len(node.inputs))]
    return b.op("Conv", ins, kernel_shape=list(w.shape[2:]), strides=list(p["stride"]),
                dilations=list(p["dilation"]), pads=[pt, pl, pb, pr])


@_emits("max_pool2d", "avg_pool2d")
def _pool(b, node):
    p = node.params
    ph, pw = p["p"]
    attrs = dict(kernel_shape=list(p["k"]), strides=list(p["s"]), pads=[ph, pw, ph, pw])
    if node.prim.name == "max_pool2d":
        return b.op("MaxPool", [b.vin(node, 0)], **attrs)
    return b.op("AveragePool", [b.vin(node, 0)], count_include_pad=int(p["include_pad"]), **attrs)


@_emits("channel_affine")
def _channel_affine(b, node):
    x = node.inputs[0]
    shape = [1] * len(x.shape)
    shape[1] = x.shape[1]
    a = b.op("Reshape", [b.vin(node, 1), b.i64(shape)])
    c = b.op("Reshape", [b.vin(node, 2), b.i64(shape)])
    return b.op("Add", [b.op("Mul", [b.name(x), a]), c])


# -- LSTM -------------------------------------------------------------------------------------------------------

def _gate_perm(hd):
    """Row order that turns jitnet's gate blocks [i, f, g, o] into ONNX's [i, o, f, c]."""
    return np.concatenate([np.arange(k * hd, (k + 1) * hd) for k in (0, 3, 1, 2)]).astype(np.int64)


def _cols(b, x, lo, hi, axis=1):
    return b.op("Slice", [x, b.i64([lo], "starts"), b.i64([hi], "ends"), b.i64([axis], "axes")])


def _lstm_cell(b, xw, s_prev, whh, bias, hd, mask=None, dt=np.float32):
    """Emit one unrolled LSTM step on packed states (B, 6H); return the name of the next packed state."""
    h, c = _cols(b, s_prev, 0, hd), _cols(b, s_prev, hd, 2 * hd)
    z = b.op("Add", [b.op("Add", [b.op("MatMul", [h, whh]), xw]), bias])
    zi, zf, zg, zo = b.op("Split", [z, b.i64([hd] * 4, "split")], n_out=4, axis=1)
    i, f, o = b.op("Sigmoid", [zi]), b.op("Sigmoid", [zf]), b.op("Sigmoid", [zo])
    g = b.op("Tanh", [zg])
    c2 = b.op("Add", [b.op("Mul", [f, c]), b.op("Mul", [i, g])])
    h2 = b.op("Mul", [o, b.op("Tanh", [c2])])
    s = b.op("Concat", [h2, c2, i, f, g, o], axis=1)
    if mask is None:
        return s
    # finished rows keep h and c and write zero gates, as the kernel does
    keep = b.op("Concat", [h, c, b.op("Mul", [_cols(b, s_prev, 2 * hd, 6 * hd), b.init(np.zeros((), dt), "zero")])],
                axis=1)
    live = b.op("Unsqueeze", [b.op("Not", [b.op("Equal", [mask, b.init(np.zeros((), dt), "zero")])]),
                              b.i64([1], "axes")])
    return b.op("Where", [live, s, keep])


@_emits("lstm_step")
def _lstm_step(b, node):
    hd = node.inputs[2].shape[0]
    mask = b.vin(node, 4, node.out.dtype) if len(node.inputs) > 4 else None
    return _lstm_cell(b, b.vin(node, 0), b.vin(node, 1), b.vin(node, 2), b.vin(node, 3), hd, mask,
                      node.out.dtype)


def _lstm_readers_ok(b, node):
    """True when every reader of the packed states reads h (any step) or c (last step) with basic indexing."""
    T, _, h6 = node.out.shape
    hd = h6 // 6
    for r in b.consumers.get(node.out.id, []):
        if r is None or r.prim.name != "getitem" or len(r.inputs) != 1:
            return False
        try:
            slices, ints, arrays = _index_parts(r.params["template"], node.out.shape, "getitem")
        except UnsupportedPrimitiveError:
            return False
        rng = [range(n) for n in node.out.shape]
        for ax, start, stop, step in slices:
            rng[ax] = range(start, stop, step)
        cols, times = rng[2], rng[0]
        if len(cols) == 0 or len(times) == 0:
            continue
        if max(cols) < hd:
            continue
        if max(cols) < 2 * hd and set(times) == {T - 1}:
            continue
        return False
    return True


@_emits("lstm_seq")
def _lstm_seq(b, node):
    xw_v, s0_v, whh_v, bias_v = node.inputs[:4]
    T, bsz, h6 = node.out.shape
    hd = h6 // 6
    dt = node.out.dtype
    if len(node.inputs) > 4 or not _lstm_readers_ok(b, node):
        return _lstm_unrolled(b, node)
    perm = b.i64(_gate_perm(hd), "lstm_gate_order")
    # X and W: the input projection xw = seq @ W_ih is folded into the LSTM node when it feeds only this node
    src = xw_v.node if xw_v.kind == "node" else None
    if src is not None and src.prim.name == "matmul" and len(src.inputs[1].shape) == 2 \
            and len(src.inputs[0].shape) == 3 and len(b.consumers.get(xw_v.id, [])) == 1 \
            and src.inputs[0].dtype == dt and src.inputs[1].dtype == dt:
        x = b.name(src.inputs[0])
        w_src = b.name(src.inputs[1])                   # (in, 4H)
    else:
        x = b.name(xw_v)
        w_src = b.init(np.eye(4 * hd, dtype=dt), "lstm_identity")
    W = b.op("Unsqueeze", [b.op("Gather", [b.op("Transpose", [w_src], perm=[1, 0]), perm], axis=0),
                           b.i64([0], "axes")], hint="lstm_W")
    R = b.op("Unsqueeze", [b.op("Gather", [b.op("Transpose", [b.name(whh_v)], perm=[1, 0]), perm], axis=0),
                           b.i64([0], "axes")], hint="lstm_R")
    B = b.op("Unsqueeze", [b.op("Concat", [b.op("Gather", [b.name(bias_v), perm], axis=0),
                                           b.init(np.zeros(4 * hd, dt), "lstm_zero_bias")], axis=0),
                           b.i64([0], "axes")], hint="lstm_B")
    s0 = b.name(s0_v)
    h0 = b.op("Unsqueeze", [_cols(b, s0, 0, hd), b.i64([0], "axes")])
    c0 = b.op("Unsqueeze", [_cols(b, s0, hd, 2 * hd), b.i64([0], "axes")])
    Y, _, Yc = b.op("LSTM", [x, W, R, B, "", h0, c0], n_out=3, hint="lstm", hidden_size=hd,
                    direction="forward")
    hs = b.op("Squeeze", [Y, b.i64([1], "axes")])                  # (T, B, H)
    cs = b.op("Expand", [Yc, b.i64([T, bsz, hd])])                 # the last c, valid at t = T - 1 only
    view = b.op("Concat", [hs, cs], axis=2, hint="lstm_hc")
    b.lstm_views[node.out.id] = (view, node)
    return view


def _lstm_unrolled(b, node):
    T, bsz, h6 = node.out.shape
    hd = h6 // 6
    xw, s, whh, bias = (b.vin(node, k) for k in range(4))
    mask = b.vin(node, 4, node.out.dtype) if len(node.inputs) > 4 else None
    steps = []
    for t in range(T):
        xt = b.op("Gather", [xw, b.i64(t, "t")], axis=0)
        mt = b.op("Gather", [mask, b.i64(t, "t")], axis=0) if mask is not None else None
        s = _lstm_cell(b, xt, s, whh, bias, hd, mt, node.out.dtype)
        steps.append(b.op("Unsqueeze", [s, b.i64([0], "axes")]))
    return b.op("Concat", steps, axis=0) if len(steps) > 1 else steps[0]


# ==============================================================================================================
# Patterns: a linear layer becomes Gemm, an evaluation-mode batch norm one BatchNormalization
# ==============================================================================================================

def _producer(v, name):
    """The node producing value v when it is primitive ``name``, else None."""
    return v.node if v.kind == "node" and v.node.prim.name == name else None


def _only_reader(b, v, node):
    """True when ``node`` is the one reader of value v (and v is not returned)."""
    return b.consumers.get(v.id, []) == [node]


def _channel_vector(v, x_shape):
    """The 1-D (C,) value that v reshapes to (1, C, 1, ...) for an input of x_shape, else None."""
    r = _producer(v, "reshape")
    if r is None or len(x_shape) < 2:
        return None
    want = (1, x_shape[1]) + (1,) * (len(x_shape) - 2)
    src = r.inputs[0]
    return src if v.shape == want and src.shape == (x_shape[1],) else None


def _match_batch_norm(b, sub):
    """Match (x - mean) * 1/sqrt(var + eps) [* gamma] [+ beta] from ``sub``; return the parts or None."""
    x = sub.inputs[0]
    if x.dtype.kind != "f" or len(x.shape) < 2:
        return None
    mean = _channel_vector(sub.inputs[1], x.shape)
    readers = b.consumers.get(sub.out.id, [])
    if mean is None or len(readers) != 1 or readers[0] is None or readers[0].prim.name != "multiply":
        return None
    mul = readers[0]
    if mul.inputs[0] is not sub.out:
        return None
    rc = _producer(mul.inputs[1], "reciprocal")
    sq = rc and _producer(rc.inputs[0], "sqrt")
    ad = sq and _producer(sq.inputs[0], "add")
    if ad is None or ad.inputs[1].kind != "const" or np.size(ad.inputs[1].const) != 1:
        return None
    var = _channel_vector(ad.inputs[0], x.shape)
    if var is None:
        return None
    chain = [sub, mul, rc, sq, ad] + [v.node for v in (sub.inputs[1], ad.inputs[0])]
    out, gamma, beta = mul, None, None
    for prim in ("multiply", "add"):
        rd = b.consumers.get(out.out.id, [])
        if len(rd) != 1 or rd[0] is None or rd[0].prim.name != prim or rd[0].inputs[0] is not out.out:
            continue
        vec = _channel_vector(rd[0].inputs[1], x.shape)
        if vec is None or rd[0].out.dtype != x.dtype:
            continue
        if prim == "multiply":
            gamma = vec
        else:
            beta = vec
        chain += [rd[0], rd[0].inputs[1].node]
        out = rd[0]
    if any(v.dtype != x.dtype for v in (mean, var) + tuple(t for t in (gamma, beta) if t is not None)):
        return None
    eps = float(np.asarray(_host(ad.inputs[1].const)).reshape(()))
    return dict(x=x, mean=mean, var=var, gamma=gamma, beta=beta, eps=eps, out=out, chain=chain)


def _patterns(b):
    """Return ({node id: emitter} for the last node of each pattern, ids of the nodes it replaces)."""
    special, members = {}, {}
    for node in b.g.live_nodes():
        if node.prim.name == "subtract":
            m = _match_batch_norm(b, node)
            if m is not None:
                special[m["out"].id] = lambda b, n, m=m: _emit_batch_norm(b, m)
                members[m["out"].id] = m["chain"]
        elif node.prim.name == "add" and len(node.inputs[1].shape) == 1:
            mm = _producer(node.inputs[0], "matmul")
            if mm is not None and _only_reader(b, mm.out, node) and len(mm.inputs[0].shape) == 2 \
                    and len(mm.inputs[1].shape) == 2 and node.out.shape == mm.out.shape \
                    and all(v.dtype == node.out.dtype for v in (*mm.inputs, node.inputs[1])) \
                    and node.out.dtype.kind == "f":
                special[node.id] = lambda b, n, mm=mm: b.op("Gemm", [b.vin(mm, 0), b.vin(mm, 1), b.vin(n, 1)])
                members[node.id] = [mm, node]
    # a replaced node is skipped only when every reader of its value is inside its pattern
    skip = set()
    for last, chain in members.items():
        gone = {n.id for n in chain if n.id != last}
        changed = True
        while changed:                  # keep a node whose value a kept node or the outside still reads
            changed = False
            for n in chain:
                if n.id in gone and any(r is None or (r.id not in gone and r.id != last)
                                        for r in b.consumers.get(n.out.id, [])):
                    gone.discard(n.id)
                    changed = True
        skip |= gone
    return special, skip


def _emit_batch_norm(b, m):
    x = m["x"]
    dt, c = x.dtype, x.shape[1]
    scale = b.name(m["gamma"]) if m["gamma"] is not None else b.init(np.ones(c, dt), "bn_scale")
    bias = b.name(m["beta"]) if m["beta"] is not None else b.init(np.zeros(c, dt), "bn_bias")
    return b.op("BatchNormalization", [b.name(x), scale, bias, b.name(m["mean"]), b.name(m["var"])],
                epsilon=m["eps"])


# ==============================================================================================================
# Errors for primitives with no ONNX form
# ==============================================================================================================

_F32 = np.dtype(np.float32)


def _lowp_emitter(node):
    """The emitter of a float16/bfloat16 row (``<name>:f32``, see ``jitnet.lowp``), or None if it is not one.

    It follows the row's compute rule in ONNX nodes: the low-precision inputs are Cast to float32, the
    original primitive's emitter runs on those, and a low-precision result is Cast back (ONNX's Cast rounds
    to nearest even, as jitnet does). Parameters naming a low-precision dtype become float32, as in the row.
    """
    orig = node.prim.extra.get("lowp_of")
    if orig is None:
        return None
    if orig.name in ("lstm_seq", "lstm_step"):
        raise UnsupportedPrimitiveError(f"onnx export: {orig.name} on {node.out.dtype} tensors is not exported "
                                        "(ONNX's LSTM runs float32): convert the model and inputs to float32")
    inner = _EMIT.get(orig.name)
    if inner is None:
        raise _unsupported(node, orig.name)

    def emit(b, node):
        ins = []
        for v in node.inputs:
            if not _lowp.is_lowp(v.dtype):
                ins.append(v)
            elif v.kind == "const":
                ins.append(Value(f"{v.id}:f32", v.shape, _F32, "const",
                                 const=_lowp.convert(np.asarray(_host(v.const)), _F32)))
            else:
                w = Value(f"{v.id}:f32", v.shape, _F32, "node", node=v.node)
                b.names[w.id] = b.cast(b.name(v), v.dtype, _F32)
                ins.append(w)
        out = node.out
        wide = _lowp.is_lowp(out.dtype)
        o = Value(out.id, out.shape, _F32 if wide else out.dtype, "node")
        params = {k: (_F32 if isinstance(p, np.dtype) and _lowp.is_lowp(p) else p)
                  for k, p in node.params.items()}
        proxy = Node(node.id, orig, ins, params, out=o)
        o.node = proxy
        name = inner(b, proxy)
        return b.cast(name, _F32, out.dtype) if wide else name
    return emit


_HINTS = {
    "random": "a random draw (dropout in training mode?): export in evaluation mode (the default)",
    "bn_moments": "batch statistics of batch norm in training mode: export in evaluation mode (the default)",
    "scan": "a jn.scan loop (GRU/RNN layers run one): only LSTM layers and unrolled Python loops are exported",
    "while_loop": "a jn.while_loop: data-dependent loops are not exported",
    "tuple_get": "the output of a loop primitive: loops other than the LSTM layer are not exported",
}


def _unsupported(node, name=None):
    name = name or node.prim.name
    hint = _HINTS.get(name)
    if hint is None and (node.prim.kind == "update" or name.endswith(("_grad", "_bwd", "_dz", "_dprev", "_dw"))):
        hint = "a gradient or optimizer primitive: export the inference function (the model), not a training step"
    if hint is None and name == "assign":
        hint = "a variable update: export the inference function, not a training step"
    return UnsupportedPrimitiveError(
        f"onnx export: primitive {name!r} has no ONNX mapping" + (f" ({hint})" if hint else "")
        + f". Supported primitives: {', '.join(supported_primitives())}")


def supported_primitives():
    """Return the sorted names of the jitnet primitives the ONNX exporter maps."""
    return sorted(_EMIT)


# ==============================================================================================================
# Entry point
# ==============================================================================================================

def export(fn_or_module, *example_args, path=None, input_names=None, output_names=None, training=False,
           opset=OPSET, check=True, model_name=None, **example_kwargs):
    """Trace ``fn_or_module(*example_args)`` and return it as an ``onnx.ModelProto`` (also saved to ``path``).

    The Modules found on the callable (the module itself, or those held by a bound method's object) are put in
    evaluation mode for the trace (``training=True`` traces training mode) and restored after. Parameters and
    buffers become initializers named by their state-dict names; inputs are named ``input_0``, ... (or
    ``input_names``) and outputs ``output_0``, ... (or ``output_names``), with the traced shapes. Raises
    :class:`UnsupportedPrimitiveError` naming a primitive without an ONNX mapping and listing the supported ones.
    """
    onnx, helper, numpy_helper = _onnx()
    if opset < 13:
        raise ValueError(f"onnx export: opset {opset} is too old; the exporter emits opset 13-{OPSET} operators")
    traced = trace_graph(fn_or_module, example_args, example_kwargs, training=bool(training))
    g = traced.graph
    writers = sorted({n.prim.name for n in g.live_nodes() if n.effects})
    if writers or g.grad_outputs:
        what = f"updates variables ({', '.join(writers)})" if writers else "writes gradients (.grad)"
        raise UnsupportedPrimitiveError(f"onnx export: the traced function {what}; export the inference function "
                                        f"(the model), not a training step")
    b = _Builder(traced, helper, numpy_helper, onnx)
    b.lstm_views = {}
    args = sorted((v for v in g.values if v.kind == "arg"), key=lambda v: v.arg_index)
    if input_names is not None and len(input_names) != traced.n_args:
        raise ValueError(f"onnx export: {len(input_names)} input_names for {traced.n_args} tensor arguments")
    inputs = []
    by_index = {v.arg_index: v for v in args}
    for i in range(traced.n_args):
        nm = b.fresh(input_names[i] if input_names is not None else f"input_{i}")
        v = by_index.get(i)
        if v is not None:
            b.names[v.id] = nm
            shape, dt = v.shape, v.dtype
        else:                      # an argument the outputs do not depend on: keep the signature anyway
            shape, dt = (), np.dtype(np.float32)
        inputs.append(helper.make_tensor_value_info(nm, b.tensor_type(dt), list(shape)))
    special, skip = _patterns(b)
    for node in g.live_nodes():
        if node.id in skip:
            continue
        emit = special.get(node.id) or _EMIT.get(node.prim.name) or _lowp_emitter(node)
        if emit is None:
            raise _unsupported(node)
        b.names[node.out.id] = emit(b, node)
    if output_names is not None and len(output_names) != len(g.outputs):
        raise ValueError(f"onnx export: {len(output_names)} output_names for {len(g.outputs)} outputs")
    outputs = []
    for k, v in enumerate(g.outputs):
        src = b.name(v)
        if v.kind == "node" and v.id in b.lstm_views:
            raise UnsupportedPrimitiveError("onnx export: returning an LSTM's packed states is not exported; "
                                            "return the outputs h")
        nm = b.fresh(output_names[k] if output_names is not None else f"output_{k}")
        b.nodes.append(helper.make_node("Identity", [src], [nm], name=b.fresh("n_output")))
        outputs.append(helper.make_tensor_value_info(nm, b.tensor_type(v.dtype), list(v.shape)))
    name = model_name or getattr(fn_or_module, "__name__", None) or type(fn_or_module).__name__
    graph = helper.make_graph(b.nodes, str(name), inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="jitnet")
    if check:
        onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model
