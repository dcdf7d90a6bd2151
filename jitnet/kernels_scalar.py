"""Scalar helpers that the elementwise templates call (inlined into the generated kernels).

Generated kernels import only this module, and its hash salts their cache keys: editing the array kernels
in ``kernels_cpu.py`` does not invalidate any generated kernel, editing a helper here invalidates them all.
"""
import math

import numpy as np
from numba import njit

# --------------------------------------------------------------------------------------------------------------
# Scalar helpers used by the elementwise templates (inlined into the generated kernels)
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def sigmoid_s(x, one):
    """Return the logistic sigmoid of x, stable for large |x|."""
    if x >= 0:
        z = math.exp(-x)
        return one / (one + z)
    z = math.exp(x)
    return z / (one + z)


@njit(cache=True, inline="always")
def softplus_s(x, zero):
    """Return log(1 + exp(x)), stable for large |x|."""
    m = x if x > zero else zero
    return m + math.log1p(math.exp(-abs(x)))


@njit(cache=True, inline="always")
def sign_s(x, zero):
    """Return -1, 0 or 1 with the sign of x (NaN stays NaN)."""
    if x > zero:
        return zero + 1
    if x < zero:
        return zero - 1
    return x * zero


@njit(cache=True, inline="always")
def maximum_s(a, b):
    """Return the larger of a and b, NaN if either is NaN (NumPy's maximum)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@njit(cache=True, inline="always")
def minimum_s(a, b):
    """Return the smaller of a and b, NaN if either is NaN (NumPy's minimum)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a <= b else b


@njit(cache=True, inline="always")
def floordiv_s(a, b):
    """Return floor(a / b) (NumPy's floor_divide for floats)."""
    return math.floor(a / b)


@njit(cache=True, inline="always")
def ifloordiv_s(a, b):
    """Return a // b for integers, 0 where b == 0 (NumPy's convention)."""
    if b == 0:
        return a * 0
    return a // b


@njit(cache=True, inline="always")
def imod_s(a, b):
    """Return a mod b for integers with the sign of b, 0 where b == 0 (NumPy's convention)."""
    if b == 0:
        return a * 0
    return a % b


@njit(cache=True, inline="always")
def fmod_s(a, b):
    """Return a mod b for floats with the sign of b (NumPy's remainder)."""
    r = np.fmod(a, b)
    if r != 0 and ((r < 0) != (b < 0)):
        r += b
    return r


