"""Tracing: run a step once with real data while recording every primitive into a graph.

The tracer is an interpreter pushed on ``autodiff``'s stack. ``apply`` calls reach it instead of the eager
path; it computes the result with the same kernels (so the first call returns real values and needs no shape
rules) and records a graph node. Tensors produced while tracing are :class:`TracerTensor`; asking for their
Python value (``bool``, ``item``, ``numpy``) raises :class:`TracingError`, because a compiled step cannot
follow Python control flow that depends on data.

Variables (``jitnet.Parameter``) read by the step become implicit inputs; in-place updates of them
(optimizer kernels, ``Variable.assign``) become effect nodes, ordered after every read of the old value.
"""
from __future__ import annotations

import linecache
import math
import os
import sys

import numpy as np

from .. import backends, ops
from ..autodiff import core as ad
from ..autodiff import nans
from ..autodiff.sparse import IndexedSlices
from ..lazy import LazyModule
from ..tensor import Parameter, Tensor
from .ir import Graph
from .prims import ASSIGN

_G = LazyModule("jitnet.backend_cuda")      # the CUDA backend, imported once a GPU is in use

__all__ = ["TracingError", "TracerTensor", "Tracer", "flatten", "unflatten"]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TracingError(TypeError):
    """Raised when a jitted function needs the Python value of a traced tensor."""


def _user_frame():
    """Return (filename, lineno, source line) of the innermost frame outside the jitnet package."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not fn.startswith(_PKG_DIR + os.sep):
            line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
            return f.f_code.co_filename, f.f_lineno, line
        f = f.f_back
    return "<unknown>", 0, ""


def _concrete_error(what):
    fn, ln, src = _user_frame()
    return TracingError(
        f"jitnet.jit: {what} needs the value of a traced tensor, which is not known while the step is "
        f"compiled.\n  File \"{fn}\", line {ln}: {src}\n"
        "Python control flow on tensor values cannot be compiled. Use jn.where(cond, a, b) for an elementwise "
        "choice, jn.while_loop / jn.scan for loops, compute the value outside the jitted function, or pass it "
        "as a static argument: jn.jit(f, static_argnums=(...)).")


class TracerTensor(Tensor):
    """A tensor seen while tracing: real data for this call plus its value in the graph."""

    __slots__ = ("_val", "_tracer")

    def _deny(self, what):
        raise _concrete_error(what)

    def __bool__(self):
        self._deny("bool(tensor) (an `if` or `while` on a tensor)")

    def item(self):
        self._deny("tensor.item()")

    def numpy(self):
        self._deny("tensor.numpy()")

    def tolist(self):
        self._deny("tensor.tolist()")

    def __float__(self):
        self._deny("float(tensor)")

    def __int__(self):
        self._deny("int(tensor)")

    def __index__(self):
        self._deny("using a tensor as a Python index")

    def __array__(self, dtype=None, copy=None):
        self._deny("converting a tensor to a NumPy array")

    def __repr__(self):
        return f"TracerTensor(shape={self.shape}, dtype={self.dtype}, value={self._val!r})"

    def detach(self):
        t = _make_tracer_tensor(self._data, self._val, self._tracer)
        return t


def _make_tracer_tensor(data, val, tracer):
    t = object.__new__(TracerTensor)
    t._data = data
    t._node = None
    t.requires_grad = False
    t.grad = None
    t.name = None
    t._val = val
    t._tracer = tracer
    return t


class TupleArray(tuple):
    """The several arrays a loop primitive returns, carried as one value (shape (), dtype object)."""

    shape = ()
    dtype = np.dtype(object)
    size = 1
    ndim = 0


def _plain(dt):
    """Whether an abstract trace may stand a placeholder in for an array of dtype ``dt`` (32/64-bit numbers, bool)."""
    return dt == np.bool_ or (dt.kind in "biuf" and dt.itemsize >= 4)


class AbstractFallback(Exception):
    """Raised inside an abstract trace when an op's output shape could depend on a value it did not compute."""


# Rows whose output shape, or whose number of steps, can depend on the values of their inputs (a boolean mask
# index, a loop's condition): an abstract trace that reaches one with an unsettled input is redone concretely.
# (A scan runs its fixed number of steps on placeholder values: its outputs' shapes do not depend on them.)
_VALUE_SHAPED = frozenset({"getitem", "while_loop"})

# Exact IEEE operations whose NumPy ufunc gives the bits the generated kernel gives, for operands of one dtype.
# The abstract trace computes the few small settled values it needs (a step counter's increment, the mean's
# gradient scale) with them: one more eager kernel compiled for a scalar costs 0.1-0.25 s of a cold start.
_EXACT_UFUNCS = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply}


class Tracer:
    """The interpreter that records a graph while computing every op (or, abstractly, shaping elementwise ones)."""

    def __init__(self, snapshot_vars=False, parent=None):
        self.graph = Graph()
        self.parent = parent         # set for a loop body: outer tensors and variables become captures
        self.n_args = 0
        self.captures = []           # outer tensors read by a loop body, in capture-slot order
        self._captured = {}
        self._consts = {}            # id(tensor) -> Value (and keep the tensor alive)
        self._keep = []
        self._state = {}             # id(var) -> current Value read of that variable
        self._readers = {}           # id(var) -> nodes that read the current version
        self._last_writer = {}       # id(var) -> effect node
        self.vars = {}               # id(var) -> var (in first-seen order)
        self._grads = {}             # id(var) -> (var, current .grad: TracerTensor, Tensor or None)
        self.snapshots = {} if snapshot_vars else None
        # Abstract mode (``abstract=True``, snapshots on): elementwise ops record their node without running;
        # their output is a zero-filled array of the right shape and dtype, and every array computed from one
        # is "unsettled" (id -> array, kept alive so ids stay unique). The step's kernels are then compiled once,
        # for the plan, instead of once per op for the trace and again fused.
        self.unsettled = None

    def _mark(self, v, arr):
        """Record on IR value ``v`` the device its array ``arr`` lives on (the plan builder reads it)."""
        if ad._DEVICES and not isinstance(arr, (np.ndarray, tuple)):
            v.device = backends.backend_of(arr).name

    # -- values -----------------------------------------------------------------------------------------------
    def arg(self, t: Tensor, index: int) -> TracerTensor:
        self.n_args = max(self.n_args, index + 1)
        v = self.graph.new_value(t.shape, t.dtype, "arg", arg_index=index)
        self._mark(v, t._data)
        tt = _make_tracer_tensor(t._data, v, self)
        tt.requires_grad = t.requires_grad
        return tt

    def value_of(self, t: Tensor):
        if isinstance(t, TracerTensor) and t._tracer is self:
            return t._val
        if self.parent is not None and (isinstance(t, (TracerTensor, Parameter))):
            return self._capture(t)
        if isinstance(t, TracerTensor):
            raise TracingError("a tensor traced by another jitted function leaked into this one (a jitted "
                               "function returned or stored a traced tensor?)")
        if isinstance(t, Parameter):
            return self._read_var(t)
        v = self._consts.get(id(t))
        if v is None:
            v = self.graph.new_value(t.shape, t.dtype, "const", const=t._data)
            self._mark(v, t._data)
            self._consts[id(t)] = v
            self._keep.append(t)
        return v

    def _capture(self, t):
        v = self._captured.get(id(t))
        if v is None:
            if isinstance(t, TracerTensor) and not self._is_ancestor(t._tracer):
                raise TracingError("a tensor traced by another jitted function leaked into a loop body")
            v = self.graph.new_value(t.shape, t.dtype, "arg", arg_index=None)
            self._mark(v, t._data)
            self._captured[id(t)] = v
            self.captures.append((t, v))
        return v

    def _is_ancestor(self, tr):
        p = self.parent
        while p is not None:
            if p is tr:
                return True
            p = p.parent
        return False

    def finish_captures(self):
        """Give every captured outer tensor an argument index after the explicit arguments."""
        for k, (t, v) in enumerate(self.captures):
            v.arg_index = self.n_args + k
        return [t for t, _ in self.captures]

    def _read_var(self, var):
        key = id(var)
        v = self._state.get(key)
        if v is None:
            if key not in self.vars:
                self.vars[key] = var
                if self.snapshots is not None:
                    self.snapshots[key] = (var, _copy_array(var._data), var._grad)
            v = self.graph.new_value(var.shape, var.dtype, "state", var=var, after=self._last_writer.get(key))
            self._mark(v, var._data)
            v.name = var.name
            self._state[key] = v
            self._readers[key] = []
        return v

    def restore_snapshots(self):
        """Put back every variable's value (and ``.grad``) as it was before the trace ran the ops eagerly."""
        for var, data, grad in (self.snapshots or {}).values():
            if isinstance(var._data, np.ndarray):
                np.copyto(var._data, data)
            else:
                _G.copy_into(var._data, data)
            var._grad = grad

    # -- the interpreter protocol -------------------------------------------------------------------------------
    def apply(self, prim, inputs, params):
        if _SUBST:
            inputs = tuple(_substitute(t) for t in inputs)
        vals = [self.value_of(t) for t in inputs]
        inplace = prim.extra.get("inplace", ()) if prim.extra else ()
        arrays = [t._data for t in inputs]
        if self.snapshots is not None:
            for i in inplace:
                self._read_var(inputs[i])
        if inplace and self.parent is not None:
            raise TracingError(f"{prim.name}: updating a variable inside a jn.scan / jn.while_loop body is not "
                               f"supported; return the new value in the carry and assign it after the loop")
        uns = self.unsettled
        if uns is not None:
            out_arr = self._abstract_apply(prim, inputs, arrays, params, vals, inplace, uns)
        else:
            out_arr = ad.select_impl(prim, inputs, params)(*arrays, **params)
        if type(out_arr) is tuple:
            out_arr = TupleArray(out_arr)
        is_random = bool(prim.extra.get("random")) if prim.extra else False
        node = None
        if not inplace and not is_random and all(v.kind == "const" for v in vals):
            out = Tensor._wrap(out_arr)          # constant folding: computed now, a constant in the graph
        else:
            effects = []
            for i in inplace:
                t = inputs[i]
                if not isinstance(t, Parameter):
                    raise TracingError(f"{prim.name}: in-place update of a tensor that is not a Variable/"
                                       f"Parameter cannot be compiled")
                effects.append(t)
            node = self.graph.new_node(prim, vals, params, effects)
            for v in vals:
                if v.kind == "state":
                    self._readers[id(v.var)].append(node)
                    if v.after is not None:
                        node.order_deps.add(v.after)
            ov = self.graph.new_value(out_arr.shape, out_arr.dtype, "node", node=node)
            self._mark(ov, out_arr)
            node.out = ov
            for var in effects:
                self._write_var(var, node)
            out = _make_tracer_tensor(out_arr, ov, self)
        if ad._State.grad_enabled and not prim.nondiff:
            for t in inputs:
                if t.requires_grad:
                    out._node = ad.Node(prim, inputs, params)
                    out.requires_grad = True
                    break
        if ad._NAN_CHECK is not None:
            _check_nans(prim, inputs, params, out_arr, node, out, vals)
        return out

    def _abstract_apply(self, prim, inputs, arrays, params, vals, inplace, uns):
        """Run (or, for an elementwise op, only shape) one op in abstract mode; return its output array."""
        touched = any(id(a) in uns for a in arrays)
        if touched and prim.name in _VALUE_SHAPED:
            if prim.name != "getitem" or any(id(a) in uns for a in arrays[1:]):     # getitem: its indices
                raise AbstractFallback(prim.name)
        if (prim.kind == "elementwise" and not inplace and prim.template is not None
                and not all(v.kind == "const" for v in vals)
                and all(type(a) is np.ndarray and _plain(a.dtype) for a in arrays)):
            dt = np.dtype(prim.dtype_rule([a.dtype for a in arrays], params)[1])
            shape = np.broadcast_shapes(*[a.shape for a in arrays])
            # Small results of settled inputs are computed (a step counter, a learning rate: rows read those
            # on the host, as Adam's bias correction does); everything else gets a placeholder.
            if _plain(dt) and (touched or math.prod(shape) > 16):
                out = np.zeros(shape, dt)
                uns[id(out)] = out
                return out
            uf = _EXACT_UFUNCS.get(prim.name)
            if uf is not None and not params and all(a.dtype == dt for a in arrays):
                return np.asarray(uf(*arrays), dt)
        out = ad.select_impl(prim, inputs, params)(*arrays, **params)
        if touched:
            if isinstance(out, tuple):       # a loop's arrays: the container (which tuple_get reads) and each one
                out = TupleArray(out)
                uns.update((id(a), a) for a in out)
            uns[id(out)] = out
        return out

    def _write_var(self, var, node):
        key = id(var)
        for r in self._readers.get(key, ()):
            if r is not node:
                node.order_deps.add(r)
        prev = self._last_writer.get(key)
        if prev is not None:
            node.order_deps.add(prev)
        self._last_writer[key] = node
        self._state.pop(key, None)            # the next read is a new version, ordered after this write
        self._readers[key] = []

    def read_grad(self, var):
        """Return ``var.grad`` as seen by the step: what it wrote, else the accumulated gradient as an input."""
        if self.parent is not None:
            raise TracingError("reading or writing .grad inside a jn.scan / jn.while_loop body is not supported")
        key = id(var)
        if self.snapshots is not None and key not in self.snapshots:
            self.snapshots[key] = (var, _copy_array(var._data), var._grad)
        if key in self._grads:
            return self._grads[key][1]
        g = var._grad
        if g is None:
            return None
        v = self.graph.new_value(g.shape, g.dtype, "gradin", var=var)
        self._mark(v, g._data)
        t = _make_tracer_tensor(g._data, v, self)
        self._grads[key] = (var, t)
        return t

    def write_grad(self, var, value):
        """Record ``var.grad = value``: written back after every run of the compiled step."""
        if self.parent is not None:
            raise TracingError("reading or writing .grad inside a jn.scan / jn.while_loop body is not supported")
        if self.snapshots is not None and id(var) not in self.snapshots:
            self.snapshots[id(var)] = (var, _copy_array(var._data), var._grad)
        self._grads[id(var)] = (var, value)

    def finish_grads(self):
        """Record the final ``.grad`` of every variable the step wrote, and set the real ones now."""
        for var, value in self._grads.values():
            if isinstance(value, IndexedSlices):       # a sparse gradient: its values and indices are outputs
                vv, iv = self.value_of(value.values), self.value_of(value.indices)
                self.graph.grad_outputs.append((var, ("sparse", vv, iv, value.dense_shape)))
                var._grad = IndexedSlices(Tensor._wrap(value.values._data), Tensor._wrap(value.indices._data),
                                          value.dense_shape)
                continue
            if value is None:
                self.graph.grad_outputs.append((var, None))
                var._grad = None
            elif isinstance(value, TracerTensor) and value._tracer is self:
                if value._val.kind == "gradin" and value._val.var is var:
                    continue                      # unchanged
                self.graph.grad_outputs.append((var, value._val))
                var._grad = Tensor._wrap(value._data)
            else:
                cv = self.value_of(value)
                self.graph.grad_outputs.append((var, cv))
                var._grad = value

    def assign(self, var, value):
        """Record ``var.assign(value)`` as an effect node and perform it now."""
        if not isinstance(value, Tensor):
            value = Tensor(np.asarray(value, dtype=var.dtype))
        if value.dtype != var.dtype:
            value = ops.astype(value, var.dtype)
        if value.shape != var.shape:
            value = ops.broadcast_to(value, var.shape)
        with ad.no_grad():
            self.apply(ASSIGN, (var, value), {})


def _check_nans(prim, inputs, params, out_arr, node, out, vals):
    """Under debug_nans: record the user's line on the graph and tape nodes, and check the traced op's output."""
    site = nans.where_now()
    if node is not None:
        node.where = site
    if out._node is not None:
        out._node.where = site
    kind = nans.check_array(out_arr)
    if kind is not None:
        nans.raise_nonfinite(prim, kind, [t._data for t in inputs], params, site,
                             lambda k: nans.value_label(vals[k]), " of a jitted step")


def _copy_array(a):
    """Return a copy of a host or device array (variable snapshots of ``explain``)."""
    if isinstance(a, np.ndarray):
        return a.copy()
    return _G.copy(a)


# -- substitution: recomputing a loop body with fresh leaves in place of the tensors it closes over ----------

_SUBST: list = []


class substituting:
    """Inside the block, traced ops that read one of ``originals`` read the matching replacement instead."""

    def __init__(self, originals, replacements):
        self.map = {id(c): v for c, v in zip(originals, replacements)}

    def __enter__(self):
        _SUBST.append(self.map)
        return self

    def __exit__(self, *exc):
        _SUBST.pop()


def _substitute(t):
    for m in reversed(_SUBST):
        r = m.get(id(t))
        if r is not None:
            return r
    return t


# -- pytrees -------------------------------------------------------------------------------------------------------

def flatten(obj):
    """Return (leaves, treedef) for nested tuples/lists/dicts with Tensor or other leaves."""
    leaves = []

    def rec(o):
        if isinstance(o, (tuple, list)):
            return (type(o), [rec(x) for x in o])
        if isinstance(o, dict):
            keys = list(o.keys())
            return (dict, keys, [rec(o[k]) for k in keys])
        leaves.append(o)
        return None

    tree = rec(obj)
    return leaves, tree


def unflatten(tree, leaves):
    """Rebuild the structure described by ``tree`` from ``leaves``."""
    it = iter(leaves)

    def rec(t):
        if t is None:
            return next(it)
        if t[0] is dict:
            return {k: rec(s) for k, s in zip(t[1], t[2])}
        typ, subs = t
        vals = [rec(s) for s in subs]
        return typ(vals) if typ in (list, tuple) else typ(*vals)

    return rec(tree)
