"""Shared hypothesis strategies and helpers for the core's tests (ops, autodiff, errors): a plain module, not a
conftest (tests/cuda has its own conftest, and two modules named ``conftest`` collide on import).

The op suite runs on every device: its tests take a ``device`` fixture ("cpu" from tests/conftest.py, "cuda" from
tests/cuda/conftest.py), create their operands with ``.to(device)`` and read results with ``.numpy()``.
``given_on`` draws fewer hypothesis examples, and ``PerDevice`` strategies smaller shapes, on cuda (the CUDA
simulator runs every GPU thread as a Python thread). ``gradcheck`` compares the gradient with central differences
on the device itself: the whole Jacobian on the CPU, random directions on cuda (2 evaluations each instead of
2 per element).

Operands are drawn as a *base* array plus a *layout* that turns it into the operand with jitnet view ops, so
the same construction exercises contiguous, transposed, step-sliced (positive and negative steps) and
broadcast (zero-stride) inputs both forward and inside gradient checks (``gradcheck`` copies its inputs to
contiguous float64, so the view has to be taken inside the checked function).
"""
from __future__ import annotations

import functools
import re

import numpy as np
from hypothesis import HealthCheck, given, settings
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

DEVICES = ("cpu", "cuda")
#: hypothesis examples per device for ``given_on``
EXAMPLES = {"few": {"cpu": 12, "cuda": 2}, "some": {"cpu": 20, "cuda": 3}}


def devtype(device):
    """Return the device's type, "cpu" or "cuda" (of "cuda:0", a jn.Device, ...)."""
    return str(device).split(":")[0]


class PerDevice(dict):
    """A value (a strategy, a shape) per device type: ``PerDevice(cpu=..., cuda=...)``."""

    def __init__(self, cpu, cuda):
        super().__init__(cpu=cpu, cuda=cuda)

    def on(self, device):
        return self[devtype(device)]


#: operand shapes: 0-d to 3-d with sides up to 4 on the CPU, up to 3 on cuda (the simulator is slow)
dev_shapes = PerDevice(shapes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3))
dev_nonscalar_shapes = PerDevice(nonscalar_shapes, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3))
dev_pair_shapes = PerDevice(pair_shapes, hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3,
                                                                           min_side=1, max_side=3))


def given_on(examples, **strategies):
    """``@given(**strategies)`` for a test taking a ``device`` argument: ``examples`` ("few" or "some") names the
    number of examples per device (``EXAMPLES``); a ``PerDevice`` strategy is drawn from its device's entry."""
    def deco(test):
        variants = {}
        for dev in DEVICES:
            strats = {k: v.on(dev) if isinstance(v, PerDevice) else v for k, v in strategies.items()}
            variants[dev] = settings(deadline=None, max_examples=EXAMPLES[examples][dev],
                                     suppress_health_check=_HC)(given(**strats)(test))

        @functools.wraps(variants["cpu"])
        def run(*args, **kwargs):
            return variants[devtype(kwargs["device"])](*args, **kwargs)
        return run
    return deco


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

    def tensor(self, dtype=jn.float32, device="cpu"):
        """Return the operand as a (possibly non-contiguous) jitnet tensor of ``dtype`` on ``device`` (the view is
        taken on the device)."""
        v = make_view(jn.tensor(self.base, dtype=dtype).to(device), self.shape, self.layout)
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


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, dtype=None, device=None):
    """Assert a jitnet tensor equals a NumPy reference (shape, optionally dtype and device, values)."""
    if device is not None:
        assert isinstance(actual, jn.Tensor), f"expected a tensor on {device}, got {type(actual).__name__}"
        assert actual.device.type == devtype(device), f"result on {actual.device}, expected {device}"
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


def to_device(data, device, dtype=None):
    """Return ``data`` as a tensor created on the CPU and moved to ``device`` with ``.to``."""
    return jn.tensor(data, dtype=dtype).to(device)


def gradcheck(f, *bases, device="cpu", **kw):
    """Check the gradient of ``f`` at float64 copies of ``bases`` (NumPy arrays) on ``device`` against central
    differences: ``jitnet.testing.gradcheck`` (the whole Jacobian) on the CPU, ``directional_gradcheck`` on cuda."""
    if devtype(device) == "cpu":
        return jn.testing.gradcheck(f, *[jn.tensor(np.asarray(b, dtype=np.float64), dtype=jn.float64)
                                         for b in bases], **kw)
    return directional_gradcheck(f, *bases, device=device, **kw)


def directional_gradcheck(f, *bases, device, directions=2, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0):
    """Check the gradient of ``<w, f(*xs)>`` (a random weighting ``w`` of the outputs) along random directions
    ``v``: the autodiff value ``sum_i <grad_i, v_i>`` against ``(F(x + eps v) - F(x - eps v)) / (2 eps)``, all
    inputs moved at once, every evaluation on ``device`` in float64. The gradients must stay on ``device``."""
    rng = np.random.default_rng(seed)
    xs64 = [np.asarray(b, dtype=np.float64) for b in bases]

    def on_device(arrays):
        return [to_device(a, device, jn.float64) for a in arrays]
    leaves = [x.requires_grad_() for x in on_device(xs64)]
    out = f(*leaves)
    w = rng.uniform(0.5, 1.5, out.shape)
    if not out.requires_grad:
        grads = [np.zeros_like(x) for x in xs64]
    else:
        out.backward(to_device(w, device, out.dtype))
        grads = []
        for x, leaf in zip(xs64, leaves):
            if leaf.grad is None:
                grads.append(np.zeros_like(x))
                continue
            assert leaf.grad.device.type == devtype(device), f"gradient on {leaf.grad.device}, expected {device}"
            grads.append(leaf.grad.numpy())

    def value(arrays):
        return float(np.sum(w * np.asarray(f(*on_device(arrays)).numpy(), dtype=np.float64)))
    for _ in range(directions):
        vs = [rng.uniform(-1, 1, x.shape) for x in xs64]
        numeric = (value([x + eps * v for x, v in zip(xs64, vs)]) -
                   value([x - eps * v for x, v in zip(xs64, vs)])) / (2 * eps)
        terms = [g * v for g, v in zip(grads, vs)]
        analytic = float(sum(np.sum(t) for t in terms))
        scale = 1.0 + float(sum(np.sum(np.abs(t)) for t in terms))
        if not abs(analytic - numeric) <= atol * scale + rtol * abs(analytic):
            raise AssertionError(f"directional gradcheck on {device} failed: autodiff {analytic!r}, central "
                                 f"differences {numeric!r}\ngradients:\n{grads}")
    return True


_NO_CUDA_MESSAGE = re.compile(r"^(\w+): this op has no CUDA kernel")


def no_cuda_reason(exc):
    """Return "<row>: <reason>" when ``exc`` (or every exception of a group) is the NotImplementedError of a
    registry row that says why it has no CUDA implementation (``extra["no_cuda"]``), else None."""
    from jitnet.autodiff.core import REGISTRY
    excs = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
    reasons = set()
    for e in excs:
        m = _NO_CUDA_MESSAGE.match(str(e)) if isinstance(e, NotImplementedError) else None
        row = REGISTRY.get(m.group(1)) if m else None
        why = row.extra.get("no_cuda") if row is not None else None
        if not why:
            return None
        reasons.add(f"{row.name}: {why}")
    return "; ".join(sorted(reasons)) if reasons else None
