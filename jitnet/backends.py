"""Devices as objects: one :class:`Backend` per device kind (``cpu``, ``cuda``).

A backend holds everything that differs between devices, so the rest of the library asks it instead of testing
array types:

- which arrays are its own (:meth:`Backend.owns`), allocation (:meth:`empty`), transfers (:meth:`from_host`,
  :meth:`to_host`) and :meth:`synchronize`;
- :meth:`impl`: a registry row's implementation on this device (the dispatcher, ``autodiff.core.select_impl``,
  calls it with the backend of the operands' arrays);
- the plan target a compiled step uses on this device (``compiler.plan.build_plan`` asks the backend of each
  unit's IR values): :meth:`group_kernel` (the elementwise code generator a fusion group becomes),
  :meth:`group_step` (the plan step that launches it, into a plan-owned buffer or straight into a variable),
  :meth:`node_step` (a primitive's implementation as a plan step, specialized to static shapes where the row
  offers it) and :attr:`native` (whether runs of CPU steps may become one compiled native driver).

The CPU backend is defined here; the CUDA backend too, but every CUDA call goes through ``LazyModule`` handles, so
importing jitnet (and running on the CPU) never imports ``numba.cuda``.

Adding a device kind means one module: a ``Backend`` subclass providing these methods, ``register(...)`` of an
instance, and ``impl["<name>"]`` entries on the rows it covers (``tests/test_registry.py`` lists those it lacks).
"""
from __future__ import annotations

import sys

import numpy as np

from . import kernelgen
from .autodiff import core as _ad
from .lazy import LazyModule

__all__ = ["Backend", "CpuBackend", "CudaBackend", "CPU", "CUDA", "register", "get", "backend_of", "names"]

_C = LazyModule("jitnet.cuda")                    # CUDA device services (arrays, transfers, synchronisation)
_G = LazyModule("jitnet.backend_cuda")            # CUDA launch services and generated one-op kernels
_KGC = LazyModule("jitnet.kernelgen_cuda")        # the CUDA source emitter for elementwise programs
_KG = LazyModule("jitnet.kernels_gpu")            # grid sizes
_R = LazyModule("jitnet.cuda_runtime")            # CUDA streams and prepared launches


class Backend:
    """The interface of a device kind. Subclasses override every method; see the module docstring."""

    name = "?"
    native = False             # plans on this device may compile runs of steps into one native driver
    debug_note = ""            # appended to JITNET_DEBUG's per-step times (" (launch)": asynchronous kernels)

    # -- arrays ------------------------------------------------------------------------------------------------
    def owns(self, arr) -> bool:
        """True when ``arr`` is an array of this device."""
        raise NotImplementedError

    def empty(self, shape, dtype):
        """Return an uninitialized array of this device."""
        raise NotImplementedError

    def from_host(self, arr):
        """Return host array ``arr`` on this device (a counted transfer when it moves)."""
        raise NotImplementedError

    # constructors (``jn.zeros``/``full``/``arange``/``linspace``/``eye`` on this device): by default made on the
    # host and moved; a device overrides them with fill kernels
    def full(self, shape, value, dtype):
        """Return an array of this device of ``shape`` filled with ``value``."""
        return self.from_host(np.full(shape, value, dtype))

    def arange(self, start, stop, step, dtype):
        """Return ``np.arange(start, stop, step)`` as an array of this device."""
        return self.from_host(np.arange(start, stop, step, dtype=dtype))

    def linspace(self, start, stop, num, dtype):
        """Return ``np.linspace(start, stop, num)`` as an array of this device."""
        return self.from_host(np.linspace(start, stop, num, dtype=dtype))

    def eye(self, n, m, dtype):
        """Return the (n, m) identity as an array of this device."""
        return self.from_host(np.eye(n, m, dtype=dtype))

    def to_host(self, arr) -> np.ndarray:
        """Return this device's array ``arr`` as a host NumPy array."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until every kernel launched on this device has finished."""

    # -- ops ---------------------------------------------------------------------------------------------------
    def impl(self, prim):
        """Return ``prim``'s implementation over this device's arrays, or raise NotImplementedError naming it.

        A row marked ``extra["any_device"]`` (the transfer between devices) takes arrays of every device in its
        one implementation, ``impl["cpu"]``: return that."""
        raise NotImplementedError

    # -- plan target -------------------------------------------------------------------------------------------
    def group_kernel(self, program, out_rank, in_maps, scalar_kinds, size):
        """Return ``(kernel, source)`` for a fusion group's :class:`kernelgen.ElementwiseProgram`."""
        raise NotImplementedError

    def group_step(self, kernel, in_slots, o, out, buf, into, in_maps, scalar_kinds):
        """Return the plan step ``step(env)`` that runs a group's kernel: into the variable array in slot ``into``
        (assign folding) when it is not None, else into plan buffer ``buf`` (or a recycled output array when
        ``buf`` is None: the value escapes the step)."""
        raise NotImplementedError

    def node_step(self, node, in_slots, o, buffer):
        """Return ``(step, specialized)``: the plan step running graph node ``node`` with this device's impl.

        ``buffer()`` returns a plan-owned output buffer (or None where the value escapes the step) for a step
        that writes its result into one (a specialization)."""
        raise NotImplementedError

    def finish_plan(self, plan) -> None:
        """Adjust a built plan that runs steps on this device (the CUDA backend: the plan's stream)."""

    def __repr__(self):
        return f"<jitnet backend {self.name!r}>"


# ==============================================================================================================
# CPU
# ==============================================================================================================

class CpuBackend(Backend):
    """Host memory and Numba ``@njit`` kernels (``kernels_cpu``, generated kernels from ``kernelgen``)."""

    name = "cpu"
    native = True

    def owns(self, arr):
        return isinstance(arr, (np.ndarray, tuple))          # (a tuple: the several arrays of a loop node)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def from_host(self, arr):
        return arr

    def to_host(self, arr):
        return arr

    def impl(self, prim):
        return prim.impl["cpu"]

    def group_kernel(self, program, out_rank, in_maps, scalar_kinds, size):
        src = kernelgen.indexed_source(program, out_rank, in_maps)
        mod = kernelgen.load_source(src, "cpu")
        return (mod.kernel_parallel if size >= kernelgen.PARALLEL_THRESHOLD else mod.kernel_serial), src

    def group_step(self, kernel, in_slots, o, out, buf, into, in_maps, scalar_kinds):
        kernel = _fast(kernel)
        oshape, dtype, kshape = out.shape, out.dtype, out.shape or (1,)
        if into is not None:
            def step(env):
                dst = env[into]
                kernel(*[env[i] for i in in_slots], dst.reshape(kshape))
                env[o] = dst
        elif buf is not None:
            view = buf.reshape(oshape)

            def step(env):
                kernel(*[env[i] for i in in_slots], buf)
                env[o] = view
        else:
            held = [None, None]

            def step(env):
                dst = _recycled(held, kshape, dtype, np.empty)
                kernel(*[env[i] for i in in_slots], dst)
                env[o] = dst.reshape(oshape)
        return step

    def node_step(self, node, in_slots, o, buffer):
        impl = node.prim.impl["cpu"]
        spec = node.prim.extra.get("specialize") if node.prim.extra else None   # fitted to static shapes
        fn = spec(node.inputs, node.params, node.out) if spec is not None and node.out.dtype != np.dtype(object) \
            else None
        if fn is None:
            return _node_step(impl, in_slots, o, node.params), False
        return _special_step(fn, impl, in_slots, o, node.params, node.out, buffer()), True


def _fast(kernel):
    """Return a caller of ``kernel`` that skips type dispatch while its operands keep the first call's strides.

    A compiled entry point does not check array layouts (a strided view passed where a contiguous array was
    compiled for is read as if it were contiguous), so it is used only when every operand has the strides it
    was compiled for; dtypes and shapes are fixed by the plan, so equal strides mean an equal Numba type.
    """
    box = [None, None]          # strides of the operands the entry point was compiled for, the entry point

    def call(*args):
        key = tuple([a.strides for a in args])
        if key == box[0]:
            try:
                return box[1](*args)
            except TypeError:          # an operand of another Numba type (read-only)
                pass
        r = kernel(*args)
        ep = kernelgen.entry_point(kernel, args)
        box[0], box[1] = (key, ep) if ep is not None else (None, None)
        return r
    return call


def _special_step(fn, impl, in_slots, o, params, out, buf):
    oshape, dtype, kshape = out.shape, out.dtype, out.shape or (1,)
    if buf is not None:
        view = buf.reshape(oshape)

        def step(env):
            if fn(*[env[i] for i in in_slots], buf):
                env[o] = view
            else:
                env[o] = impl(*[env[i] for i in in_slots], **params)
    else:
        held = [None, None]

        def step(env):
            dst = _recycled(held, kshape, dtype, np.empty)
            if fn(*[env[i] for i in in_slots], dst):
                env[o] = dst.reshape(oshape)
            else:
                env[o] = impl(*[env[i] for i in in_slots], **params)
    return step


def _recycled(held, shape, dtype, empty):
    """Return an output array for a value the step returns: one of two earlier outputs if the caller dropped it.

    A returned array is recycled only when nothing but this plan refers to it (its reference count: ``held[k]``,
    the local name and getrefcount's argument), so results the caller still holds are never overwritten (every
    view jitnet makes of a device array refers to it too); steady-state steps then allocate no new memory for
    their outputs and skip the page faults of fresh large arrays. On a GPU, kernels run in launch order (the
    runtime orders a stream after the previous launch's: ``cuda_runtime``), so a kernel still reading the old
    value finishes first.
    """
    for k in (0, 1):
        a = held[k]
        if a is not None and sys.getrefcount(a) == 3:
            return a
    a = empty(shape, dtype)
    held[1] = held[0]
    held[0] = a
    return a


def _node_step(impl, in_slots, o, params):
    if len(in_slots) == 1:
        (a,) = in_slots

        def step(env):
            env[o] = impl(env[a], **params)
    elif len(in_slots) == 2:
        a, b = in_slots

        def step(env):
            env[o] = impl(env[a], env[b], **params)
    else:
        def step(env):
            env[o] = impl(*[env[i] for i in in_slots], **params)
    return step


# ==============================================================================================================
# CUDA
# ==============================================================================================================

class CudaBackend(Backend):
    """NVIDIA GPUs through Numba's CUDA target: device arrays, ``kernels_gpu`` kernels, generated ``@cuda.jit``
    kernels (``kernelgen_cuda``). Loaded lazily: nothing CUDA is imported until a method runs."""

    name = "cuda"
    debug_note = " (launch)"     # CUDA kernels run asynchronously: JITNET_DEBUG times their launch

    def owns(self, arr):
        return not isinstance(arr, (np.ndarray, tuple, np.generic)) and _C.is_device_array(arr)

    def empty(self, shape, dtype):
        return _C.empty(shape, dtype)

    def from_host(self, arr):
        return _C.to_device(arr)

    def to_host(self, arr):
        return _C.to_host(arr)

    def synchronize(self):
        _C.synchronize()

    def full(self, shape, value, dtype):
        return _G.full(shape, value, dtype)

    def arange(self, start, stop, step, dtype):
        return _G.arange(start, stop, step, dtype)

    def linspace(self, start, stop, num, dtype):
        return _G.linspace(start, stop, num, dtype)

    def eye(self, n, m, dtype):
        return _G.eye(n, m, dtype)

    def impl(self, prim):
        f = prim.impl.get("cuda")
        return f if f is not None else _G.impl_of(prim)    # else a generated kernel from its template, or an error

    def group_kernel(self, program, out_rank, in_maps, scalar_kinds, size):
        return _KGC.group_kernel(program, out_rank, in_maps, scalar_kinds)

    def group_step(self, kernel, in_slots, o, out, buf, into, in_maps, scalar_kinds):
        oshape, dtype, kshape = out.shape, out.dtype, out.shape or (1,)
        n = 1
        for d in kshape:
            n *= d
        scal = [m == "scalar" for m in in_maps]
        host = [k == "host" for k in scalar_kinds]
        # launched through a prepared launch: configured once per stream, overload looked up once per layout
        # (arguments: n, the operands, the output; the device arrays among them key the overload)
        arrays = [k + 1 for k, (sc, h) in enumerate(zip(scal, host)) if not (sc and h)] + [len(in_slots) + 1]
        launch = _R.PreparedLaunch(kernel, _KG.grid(n), _KG.BLOCK, arrays)
        reshape, empty = _C.reshape, _C.empty
        held = [None, None]

        def step(env):
            args = [n]
            for s, sc, h in zip(in_slots, scal, host):
                a = env[s]
                if sc:                           # a 1-element operand: by value from the host, else a 1-vector
                    a = a.reshape(())[()] if h else reshape(a, (1,))
                args.append(a)
            if into is not None:
                var = env[into]
                dst = var if var.shape == kshape else reshape(var, kshape)
            else:
                dst = buf if buf is not None else _recycled(held, kshape, dtype, empty)
            if n:
                args.append(dst)
                launch(args)
            if into is not None:
                env[o] = var
            else:
                env[o] = dst if kshape == oshape else reshape(dst, oshape)
        return step

    def node_step(self, node, in_slots, o, buffer):
        return _node_step(self.impl(node.prim), in_slots, o, node.params), False

    def finish_plan(self, plan):
        # the plan's kernels launch on its own stream (cuda_runtime.run_on_plan_stream)
        plan.run_arrays = _R.run_on_plan_stream(plan, plan.run_arrays)


# ==============================================================================================================
# The registry of backends
# ==============================================================================================================

CPU = CpuBackend()
CUDA = CudaBackend()
_BACKENDS = {"cpu": CPU, "cuda": CUDA}
_OTHERS = [CUDA]            # non-CPU backends, asked in order by backend_of


def register(backend: Backend) -> Backend:
    """Add a device kind (its ``name`` must be new); return it."""
    if backend.name in _BACKENDS:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    _OTHERS.append(backend)
    _ad.enable_devices()                 # dispatch now asks each operand's backend
    return backend


def get(name: str) -> Backend:
    """Return the backend of device kind ``name`` ('cpu', 'cuda', or 'cuda:0': the index is ignored)."""
    b = _BACKENDS.get(str(name).partition(":")[0])
    if b is None:
        raise ValueError(f"unknown device kind {name!r}: expected one of {', '.join(sorted(_BACKENDS))}")
    return b


def names() -> list:
    """The registered device kinds."""
    return list(_BACKENDS)


_BY_TYPE = {}              # array type -> the backend that owns it (asked once per type)


def backend_of(arr) -> Backend:
    """Return the backend whose array ``arr`` is (CPU for NumPy arrays, scalars and loop tuples)."""
    if isinstance(arr, (np.ndarray, tuple, np.generic)):
        return CPU
    b = _BY_TYPE.get(type(arr))
    if b is not None:
        return b
    for b in _OTHERS:
        if b.owns(arr):
            _BY_TYPE[type(arr)] = b
            return b
    raise TypeError(f"no jitnet backend owns an array of type {type(arr).__name__}")


_ad.install_backends(backend_of, get)
