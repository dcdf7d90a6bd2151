"""Primitive registry, the apply() dispatcher, the tape, and reverse-mode differentiation.

A :class:`Primitive` is one row of the registry: a name, how to compute it (``impl``: NumPy arrays in, one
array out, plus static keyword parameters), its VJP written in jitnet ops (so it runs eagerly, traces into
graphs, and differentiates again for higher-order gradients), and for elementwise primitives the scalar
template the kernel generator splices into kernels.

``apply(prim, *inputs, **params)`` is the single entry point of every op. Eagerly it computes now and, when a
gradient is needed, records a :class:`Node` on the output. When an interpreter (a tracer pushed by the
compiler) is active, it hands the call to that interpreter instead: this module never imports the compiler.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .sparse import IndexedSlices

__all__ = ["Primitive", "REGISTRY", "no_cuda", "apply", "Node", "no_grad", "enable_grad", "is_grad_enabled",
           "backward", "gradients", "grad", "value_and_grad", "push_interpreter", "current_interpreter"]

REGISTRY: dict[str, "Primitive"] = {}


class Primitive:
    """One registry row: name, implementation per device, VJP rule, optional elementwise template."""

    __slots__ = ("name", "impl", "vjp", "template", "kind", "dtype_rule", "shape_rule", "nondiff", "extra")

    def __init__(self, name, impl=None, vjp=None, template=None, kind="other", dtype_rule=None,
                 shape_rule=None, nondiff=False):
        self.name = name
        self.impl = impl            # {"cpu": f(*arrays, **params) -> array}
        self.vjp = vjp              # f(g, ans, inputs, needs, **params) -> tuple of Tensor|None
        self.template = template    # elementwise: expression over {0}, {1}, ... and {T}
        self.kind = kind            # "elementwise", "reduce", "view", "other"
        self.dtype_rule = dtype_rule
        self.shape_rule = shape_rule
        self.nondiff = nondiff      # output never carries a gradient (comparisons, argmax, ...)
        self.extra = {}
        REGISTRY[name] = self

    def __repr__(self):
        return f"Primitive({self.name})"


class _State:
    grad_enabled = True
    interpreters: list = []
    backward_of = None       # the tape Node whose VJP is running (set only while debug_nans is on)


def is_grad_enabled() -> bool:
    """Return True when operations record a tape for gradients."""
    return _State.grad_enabled


@contextlib.contextmanager
def no_grad():
    """Context manager in which no tape is recorded (inference, optimizer updates)."""
    prev = _State.grad_enabled
    _State.grad_enabled = False
    try:
        yield
    finally:
        _State.grad_enabled = prev


@contextlib.contextmanager
def enable_grad():
    """Context manager that turns tape recording back on inside ``no_grad``."""
    prev = _State.grad_enabled
    _State.grad_enabled = True
    try:
        yield
    finally:
        _State.grad_enabled = prev


@contextlib.contextmanager
def push_interpreter(interp):
    """Make ``interp`` handle every ``apply`` inside the block (used by the tracer of ``jitnet.jit``)."""
    _State.interpreters.append(interp)
    try:
        yield interp
    finally:
        _State.interpreters.pop()


def current_interpreter():
    """Return the active interpreter (a tracer) or None when running eagerly."""
    return _State.interpreters[-1] if _State.interpreters else None


_wrap = None       # Tensor._wrap, set by jitnet.tensor (which imports this module)


def _add_grads(prev, g):
    """Return prev + g for gradients that may be dense Tensors or IndexedSlices (sparse rows)."""
    if prev is None:
        return g
    return g.__radd__(prev) if isinstance(g, IndexedSlices) else prev + g


class Node:
    """The tape entry of a computed tensor: the primitive, its input tensors and static parameters."""

    __slots__ = ("prim", "inputs", "params", "where")     # where: the user's line, set only under debug_nans

    def __init__(self, prim, inputs, params):
        self.prim = prim
        self.inputs = inputs
        self.params = params


def _debug_level():
    import os
    try:
        return int(os.environ.get("JITNET_DEBUG", "0") or 0)
    except ValueError:
        return 0


DEBUG = _debug_level()   # JITNET_DEBUG at import: 1 prints every eager kernel launch and its time


def _apply_debug(prim, inputs, params):
    import time
    t0 = time.perf_counter()
    arr = prim.impl["cpu"](*[t._data for t in inputs], **params)
    dt = (time.perf_counter() - t0) * 1e6
    shapes = ", ".join(str(t.shape) for t in inputs)
    print(f"[jitnet] {prim.name}({shapes}) -> {arr.shape} {arr.dtype}: {dt:.1f} us")
    return arr


# --------------------------------------------------------------------------------------------------------------
# Devices. ``_DEVICES`` turns true when the CUDA backend is loaded (jitnet.cuda.require); until then apply()
# pays one global read for device support, and CPU kernels are called exactly as before.
# --------------------------------------------------------------------------------------------------------------

_DEVICES = False

# ``jitnet.debug_nans``: None when the mode is off (apply pays this one global test), else the function that
# checks an eager op's output (installed by ``autodiff.nans``, which imports this module, not the reverse).
_NAN_CHECK = None

# The float16/bfloat16 rule (``jitnet.lowp.rule``): None until such a dtype first appears (apply pays this one
# global test), then the function that swaps a primitive for its float32-computing row on low-precision data.
_LOWP = None


def enable_devices():
    """Turn on per-op device dispatch (called once by the CUDA backend when it loads)."""
    global _DEVICES
    _DEVICES = True


def _device_name(arr):
    return "cpu" if isinstance(arr, (np.ndarray, tuple)) else "cuda:0"


def select_impl(prim, inputs, params):
    """Return the impl of ``prim`` for the device of its tensor ``inputs`` (checking they agree)."""
    if not _DEVICES:
        return prim.impl["cpu"]
    dev, j = None, 0
    for j, t in enumerate(inputs):
        if not isinstance(t._data, (np.ndarray, tuple)):      # (a tuple: the several arrays of a loop node)
            dev = t
            break
    if dev is None:
        if not inputs and params.get("device", "cpu") != "cpu":
            return _cuda_impl(prim)
        return prim.impl["cpu"]
    if not prim.extra.get("any_device"):
        for i, t in enumerate(inputs):
            d = t._data
            if isinstance(d, np.ndarray) and d.ndim:      # 0-d host tensors are scalars: allowed, as in PyTorch
                raise RuntimeError(
                    f"{prim.name}: expected all tensors on the same device, got cuda:0 (input {j}, shape "
                    f"{dev.shape}) and cpu (input {i}, shape {t.shape}); move them with .to('cuda') or .cpu()")
    return _cuda_impl(prim)


_CUDA_FACTORY = None     # builds a CUDA impl on first use (elementwise primitives registered after the backend)


def no_cuda(reason, *prims):
    """Record on each row in ``prims`` why it has no CUDA implementation (``extra["no_cuda"]``).

    Every row either carries ``impl["cuda"]``, gets a generated kernel from its elementwise template, or says
    why not here; ``tests/test_registry.py`` fails a row that does none of these."""
    for p in prims:
        p.extra["no_cuda"] = reason


def set_cuda_factory(factory):
    """Install the function that builds a missing CUDA impl of a primitive (or returns None)."""
    global _CUDA_FACTORY
    _CUDA_FACTORY = factory


def _cuda_impl(prim):
    f = prim.impl.get("cuda")
    if f is None and _CUDA_FACTORY is not None:
        f = _CUDA_FACTORY(prim)
        if f is not None:
            prim.impl["cuda"] = f
    if f is None:
        raise NotImplementedError(f"{prim.name}: this op has no CUDA kernel yet; run it on the CPU "
                                  f"(.cpu()) and move the result back with .to('cuda')")
    return f


def _apply_devices(prim, inputs, params):
    impl = select_impl(prim, inputs, params)
    if DEBUG:
        import time
        t0 = time.perf_counter()
        arr = impl(*[t._data for t in inputs], **params)
        print(f"[jitnet] {prim.name}({', '.join(str(t.shape) for t in inputs)}) -> {arr.shape} {arr.dtype} on "
              f"{_device_name(arr)}: {(time.perf_counter() - t0) * 1e6:.1f} us (launch)")
        out = _wrap(arr)
    else:
        out = _wrap(impl(*[t._data for t in inputs], **params))
    if _State.grad_enabled and not prim.nondiff and out._data.dtype.kind in "fV":   # (V: bfloat16)
        for t in inputs:
            if t.requires_grad:
                out._node = Node(prim, inputs, params)
                out.requires_grad = True
                break
    if _NAN_CHECK is not None:
        _NAN_CHECK(prim, inputs, params, out)
    return out


def apply(prim: Primitive, *inputs, **params):
    """Run primitive ``prim`` on tensors ``inputs``; return the output tensor (recording a tape node)."""
    if _LOWP is not None:
        prim = _LOWP(prim, inputs, params)
    if _State.interpreters:
        return _State.interpreters[-1].apply(prim, inputs, params)
    if _DEVICES:
        return _apply_devices(prim, inputs, params)
    if DEBUG:
        out = _wrap(_apply_debug(prim, inputs, params))
    else:
        out = _wrap(prim.impl["cpu"](*[t._data for t in inputs], **params))
    if _State.grad_enabled and not prim.nondiff and out._data.dtype.kind in "fV":  # int: no grad (V: bf16)
        for t in inputs:
            if t.requires_grad:
                out._node = Node(prim, inputs, params)
                out.requires_grad = True
                break
    if _NAN_CHECK is not None:
        _NAN_CHECK(prim, inputs, params, out)
    return out


# --------------------------------------------------------------------------------------------------------------
# Reverse mode
# --------------------------------------------------------------------------------------------------------------

def _toposort(roots):
    """Return tensors reachable from ``roots`` through tape nodes, inputs before their consumers."""
    order, seen = [], set()
    stack = [(r, False) for r in roots if r.requires_grad]
    while stack:
        t, done = stack.pop()
        if done:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        node = t._node
        if node is not None:
            for i in node.inputs:
                if i.requires_grad and id(i) not in seen:
                    stack.append((i, False))
    return order


def _run_backward(roots, root_grads, targets=None, create_graph=False):
    """Propagate ``root_grads`` from ``roots``; return {id(tensor): grad} for leaves or ``targets``."""
    prev = _State.backward_of
    try:
        return _backward_pass(roots, root_grads, targets, create_graph)
    finally:
        _State.backward_of = prev        # (debug_nans labels the ops a VJP runs; an error must not leave it set)


def _backward_pass(roots, root_grads, targets, create_graph):
    from .. import ops
    order = _toposort(roots)
    grads = {}
    for r, g in zip(roots, root_grads):
        if r.requires_grad:
            grads[id(r)] = g if id(r) not in grads else grads[id(r)] + g
    if targets is not None:
        # only propagate along paths that reach a target
        want = {id(t) for t in targets}
        reach = set()
        for t in order:
            if id(t) in want or (t._node is not None and any(id(i) in reach for i in t._node.inputs)):
                reach.add(id(t))
    results = {}
    ctx = enable_grad() if create_graph else no_grad()
    with ctx:
        for t in reversed(order):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            node = t._node
            if isinstance(g, IndexedSlices) and g.dense_at_leaf and (node is None or (targets is not None
                                                                                  and id(t) in want)):
                g = g.to_dense()                 # a slice's gradient reaching a leaf or target: dense
            if targets is None:
                if node is None:
                    results[id(t)] = (t, g)
                    continue
            else:
                if id(t) in want:
                    results[id(t)] = (t, g)
                if node is None:
                    continue
            ins = node.inputs
            if isinstance(g, IndexedSlices):     # sparse gradients stay sparse only on their way to leaves
                g = g.to_dense()
            needs = tuple(i.requires_grad and (targets is None or id(i) in reach) for i in ins)
            if not any(needs):
                continue
            if _NAN_CHECK is not None:
                _State.backward_of = node      # ops run by the VJP are labelled "backward"
            in_grads = node.prim.vjp(g, t, ins, needs, **node.params)
            for i, gi, need in zip(ins, in_grads, needs):
                if gi is None or not need:
                    continue
                if gi.shape != i.shape:          # broadcasting is undone here and only here
                    gi = ops.sum_to(gi, i.shape)
                if gi.dtype != i.dtype:
                    gi = gi.astype(i.dtype)
                prev = grads.get(id(i))
                grads[id(i)] = _add_grads(prev, gi)
    return results


def _seed(ys, grad_ys):
    from ..tensor import Tensor
    from .. import ops
    ys = list(ys)
    if grad_ys is None:
        gs = []
        for y in ys:
            if y.size != 1:
                raise ValueError(
                    f"backward: gradient can be implicitly created only for a scalar output, got shape "
                    f"{y.shape}; pass grad= (or grad_ys=) with the same shape as the output")
            gs.append(ops.ones_like(y))
        return ys, gs
    grad_ys = list(grad_ys)
    gs = []
    for y, g in zip(ys, grad_ys):
        g = g if isinstance(g, Tensor) else Tensor._from_value(g, dtype=y.dtype)
        if g.shape != y.shape:
            raise ValueError(f"backward: grad shape {g.shape} does not match output shape {y.shape}")
        gs.append(g)
    return ys, gs


def backward(t, grad=None, create_graph=False):
    """Accumulate d(t)/d(leaf) into ``leaf.grad`` for every leaf that requires a gradient."""
    if not t.requires_grad:
        raise RuntimeError("backward: the tensor does not require grad (no input had requires_grad=True, "
                           "or it was computed under no_grad())")
    ys, gs = _seed([t], None if grad is None else [grad])
    res = _run_backward(ys, gs, None, create_graph)
    for leaf, g in res.values():
        if not create_graph:
            g = g.detach()
        leaf.grad = _add_grads(leaf.grad, g)


def gradients(ys, xs, grad_ys=None, create_graph=None):
    """Return the list of sum(ys)'s gradients w.r.t. each of ``xs`` (None-free: zeros where unconnected)."""
    from .. import ops
    from ..tensor import Tensor
    single_y = isinstance(ys, Tensor)
    ys = [ys] if single_y else list(ys)
    single_x = isinstance(xs, Tensor)
    xs = [xs] if single_x else list(xs)
    if grad_ys is not None and isinstance(grad_ys, Tensor):
        grad_ys = [grad_ys]
    live = [y for y in ys if y.requires_grad]
    if create_graph is None:
        create_graph = _State.grad_enabled and bool(_State.interpreters)
    if live:
        idx = [k for k, y in enumerate(ys) if y.requires_grad]
        ys2, gs = _seed(live, None if grad_ys is None else [grad_ys[k] for k in idx])
        res = _run_backward(ys2, gs, xs, create_graph)
    else:
        res = {}
    out = []
    for x in xs:
        r = res.get(id(x))
        out.append(r[1] if r is not None else ops.zeros_like(x))
    return out[0] if single_x and len(out) == 1 else out


def _prepare_args(args, argnums):
    from ..tensor import Tensor
    from .. import ops
    args = list(args)
    targets = []
    nested = False
    for i in argnums:
        if i >= len(args):
            raise ValueError(f"grad: argnums {i} out of range for {len(args)} positional arguments")
        a = args[i]
        if not isinstance(a, Tensor):
            a = Tensor._from_value(a)
        if a.dtype.kind not in "fV":                   # (V: bfloat16)
            raise TypeError(f"grad: argument {i} has dtype {a.dtype}; only floating tensors have gradients")
        if a.requires_grad:
            nested = True
            a = ops.identity(a)          # a fresh node: the inner gradient stops here, the outer sees through
        else:
            a = a.detach()
            a.requires_grad = True
        args[i] = a
        targets.append(a)
    return args, targets, nested


def value_and_grad(fun, argnums=0, has_aux=False):
    """Return a function computing ``(fun(*args), gradient)``; gradient is a tuple when argnums is a tuple."""
    multi = isinstance(argnums, (tuple, list))
    nums = tuple(argnums) if multi else (argnums,)

    def vg(*args, **kwargs):
        args, targets, nested = _prepare_args(args, nums)
        with enable_grad():
            out = fun(*args, **kwargs)
        aux = None
        if has_aux:
            out, aux = out
        from ..tensor import Tensor
        if not isinstance(out, Tensor):
            raise TypeError(f"grad: the function must return a scalar Tensor, got {type(out).__name__}")
        if out.size != 1:
            raise ValueError(f"grad: the function must return a scalar, got shape {out.shape}")
        create = nested or bool(_State.interpreters)
        gs = gradients(out, targets, create_graph=create)
        if not create:
            gs = [g.detach() for g in gs]
            out = out.detach()
        g = tuple(gs) if multi else gs[0]
        return ((out, aux), g) if has_aux else (out, g)

    vg.__name__ = f"value_and_grad({getattr(fun, '__name__', 'f')})"
    return vg


def grad(fun, argnums=0, has_aux=False):
    """Return a function computing the gradient of scalar ``fun`` w.r.t. the arguments ``argnums``."""
    vg = value_and_grad(fun, argnums, has_aux)

    def g_plain(*args, **kwargs):
        return vg(*args, **kwargs)[1]

    def g_aux(*args, **kwargs):
        (v, aux), gr = vg(*args, **kwargs)
        return gr, aux

    out = g_aux if has_aux else g_plain
    out.__name__ = f"grad({getattr(fun, '__name__', 'f')})"
    return out
