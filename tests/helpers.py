"""Shared hypothesis strategies and helpers for the core's tests (ops, autodiff, errors): a plain module, not a
conftest (tests/cuda has its own conftest, and two modules named ``conftest`` collide on import).

Operands are drawn as a *base* array plus a *layout* that turns it into the operand with jitnet view ops, so
the same construction exercises contiguous, transposed, step-sliced (positive and negative steps) and
broadcast (zero-stride) inputs both forward and inside gradient checks (``gradcheck`` copies its inputs to
contiguous float64, so the view has to be taken inside the checked function).
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jitnet as jn

#: few examples: a first run compiles kernels, and gradchecks evaluate the function 2 * size times
_HC = [HealthCheck.too_slow, HealthCheck.data_too_large]
FEW = settings(deadline=None, max_examples=12, suppress_health_check=_HC)
SOME = settings(deadline=None, max_examples=20, suppress_health_check=_HC)

LAYOUTS = ("c", "t", "s", "r", "b")
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2 ** 32 - 1)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
nonscalar_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
pair_shapes = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=4)


def sample(rng, shape, domain="any"):
    """Return float64 values of ``shape`` drawn from ``domain`` (chosen away from kinks and poles)."""
    if domain == "any":
        return rng.uniform(-2, 2, shape)
    if domain == "pos":                    # log, sqrt, reciprocal, power bases
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nz":                     # abs, sign, relu, division: |x| >= 0.3
        return rng.uniform(0.3, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    if domain == "gt-1":                   # log1p
        return rng.uniform(-0.5, 2.0, shape)
    if domain == "distinct":               # max/min/sort: values at least 0.05 apart, no ties
        n = int(np.prod(shape)) if shape else 1
        return (rng.permutation(n) * 0.1 - n * 0.05 + rng.uniform(0, 0.05, n)).reshape(shape)
    raise ValueError(domain)


def base_shape(shape, layout):
    """Return the shape of the base array that ``layout`` turns into an operand of ``shape``."""
    shape = tuple(shape)
    if layout == "t":
        return shape[::-1]
    if layout in ("s", "r"):
        return tuple(2 * s for s in shape)
    if layout == "b":
        return tuple(1 if i % 2 == 0 else s for i, s in enumerate(shape))
    return shape


def make_view(t, shape, layout):
    """Return the operand of ``shape`` built from base tensor ``t`` with jitnet view ops."""
    shape = tuple(shape)
    if layout == "t":
        return jn.transpose(t)
    if layout == "s":
        return t[tuple(slice(None, None, 2) for _ in shape)] if shape else t
    if layout == "r":
        return t[tuple(slice(None, None, -2) for _ in shape)] if shape else t
    if layout == "b":
        return jn.broadcast_to(t, shape)
    return t


class Operand:
    """A base array and the layout that makes it an operand of a given shape."""

    def __init__(self, shape, layout, seed, domain="any"):
        self.shape, self.layout = tuple(shape), layout
        self.base = sample(np.random.default_rng(seed), base_shape(shape, layout), domain)

    def tensor(self, dtype=jn.float32):
        """Return the operand as a (possibly non-contiguous) jitnet tensor of ``dtype``."""
        v = make_view(jn.tensor(self.base, dtype=dtype), self.shape, self.layout)
        assert v.shape == self.shape
        return v

    def array(self, dtype=np.float32):
        """Return the operand's values as a NumPy array (the reference input)."""
        return np.asarray(self.base, dtype=dtype)[_np_index(self.shape, self.layout)] \
            if self.layout in ("s", "r") else self._np(dtype)

    def _np(self, dtype):
        b = np.asarray(self.base, dtype=dtype)
        if self.layout == "t":
            return b.T
        if self.layout == "b":
            return np.broadcast_to(b, self.shape)
        return b

    def view(self, t):
        """Apply this operand's layout to base tensor ``t`` (use inside gradchecked functions)."""
        return make_view(t, self.shape, self.layout)


def _np_index(shape, layout):
    step = 2 if layout == "s" else -2
    return tuple(slice(None, None, step) for _ in shape)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, dtype=None):
    """Assert a jitnet tensor equals a NumPy reference (shape, optionally dtype, values)."""
    a = actual.numpy() if isinstance(actual, jn.Tensor) else np.asarray(actual)
    e = np.asarray(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    if dtype is not None:
        assert a.dtype == np.dtype(dtype), f"dtype {a.dtype} != expected {np.dtype(dtype)}"
    if e.dtype.kind in "biu" and a.dtype.kind in "biu":
        np.testing.assert_array_equal(a, e)
    else:
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol,
                                   equal_nan=True)


def gradcheck(f, *bases, **kw):
    """Run ``jitnet.testing.gradcheck`` on float64 copies of ``bases`` (NumPy arrays)."""
    return jn.testing.gradcheck(f, *[jn.tensor(np.asarray(b, dtype=np.float64), dtype=jn.float64)
                                     for b in bases], **kw)
