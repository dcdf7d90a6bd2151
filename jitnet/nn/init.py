"""Initializers: functions of a shape that return new tensors, drawn from ``jitnet.random`` (seedable).

Fans: for a 2-D weight (in, out) fan_in = in, fan_out = out; for a convolution weight (out, in, *kernel)
fan_in = in * prod(kernel) and fan_out = out * prod(kernel); for 1-D shapes both are the length.
"""
from __future__ import annotations

import math

import numpy as np

from .. import random as _random
from ..tensor import Tensor, _normalize_dtype, float32

__all__ = ["zeros", "ones", "constant", "uniform", "normal", "truncated_normal", "he_normal", "he_uniform",
           "xavier_uniform", "xavier_normal", "orthogonal", "compute_fans"]


def _shape(shape):
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def compute_fans(shape):
    """Return (fan_in, fan_out) of a weight shape (see the module docstring for the convention)."""
    shape = _shape(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    rf = int(np.prod(shape[2:]))
    return shape[1] * rf, shape[0] * rf


def zeros(shape, dtype=float32):
    """Return a tensor of zeros."""
    return Tensor._wrap(np.zeros(_shape(shape), _normalize_dtype(dtype)))


def ones(shape, dtype=float32):
    """Return a tensor of ones."""
    return Tensor._wrap(np.ones(_shape(shape), _normalize_dtype(dtype)))


def constant(shape, value, dtype=float32):
    """Return a tensor filled with ``value``."""
    return Tensor._wrap(np.full(_shape(shape), value, _normalize_dtype(dtype)))


def uniform(shape, low=-0.05, high=0.05, dtype=float32):
    """Return samples from U[low, high)."""
    return _random.uniform(_shape(shape), low, high, dtype=dtype)


def normal(shape, mean=0.0, std=0.05, dtype=float32):
    """Return samples from N(mean, std**2)."""
    return _random.normal(_shape(shape), mean, std, dtype=dtype)


def truncated_normal(shape, mean=0.0, std=0.05, dtype=float32):
    """Return N(mean, std**2) samples redrawn until within two standard deviations."""
    return _random.truncated_normal(_shape(shape), mean, std, dtype=dtype)


def he_normal(shape, gain=2.0, dtype=float32):
    """Return N(0, gain / fan_in) samples (He et al. 2015; gain 2 suits ReLU)."""
    fan_in, _ = compute_fans(shape)
    return _random.normal(_shape(shape), 0.0, math.sqrt(gain / max(fan_in, 1)), dtype=dtype)


def he_uniform(shape, gain=2.0, dtype=float32):
    """Return U(-a, a) samples with a = sqrt(3 * gain / fan_in)."""
    fan_in, _ = compute_fans(shape)
    a = math.sqrt(3.0 * gain / max(fan_in, 1))
    return _random.uniform(_shape(shape), -a, a, dtype=dtype)


def xavier_uniform(shape, gain=1.0, dtype=float32):
    """Return U(-a, a) samples with a = gain * sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    fan_in, fan_out = compute_fans(shape)
    a = gain * math.sqrt(6.0 / max(fan_in + fan_out, 1))
    return _random.uniform(_shape(shape), -a, a, dtype=dtype)


def xavier_normal(shape, gain=1.0, dtype=float32):
    """Return N(0, gain**2 * 2 / (fan_in + fan_out)) samples."""
    fan_in, fan_out = compute_fans(shape)
    return _random.normal(_shape(shape), 0.0, gain * math.sqrt(2.0 / max(fan_in + fan_out, 1)), dtype=dtype)


def orthogonal(shape, gain=1.0, dtype=float32):
    """Return a (semi-)orthogonal matrix of ``shape`` (flattened after the first axis for more dims)."""
    shape = _shape(shape)
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    a = _random.normal((max(rows, cols), min(rows, cols)), dtype=np.float64).numpy()
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return Tensor._wrap((gain * q[:rows, :cols]).reshape(shape).astype(_normalize_dtype(dtype)))
