"""Automatic mixed precision: ``jn.autocast``, a context manager (and decorator) like ``torch.autocast``.

Inside ``with jn.autocast(jn.float16):`` (or ``jn.bfloat16``) each primitive's inputs are cast by one policy,
applied in ``autodiff.core.apply`` before the low-precision rule of :mod:`jitnet.lowp`:

* **GEMM-like rows** (:data:`LOWER`: matmul, conv2d and conv2d's two gradient rows) cast their float32 inputs
  (and inputs of the other 16-bit type) to the autocast dtype, so they return it. ``nn.Linear`` and
  ``nn.functional.linear`` cast their bias too, so a linear layer returns the low dtype (conv2d's bias is cast
  with its other inputs). float64 inputs are left alone (as in PyTorch).
* **Numerically sensitive rows** (:data:`FLOAT32`: softmax, log_softmax, logsumexp, the cross-entropy rows,
  exp, log, log1p, power, reciprocal, softplus, cumulative sums and products, batch-norm statistics, and the
  ``sum``/``prod`` reductions, which ``mean``, ``var``, the norms and the losses are made of) cast
  float16/bfloat16 inputs up to float32, so they compute and return float32. Batch norm's normalizing map
  (``nn.functional.channel_affine``) does too, so a BatchNorm layer returns float32 on every device.
* Every other row sees its inputs as they are and follows the low-precision rule (float16 with float16 gives
  float16; float16 with float32 gives float32).

The casts are ordinary ``cast`` nodes: the tape records them, so gradients flow back to float32 parameters
(a cast's VJP casts the gradient back to its input's dtype), and a step traced by ``jn.jit`` inside autocast
records them in its graph. **Autocast is part of the jit cache key**: a jitted function called inside
``autocast(float16)``, inside ``autocast(bfloat16)`` and outside autocast is traced once for each and never
reuses another's plan. A function that enters autocast itself (``@jn.jit`` over ``@jn.autocast()``) always
records the casts.

**Where it computes.** On a GPU, float16 GEMMs read their float16 operands as stored and accumulate in float32
inside the tiled matmul kernel (conv2d is im2col plus that kernel), rounding the product to float16 once. On the
CPU the policy is the same but the storage rule applies: Numba's CPU target has no float16/bfloat16 arithmetic,
so a float16 matmul widens its operands to float32, runs the float32 GEMM and rounds the result (the values
are those of float16 storage, the speed is not faster than float32). ``autocast(bfloat16)`` is for CPU
tensors: jitnet's CUDA kernels have no bfloat16 path, so a GEMM on GPU tensors under it raises a TypeError
naming ``autocast(jn.float16)``.

The state is process-wide (like ``no_grad``), not per thread. ``autocast(enabled=False)`` turns it off inside
an autocast block. Loss scaling for float16 training is :class:`jitnet.optim.GradScaler`.
"""
from __future__ import annotations

import functools

import numpy as np

from . import lowp
from .autodiff import core as _ad

__all__ = ["autocast", "is_autocast_enabled", "get_autocast_dtype", "LOWER", "FLOAT32"]

_F32 = np.dtype(np.float32)

#: GEMM-like primitives: float32 (and other 16-bit) inputs are cast to the autocast dtype
LOWER = frozenset({"matmul", "conv2d", "conv2d_grad_input", "conv2d_grad_weight"})
#: numerically sensitive primitives: float16/bfloat16 inputs are cast up to float32
FLOAT32 = frozenset({"softmax", "log_softmax", "logsumexp", "cross_entropy_int", "cross_entropy_int_grad",
                     "cross_entropy_int_reduced", "cross_entropy_int_reduced_grad",
                     "cross_entropy_prob", "cross_entropy_prob_grad", "exp", "log", "log1p", "power",
                     "reciprocal", "softplus", "cumulative", "bn_moments"})
#: the ``reduce`` row's operations that run in float32 (max and min round nothing: they keep the dtype)
FLOAT32_REDUCE = frozenset({"sum", "prod"})


def _dtype_of(t):
    return getattr(t._data, "dtype", None)


def _is_lowp(dt):
    return dt is not None and lowp.is_lowp(dt)


class Policy:
    """The cast policy of one autocast dtype; ``autodiff.core.apply`` calls it with each primitive's inputs."""

    __slots__ = ("dtype", "name")

    def __init__(self, dtype):
        self.dtype = dtype
        self.name = str(dtype.name)

    def _lowers(self, dt):
        return dt is not None and dt != self.dtype and (dt == _F32 or lowp.is_lowp(dt))

    def _cast(self, t, dt):
        return _ad.apply(_ad.REGISTRY["cast"], t, dtype=dt)

    def lower(self, t):
        """Return tensor ``t`` cast to the autocast dtype when a GEMM-like row would cast it, else ``t``."""
        return self._cast(t, self.dtype) if self._lowers(_dtype_of(t)) else t

    def __call__(self, prim, inputs, params):
        name = prim.name
        if name in LOWER:
            if lowp.is_bf16(self.dtype):
                for t in inputs:
                    if not isinstance(t._data, (np.ndarray, tuple)):
                        raise TypeError(f"{name} under jn.autocast(jn.bfloat16): jitnet's CUDA kernels have no "
                                        "bfloat16 path; use jn.autocast(jn.float16) for GPU tensors")
            for t in inputs:
                if self._lowers(_dtype_of(t)):
                    return tuple(self.lower(u) for u in inputs)
            return inputs
        if name in FLOAT32 or (name == "reduce" and params.get("op") in FLOAT32_REDUCE):
            for t in inputs:
                if _is_lowp(_dtype_of(t)):
                    return tuple(self._cast(u, _F32) if _is_lowp(_dtype_of(u)) else u for u in inputs)
        return inputs


_POLICIES = {}


def _policy(dt):
    p = _POLICIES.get(dt)
    if p is None:
        p = _POLICIES[dt] = Policy(dt)
    return p


def _resolve(dtype):
    if isinstance(dtype, str) and dtype in ("cpu", "cuda"):
        raise TypeError(f"jn.autocast takes a dtype, not a device ({dtype!r}): write jn.autocast(jn.float16) or "
                        "jn.autocast(jn.bfloat16); the policy applies to tensors on every device")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"jn.autocast: dtype must be jn.float16 or jn.bfloat16, got {dtype!r}") from None
    if not lowp.is_lowp(dt):
        raise TypeError(f"jn.autocast: dtype must be jn.float16 or jn.bfloat16, got {dt}")
    return dt


class autocast:
    """Run GEMM-like ops in ``dtype`` (float16 or bfloat16) and sensitive ops in float32 inside the block.

    Use it as a context manager (``with jn.autocast(jn.float16): loss = loss_fn(model(x), y)``) or as a
    decorator (``@jn.autocast()``). ``enabled=False`` turns autocast off inside the block (nesting restores the
    outer setting on exit). See :mod:`jitnet.autocast` for the policy, jit caching and devices.
    """

    def __init__(self, dtype=lowp.float16, enabled=True):
        self.dtype = _resolve(dtype)
        self.enabled = bool(enabled)
        self._prev = []

    def __enter__(self):
        lowp.enable()                          # the policy runs inside the low-precision hook of apply
        self._prev.append(_ad._AUTOCAST)
        _ad._AUTOCAST = _policy(self.dtype) if self.enabled else None
        return self

    def __exit__(self, *exc):
        _ad._AUTOCAST = self._prev.pop()
        return False

    def __call__(self, fn):
        dtype, enabled = self.dtype, self.enabled

        @functools.wraps(fn)
        def autocast_wrapper(*args, **kwargs):
            with autocast(dtype, enabled):
                return fn(*args, **kwargs)
        return autocast_wrapper

    def __repr__(self):
        return f"jitnet.autocast({self.dtype.name}, enabled={self.enabled})"


def is_autocast_enabled() -> bool:
    """Return True inside an enabled ``jn.autocast`` block."""
    return _ad._AUTOCAST is not None


def get_autocast_dtype():
    """Return the dtype of the enclosing enabled ``jn.autocast`` block, or None outside one."""
    p = _ad._AUTOCAST
    return None if p is None else p.dtype
