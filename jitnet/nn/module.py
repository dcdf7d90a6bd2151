"""Module: a tree of layers holding Parameters (trainable) and buffers (non-trainable Variables).

Sub-modules, parameters and buffers are registered by attribute assignment. Names are hierarchical with "/"
separators built from attribute names (``encoder/layer_1/W``). Calling a module calls ``forward``; calling the
same instance twice re-uses (shares) its variables.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import cuda as _cuda
from ..autodiff.core import no_grad
from ..io.checkpoint import check_state
from ..lowp import is_floating
from ..tensor import (Device, Parameter, Tensor, _normalize_dtype, bfloat16, float16, float32, float64)

__all__ = ["Module", "Sequential", "ModuleList"]


def _is_dtype_arg(a) -> bool:
    """True when ``a`` names a dtype (jn.float16, np.float32, "float16", float) rather than a device."""
    if isinstance(a, Device):
        return False
    if isinstance(a, str) and (a.startswith("cuda") or a == "cpu"):
        return False
    try:
        _normalize_dtype(a)
    except (TypeError, ImportError, ValueError):
        return False
    return True


class Module:
    """Base class of layers and models: sub-modules, parameters, buffers, train/eval mode and state dicts."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration ------------------------------------------------------------------------------------------
    def _check_init(self):
        if "_modules" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")

    def __setattr__(self, name, value):
        if isinstance(value, (Parameter, Module)) or name in self.__dict__.get("_parameters", ()) \
                or name in self.__dict__.get("_buffers", ()) or name in self.__dict__.get("_modules", ()):
            self._check_init()
            for d in (self._parameters, self._buffers, self._modules):
                d.pop(name, None)
            if isinstance(value, Parameter):
                if value.name is None:
                    value.name = name
                (self._parameters if value.trainable else self._buffers)[name] = value
                return
            if isinstance(value, Module):
                self._modules[name] = value
                return
            if value is not None:
                object.__setattr__(self, name, value)
                return
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        for k in ("_parameters", "_buffers", "_modules"):
            if k in d and name in d[k]:
                return d[k][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for k in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__.get(k, ()):
                del self.__dict__[k][name]
                return
        object.__delattr__(self, name)

    def add_module(self, name, module):
        """Register ``module`` under ``name`` and return it."""
        if not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} is a {type(module).__name__}, not a Module")
        setattr(self, name, module)
        return module

    def add_parameter(self, name, value, trainable=True):
        """Register a new Parameter (trainable) or buffer Variable built from ``value``; return it."""
        p = value if isinstance(value, Parameter) else Parameter(value, trainable=trainable, name=name)
        setattr(self, name, p)
        return p

    def add_buffer(self, name, value):
        """Register a non-trainable Variable (saved in the state dict, not optimized); return it."""
        return self.add_parameter(name, value, trainable=False)

    def register_buffer(self, name, tensor, persistent=True):
        """Register ``tensor`` as a buffer (a non-trainable Variable: in the state dict, moved by ``.to``, not
        a parameter) under ``name``, PyTorch's spelling of ``add_buffer``; return it."""
        if not persistent:
            raise ValueError(f"register_buffer({name!r}): persistent=False is not supported (every buffer is "
                             "saved in the state dict)")
        if tensor is None:
            raise ValueError(f"register_buffer({name!r}): the buffer is None; give it an array or tensor")
        if "/" in name or "." in name or not name:
            raise KeyError(f"register_buffer: invalid buffer name {name!r} (no '/' or '.', not empty)")
        if name in self.__dict__.get("_parameters", ()):
            raise KeyError(f"register_buffer: {name!r} is already a parameter of {type(self).__name__}")
        self._check_init()
        if isinstance(tensor, Tensor) and not isinstance(tensor, Parameter):
            tensor = tensor.numpy()
        if isinstance(tensor, Parameter) and tensor.trainable:
            raise ValueError(f"register_buffer({name!r}): got a trainable Parameter; use register_parameter")
        return self.add_buffer(name, tensor)

    def register_parameter(self, name, param):
        """Register ``param`` (a trainable Parameter, or an array made into one) under ``name``; return it."""
        if "/" in name or "." in name or not name:
            raise KeyError(f"register_parameter: invalid parameter name {name!r} (no '/' or '.', not empty)")
        return self.add_parameter(name, param, trainable=True)

    def apply(self, fn):
        """Call ``fn(module)`` on every sub-module (children first) and then on this module; return self."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # -- traversal ---------------------------------------------------------------------------------------------
    def children(self):
        """Return an iterator over the direct sub-modules."""
        return iter(self._modules.values())

    def named_children(self):
        """Return an iterator over (name, sub-module) pairs."""
        return iter(self._modules.items())

    def named_modules(self, prefix=""):
        """Return an iterator over (hierarchical name, module) for this module and all below (each once)."""
        seen = set()

        def visit(m, pre):
            if id(m) in seen:
                return
            seen.add(id(m))
            yield pre, m
            for n, c in m._modules.items():
                yield from visit(c, f"{pre}/{n}" if pre else n)
        return visit(self, prefix)

    def modules(self):
        """Return an iterator over this module and all its sub-modules."""
        return (m for _, m in self.named_modules())

    def _named_vars(self, kinds):
        seen = set()
        for pre, m in self.named_modules():
            for k in kinds:
                for n, v in getattr(m, k).items():
                    if id(v) in seen:
                        continue
                    seen.add(id(v))
                    yield (f"{pre}/{n}" if pre else n), v

    def named_parameters(self):
        """Return an iterator over (name, Parameter) of trainable variables, shared ones once."""
        return self._named_vars(("_parameters",))

    def parameters(self):
        """Return the list of trainable Parameters (shared ones once)."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        """Return an iterator over (name, Variable) of non-trainable variables (e.g. moving averages)."""
        return self._named_vars(("_buffers",))

    def buffers(self):
        """Return the list of non-trainable Variables."""
        return [b for _, b in self.named_buffers()]

    def named_variables(self):
        """Return an iterator over (name, Variable) of parameters and buffers in registration order."""
        return self._named_vars(("_parameters", "_buffers"))

    def num_parameters(self):
        """Return the total number of trainable scalars."""
        return int(sum(p.size for p in self.parameters()))

    # -- modes -------------------------------------------------------------------------------------------------
    def train(self, mode=True):
        """Put this module and all sub-modules in training mode (or eval when mode is False); return self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        """Put this module and all sub-modules in evaluation mode; return self."""
        return self.train(False)

    def zero_grad(self):
        """Set ``.grad`` of every parameter to None."""
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, flag=True):
        """Set requires_grad on every parameter; return self."""
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def to(self, *args, device=None, dtype=None):
        """Move and/or cast the module's variables in place: ``to("cuda")``, ``to(jn.float16)``,
        ``to("cuda", jn.bfloat16)``, ``to(device=..., dtype=...)``; return self.

        The variables stay the same objects (optimizers built before a move keep working; their slots follow
        the parameters on the next step). A dtype casts the floating variables only (integer buffers such as
        counters keep theirs) and drops their ``.grad``; build the optimizer after casting, since its slots
        take the parameters' dtype when created. Raises when ``device`` is not available or an argument is
        neither a device nor a dtype.
        """
        for a in args:
            if _is_dtype_arg(a):
                dtype = a
            else:
                device = a
        if device is not None:
            d = Device(device)
            if d.type == "cuda":
                _cuda.require(f"{type(self).__name__}.to({str(d)!r})", d.index)
            for _, v in self.named_variables():
                v._move_(d)
        if dtype is not None:
            dt = _normalize_dtype(dtype)
            if not is_floating(dt):
                raise TypeError(f"{type(self).__name__}.to: can only cast to a floating dtype, got {dt}")
            for _, v in self.named_variables():
                if is_floating(v.dtype) and v.dtype != dt:
                    with no_grad():
                        v._data = Tensor(v._data).astype(dt)._data
                    v.grad = None
        return self

    def half(self):
        """Cast the floating variables to float16 in place; return self."""
        return self.to(dtype=float16)

    def bfloat16(self):
        """Cast the floating variables to bfloat16 in place (needs ml_dtypes); return self."""
        return self.to(dtype=bfloat16)

    def float(self):
        """Cast the floating variables to float32 in place; return self."""
        return self.to(dtype=float32)

    def double(self):
        """Cast the floating variables to float64 in place; return self."""
        return self.to(dtype=float64)

    def cpu(self):
        """Move the module's variables to the CPU in place; return self."""
        return self.to("cpu")

    def cuda(self):
        """Move the module's variables to the GPU (cuda:0) in place; return self."""
        return self.to("cuda")

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self):
        """Return a flat dict name -> Tensor of parameters and buffers (shared variables once)."""
        return OrderedDict((n, v) for n, v in self.named_variables())

    def load_state_dict(self, state, strict=True):
        """Copy ``state`` (name -> array-like) into the variables; return (missing, unexpected) names.

        Raises KeyError naming missing / unexpected entries (when strict) and ValueError naming entries whose
        shapes differ, with both shapes.
        """
        own = self.state_dict()
        got = {k: (v.numpy() if isinstance(v, Tensor) else np.asarray(v)) for k, v in state.items()}
        missing, unexpected = check_state({k: v.shape for k, v in own.items()}, got,
                                          where=f"{type(self).__name__}.load_state_dict", strict=strict)
        for k, v in own.items():
            if k in got:
                v.assign(got[k].astype(v.dtype, copy=False))
        return missing, unexpected

    # -- calling -----------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Return the module's output (subclasses override this)."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        """Return the one-line description shown by repr (subclasses override this)."""
        return ""

    def __repr__(self):
        lines = []
        for n, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"({n}): {sub}")
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


class Sequential(Module):
    """A chain of modules applied in order; sub-modules are named "0", "1", ... (or by the given names)."""

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (dict, OrderedDict)):
            for n, m in layers[0].items():
                self.add_module(str(n), m)
        else:
            for i, m in enumerate(layers):
                self.add_module(str(i), m)

    def append(self, module):
        """Add ``module`` at the end; return self."""
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        mods = list(self._modules.values())
        if isinstance(i, slice):
            return Sequential(*mods[i])
        return mods[i]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        """Return the output of the last layer after feeding x through every layer in order."""
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(Module):
    """A list of sub-modules named "0", "1", ... (registered so that their parameters are found)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        """Add ``module`` at the end; return self."""
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())
