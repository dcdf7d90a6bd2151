"""DLPack exchange: ``Tensor.__dlpack__`` / ``__dlpack_device__`` and ``jn.from_dlpack`` (zero-copy).

This module sits above ``jitnet.tensor`` (``from_dlpack`` makes tensors) and gives the class its two DLPack
methods when it loads (``import jitnet`` loads it).

A CPU tensor exports its NumPy array's DLPack capsule: the capsule points at the tensor's memory (strides and
dtype as they are, read-only views flagged read-only) and holds a reference to that array until the consumer
releases it. ``from_dlpack`` takes anything with ``__dlpack__`` (NumPy, PyTorch, JAX, CuPy, ...) or a NumPy
array and returns a tensor sharing its memory; the tensor keeps the producer's memory alive.

As with ``torch.Tensor.__dlpack__``, a tensor that requires gradients is not exported (the consumer could
write into memory that the tape still reads): export ``t.detach()``.

**bfloat16.** NumPy's DLPack refuses bfloat16 (ml_dtypes' type, kind ``'V'``), so this module reads and
labels those capsules itself, through ``ctypes`` structures with ``dlpack.h``'s layouts (``DLDevice``,
``DLDataType``, ``DLTensor``, ``DLManagedTensor`` and the versioned one). Export: NumPy exports the array's
uint16 view (legacy capsule, or versioned with the read-only flag when the consumer passes ``max_version``;
NumPy's C deleter drops the reference to the array, and its capsule destructor frees only an unused capsule);
before anyone sees the capsule, its DLTensor's dtype becomes ``(kDLBfloat, 16, 1)``. Import: when NumPy refuses
a producer's capsule, it is read here (data + byte offset, shape, strides in elements or NULL for C order); a
bfloat16 one is renamed ``"used_dltensor"`` (``_versioned``) and its memory viewed as a uint16 array, then as
bfloat16, whose owner calls the producer's deleter once the last view of that memory is gone. Zero copy both
ways; every other dtype goes through NumPy's DLPack exactly as before.
"""
from __future__ import annotations

import ctypes
import types

import numpy as np

from . import cuda as _cuda
from . import lowp as _lowp
from .tensor import _SUPPORTED, Device, Tensor, as_tensor, tensor

__all__ = ["from_dlpack", "to_dlpack", "dlpack_device"]

#: DLPack device type codes (``DLDeviceType``)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST = 1, 2, 3
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi",
                 10: "rocm", 11: "rocm_host", 13: "cuda_managed", 14: "oneapi"}


# --------------------------------------------------------------------------------------------------------------
# bfloat16: DLPack structures through ctypes (NumPy's DLPack has no bfloat16)
# --------------------------------------------------------------------------------------------------------------

KDL_BFLOAT = 4                      #: ``DLDataTypeCode.kDLBfloat``
_FLAG_READ_ONLY = 1                  #: ``DLPACK_FLAG_BITMASK_READ_ONLY``
_DL_CODES = {0: "int", 1: "uint", 2: "float", 3: "opaque handle", 4: "bfloat", 5: "complex", 6: "bool"}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_CAP_NAMES = (b"dltensor", b"dltensor_versioned")
_USED_NAMES = {b"dltensor": b"used_dltensor", b"dltensor_versioned": b"used_dltensor_versioned"}
_DeleterFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)      # void (*)(DLManagedTensor[Versioned]*)
_C = None               # the C entry points below, made on first use


class _CApi:
    """The C entry points this module calls (its own ctypes prototypes: nothing shared is reconfigured)."""

    def __init__(self):
        api, proto = ctypes.pythonapi, ctypes.PYFUNCTYPE
        cp, obj = ctypes.c_char_p, ctypes.py_object
        self.is_valid = proto(ctypes.c_int, obj, cp)(("PyCapsule_IsValid", api))
        self.get_pointer = proto(ctypes.c_void_p, obj, cp)(("PyCapsule_GetPointer", api))
        self.set_name = proto(ctypes.c_int, obj, cp)(("PyCapsule_SetName", api))
        # PyCapsule_SetName keeps the pointer, and a capsule may outlive this module at interpreter exit:
        # these buffers live as long as the process
        self.used = {k: ctypes.create_string_buffer(v) for k, v in _USED_NAMES.items()}
        for buf in self.used.values():
            api.Py_IncRef(obj(buf))

    def managed(self, cap, what):
        """Return ``(name, struct)``: the DLManagedTensor[Versioned] of unused DLPack capsule ``cap``."""
        for name in _CAP_NAMES:
            if self.is_valid(cap, name):
                addr = self.get_pointer(cap, name)
                cls = _DLManagedTensorVersioned if name == _CAP_NAMES[1] else _DLManagedTensor
                return name, cls.from_address(addr)
        raise BufferError(f"{what} gave {cap!r}, not an unused DLPack capsule")


def _api():
    global _C
    if _C is None:
        _C = _CApi()
    return _C


def _export_bf16(arr, kwargs):
    """Return a DLPack capsule viewing bfloat16 array ``arr`` with DLPack dtype (kDLBfloat, 16, 1).

    NumPy exports the array's uint16 view (its C deleter and capsule destructor manage the lifetime, and it
    handles ``max_version``, ``copy`` and the read-only flag); the capsule's DLTensor then gets the bfloat16
    type code before any consumer sees it. The bit patterns are the same, so only the label changes.
    """
    cap = arr.view(np.uint16).__dlpack__(**kwargs)
    _, m = _api().managed(cap, "numpy.ndarray.__dlpack__")
    dt = m.dl_tensor.dtype
    if (dt.code, dt.bits, dt.lanes) != (1, 16, 1):                   # (kDLUInt, 16, 1): NumPy's uint16
        raise BufferError(f"__dlpack__: NumPy exported a uint16 view as {_dl_dtype_name(dt)}")
    m.dl_tensor.dtype = _DLDataType(KDL_BFLOAT, 16, 1)
    return cap


class _ImportedMemory:
    """Owns a consumed DLManagedTensor: NumPy views it through ``__array_interface__``; freeing this object
    (when the last array over the memory goes) calls the producer's deleter."""

    __slots__ = ("__array_interface__", "_managed", "_deleter")

    def __init__(self, managed, deleter, interface):
        self._managed, self._deleter = managed, deleter
        self.__array_interface__ = interface

    def __del__(self):
        if self._deleter:
            d, self._deleter = self._deleter, None
            _DeleterFn(d)(self._managed)


def _dl_dtype_name(dt):
    base = _DL_CODES.get(dt.code, f"code {dt.code}")
    return f"{base}{dt.bits}" + (f"x{dt.lanes}" if dt.lanes != 1 else "")


def _import_capsule(cap, obj):
    """Return a bfloat16 NumPy array over the memory of DLPack capsule ``cap`` (from ``obj``), or None when
    the capsule holds another dtype (then it stays unused, and its destructor frees it)."""
    c = _api()
    name, m = c.managed(cap, f"from_dlpack: {_describe(obj)}.__dlpack__()")
    addr = ctypes.addressof(m)
    read_only = False
    if name == _CAP_NAMES[1]:
        if m.version.major != 1:     # a layout this module does not know: read nothing more
            raise BufferError(f"from_dlpack: {_describe(obj)} gave DLPack {m.version.major}.{m.version.minor}; "
                              "jitnet reads DLPack 1.x")
        read_only = bool(m.flags & _FLAG_READ_ONLY)
    t = m.dl_tensor
    if t.device.device_type not in (KDL_CPU, KDL_CUDA_HOST):
        name_ = _DEVICE_NAMES.get(t.device.device_type, f"type {t.device.device_type}")
        raise BufferError(f"from_dlpack: {_describe(obj)} exported memory on device {name_}; DLPack import "
                          "takes CPU memory")
    dt = t.dtype
    if (dt.code, dt.bits, dt.lanes) != (KDL_BFLOAT, 16, 1):
        return None
    n = t.ndim
    shape = tuple(t.shape[i] for i in range(n))
    strides = tuple(2 * t.strides[i] for i in range(n)) if t.strides and n else None
    data = (t.data or 0) + t.byte_offset
    bf16 = _lowp.bfloat16_dtype()
    c.set_name(cap, c.used[name])            # consumed: the producer's destructor leaves it alone
    if 0 in shape or data == 0:                           # nothing to view (NumPy wants a real pointer)
        if m.deleter:
            _DeleterFn(m.deleter)(addr)
        return np.empty(shape, bf16)
    owner = _ImportedMemory(addr, m.deleter, {"shape": shape, "typestr": np.dtype(np.uint16).str,
                                               "strides": strides, "data": (data, read_only), "version": 3})
    return np.asarray(owner).view(bf16)


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
    if _lowp.is_bf16(data.dtype):
        return _export_bf16(data, kwargs)
    return data.__dlpack__(**kwargs)


def _describe(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_dtype(arr, obj):
    if _lowp.is_lowp(arr.dtype):
        _lowp.enable()                      # float16/bfloat16 compute through jitnet.lowp's rule
    elif arr.dtype not in _SUPPORTED:
        raise TypeError(f"from_dlpack: {_describe(obj)} has dtype {arr.dtype}, which jitnet does not support "
                        "(float16/32/64, bfloat16, int8/16/32/64, uint8, bool); convert it on the producer's "
                        "side first")
    return arr


def from_dlpack(obj, *, device=None, copy=None):
    """Return a tensor sharing the memory of ``obj`` (anything with ``__dlpack__``, or a NumPy array).

    ``copy=True`` copies; ``copy=False`` refuses to copy (an error if sharing is impossible). ``device``
    ('cpu') may name where the result must live. The tensor keeps the producer's memory alive.
    """
    if device is not None:
        if Device(device).type != "cpu":
            raise BufferError(f"from_dlpack: device={device!r} is not supported; DLPack import makes CPU "
                              "tensors (GPU arrays come in with jn.as_tensor through __cuda_array_interface__)")
    if isinstance(obj, Tensor):
        if copy:
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
            return tensor(as_tensor(obj)) if copy else as_tensor(obj)
        raise BufferError(f"from_dlpack: {_describe(obj)} lives on device {name}:{dev[1]}; DLPack import "
                          "takes CPU memory (move it to the CPU on the producer's side, or pass a CUDA array "
                          "with __cuda_array_interface__ to jn.as_tensor)")
    try:
        arr = np.from_dlpack(obj, copy=copy)
    except (BufferError, TypeError, ValueError, RuntimeError) as e:
        arr = _from_dlpack_bf16(obj, copy)           # NumPy has no bfloat16: this module reads those
        if arr is None:
            raise BufferError(f"from_dlpack: cannot import {_describe(obj)} ({type(e).__name__}: {e})") from e
    return Tensor._wrap(_check_dtype(arr, obj))


def _from_dlpack_bf16(obj, copy):
    """Return a bfloat16 array sharing ``obj``'s memory (a copy if ``copy``), or None if it is not bfloat16."""
    try:
        cap = obj.__dlpack__(max_version=(1, 0))
    except TypeError:                                  # a producer older than DLPack 1.0's keywords
        cap = obj.__dlpack__()
    arr = _import_capsule(cap, obj)
    if arr is not None and copy:
        arr = arr.copy()
    return arr


# --------------------------------------------------------------------------------------------------------------
# Tensor's DLPack methods (tensor.py sits below this module and does not import it: the class gets them here)
# --------------------------------------------------------------------------------------------------------------

def _dlpack_method(self):
    """The DLPack export method (``np.from_dlpack``, ``torch.from_dlpack``): returns a capsule sharing memory.

    A GPU tensor has none (AttributeError), so consumers that look for ``__dlpack__`` first (PyTorch,
    numba.cuda kernel arguments) fall back to its ``__cuda_array_interface__``, its zero-copy export.
    """
    d = self._data
    if not isinstance(d, np.ndarray):
        if _cuda.is_device_array(d):
            raise AttributeError("a GPU tensor has no __dlpack__: it is exported without a copy through "
                                 "__cuda_array_interface__ (torch.as_tensor, cupy.asarray, "
                                 "numba.cuda.as_cuda_array), or use t.cpu() for DLPack")
    return types.MethodType(to_dlpack, self)


def _dlpack_device_method(self):
    """Return the DLPack ``(device_type, device_id)`` of the data: (1, 0) on the CPU, (2, n) on cuda:n."""
    return dlpack_device(self)


Tensor.__dlpack__ = property(_dlpack_method)
Tensor.__dlpack_device__ = _dlpack_device_method
