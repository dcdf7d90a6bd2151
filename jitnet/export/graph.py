"""Trace a function or module once into jitnet's graph IR for export (ONNX, TensorBoard).

The trace is the same one ``jitnet.jit`` records (every primitive, with parameters as variable reads), minus
the plan: no fusion and no generated step kernels, so the exporters see one node per primitive. Variables the
traced code updates (an optimizer step, batch-norm moving averages) are put back afterwards, so exporting a
training step leaves the model as it was.
"""
from __future__ import annotations

from ..autodiff import core as ad
from ..compiler import JitFunction
from ..compiler.passes import cse, dce
from ..compiler.trace import flatten
from ..tensor import Tensor

__all__ = ["TracedGraph", "trace_graph", "find_modules"]


class TracedGraph:
    """A traced graph plus what exporters need to name things: ``graph``, ``var_names`` (id -> name)."""

    def __init__(self, graph, var_names, n_args):
        self.graph = graph
        self.var_names = var_names
        self.n_args = n_args

    def name_of(self, var):
        """Return the export name of a variable: its state-dict name, else its own name, else 'var'."""
        return self.var_names.get(id(var)) or getattr(var, "name", None) or "var"


def _is_module(obj):
    return callable(getattr(obj, "named_variables", None)) and callable(getattr(obj, "train", None)) \
        and hasattr(obj, "training")


def find_modules(fn):
    """Return [(prefix, module)] of the Modules ``fn`` uses: itself, its object's, or those its code names.

    A Module gives itself (prefix ""); a bound method gives its object when that is a Module, else the
    Modules among the object's attributes (prefixed by the attribute name); a plain function gives the
    Modules among the variables it closes over and the globals its code names (prefixed by those names).
    """
    if _is_module(fn):
        return [("", fn)]
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        if _is_module(owner):
            return [("", owner)]
        return [(k, v) for k, v in sorted(getattr(owner, "__dict__", {}).items()) if _is_module(v)]
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    found, seen = [], set()
    cells = zip(code.co_freevars, fn.__closure__ or ())
    named = [(k, c.cell_contents) for k, c in cells if _filled(c)]
    glb = getattr(fn, "__globals__", {})
    named += [(k, glb[k]) for k in code.co_names if k in glb]
    for k, v in named:
        if _is_module(v) and id(v) not in seen:
            seen.add(id(v))
            found.append((k, v))
    return found


def _filled(cell):
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _var_names(modules):
    names = {}
    for prefix, m in modules:
        for n, v in m.named_variables():
            names.setdefault(id(v), f"{prefix}/{n}" if prefix else n)
    return names


class _Mode:
    """Set every module of the traced function to eval (or train) mode and restore each one's flag after."""

    def __init__(self, modules, training):
        self.modules, self.training, self.saved = modules, training, []

    def __enter__(self):
        if self.training is None:
            return self
        for _, top in self.modules:
            for m in top.modules():
                self.saved.append((m, m.training))
            top.train(self.training)
        return self

    def __exit__(self, *exc):
        for m, flag in self.saved:
            object.__setattr__(m, "training", flag)


def trace_graph(fn, args, kwargs=None, *, training=None, grad=None):
    """Trace ``fn(*args, **kwargs)`` once and return a :class:`TracedGraph` (DCE and CSE applied, not fused).

    ``training`` (True/False) puts the Modules found on ``fn`` (see :func:`find_modules`) in that mode for the
    trace and restores their modes afterwards; None leaves them. ``grad=False`` traces under ``no_grad``.
    Every variable the function updates is restored after the trace.
    """
    kwargs = dict(kwargs or {})
    while isinstance(fn, JitFunction):          # a jitted function: trace the Python function it compiles
        fn = fn.fn
    modules = find_modules(fn)
    jf = JitFunction(fn)
    _, leaves, tree, tensors = jf._signature(tuple(args), kwargs)
    with _Mode(modules, training):
        prev = ad._State.grad_enabled
        if grad is not None:
            ad._State.grad_enabled = bool(grad)
        try:
            tracer, result = jf.trace(leaves, tree, snapshot=True)
            out_leaves, _ = flatten(result)
            g = tracer.graph
            for leaf in out_leaves:
                if isinstance(leaf, Tensor):
                    g.outputs.append(tracer.value_of(leaf))
        finally:
            ad._State.grad_enabled = prev
            _restore(tracer if "tracer" in locals() else None)
    if not g.outputs:
        raise ValueError(f"export: {getattr(fn, '__name__', type(fn).__name__)} returned no tensor to export "
                         f"(got {type(result).__name__})")
    dce(g)
    cse(g)
    dce(g)
    return TracedGraph(g, _var_names(modules), len(tensors))


def _restore(tracer):
    if tracer is not None:
        tracer.restore_snapshots()
