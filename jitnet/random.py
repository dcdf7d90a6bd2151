"""Random tensors from one seeded generator (PCG64): ``jitnet.random.seed(0)`` makes runs repeatable.

On a CUDA device (the default device, see ``jn.device``) draws are made on the GPU by a counter-based
generator (SplitMix64 of a key and a counter, see ``kernels_gpu.random_fill``): ``seed`` sets its key too,
so GPU runs are repeatable as well, though they draw other numbers than the CPU generator.
"""
from __future__ import annotations

import numpy as np

from .autodiff.core import Primitive, apply
from . import tensor as _tensor
from .lazy import LazyModule
from .ops import take
from .tensor import Tensor, _normalize_dtype, float32, int64

# the CUDA backend, imported when a CUDA implementation first runs (never on the CPU)
_G = LazyModule("jitnet.backend_cuda")
_KG = LazyModule("jitnet.kernels_gpu")
_C = LazyModule("jitnet.cuda")

__all__ = ["seed", "get_generator", "uniform", "normal", "truncated_normal", "bernoulli", "categorical",
           "permutation", "randint", "shuffle"]

_gen = np.random.default_rng()
_gpu = {"key": None, "offset": 0}          # the GPU generator: a 64-bit key and the next unused counter
_M64 = (1 << 64) - 1


def _splitmix(z):
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def seed(s: int) -> None:
    """Reseed the global generator (and the GPU generator's key)."""
    global _gen
    _gen = np.random.default_rng(s)
    _gpu["key"] = _splitmix(int(s) & _M64)
    _gpu["offset"] = 0


def _gpu_counters(count):
    """Return (key, first counter) for a GPU draw using ``count`` counters, and reserve them."""
    if _gpu["key"] is None:
        _gpu["key"] = _splitmix(int(_gen.integers(0, 1 << 62)))
    off = _gpu["offset"]
    _gpu["offset"] = (off + int(count)) & _M64
    return _gpu["key"], off


def get_generator() -> np.random.Generator:
    """Return the global NumPy generator behind jitnet.random."""
    return _gen


def _shape(shape):
    if shape is None:
        return ()
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _val(v):
    return v.numpy() if isinstance(v, Tensor) else v


def _sample_impl(kind, shape, dtype, a, b):
    if kind == "uniform":
        return _gen.uniform(a, b, shape).astype(dtype)
    if kind == "normal":
        z = _gen.standard_normal(shape, dtype=np.float32 if dtype == np.float32 else np.float64)
        if b != 1.0:
            z *= z.dtype.type(b)
        if a != 0.0:
            z += z.dtype.type(a)
        return z.astype(dtype, copy=False)
    if kind == "truncated_normal":
        z = _gen.standard_normal(shape)
        bad = np.abs(z) > 2
        while bad.any():
            z[bad] = _gen.standard_normal(int(bad.sum()))
            bad = np.abs(z) > 2
        return (z * b + a).astype(dtype)
    if kind == "bernoulli":
        return (_gen.random(shape) < a).astype(dtype)
    if kind == "randint":
        return _gen.integers(a, b, shape).astype(dtype)
    raise ValueError(kind)


# A random draw is a primitive with no tensor inputs: under jitnet.jit it is a graph node (never folded into
# a constant, never merged by CSE), so each run of a compiled step draws new numbers.
# CUDA: kind codes of kernels_gpu.random_fill, and the counters each element may use
_GPU_KINDS = {"uniform": 0, "normal": 1, "truncated_normal": 2, "bernoulli": 3, "randint": 4}
_GPU_DRAWS = {0: 1, 1: 2, 2: 128, 3: 1, 4: 1}


def _sample_cuda(kind, shape, dtype, a, b, device=None):
    """Fill a new device array with the counter-based generator (kernels_gpu.random_fill): no device state."""
    dtype = np.dtype(dtype)
    code = _GPU_KINDS.get(kind)
    if code is None:
        raise ValueError(kind)
    out = _C.empty(shape, dtype)
    n = out.size
    if n:
        key, offset = _gpu_counters(n * _GPU_DRAWS[code])
        tgt = _G.as_u8(out) if dtype == np.dtype(np.bool_) else out
        if code == 4:
            if b <= a:
                raise ValueError(f"randint: low {a} must be below high {b}")
            av, bv = np.int64(a), np.int64(b)
        else:
            av, bv = np.float64(a), np.float64(b)
        _G.launch(_KG.random_fill, n, _C.reshape(tgt, (n,)), np.int64(code), np.uint64(key), np.uint64(offset),
                  av, bv)
    return out


SAMPLE = Primitive("random", impl={"cpu": _sample_impl, "cuda": _sample_cuda}, nondiff=True)
SAMPLE.extra["random"] = True


def _sample(kind, shape, dtype, a, b, device=None):
    dev = _tensor._DEVICE_STACK[-1] if device is None else _tensor.device(device)
    if dev.type != "cpu":           # drawn on the default device (the CPU impl never sees this parameter)
        return apply(SAMPLE, kind=kind, shape=_shape(shape), dtype=_normalize_dtype(dtype), a=a, b=b,
                     device=str(dev))
    return apply(SAMPLE, kind=kind, shape=_shape(shape), dtype=_normalize_dtype(dtype), a=a, b=b)


def uniform(shape=(), low=0.0, high=1.0, dtype=float32, device=None):
    """Return samples from U[low, high) (on ``device``; default: the default device)."""
    if isinstance(low, Tensor) or isinstance(high, Tensor):
        return Tensor._wrap(_gen.uniform(_val(low), _val(high), _shape(shape)).astype(_normalize_dtype(dtype)))
    return _sample("uniform", shape, dtype, float(low), float(high), device)


def normal(shape=(), mean=0.0, std=1.0, dtype=float32, device=None):
    """Return samples from N(mean, std**2) (on ``device``; default: the default device)."""
    if isinstance(mean, Tensor) or isinstance(std, Tensor):
        return Tensor._wrap(_gen.normal(_val(mean), _val(std), _shape(shape)).astype(_normalize_dtype(dtype)))
    return _sample("normal", shape, dtype, float(mean), float(std), device)


def truncated_normal(shape=(), mean=0.0, std=1.0, dtype=float32, device=None):
    """Return N(mean, std**2) samples redrawn until within two standard deviations (TensorFlow semantics)."""
    return _sample("truncated_normal", shape, dtype, float(mean), float(std), device)


def bernoulli(p=0.5, shape=None, dtype=float32, device=None):
    """Return 0/1 samples that are 1 with probability ``p`` (a scalar or a tensor)."""
    if isinstance(p, Tensor) or np.ndim(p):
        pv = np.asarray(_val(p))
        shp = pv.shape if shape is None else _shape(shape)
        return Tensor._wrap((_gen.random(shp) < pv).astype(_normalize_dtype(dtype)))
    return _sample("bernoulli", () if shape is None else shape, dtype, float(p), 0.0, device)


def categorical(logits=None, probs=None, num_samples=1):
    """Return int64 samples of shape (batch, num_samples) (or (num_samples,)) from logits or probabilities."""
    if (logits is None) == (probs is None):
        raise ValueError("categorical: give exactly one of logits= and probs=")
    if logits is not None:
        lg = np.asarray(_val(logits), dtype=np.float64)
        lg = lg - lg.max(axis=-1, keepdims=True)
        p = np.exp(lg)
    else:
        p = np.asarray(_val(probs), dtype=np.float64)
        if (p < 0).any():
            raise ValueError("categorical: probabilities must be non-negative")
    p = p / p.sum(axis=-1, keepdims=True)
    squeeze = p.ndim == 1
    p2 = p.reshape(-1, p.shape[-1])
    c = np.cumsum(p2, axis=-1)
    u = _gen.random((p2.shape[0], num_samples))
    out = np.minimum((u[:, :, None] >= c[:, None, :]).sum(-1), p2.shape[-1] - 1).astype(np.int64)
    return Tensor._wrap(out[0] if squeeze else out.reshape(p.shape[:-1] + (num_samples,)))


def permutation(n):
    """Return a random permutation of range(n) (int64), or of the first axis of a tensor."""
    if isinstance(n, (int, np.integer)):
        return Tensor._wrap(_gen.permutation(int(n)).astype(np.int64))
    t = n if isinstance(n, Tensor) else Tensor(n)
    return take(t, permutation(t.shape[0]).to(t.device), axis=0)


def randint(low, high=None, shape=(), dtype=int64, device=None):
    """Return integers from [low, high)."""
    if high is None:
        low, high = 0, low
    return _sample("randint", shape, dtype, int(low), int(high), device)


def shuffle(n):
    """Return a shuffled int64 index tensor of length n."""
    return permutation(n)
