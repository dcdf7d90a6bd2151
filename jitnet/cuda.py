"""The CUDA device: availability, device arrays, counted host<->device transfers, device-side error checks.

Importing this module (and jitnet) never imports ``numba.cuda``: that happens on the first use of a CUDA
device (``jn.device("cuda")``, ``Tensor.to("cuda")``, ``Module.to("cuda")``: :func:`require`), which also runs
what the layers above registered with :func:`on_load` (``jitnet.tensor``: the CUDA kernels of the registry's
rows, :mod:`jitnet.backend_cuda`, and device dispatch in ``autodiff.core.apply``). Until then a CPU-only
program pays nothing for the GPU backend. This module sits under the registry: it imports no jitnet module
but the kernels (``kernels_gpu``, once a GPU is in use) and ``bounds``.

A tensor on the GPU holds a Numba device array (``DeviceNDArray``; in Numba's CUDA simulator, enabled by
``NUMBA_ENABLE_CUDASIM=1`` before Numba is imported, a ``FakeCUDAArray``). Every copy between host and device
goes through :func:`to_device` / :func:`to_host`, which count them: :func:`transfer_stats` lets tests assert
that a training step moves nothing but what the user asked for (``item()``, ``numpy()``, ``cpu()``).

Device memory comes from a caching allocator, kernels launch on the current stream (a plan's own, a user's
``with jn.cuda.stream(s):``, else the default stream) and fused plan steps through prepared launches: see
:mod:`jitnet.cuda_runtime` (``memory_stats``, ``reset_peak_memory_stats``, ``empty_cache``, ``Stream``,
``stream``, ``launch_stats`` are re-exported here).

Kernels that find bad input (an index out of range) cannot raise: they record the first problem in a small
error record in mapped host memory, and the next synchronizing call (``item()``, ``numpy()``, ``cpu()``,
:func:`synchronize`) raises it as a Python exception, as PyTorch reports device-side asserts.
"""
from __future__ import annotations

import numpy as np

from . import cuda_runtime as _R
from .bounds import index_error
from .cuda_runtime import (Stream, current_stream, empty_cache, launch_stats, launch_stream, memory_stats,
                           reset_launch_stats, reset_peak_memory_stats, stream)
from .lazy import LazyModule

_KG = LazyModule("jitnet.kernels_gpu")      # the CUDA kernels (a strided copy), imported once a GPU is in use

__all__ = ["is_available", "simulator_enabled", "device_count", "synchronize", "transfer_stats",
           "reset_transfer_stats", "to_device", "to_host", "empty", "is_device_array", "require", "memory_stats",
           "reset_peak_memory_stats", "empty_cache", "Stream", "stream", "current_stream", "launch_stream",
           "launch_stats", "reset_launch_stats"]

_nc = None                 # numba.cuda, once imported
_loaded = False            # the CUDA backend (kernels, primitive impls) is installed
_STATS = {"h2d": 0, "d2h": 0, "h2d_bytes": 0, "d2h_bytes": 0}
_ERR = None                # error record written by kernels: [code, value, bound, op id, position]
_ERR_OPS: list = []        # op id -> (op name, what) for error messages
_ON_LOAD: list = []        # what the first require() runs: the CUDA backend's installation (see on_load)


def _numba_cuda():
    global _nc
    if _nc is None:
        from numba import cuda as nc
        _nc = nc
    return _nc


def simulator_enabled() -> bool:
    """Return True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` before Numba's import)."""
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def is_available() -> bool:
    """Return True when a CUDA GPU (or Numba's CUDA simulator) can run jitnet's kernels."""
    try:
        nc = _numba_cuda()
        return bool(nc.is_available())
    except Exception:          # no numba.cuda, no driver, a broken toolkit: not available
        return False


def device_count() -> int:
    """Return the number of CUDA devices (1 in the simulator, 0 without a GPU)."""
    if not is_available():
        return 0
    if simulator_enabled():
        return 1
    try:
        return len(_numba_cuda().gpus)
    except Exception:
        return 0


def _unavailable_message(what):
    return (f"{what}: device 'cuda' is not available: numba.cuda found no CUDA GPU. Install a CUDA driver and "
            f"jitnet's cuda extra (pip install -e \".[cuda]\"), or set NUMBA_ENABLE_CUDASIM=1 before Numba is "
            f"imported to run the CUDA kernels in Numba's simulator (slow; for tests).")


def require(what="cuda", index=0):
    """Load the CUDA backend (kernels and primitive impls) and turn on device dispatch; raise if no GPU."""
    global _loaded, _DEVICE_TYPES
    if not _loaded:
        if not is_available():
            raise RuntimeError(_unavailable_message(what))
        if simulator_enabled():
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            _DEVICE_TYPES = (FakeCUDAArray,)
        else:
            from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase
            _DEVICE_TYPES = (DeviceNDArrayBase,)
        for install in _ON_LOAD:
            install()
        _loaded = True
    if index != 0:
        n = device_count()
        raise RuntimeError(f"{what}: device cuda:{index} is not supported: jitnet runs on cuda:0 only "
                           f"({n} device{'s' if n != 1 else ''} found)")


def on_load(install):
    """Make the first :func:`require` call ``install()`` (once a GPU is found); return ``install``.

    This module is the device layer under the registry: the layers above it that bring the CUDA backend up
    (the row implementations, device dispatch in ``apply``: ``jitnet.tensor``) register here what that takes,
    and it runs only when a GPU is first used."""
    _ON_LOAD.append(install)
    return install


def active() -> bool:
    """Return True once the CUDA backend is loaded (some tensor or module has been placed on the GPU)."""
    return _loaded


# --------------------------------------------------------------------------------------------------------------
# Transfers (counted) and allocation
# --------------------------------------------------------------------------------------------------------------

def transfer_stats() -> dict:
    """Return counts and bytes of host-to-device (``h2d``) and device-to-host (``d2h``) copies so far."""
    return dict(_STATS)


def reset_transfer_stats() -> None:
    """Set the transfer counters to zero."""
    for k in _STATS:
        _STATS[k] = 0


_DEVICE_TYPES: tuple = ()


def is_device_array(a) -> bool:
    """Return True for a Numba CUDA device array (always False before a GPU is first used)."""
    return bool(_DEVICE_TYPES) and isinstance(a, _DEVICE_TYPES)


def to_device(a):
    """Return a new device array holding a copy of host array ``a`` (counted as one h2d transfer; the memory
    comes from the caching allocator, the copy runs on the default stream after the work queued before it)."""
    a = np.ascontiguousarray(a) if a.ndim else np.array(a)        # (ascontiguousarray makes a 0-d array 1-d)
    _STATS["h2d"] += 1
    _STATS["h2d_bytes"] += a.nbytes
    return _R.from_host(a)


def to_host(d) -> np.ndarray:
    """Return a host copy of device array ``d`` (counted as one d2h transfer; raises pending device errors)."""
    d = contiguous(d)
    _STATS["d2h"] += 1
    _STATS["d2h_bytes"] += d.size * d.dtype.itemsize
    out = np.empty(tuple(d.shape), d.dtype)
    if out.size:
        _R.on_default_stream()           # (the copy waits for the work queued before it, on every stream)
        d.copy_to_host(out)
    check_errors()
    return out


def empty(shape, dtype):
    """Return an uninitialised C-contiguous device array (from the caching allocator: ``cuda_runtime``)."""
    return _R.empty(shape, dtype)


def is_contiguous(d) -> bool:
    """Return True when device array ``d`` is C-contiguous (computed from its shape and strides; an empty array
    is: it holds no element to be out of place)."""
    if 0 in tuple(d.shape):
        return True
    expect = d.dtype.itemsize
    for s, st in zip(reversed(tuple(d.shape)), reversed(tuple(d.strides))):
        if s == 1:
            continue
        if st != expect:
            return False
        expect *= s
    return True


def c_strides(shape, itemsize):
    """Return the C-contiguous strides (bytes) of ``shape``."""
    st, acc = [], itemsize
    for s in reversed(shape):
        st.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(st))


class _Holder:
    """Keeps a NumPy base alive behind an ``__array_interface__`` (simulator views)."""

    __slots__ = ("__array_interface__", "base")


def view(d, shape, strides, offset=0):
    """Return a device array sharing ``d``'s memory: ``shape``, byte ``strides`` (>= 0) and byte ``offset``.

    The first element sits ``offset`` bytes after ``d``'s first element. Strides may be 0 (broadcast) but not
    negative (a negative-stride view is materialized by a gather kernel instead). The view holds a reference to
    ``d`` (``_jn_base``), so ``d``'s reference count tells whether any view of it is alive (plans recycle the
    arrays they return only when nothing refers to them).
    """
    shape = tuple(int(s) for s in shape)
    strides = tuple(int(s) for s in strides)
    if simulator_enabled():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        base = d._ary
        h = _Holder()
        h.base = base
        ptr = base.__array_interface__["data"][0] if base.size else 0
        h.__array_interface__ = {"data": (ptr + offset, False), "shape": shape, "strides": strides,
                                 "typestr": base.dtype.str, "version": 3}
        v = FakeCUDAArray(np.asarray(h))
        v._jn_base = d
        return v
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    gpu_data = d.gpu_data
    n = 1
    for s in shape:
        n *= s
    if offset and n:
        gpu_data = gpu_data.view(offset)
    v = DeviceNDArray(shape, strides, d.dtype, gpu_data=gpu_data)
    v._jn_base = d
    return v


def contiguous(d):
    """Return ``d`` if it is C-contiguous, else a C-contiguous copy on the device (one gather kernel)."""
    if is_contiguous(d):
        return d
    out = empty(d.shape, d.dtype)
    n = out.size
    if n:
        isz = d.dtype.itemsize
        shape, strides = tuple(int(s) for s in d.shape), tuple(int(st) for st in d.strides)
        extent = 1 + sum((s - 1) * st for s, st in zip(shape, strides)) // isz     # (view strides are >= 0)
        _KG.gather_strided[_KG.grid(n), _KG.BLOCK, launch_stream()](view(d, (extent,), (isz,), 0), 0, shape,
                                                    tuple(st // isz for st in strides), reshape(out, (n,)))
    return out


def reshape(d, shape):
    """Return a C-contiguous device array ``d`` viewed with a new shape (no copy)."""
    shape = tuple(int(s) for s in shape)
    if tuple(d.shape) == shape:
        return d
    if not is_contiguous(d):
        raise ValueError("reshape of a non-contiguous device array needs a copy")
    return view(d, shape, c_strides(shape, d.dtype.itemsize), 0)


def synchronize() -> None:
    """Wait for every queued kernel to finish (on every stream), then raise any error a kernel recorded (an index
    out of range)."""
    if not _loaded:
        return
    _numba_cuda().synchronize()
    check_errors()


# --------------------------------------------------------------------------------------------------------------
# Device-side error record
# --------------------------------------------------------------------------------------------------------------

def error_record():
    """Return the int64[5] device error record kernels write to: [code, value, bound, op id, flat position of the
    bad value] (code 0: no error)."""
    global _ERR
    if _ERR is None:
        nc = _numba_cuda()
        if simulator_enabled():
            _ERR = nc.device_array(5, np.int64)
            _ERR._ary[:] = 0
        else:
            _ERR = nc.mapped_array(5, np.int64)      # host memory the device writes: read without a copy
            _ERR[:] = 0
    return _ERR


def error_op(name, what="index"):
    """Return the id kernels store in the error record for op ``name`` (``what`` names the checked value)."""
    key = (name, what)
    try:
        return _ERR_OPS.index(key) + 1
    except ValueError:
        _ERR_OPS.append(key)
        return len(_ERR_OPS)


def check_errors() -> None:
    """Raise the first error a kernel recorded since the last check (and clear it)."""
    if _ERR is None:
        return
    host = _ERR._ary if simulator_enabled() else _ERR
    if host[0] == 0:
        return
    code, value, bound, op, pos = (int(v) for v in host)
    host[:] = 0
    name, what = _ERR_OPS[op - 1] if 0 < op <= len(_ERR_OPS) else ("a CUDA kernel", "index")
    if code == 1:
        raise index_error(name, what, value, pos, f"size {bound}", device=True)
    raise RuntimeError(f"{name}: device-side error {code} (value {value}, bound {bound})")


# --------------------------------------------------------------------------------------------------------------
# Interop
# --------------------------------------------------------------------------------------------------------------

def array_interface(d) -> dict:
    """Return the ``__cuda_array_interface__`` (version 3) of device array ``d``."""
    if simulator_enabled():
        ai = d._ary.__array_interface__
        return {"shape": tuple(d.shape), "strides": None if is_contiguous(d) else tuple(d.strides),
                "data": (ai["data"][0], False), "typestr": d.dtype.str, "stream": None, "version": 3}
    return d.__cuda_array_interface__


def from_cuda_array(obj):
    """Return a device array sharing the memory of ``obj`` (anything with ``__cuda_array_interface__``)."""
    require("as_tensor")
    nc = _numba_cuda()
    if simulator_enabled():
        raise RuntimeError("as_tensor: Numba's CUDA simulator cannot wrap foreign CUDA arrays")
    return nc.as_cuda_array(obj)
