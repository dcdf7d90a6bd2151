"""DLPack exchange: ``Tensor.__dlpack__`` / ``__dlpack_device__`` and ``jn.from_dlpack`` (zero-copy).

A CPU tensor exports its NumPy array's DLPack capsule: the capsule points at the tensor's memory (strides and
dtype as they are, read-only views flagged read-only) and holds a reference to that array until the consumer
releases it. ``from_dlpack`` takes anything with ``__dlpack__`` (NumPy, PyTorch, JAX, CuPy, ...) or a NumPy
array and returns a tensor sharing its memory; the tensor keeps the producer's memory alive.

As with ``torch.Tensor.__dlpack__``, a tensor that requires gradients is not exported (the consumer could
write into memory that the tape still reads): export ``t.detach()``.
"""
from __future__ import annotations

import numpy as np

from . import lowp as _lowp

__all__ = ["from_dlpack", "to_dlpack", "dlpack_device"]

#: DLPack device type codes (``DLDeviceType``)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST = 1, 2, 3
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi",
                 10: "rocm", 11: "rocm_host", 13: "cuda_managed", 14: "oneapi"}


def _tensor_types():
    from .tensor import Tensor, _SUPPORTED
    return Tensor, _SUPPORTED


def dlpack_device(t) -> tuple:
    """Return the ``(device_type, device_id)`` pair of tensor ``t`` as DLPack codes ((1, 0) for the CPU)."""
    if isinstance(t._data, np.ndarray):
        return (KDL_CPU, 0)
    return (KDL_CUDA, t.device.index)


def to_dlpack(t, *, stream=None, max_version=None, dl_device=None, copy=None):
    """Return a DLPack capsule viewing tensor ``t``'s memory (the body of ``Tensor.__dlpack__``)."""
    if t.requires_grad:
        raise RuntimeError("__dlpack__: cannot export a tensor that requires gradients (a consumer could "
                           "change memory the tape still reads); export t.detach() instead")
    data = t._data
    if not isinstance(data, np.ndarray):
        raise BufferError(f"__dlpack__: this tensor holds no host array ({type(data).__name__}); only a "
                          "concrete CPU tensor (not one being traced by jitnet.jit) can be exported")
    if stream is not None:
        raise BufferError(f"__dlpack__: stream must be None for a CPU tensor, got {stream!r}")
    if dl_device is not None and tuple(dl_device) != (KDL_CPU, 0):
        name = _DEVICE_NAMES.get(dl_device[0], str(dl_device[0]))
        raise BufferError(f"__dlpack__: the tensor is on the CPU; it cannot be exported to device "
                          f"{name}:{dl_device[1]} {tuple(dl_device)}")
    kwargs = {}
    if max_version is not None:
        kwargs["max_version"] = tuple(max_version)
    if copy is not None:
        kwargs["copy"] = copy
    return data.__dlpack__(**kwargs)


def _describe(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_dtype(arr, obj):
    Tensor, supported = _tensor_types()
    if arr.dtype not in supported:
        raise TypeError(f"from_dlpack: {_describe(obj)} has dtype {arr.dtype}, which jitnet does not support "
                        "(float16/32/64, int8/16/32/64, uint8, bool); convert it on the producer's side first")
    if arr.dtype == np.float16:
        _lowp.enable()                      # float16 computes through jitnet.lowp's rule
    return arr


def from_dlpack(obj, *, device=None, copy=None):
    """Return a tensor sharing the memory of ``obj`` (anything with ``__dlpack__``, or a NumPy array).

    ``copy=True`` copies; ``copy=False`` refuses to copy (an error if sharing is impossible). ``device``
    ('cpu') may name where the result must live. The tensor keeps the producer's memory alive.
    """
    Tensor, _ = _tensor_types()
    if device is not None:
        from .tensor import Device
        if Device(device).type != "cpu":
            raise BufferError(f"from_dlpack: device={device!r} is not supported; DLPack import makes CPU "
                              "tensors (GPU arrays come in with jn.as_tensor through __cuda_array_interface__)")
    if isinstance(obj, Tensor):
        if copy:
            from .tensor import tensor
            return tensor(obj)
        return obj
    if isinstance(obj, np.ndarray):
        arr = _check_dtype(obj.copy() if copy else obj, obj)
        return Tensor._wrap(arr)
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"from_dlpack: {_describe(obj)} has no __dlpack__ method (expected a NumPy, PyTorch, "
                        "JAX, CuPy or other DLPack array); use jn.tensor(...) to copy other data")
    dev = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (KDL_CPU, 0)
    kind = int(dev[0])
    if kind not in (KDL_CPU, KDL_CUDA_HOST):
        name = _DEVICE_NAMES.get(kind, f"type {kind}")
        if kind == KDL_CUDA and hasattr(obj, "__cuda_array_interface__"):
            from .tensor import as_tensor, tensor
            return tensor(as_tensor(obj)) if copy else as_tensor(obj)
        raise BufferError(f"from_dlpack: {_describe(obj)} lives on device {name}:{dev[1]}; DLPack import "
                          "takes CPU memory (move it to the CPU on the producer's side, or pass a CUDA array "
                          "with __cuda_array_interface__ to jn.as_tensor)")
    try:
        arr = np.from_dlpack(obj, copy=copy)
    except (BufferError, TypeError, ValueError, RuntimeError) as e:
        raise BufferError(f"from_dlpack: cannot import {_describe(obj)} ({type(e).__name__}: {e})") from e
    return Tensor._wrap(_check_dtype(arr, obj))
