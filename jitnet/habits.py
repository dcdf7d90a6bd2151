"""PyTorch spellings on tensors: aliases of jitnet's NumPy names, in-place updates, and ``x.at[idx]``.

NumPy names stay primary. This module adds

* aliases: ``cat`` (concatenate), ``permute``, ``clone`` (copy), ``randn``/``rand``, ``manual_seed``, ``dim=``
  for ``axis=`` and ``keepdim=`` for ``keepdims=`` (giving both spellings is a TypeError), and varargs shapes in
  ``zeros(2, 3)``, ``ones``, ``empty``, ``randn``, ``rand``;
* in-place updates ``x[idx] = v``, ``add_``, ``sub_``, ``mul_``, ``div_``, ``zero_``, ``fill_``, ``copy_`` on
  tensors that need no gradient (RuntimeError on one that requires grad or was computed by a recorded op, as
  PyTorch's version counter would; TracingError inside ``jitnet.jit``);
* ``x.at[idx].set(v) / .add(v) / .multiply(v) / .get()``: JAX-style functional updates that return a new tensor
  and are differentiable, eagerly and under ``jitnet.jit``;
* an AttributeError naming the jitnet spelling for common PyTorch names jitnet does not have.
"""
from __future__ import annotations

import builtins
import functools
import inspect

import numpy as np

from . import cuda as _cuda
from . import lowp as _lowp
from . import ops as _ops
from . import random as _random
from .autodiff import core as _ad
from .compiler import TracingError
from .tensor import Tensor, float32
from .lazy import LazyModule

_G = LazyModule("jitnet.backend_cuda")      # the CUDA backend, imported once a GPU is in use

__all__ = ["cat", "permute", "clone", "randn", "rand", "manual_seed", "zeros", "ones", "empty"]

_NO = object()

# ----------------------------------------------------------------------------------------------------------
# dim= / keepdim= aliases
# ----------------------------------------------------------------------------------------------------------

_DIM_OPS = ["sum", "prod", "max", "min", "mean", "var", "std", "norm", "all", "any", "logsumexp", "argmax",
            "argmin", "cumsum", "cumprod", "softmax", "log_softmax", "flip", "squeeze", "expand_dims", "argsort",
            "sort", "take_along_axis", "take", "split", "concatenate", "stack"]


def _dim_alias(fn):
    """Return ``fn`` also accepting PyTorch's ``dim=`` (for ``axis=``) and ``keepdim=`` (for ``keepdims=``)."""
    names = list(inspect.signature(fn).parameters)
    pos = names.index("axis")
    kpos = names.index("keepdims") if "keepdims" in names else None
    op = fn.__name__

    @functools.wraps(fn)
    def f(*args, dim=_NO, keepdim=_NO, **kw):
        if dim is not _NO:
            if "axis" in kw or len(args) > pos:
                raise TypeError(f"{op}: got both axis and dim= (dim is PyTorch's name for axis; give one)")
            kw["axis"] = dim
        if keepdim is not _NO:
            if kpos is None:
                raise TypeError(f"{op}() got an unexpected keyword argument 'keepdim'")
            if "keepdims" in kw or len(args) > kpos:
                raise TypeError(f"{op}: got both keepdims and keepdim= (keepdim is PyTorch's name; give one)")
            kw["keepdims"] = keepdim
        return fn(*args, **kw)
    return f


_WRAPPED = {n: _dim_alias(getattr(_ops, n)) for n in _DIM_OPS}
globals().update(_WRAPPED)          # (shadows builtins max/min/sum/any/all here: use builtins.*)
__all__ += _DIM_OPS

# ----------------------------------------------------------------------------------------------------------
# Aliases and varargs shapes
# ----------------------------------------------------------------------------------------------------------

cat = _dim_alias(_ops.concatenate)
cat.__name__ = cat.__qualname__ = "cat"
cat.__doc__ = "Return the tensors joined along an existing ``axis`` (PyTorch's name for jn.concatenate)."


def _dims(dims, op):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"{op}: dimensions must be integers, got {d!r}")
    return tuple(int(d) for d in dims)


def permute(x, *dims):
    """Return x with its axes in the order ``dims`` (PyTorch's name for jn.transpose(x, axes))."""
    x = _ops._as_tensor(x)
    dims = _dims(dims, "permute")
    if len(dims) != x.ndim or sorted(d % builtins.max(x.ndim, 1) for d in dims) != list(range(x.ndim)) \
            or builtins.any(not -x.ndim <= d < x.ndim for d in dims):
        raise ValueError(f"permute: dims {dims} are not a permutation of the {x.ndim} axes of a tensor of shape "
                         f"{x.shape}")
    return _ops.transpose(x, tuple(d % x.ndim for d in dims))


def clone(x):
    """Return a new contiguous copy of x, differentiable (PyTorch's name for jn.copy)."""
    return _ops.copy(x)


def manual_seed(seed):
    """Reseed jitnet's random generators (PyTorch's name for jn.random.seed); return None."""
    _random.seed(int(seed))


def _varargs_shape(args, op):
    """Split constructor ``args`` into (shape, rest): ``f(2, 3)`` and ``f((2, 3), dtype)`` both work."""
    if args and isinstance(args[0], (int, np.integer)) and not isinstance(args[0], bool):
        n = 1
        while n < len(args) and isinstance(args[n], (int, np.integer)) and not isinstance(args[n], bool):
            n += 1
        return tuple(int(a) for a in args[:n]), args[n:]
    if not args:
        raise TypeError(f"{op}: missing the shape (give it as {op}(2, 3) or {op}((2, 3)))")
    return args[0], args[1:]


def _constructor(fn, name):
    @functools.wraps(fn)
    def f(*args, size=None, **kw):
        if size is not None:
            if args:
                raise TypeError(f"{name}: got a shape both positionally and as size=")
            args = (size,)
        shape, rest = _varargs_shape(args, name)
        return fn(shape, *rest, **kw)
    f.__doc__ = fn.__doc__.rstrip(".") + "; the shape may be given as varargs: " + name + "(2, 3)."
    return f


zeros = _constructor(_ops.zeros, "zeros")
ones = _constructor(_ops.ones, "ones")
empty = _constructor(_ops.empty, "empty")


def _randn(shape, dtype=float32, device=None):
    return _random.normal(shape, 0.0, 1.0, dtype=dtype, device=device)


def _rand(shape, dtype=float32, device=None):
    return _random.uniform(shape, 0.0, 1.0, dtype=dtype, device=device)


_randn.__doc__ = "Return standard normal samples of the given shape (PyTorch's randn)."
_rand.__doc__ = "Return uniform samples in [0, 1) of the given shape (PyTorch's rand)."
randn = _constructor(_randn, "randn")
randn.__name__ = randn.__qualname__ = "randn"
rand = _constructor(_rand, "rand")
rand.__name__ = rand.__qualname__ = "rand"

# ----------------------------------------------------------------------------------------------------------
# In-place updates
# ----------------------------------------------------------------------------------------------------------


def _check_inplace(x, op):
    """Raise unless tensor ``x`` may be written in place by ``op``."""
    if _ad.current_interpreter() is not None:
        raise TracingError(f"{op}: in-place update of a tensor inside jitnet.jit cannot be compiled; use the "
                           f"functional y = x.at[idx].set(v) / .add(v) (or Parameter.assign for state)")
    if x.requires_grad or x._node is not None:
        raise RuntimeError(f"{op}: a tensor that requires grad (or was computed by a recorded op) cannot be "
                           f"updated in place, its value may be needed by backward; use the functional "
                           f"x.at[idx].set(v) / .add(v), or Parameter.assign for a parameter")
    d = x._data
    if isinstance(d, np.ndarray) and not d.flags.writeable:
        raise RuntimeError(f"{op}: the tensor of shape {x.shape} is a read-only view (a broadcast or a "
                           f"constant); clone() it before updating it in place")


def _host_index(index, x):
    """Return ``index`` with tensors replaced by their arrays (on x's device)."""
    def conv(v):
        if isinstance(v, Tensor):
            if _lowp.is_floating(v.dtype):
                raise TypeError(f"setitem: float index of dtype {v.dtype}; indices must be integers or bools")
            return v._data if isinstance(x._data, np.ndarray) else v.to(x.device)._data
        if isinstance(v, (float, np.floating)):
            raise TypeError(f"setitem: float index {v!r}; indices must be integers, slices or bools")
        return v
    return tuple(conv(v) for v in index) if isinstance(index, tuple) else conv(index)


def _value(v, x):
    if isinstance(v, Tensor):
        d = v._data
        if isinstance(x._data, np.ndarray) and not isinstance(d, np.ndarray):
            d = _cuda.to_host(d)
        return d
    return v


def _setitem(self, index, value):
    """Write ``value`` into ``self[index]`` in place (a tensor that needs no gradient only)."""
    _check_inplace(self, "setitem (x[idx] = v)")
    idx = _host_index(index, self)
    v = _value(value, self)
    d = self._data
    if not isinstance(d, np.ndarray):
        try:
            d[idx] = v if not isinstance(v, np.ndarray) else np.ascontiguousarray(v)
        except (TypeError, NotImplementedError, IndexError, ValueError) as e:
            raise type(e)(f"setitem: cannot write x[{index!r}] on a GPU tensor of shape {self.shape}: {e}") \
                from None
        return
    try:
        d[idx] = v
    except IndexError as e:
        raise IndexError(f"setitem: {e} (tensor shape {self.shape})") from None
    except ValueError as e:
        raise ValueError(f"setitem: cannot write a value of shape {np.shape(v)} into x[{index!r}] of a tensor "
                         f"of shape {self.shape} (dtype {self.dtype}): {e}") from None


def _inplace(name, ufunc, opname):
    def f(self, other, alpha=None):
        _check_inplace(self, name)
        v = _value(other, self)
        if alpha is not None:
            v = np.multiply(v, alpha) if isinstance(self._data, np.ndarray) else _ops.multiply(other, alpha)._data
        d = self._data
        if isinstance(d, np.ndarray):
            try:
                ufunc(d, v, out=d, casting="same_kind")
            except TypeError as e:       # numpy's UFuncTypeError (a float value into an integer tensor)
                raise TypeError(f"{name}: cannot write the result into a tensor of dtype {self.dtype}: {e}") \
                    from None
            except ValueError:
                raise ValueError(f"{name}: a value of shape {np.shape(v)} does not broadcast to the tensor's "
                                 f"shape {self.shape}") from None
            return self
        r = getattr(_ops, opname)(Tensor._wrap(d), Tensor._wrap(v) if not np.isscalar(v) else v)
        if r.shape != self.shape:
            raise ValueError(f"{name}: a value of shape {np.shape(v)} does not broadcast to the tensor's shape "
                             f"{self.shape}")
        _G.copy_into(d, r._data)
        return self
    f.__name__ = name
    f.__doc__ = f"Compute ``self {opname} other`` into this tensor in place (no gradient); return self."
    return f


def _fill_(self, value, _op="fill_"):
    """Set every element of this tensor to ``value`` in place (no gradient); return self."""
    _check_inplace(self, _op)
    d = self._data
    if isinstance(d, np.ndarray):
        d[...] = value.item() if isinstance(value, Tensor) else value
    else:
        _G.copy_into(d, np.asarray(value.item() if isinstance(value, Tensor) else value, dtype=d.dtype))
    return self


def _zero_(self):
    """Set every element of this tensor to zero in place (no gradient); return self."""
    return _fill_(self, 0, "zero_")


def _copy_(self, src):
    """Copy ``src`` (broadcast, cast same-kind) into this tensor in place (no gradient); return self."""
    _check_inplace(self, "copy_")
    v = _value(src, self)
    d = self._data
    if isinstance(d, np.ndarray):
        try:
            np.copyto(d, v, casting="same_kind")
        except TypeError as e:
            raise TypeError(f"copy_: cannot copy a value of dtype {np.asarray(v).dtype} into a tensor of dtype "
                            f"{self.dtype}: {e}") from None
        except ValueError:
            raise ValueError(f"copy_: a value of shape {np.shape(v)} does not broadcast to the tensor's shape "
                             f"{self.shape}") from None
        return self
    _G.copy_into(d, v if not np.isscalar(v) else np.asarray(v, dtype=d.dtype))
    return self


# ----------------------------------------------------------------------------------------------------------
# x.at[idx]: functional, differentiable updates
# ----------------------------------------------------------------------------------------------------------


def _template(x, index):
    """Return (template, index tensors, NumPy index) for ``x[index]`` in the form GETITEM takes."""
    if not isinstance(index, tuple):
        index = (index,)
    template, arrays, host = [], [], []
    for v in index:
        if isinstance(v, (Tensor, np.ndarray, list)):
            t = _ops._as_tensor(v)
            if _lowp.is_floating(t.dtype):
                raise TypeError(f"at[]: float index of dtype {t.dtype}; indices must be integers or bools")
            template.append(("__arr__", len(arrays)))
            arrays.append(t)
            host.append(t._data if isinstance(t._data, np.ndarray) else np.asarray(t.numpy()))
        elif isinstance(v, (float, np.floating)):
            raise TypeError(f"at[]: float index {v!r}; indices must be integers, slices or bools")
        elif isinstance(v, (bool, np.bool_)):
            template.append(bool(v))
            host.append(bool(v))
        elif isinstance(v, (int, np.integer)):
            template.append(int(v))
            host.append(int(v))
        elif v is None or v is Ellipsis or isinstance(v, slice):
            template.append(_ops._freeze(v))
            host.append(_ops._freeze(v))
        else:
            raise TypeError(f"at[]: unsupported index {v!r} of type {type(v).__name__}")
    return tuple(template), arrays, tuple(host)


class _AtRef:
    """``x.at[idx]``: methods that return x with the elements at ``idx`` replaced, added to or multiplied."""

    __slots__ = ("x", "index")

    def __init__(self, x, index):
        self.x, self.index = x, index

    def _positions(self, op):
        """Return (template, arrays, flat positions selected) checking the index against x's shape."""
        x = self.x
        template, arrays, host = _template(x, self.index)
        try:
            pos = np.broadcast_to(np.arange(x.size, dtype=np.int64).reshape(x.shape), x.shape)[host]
        except IndexError as e:
            raise IndexError(f"at[].{op}: {e} (tensor shape {x.shape})") from None
        return template, arrays, np.asarray(pos)

    def _scatter(self, v, template, arrays, shape):
        """Return a tensor of x's shape holding ``v`` (broadcast to the selection) at the index, zeros elsewhere."""
        x = self.x
        v = _ops._as_tensor(v) if isinstance(v, Tensor) else Tensor._wrap(np.asarray(v, dtype=x.dtype))
        if v.dtype != x.dtype:
            v = _ops.astype(v, x.dtype)
        if v.shape != shape:
            try:
                np.broadcast_shapes(v.shape, shape)
            except ValueError:
                raise ValueError(f"at[]: a value of shape {v.shape} does not broadcast to the selection's shape "
                                 f"{shape} (tensor shape {x.shape}, index {self.index!r})") from None
            v = _ops.broadcast_to(v, shape)
        return _ad.apply(_ops.GETITEM_GRAD, v, *arrays, template=template, shape=x.shape)

    def get(self):
        """Return ``x[idx]``."""
        return _ops.getitem(self.x, self.index)

    def add(self, v):
        """Return a copy of x with ``v`` added at the index (repeated positions accumulate); differentiable."""
        template, arrays, pos = self._positions("add")
        return _ops.add(self.x, self._scatter(v, template, arrays, pos.shape))

    def set(self, v):
        """Return a copy of x with the elements at the index set to ``v``; differentiable in x and v.

        A position the index selects more than once gets the mean of the values written there.
        """
        x = self.x
        template, arrays, pos = self._positions("set")
        s = self._scatter(v, template, arrays, pos.shape)
        count = self._scatter(np.ones((), x.dtype), template, arrays, pos.shape)
        if arrays and np.unique(pos).size != pos.size:
            return _ops.add(_ops.multiply(x, _ops.subtract(1, _ops.minimum(count, 1))),
                            _ops.divide(s, _ops.maximum(count, 1)))
        return _ops.add(_ops.multiply(x, _ops.subtract(1, count)), s)

    def multiply(self, v):
        """Return a copy of x with the elements at the index multiplied by ``v``; differentiable in x and v."""
        x = self.x
        template, arrays, pos = self._positions("multiply")
        if arrays and np.unique(pos).size != pos.size:
            raise ValueError(f"at[].multiply: the index selects some positions of the tensor of shape {x.shape} "
                             f"more than once; give distinct indices")
        v = v if isinstance(v, Tensor) else Tensor._wrap(np.asarray(v, dtype=x.dtype))
        return _ops.multiply(x, _ops.add(self._scatter(_ops.subtract(v, 1), template, arrays, pos.shape), 1))

    mul = multiply

    def __repr__(self):
        return f"<at[{self.index!r}] of a tensor of shape {self.x.shape}>"


class _At:
    """``x.at``: index it (``x.at[idx]``) to get the functional update methods."""

    __slots__ = ("x",)

    def __init__(self, x):
        self.x = x

    def __getitem__(self, index):
        return _AtRef(self.x, index)


def _at(self):
    """Functional updates: ``x.at[idx].set(v)``, ``.add(v)``, ``.multiply(v)`` return new tensors."""
    return _At(self)


# ----------------------------------------------------------------------------------------------------------
# PyTorch names jitnet spells otherwise
# ----------------------------------------------------------------------------------------------------------

# name -> the jitnet spelling (for jitnet.<name> and Tensor.<name>)
TORCH_NAMES = {
    "mm": "jn.matmul(a, b) or a @ b", "bmm": "jn.matmul(a, b) or a @ b", "einsum": "jn.matmul / jn.dot",
    "narrow": "slicing: x[:, start:start + length]", "masked_fill": "jn.where(mask, value, x)",
    "masked_fill_": "x[mask] = value", "gather": "jn.take_along_axis(x, indices, axis)",
    "index_select": "jn.take(x, indices, axis)", "scatter_add_": "x.at[idx].add(v) or jn.scatter_add",
    "index_add": "jn.scatter_add(x, indices, updates, axis)", "index_put_": "x[idx] = v",
    "repeat_interleave": "jn.take(x, indices, axis)", "chunk": "jn.split(x, sections, axis)",
    "unbind": "list(x) or jn.split", "hstack": "jn.concatenate(tensors, axis=-1)",
    "vstack": "jn.concatenate(tensors, axis=0)", "expand": "jn.broadcast_to(x, shape)",
    "contiguous": "jn.copy(x) (jitnet ops accept any layout)", "numel": "x.size",
    "dim": "x.ndim", "t": "x.T", "clamp": "jn.clip(x, a_min, a_max)", "clamp_": "x.copy_(jn.clip(x, lo, hi))",
    "detach_": "x.detach()", "masked_select": "x[mask]", "topk": "jn.top_k(x, k)",
    "from_numpy": "jn.as_tensor(array)", "no_grad_": "jn.no_grad()", "set_grad_enabled": "jn.enable_grad / "
    "jn.no_grad", "randint_like": "jn.random.randint", "randn_like": "jn.randn(*x.shape)",
    "rand_like": "jn.rand(*x.shape)", "argwhere": "jn.nonzero(x)", "bernoulli": "jn.random.bernoulli(p)",
    "multinomial": "jn.random.categorical(probs=p, num_samples=n)", "cross_entropy":
    "jn.nn.functional.cross_entropy(logits, labels)", "sigmoid_": "x.copy_(jn.sigmoid(x))",
    "relu_": "x.copy_(jn.relu(x))",
}


def unsupported(name, where="jitnet"):
    """Return the AttributeError for PyTorch name ``name`` (naming the jitnet spelling), or None if unknown."""
    hint = TORCH_NAMES.get(name)
    if hint is None:
        return None
    return AttributeError(f"{where} has no attribute {name!r} (a PyTorch name); in jitnet use {hint}")


def _tensor_getattr(self, name):
    err = unsupported(name, "Tensor")
    if err is not None:
        raise err
    return object.__getattribute__(self, name)      # (raises the attribute's own error, e.g. a property's)


def _bind():
    """Add the PyTorch spellings to Tensor (jitnet's own class; nothing outside jitnet changes)."""
    for n, f in _WRAPPED.items():
        if n in ("concatenate", "stack"):
            continue
        setattr(Tensor, n, f)
    Tensor.permute = permute
    Tensor.clone = clone
    Tensor.__setitem__ = _setitem
    Tensor.add_ = _inplace("add_", np.add, "add")
    Tensor.sub_ = _inplace("sub_", np.subtract, "subtract")
    Tensor.mul_ = _inplace("mul_", np.multiply, "multiply")
    Tensor.div_ = _inplace("div_", np.divide, "divide")
    Tensor.fill_ = _fill_
    Tensor.zero_ = _zero_
    Tensor.copy_ = _copy_
    Tensor.at = property(_at)
    Tensor.__getattr__ = _tensor_getattr


_bind()
