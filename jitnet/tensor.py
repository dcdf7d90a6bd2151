"""Tensor: a NumPy-like array with a device, autodiff state and the operators of jitnet.ops."""
from __future__ import annotations

import numpy as np

from . import backends as _backends
from . import cuda as _cuda
from . import lowp as _lowp
from .autodiff import core as _ad
from .lazy import LazyModule

_G = LazyModule("jitnet.backend_cuda")      # the CUDA backend, imported once a GPU is in use
_NC = LazyModule("jitnet.nans_cuda")        # debug_nans on the device, imported with it

__all__ = ["Tensor", "Parameter", "Variable", "tensor", "as_tensor", "float32", "float64", "float16", "bfloat16",
           "int32", "int64", "int8", "uint8", "bool_", "Device", "device", "get_default_dtype", "get_default_device",
           "set_default_device"]

float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
int8 = np.dtype(np.int8)
uint8 = np.dtype(np.uint8)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
bool_ = np.dtype(np.bool_)
bfloat16 = _lowp.bfloat16      # ml_dtypes' bfloat16, resolved on first use (jitnet/lowp.py)

_SUPPORTED = {float16, float32, float64, int8, uint8, int32, int64, bool_, np.dtype(np.int16)}
_DEFAULT_FLOAT = float32


def get_default_dtype():
    """Return the default floating dtype (float32)."""
    return _DEFAULT_FLOAT


class Device:
    """A device name (``cpu`` or ``cuda[:n]``); ``with jn.device("cuda"):`` makes it the default device.

    Inside the block, constructors (``jn.zeros``, ``jn.tensor``, ``jn.random.normal``, layers' parameters, ...)
    create their tensors on this device, as with ``torch.device`` used as a context manager.
    """

    __slots__ = ("type", "index")

    def __init__(self, spec="cpu"):
        if isinstance(spec, Device):
            self.type, self.index = spec.type, spec.index
            return
        s = str(spec)
        t, _, i = s.partition(":")
        if t not in ("cpu", "cuda") and t not in _backends.names():
            raise ValueError(f"unknown device {spec!r}: expected 'cpu' or 'cuda[:index]'"
                             + "".join(f" or {n!r}" for n in _backends.names() if n not in ("cpu", "cuda")))
        self.type, self.index = t, (int(i) if i else 0)

    def __eq__(self, other):
        try:
            o = Device(other)
        except (ValueError, TypeError):
            return NotImplemented
        return self.type == o.type and (self.type != "cuda" or self.index == o.index)

    def __hash__(self):
        return hash((self.type, self.index if self.type == "cuda" else 0))

    def __str__(self):
        return f"cuda:{self.index}" if self.type == "cuda" else self.type

    __repr__ = lambda self: f"device({str(self)!r})"  # noqa: E731

    def __enter__(self):
        if self.type == "cuda":
            _cuda.require(f"jn.device({str(self)!r})", self.index)
        _DEVICE_STACK.append(self)
        return self

    def __exit__(self, *exc):
        _DEVICE_STACK.pop()


_CPU = Device("cpu")
_CUDA0 = Device("cuda:0")
_DEVICE_STACK = [_CPU]          # the default device is the last entry (``with jn.device(...)`` pushes one)


def device(spec="cpu") -> Device:
    """Return the Device named by ``spec`` ('cpu' or 'cuda[:n]'); raise if that device is not available."""
    d = Device(spec)
    if d.type == "cuda":
        _cuda.require(f"jn.device({str(d)!r})", d.index)
    return d


def get_default_device() -> Device:
    """Return the device on which constructors create tensors (cpu unless set or inside ``with jn.device``)."""
    return _DEVICE_STACK[-1]


def set_default_device(spec) -> None:
    """Make ``spec`` ('cpu', 'cuda') the device on which constructors create tensors from now on."""
    d = device(spec)
    _DEVICE_STACK[0] = d
    del _DEVICE_STACK[1:]


def _on_device(arr, dev):
    """Return host or device array ``arr`` placed on Device ``dev`` (a counted transfer when it moves)."""
    if dev.type == "cpu":
        if isinstance(arr, np.ndarray):
            return arr
        return _backends.backend_of(arr).to_host(arr)
    if dev.type != "cuda":                              # a device kind registered with jitnet.backends
        be = _backends.get(dev.type)
        if be.owns(arr):
            return arr
        return be.from_host(arr if isinstance(arr, np.ndarray) else _backends.backend_of(arr).to_host(arr))
    _cuda.require(f"to({str(dev)!r})", dev.index)
    if isinstance(arr, np.ndarray) and _lowp.is_bf16(arr.dtype):
        raise TypeError("bfloat16 tensors live on the CPU (no GPU kernel reads them); convert with .float() or "
                        ".half() before moving to the GPU")
    return _cuda.to_device(arr) if isinstance(arr, np.ndarray) else arr


def _normalize_dtype(dtype):
    if dtype is None:
        return None
    if dtype is float:
        return _DEFAULT_FLOAT
    if dtype is int:
        return int64
    if dtype is bool:
        return bool_
    if isinstance(dtype, _lowp.BFloat16) or (isinstance(dtype, str) and dtype == "bfloat16"):
        return _lowp.bfloat16_dtype()
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}") from None
    if dt not in _SUPPORTED:
        if _lowp.is_lowp(dt):                   # bfloat16 given as ml_dtypes' type
            _lowp.enable()
            return dt
        raise TypeError(f"unsupported dtype {dt}: jitnet supports float16/32/64, bfloat16, int8/16/32/64, uint8, "
                        "bool")
    if dt == float16:
        _lowp.enable()
    return dt


def _astype(arr, dt):
    """Return host array ``arr`` as dtype ``dt`` (float16/bfloat16 conversions through jitnet.lowp's kernels)."""
    if arr.dtype == dt:
        return arr
    if _lowp.is_lowp(dt) or _lowp.is_lowp(arr.dtype):
        return _lowp.convert(arr, dt)
    return arr.astype(dt)


def _infer_array(value, dtype=None):
    """Return a NumPy array for ``value``: Python floats become float32, ints int64, unless dtype says."""
    dt = _normalize_dtype(dtype)
    if isinstance(value, Tensor):
        arr = value._data
        if dt is None or arr.dtype == dt:
            return arr
        if not isinstance(arr, np.ndarray):
            return _G.cast(arr, dt)
        return _astype(arr, dt)
    if isinstance(value, np.ndarray):
        if dt is None:
            if value.dtype not in _SUPPORTED:
                if _lowp.is_lowp(value.dtype):    # a bfloat16 array
                    _lowp.enable()
                    return value
                if value.dtype.kind == "f":
                    return value.astype(float64)
                if value.dtype.kind in "iu":
                    return value.astype(int64)
                raise TypeError(f"unsupported dtype {value.dtype}")
            if value.dtype == float16:
                _lowp.enable()
            return value
        return _astype(value, dt)
    if _cuda.is_device_array(value):
        if dt is None or value.dtype == dt:
            return value
        return _G.cast(value, dt)
    arr = np.asarray(value)
    if dt is not None:
        return _astype(arr, dt)
    if arr.dtype.kind == "f":
        return arr.astype(_DEFAULT_FLOAT)
    if arr.dtype.kind in "iu":
        return arr.astype(int64, copy=False)
    if arr.dtype.kind == "b":
        return arr
    raise TypeError(f"cannot make a tensor from {type(value).__name__} (dtype {arr.dtype})")


class Tensor:
    """An n-dimensional array on a device, with ``requires_grad``, ``grad`` and NumPy-style operators."""

    __slots__ = ("_data", "_node", "requires_grad", "grad", "name", "__weakref__")
    __array_priority__ = 1000

    def __init__(self, data, dtype=None, requires_grad=False):
        self._data = _infer_array(data, dtype)
        self._node = None
        self.grad = None
        self.name = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _wrap(cls, arr):
        t = object.__new__(cls)
        t._data = arr
        t._node = None
        t.requires_grad = False
        t.grad = None
        t.name = None
        return t

    @classmethod
    def _from_value(cls, value, dtype=None):
        return cls._wrap(_infer_array(value, dtype))

    # -- metadata ------------------------------------------------------------------------------------------
    @property
    def shape(self):
        """The shape tuple."""
        s = self._data.shape
        return s if type(s) is tuple else tuple(s)     # (the CUDA simulator's shape is a tuple subclass)

    @property
    def dtype(self):
        """The NumPy dtype."""
        return self._data.dtype

    @property
    def ndim(self):
        """The number of dimensions."""
        return self._data.ndim

    @property
    def size(self):
        """The number of elements."""
        return self._data.size

    @property
    def device(self):
        """The Device holding the data."""
        d = self._data
        if isinstance(d, (np.ndarray, tuple)):
            return _CPU
        be = _backends.backend_of(d)
        return _CUDA0 if be is _backends.CUDA else Device(be.name)

    @property
    def is_cuda(self):
        """True when the data is on a CUDA device."""
        d = self._data
        return not isinstance(d, (np.ndarray, tuple)) and _backends.backend_of(d) is _backends.CUDA

    @property
    def __cuda_array_interface__(self):
        """The CUDA array interface of a GPU tensor's data (CuPy, PyTorch and Numba take it without a copy)."""
        d = self._data
        if isinstance(d, (np.ndarray, tuple)):
            raise AttributeError("a CPU tensor has no __cuda_array_interface__; move it with .to('cuda')")
        return _cuda.array_interface(d)

    @property
    def is_leaf(self):
        """True for tensors not computed by a recorded op."""
        return self._node is None

    def requires_grad_(self, flag=True):
        """Set ``requires_grad`` in place (floating dtypes only) and return self."""
        if flag and not _lowp.is_floating(self._data.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        self.requires_grad = bool(flag)
        return self

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        for i in range(self.shape[0]):
            yield self[i]

    def __repr__(self):
        body = np.array2string(self.numpy(), separator=", ", prefix="Tensor(")
        extra = ", requires_grad=True" if self.requires_grad else ""
        dev = "" if isinstance(self._data, np.ndarray) else ", device='cuda:0'"
        return f"Tensor({body}, shape={self.shape}, dtype={self.dtype}{dev}{extra})"

    def __array__(self, dtype=None, copy=None):
        if copy is False and not isinstance(self._data, np.ndarray):
            raise ValueError("np.asarray(copy=False): a GPU tensor's data cannot be viewed from the host "
                             "without a copy; use t.numpy() or copy=None")
        a = self.numpy()
        if dtype is not None and np.dtype(dtype) != a.dtype:
            if copy is False:
                raise ValueError(f"np.asarray(copy=False): converting dtype {a.dtype} to {np.dtype(dtype)} "
                                 "needs a copy")
            return a.astype(dtype)
        if copy:
            return a.copy()
        return a

    def numpy(self):
        """Return the data as a NumPy array (a view on the CPU: do not modify it; a copy from a GPU)."""
        d = self._data
        if isinstance(d, np.ndarray):
            return d
        return _backends.backend_of(d).to_host(d)

    def item(self):
        """Return the single element as a Python number."""
        if self.size != 1:
            raise ValueError(f"item(): the tensor has {self.size} elements, expected 1 (shape {self.shape})")
        return self.numpy().item()

    def tolist(self):
        """Return the data as nested Python lists."""
        return self.numpy().tolist()

    def detach(self):
        """Return a tensor sharing the data, cut from the tape."""
        return Tensor._wrap(self._data)

    def to(self, dev):
        """Return the tensor on device ``dev`` ('cpu' or 'cuda'); itself when it is already there.

        The copy is differentiable (the gradient goes back to this tensor's device) and counted as a transfer.
        """
        d = dev if isinstance(dev, Device) else Device(dev)
        if d == self.device:
            return self
        if d.type == "cuda":
            _cuda.require(f"Tensor.to({str(d)!r})", d.index)
        return _ad.apply(TRANSFER, self, device=str(d))

    def cpu(self):
        """Return the tensor on the CPU."""
        return self.to("cpu")

    def cuda(self):
        """Return the tensor on the GPU (cuda:0)."""
        return self.to("cuda")

    def _move_(self, dev):
        """Move this tensor's data (and its ``.grad``) to ``dev`` in place; return self (``Module.to``)."""
        d = dev if isinstance(dev, Device) else Device(dev)
        if d != self.device:
            self._data = _on_device(self._data, d)
        g = self._grad if isinstance(self, Parameter) else self.grad
        if isinstance(g, Tensor):
            g._move_(d)
        return self

    def zero_grad(self):
        """Set ``.grad`` to None."""
        self.grad = None

    def __bool__(self):
        if self.size != 1:
            raise ValueError(f"the truth value of a tensor with {self.size} elements is ambiguous; use "
                             ".any() or .all()")
        return bool(self.numpy())

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        if self.dtype.kind not in "iu" or self.size != 1:
            raise TypeError("only integer tensors of one element can be used as an index")
        return int(self.item())

    __hash__ = object.__hash__


# Tensor's operators and most of its methods are jitnet.ops functions: ops.py binds them to the class when it
# loads (it imports this module, not the reverse), as autodiff.backprop binds ``backward`` and jitnet.dlpack
# ``__dlpack__``.
Tensor.float = lambda self: self.astype(float32)
Tensor.double = lambda self: self.astype(float64)
Tensor.long = lambda self: self.astype(int64)
Tensor.int = lambda self: self.astype(int32)
Tensor.half = lambda self: self.astype(float16)
Tensor.bfloat16 = lambda self: self.astype(bfloat16)




class Parameter(Tensor):
    """A trainable state tensor (``requires_grad=True``) updated in place by optimizers and ``assign``.

    It is created on ``device`` (default: the data's device for a GPU array, else the default device).
    """

    __slots__ = ("trainable", "_grad")

    @property
    def grad(self):
        """The accumulated gradient (None until a backward pass reaches this variable)."""
        interp = _ad.current_interpreter()
        if interp is not None and hasattr(interp, "read_grad"):
            return interp.read_grad(self)
        return self._grad

    @grad.setter
    def grad(self, value):
        interp = _ad.current_interpreter()
        if interp is not None and hasattr(interp, "write_grad"):
            interp.write_grad(self, value)
            return
        self._grad = value

    def __init__(self, data, dtype=None, requires_grad=None, trainable=True, name=None, device=None):
        arr = _infer_array(data, dtype)
        if isinstance(arr, np.ndarray):
            arr = np.array(arr, copy=True, order="C")
            dev = _DEVICE_STACK[-1] if device is None else Device(device)
            if dev.type != "cpu":                   # created under ``with jn.device("cuda")`` (or asked for)
                arr = _on_device(arr, dev)
        else:
            arr = _G.copy(arr)
            if device is not None and Device(device).type == "cpu":
                arr = _on_device(arr, _CPU)
        super().__init__(arr)
        self.trainable = trainable
        self.name = name
        rg = trainable if requires_grad is None else requires_grad
        if rg:
            self.requires_grad_(True)

    def assign(self, value):
        """Write ``value`` into this variable in place (shape and dtype kept); return self."""
        interp = _ad.current_interpreter()
        if interp is not None and hasattr(interp, "assign"):
            interp.assign(self, value)
            return self
        v = value._data if isinstance(value, Tensor) else np.asarray(value)
        if v.shape != self.shape and np.broadcast_shapes(v.shape, self.shape) != self.shape:
            raise ValueError(f"assign: value of shape {v.shape} does not fit variable of shape {self.shape}")
        if isinstance(self._data, np.ndarray) and isinstance(v, np.ndarray):
            np.copyto(self._data, v, casting="same_kind")
            return self
        if not np.can_cast(v.dtype, self.dtype, "same_kind"):
            raise TypeError(f"assign: cannot cast a value of dtype {v.dtype} to variable dtype {self.dtype}")
        if isinstance(self._data, np.ndarray):
            np.copyto(self._data, _cuda.to_host(v), casting="same_kind")
        else:
            _G.copy_into(self._data, v)
        return self

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


Variable = Parameter
_ad._wrap = Tensor._wrap


# --------------------------------------------------------------------------------------------------------------
# Devices: the transfer primitive, and what the first use of a GPU brings up
# --------------------------------------------------------------------------------------------------------------

def _transfer_impl(a, device):
    return _on_device(a, Device(device))


def _transfer_vjp(g, ans, ins, needs, device):
    return (g.to(ins[0].device),)


#: Tensor.to / .cpu / .cuda: a copy between devices (differentiable; its inputs may be on any device, and every
#: backend runs this one implementation: ``any_device``)
TRANSFER = _ad.Primitive("to_device", impl={"cpu": _transfer_impl, "cuda": _transfer_impl}, vjp=_transfer_vjp)
TRANSFER.extra["any_device"] = True


@_cuda.on_load
def _load_cuda_backend():
    """Run by the first ``jitnet.cuda.require``: CUDA kernels for the rows, device dispatch in ``apply``."""
    _G.install()
    _NC.install()               # jitnet.debug_nans checks device arrays on the device
    _ad.enable_devices()


def tensor(data, dtype=None, requires_grad=False, device=None):
    """Return a new tensor holding a copy of ``data`` (floats default to float32) on ``device``.

    ``device`` defaults to the data's device for a tensor, else to the default device (see ``jn.device``).
    """
    if isinstance(data, Tensor):
        src = data._data
        if isinstance(src, np.ndarray):
            arr = src.copy() if dtype is None else _astype(src, _normalize_dtype(dtype))
            if arr is src:
                arr = src.copy()
        else:
            arr = _G.copy(src) if dtype is None else _G.cast(src, _normalize_dtype(dtype))
        dev = Device(device) if device is not None else (_CPU if isinstance(src, np.ndarray) else _CUDA0)
    else:
        arr = _infer_array(data, dtype)
        if arr is data:
            arr = arr.copy()
        dev = Device(device) if device is not None else _DEVICE_STACK[-1]
    return Tensor(_on_device(arr, dev), requires_grad=requires_grad)


def as_tensor(data, dtype=None, device=None):
    """Return ``data`` as a tensor, sharing memory with a NumPy array (or a CUDA array) where possible.

    Objects exporting ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors, Numba device arrays) become
    GPU tensors without a copy.
    """
    if isinstance(data, Tensor):
        t = data if (dtype is None or data.dtype == _normalize_dtype(dtype)) else Tensor(data, dtype=dtype)
        return t if device is None else t.to(device)
    if not isinstance(data, np.ndarray) and hasattr(data, "__cuda_array_interface__"):
        t = Tensor._wrap(_cuda.from_cuda_array(data))
        return t if dtype is None else Tensor(t, dtype=dtype)
    dev = Device(device) if device is not None else _DEVICE_STACK[-1]
    t = Tensor(data, dtype=dtype)
    return t if dev.type == "cpu" else t.to(dev)
