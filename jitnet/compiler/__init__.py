"""jitnet.jit: trace a step into a graph, optimize it, fuse elementwise chains into generated kernels.

The first call for an input signature (tensor shapes, dtypes and requires_grad; the values of every
non-tensor argument; the enclosing ``jn.autocast`` dtype, if any) traces the function under a recording
interpreter. On the CPU the trace is abstract (elementwise ops are recorded, not run; variables are restored
afterwards) and the compiled plan then runs the first call; elsewhere, or when an op's shape could depend on a
skipped value, the function runs once for real, returning real results and updating variables exactly as the
eager code would. The recorded graph then goes
through DCE, CSE and fusion, and becomes a :class:`~jitnet.compiler.plan.Plan`. Later calls with the same
signature run the plan without touching the Python function.
"""
from __future__ import annotations

import functools
import io
import os
import sys

import numpy as np

from .. import random as _random
from .. import runtime
from ..autodiff import core as ad
from ..tensor import Parameter, Tensor
from .passes import cse, dce, prune_scan_saves
from . import native as _native
from .plan import build_plan
from .trace import Tracer, TracerTensor, TracingError, flatten, unflatten


__all__ = ["jit", "explain", "TracingError", "stats", "JitFunction"]

_stats = {"traces": 0, "plans": 0, "calls": 0, "plan_runs": 0, "abstract_traces": 0, "abstract_fallbacks": 0}


def stats() -> dict:
    """Return counters of the compiler: traces, plans built, calls and plan runs (all jitted functions)."""
    return dict(_stats)


def _hashable_tree(tree):
    if tree is None:
        return None
    if tree[0] is dict:
        return ("dict", tuple(tree[1]), tuple(_hashable_tree(t) for t in tree[2]))
    return (tree[0].__name__, tuple(_hashable_tree(t) for t in tree[1]))


class _Compiled:
    __slots__ = ("plan", "graph", "out_tree", "out_kinds", "tracer_vars", "var_hosts", "timer")


class JitFunction:
    """A function compiled per input signature; call it like the original."""

    def __init__(self, fn, static_argnums=(), static_argnames=(), fuse=True):
        self.fn = fn
        self.static_argnums = set((static_argnums,) if isinstance(static_argnums, int) else static_argnums)
        self.static_argnames = set((static_argnames,) if isinstance(static_argnames, str) else static_argnames)
        self.fuse = fuse
        self._cache = {}
        functools.update_wrapper(self, fn)

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return functools.partial(self.__call__, obj)

    # -- signature ------------------------------------------------------------------------------------------
    def _signature(self, args, kwargs):
        leaves, tree = flatten((tuple(args), dict(kwargs)))
        sig, tensors = [], []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, np.ndarray):
                leaf = leaves[i] = Tensor(leaf)
            if isinstance(leaf, Tensor) and not isinstance(leaf, TracerTensor):
                sig.append((leaf.shape, leaf.dtype.str, leaf.requires_grad, isinstance(leaf._data, np.ndarray)))
                tensors.append(leaf)
            else:
                try:
                    hash(leaf)
                except TypeError:
                    raise TypeError(f"jitnet.jit: argument value {leaf!r} of type {type(leaf).__name__} is not a "
                                    f"tensor and not hashable, so it cannot be part of the compiled signature")
                sig.append(("static", type(leaf).__name__, leaf))
        return (_hashable_tree(tree), tuple(sig)), leaves, tree, tensors

    def __call__(self, *args, **kwargs):
        _stats["calls"] += 1
        key, leaves, tree, tensors = self._signature(args, kwargs)
        if ad._NAN_CHECK is not None:
            key = (key, "debug_nans")                # checked plans are kept apart from the fast ones
        if ad._AUTOCAST is not None:
            key = (key, "autocast", ad._AUTOCAST.name)   # a trace inside jn.autocast records its casts
        comp = self._cache.get(key)
        if comp is None:
            return self._trace_and_compile(key, leaves, tree, tensors)
        for var, shape in comp.plan.var_shapes:
            if var._data.shape != shape:
                del self._cache[key]
                return self._trace_and_compile(key, leaves, tree, tensors)
        if ad._DEVICES and comp.var_hosts != [isinstance(v._data, np.ndarray) for v, _ in comp.plan.var_shapes]:
            del self._cache[key]                     # a variable moved between devices since the trace
            return self._trace_and_compile(key, leaves, tree, tensors)
        _stats["plan_runs"] += 1
        return _run(comp, tensors)

    # -- tracing ----------------------------------------------------------------------------------------------
    def trace(self, leaves, tree, snapshot=False, tracer=None):
        """Trace the function on ``leaves``; return (tracer, returned structure)."""
        if tracer is None:
            tracer = Tracer(snapshot_vars=snapshot)
        targs, ti = [], 0
        for leaf in leaves:
            if isinstance(leaf, Tensor) and not isinstance(leaf, TracerTensor):
                targs.append(tracer.arg(leaf, ti))
                ti += 1
            else:
                targs.append(leaf)
        args, kwargs = unflatten(tree, targs)
        _stats["traces"] += 1
        with ad.push_interpreter(tracer):
            result = self.fn(*args, **kwargs)
            tracer.finish_grads()
        return tracer, result

    def _trace_and_compile(self, key, leaves, tree, tensors, fuse=None):
        fuse = self.fuse if fuse is None else fuse
        if _abstract_ok():
            rng = _rng_state()
            tracer = Tracer(snapshot_vars=True)
            tracer.unsettled = {}
            comp = None
            try:
                _, result = self.trace(leaves, tree, tracer=tracer)
                comp, _ = _compile(tracer, result, fuse)
            except TracingError:              # the function's own mistake (.item() on a traced tensor, ...):
                raise                         # a concrete trace would stop at the same line
            except Exception as e:            # a value-shaped op, or an op that failed on placeholder values:
                _stats["traces"] -= 1         # trace again, concretely (an error then comes from real values)
                _stats["abstract_fallbacks"] += 1
                if _debug() >= 1:
                    print(f"jitnet.jit: {getattr(self.fn, '__qualname__', self.fn)!s}: traced again with values "
                          f"({type(e).__name__}: {e})", file=sys.stderr)
            finally:
                tracer.restore_snapshots()    # undo what the trace's in-place ops did to the variables, and
                _set_rng_state(rng)           # let the plan (or the concrete trace) draw this call's numbers
            if comp is not None:
                self._cache[key] = comp
                _stats["abstract_traces"] += 1
                _native.HOLD[0] = True
                try:
                    return _run(comp, tensors)
                finally:
                    _native.HOLD[0] = False
        tracer, result = self.trace(leaves, tree)
        comp, eager_out = _compile(tracer, result, fuse)
        self._cache[key] = comp
        return eager_out

    def lower(self, *args, **kwargs):
        """Trace and compile without keeping variable updates; return (graph, plan)."""
        key, leaves, tree, tensors = self._signature(args, kwargs)
        tracer, result = self.trace(leaves, tree, snapshot=True)
        try:
            comp, _ = _compile(tracer, result, self.fuse)
        finally:
            tracer.restore_snapshots()
        return comp.graph, comp.plan


def _abstract_ok():
    """Whether a new trace may skip running its elementwise ops (CPU only, no NaN checks; JITNET_TRACE=concrete
    turns it off)."""
    return not ad._DEVICES and ad._NAN_CHECK is None and os.environ.get("JITNET_TRACE", "") != "concrete"


def _rng_state():
    return _random._gen, _random._gen.bit_generator.state


def _set_rng_state(saved):
    gen, state = saved
    gen.bit_generator.state = state


def _run(comp, tensors):
    """Run a compiled step's plan on the call's tensors; return its outputs in the function's structure."""
    env = comp.timer.run(comp.plan.run, tensors)     # BLAS on one thread when that is faster (a busy machine)
    outs = []
    k = 0
    for kind, payload in comp.out_kinds:
        if kind == "tensor":
            s = comp.plan.out_slots[k]
            k += 1
            arr = s[1]._data if isinstance(s, tuple) else env[s]
            outs.append(Tensor._wrap(arr))
        else:
            outs.append(payload)
    return unflatten(comp.out_tree, outs) if comp.out_tree is not None else outs[0]


def _compile(tracer, result, fuse_ops):
    g = tracer.graph
    out_leaves, out_tree = flatten(result)
    kinds = []
    eager = []
    for leaf in out_leaves:
        if isinstance(leaf, Tensor):
            v = tracer.value_of(leaf)
            g.outputs.append(v)
            kinds.append(("tensor", None))
            eager.append(Tensor._wrap(leaf._data))
        else:
            kinds.append(("static", leaf))
            eager.append(leaf)
    dce(g)
    cse(g)
    dce(g)
    prune_scan_saves(g)
    plan = build_plan(g, fuse_ops)
    _stats["plans"] += 1
    comp = _Compiled()
    comp.plan, comp.graph, comp.out_tree, comp.out_kinds = plan, g, out_tree, kinds
    comp.timer = runtime.StepTimer()
    comp.var_hosts = [isinstance(v._data, np.ndarray) for v, _ in plan.var_shapes]
    lvl = _debug()
    if lvl >= 2:
        print(_describe(g, plan, sources=lvl >= 3))
    return comp, unflatten(out_tree, eager)


def _debug():
    try:
        return int(os.environ.get("JITNET_DEBUG", "0") or 0)
    except ValueError:
        return 0


def jit(fn=None, *, static_argnums=(), static_argnames=(), fuse=True):
    """Return ``fn`` compiled per input signature (usable as ``@jit`` or ``@jit(static_argnums=...)``)."""
    if fn is None:
        return lambda f: JitFunction(f, static_argnums, static_argnames, fuse)
    return JitFunction(fn, static_argnums, static_argnames, fuse)


def _describe(g, plan, sources=True):
    buf = io.StringIO()
    p = functools.partial(print, file=buf)
    p("== graph ==")
    p(str(g))
    p(f"== fusion groups ({len(plan.groups)}) ==")
    for i, grp in enumerate(plan.groups):
        p(f"group {i}: {' -> '.join(m.prim.name for m in grp.members)}  inputs={grp.inputs}  "
          f"out={grp.root.out!r} {grp.root.out.dtype}{list(grp.root.out.shape)}")
    p("== schedule ==")
    for name in plan.step_names:
        p("  " + name)
    if sources:
        p("== generated kernels ==")
        for i, src in enumerate(plan.sources):
            p(f"# ---- group {i} ----")
            p(src)
    p(f"== kernel count: {plan.kernel_count} ({len(plan.groups)} fused, "
      f"{plan.kernel_count - len(plan.groups)} library kernels); plan buffers {plan.buffer_bytes} bytes ==")
    return buf.getvalue()


def explain(fn, *args, sources=True, file=None, **kwargs):
    """Print the graph, fusion groups, generated kernel sources and kernel count of ``fn`` on these args.

    Variables the step updates are restored afterwards. Returns the text.
    """
    jf = fn if isinstance(fn, JitFunction) else JitFunction(fn)
    g, plan = jf.lower(*args, **kwargs)
    text = _describe(g, plan, sources)
    print(text, file=file)
    return text
