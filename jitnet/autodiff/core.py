"""Primitive registry, the apply() dispatcher and the tape.

A :class:`Primitive` is one row of the registry: a name, how to compute it (``impl``: NumPy arrays in, one
array out, plus static keyword parameters), its VJP written in jitnet ops (so it runs eagerly, traces into
graphs, and differentiates again for higher-order gradients), and for elementwise primitives the scalar
template the kernel generator splices into kernels.

``apply(prim, *inputs, **params)`` is the single entry point of every op. Eagerly it computes now and, when a
gradient is needed, records a :class:`Node` on the output. When an interpreter (a tracer pushed by the
compiler) is active, it hands the call to that interpreter instead: this module never imports the compiler.

This is the lowest layer of the differentiable core: it imports no other jitnet module (tensors, ops and the
compiler build on it). Reverse-mode differentiation (``backward``, ``gradients``, ``grad``,
``value_and_grad``) runs jitnet ops, so it lives a layer up, in :mod:`jitnet.autodiff.backprop`, which adds
those four names to this module when it loads (``autodiff.core.grad`` keeps working once jitnet is imported).
"""
from __future__ import annotations

import contextlib

import numpy as np

__all__ = ["Primitive", "REGISTRY", "no_cuda", "apply", "Node", "no_grad", "enable_grad", "is_grad_enabled",
           "push_interpreter", "current_interpreter"]

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

# ``jitnet.autocast``: None outside an autocast block; inside one, the policy (``autocast.Policy``: its ``dtype``
# and a call that returns an op's inputs cast as the policy says). It is read only after ``_LOWP`` is set
# (entering autocast installs the low-precision rule), so programs that never use either pay one global test.
_AUTOCAST = None


def enable_devices():
    """Turn on per-op device dispatch (called once by the CUDA backend when it loads)."""
    global _DEVICES
    _DEVICES = True


# ``jitnet.backends`` installs these when it loads (it imports this module, not the reverse): the backend owning
# an array, and the backend of a device name. Dispatch asks the backend for a row's implementation.
_BACKEND_OF = None
_BACKEND_NAMED = None


def install_backends(backend_of, backend_named):
    """Let dispatch find the backend of an array / a device name (called once by ``jitnet.backends``)."""
    global _BACKEND_OF, _BACKEND_NAMED
    _BACKEND_OF, _BACKEND_NAMED = backend_of, backend_named


def _device_name(arr):
    return "cpu" if isinstance(arr, (np.ndarray, tuple)) else _BACKEND_OF(arr).name


def select_impl(prim, inputs, params):
    """Return the impl of ``prim`` for the device of its tensor ``inputs`` (checking they agree): the row's
    implementation that the backend of that device (``jitnet.backends``) gives."""
    if not _DEVICES:
        return prim.impl["cpu"]
    dev, j = None, 0
    for j, t in enumerate(inputs):
        if not isinstance(t._data, (np.ndarray, tuple)):      # (a tuple: the several arrays of a loop node)
            dev = t
            break
    if dev is None:
        if not inputs and params.get("device", "cpu") != "cpu":     # a constructor on a device
            return _BACKEND_NAMED(params["device"]).impl(prim)
        return prim.impl["cpu"]
    backend = _BACKEND_OF(dev._data)
    if not prim.extra.get("any_device"):
        for i, t in enumerate(inputs):
            d = t._data
            if isinstance(d, np.ndarray) and d.ndim:      # 0-d host tensors are scalars: allowed, as in PyTorch
                raise RuntimeError(
                    f"{prim.name}: expected all tensors on the same device, got {dev.device} (input {j}, shape "
                    f"{dev.shape}) and cpu (input {i}, shape {t.shape}); move them with .to('{backend.name}') or "
                    f".cpu()")
    return backend.impl(prim)


def no_cuda(reason, *prims):
    """Record on each row in ``prims`` why it has no CUDA implementation (``extra["no_cuda"]``).

    Every row either carries ``impl["cuda"]``, gets a generated kernel from its elementwise template, or says
    why not here; ``tests/test_registry.py`` fails a row that does none of these."""
    for p in prims:
        p.extra["no_cuda"] = reason


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
        if _AUTOCAST is not None:
            inputs = _AUTOCAST(prim, inputs, params)
        prim = _LOWP(prim, inputs, params)
    if _State.interpreters:
        return _State.interpreters[-1].apply(prim, inputs, params)
    if _DEVICES:
        return _apply_devices(prim, inputs, params)
    if DEBUG:
        out = _wrap(_apply_debug(prim, inputs, params))
    elif len(inputs) == 2:                            # (binary operators: no list built for the arrays)
        out = _wrap(prim.impl["cpu"](inputs[0]._data, inputs[1]._data, **params))
    else:
        out = _wrap(prim.impl["cpu"](*[t._data for t in inputs], **params))
    if _State.grad_enabled and not prim.nondiff:
        for t in inputs:
            if t.requires_grad:
                if out._data.dtype.kind in "fV":      # int: no grad (V: bf16)
                    out._node = Node(prim, inputs, params)
                    out.requires_grad = True
                break
    if _NAN_CHECK is not None:
        _NAN_CHECK(prim, inputs, params, out)
    return out


# --------------------------------------------------------------------------------------------------------------
# The tape (reverse mode itself: autodiff/backprop.py)
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
