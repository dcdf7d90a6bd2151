"""Gradient checking by central differences (float64)."""
from __future__ import annotations

import numpy as np

from . import lowp as _lowp
from .autodiff.backprop import grad as _grad
from .ops import sum as _sum
from .tensor import Tensor, float64

__all__ = ["numerical_grad", "gradcheck"]


def _as64(x):
    return Tensor(np.array(x.numpy() if isinstance(x, Tensor) else x, dtype=np.float64))


def numerical_grad(f, inputs, argnum, eps=1e-6):
    """Return d sum(f(*inputs)) / d inputs[argnum] by central differences (float64)."""
    xs = [_as64(x) if isinstance(x, (Tensor, np.ndarray)) else x for x in inputs]
    base = xs[argnum].numpy().copy()
    g = np.zeros_like(base)
    flat = base.reshape(-1)
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        for sgn in (1, -1):
            flat[i] = old + sgn * eps
            xs[argnum] = Tensor(base.copy())
            val = float(np.sum(np.asarray(f(*xs), dtype=np.float64)))
            gflat[i] += sgn * val
        flat[i] = old
    return g / (2 * eps)


def gradcheck(f, *inputs, argnums=None, eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=True):
    """Return True if the autodiff gradient of sum(f(*inputs)) matches central differences in float64."""
    xs = [_as64(x) if isinstance(x, (Tensor, np.ndarray)) and _lowp.is_floating(np.asarray(x).dtype) else x
          for x in inputs]
    if argnums is None:
        argnums = tuple(i for i, x in enumerate(xs) if isinstance(x, Tensor) and x.dtype == float64)
    for a in argnums:
        def scalar(*args):
            return _sum(f(*args))
        analytic = _grad(scalar, argnums=a)(*xs).numpy()
        numeric = numerical_grad(f, xs, a, eps)
        if not np.allclose(analytic, numeric, atol=atol, rtol=rtol):
            if raise_exception:
                err = np.max(np.abs(analytic - numeric))
                raise AssertionError(f"gradcheck failed for argument {a}: max abs error {err:.3g}\n"
                                     f"analytic:\n{analytic}\nnumeric:\n{numeric}")
            return False
    return True
