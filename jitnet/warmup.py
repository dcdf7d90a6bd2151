"""Kernel warm-up: run every public op once per dtype, rank and memory layout so its kernels compile (or load from
Numba's disk cache) before real work starts.

The core ops are listed in one table (``ELEMENTWISE_UNARY``, ``ELEMENTWISE_BINARY``, ``OTHER_OPS`` below). Layers
built on top add their own entries with :func:`register_warmup`::

    from jitnet.warmup import register_warmup

    @register_warmup
    def _warm_linear(quick=False):          # ``quick`` is passed when the function accepts it
        Linear(4, 3)(jn.ones((2, 4))).sum().backward()

``python -m jitnet warmup`` imports jitnet (its layers ``jitnet.nn`` and ``jitnet.optim`` register theirs) and calls
:func:`run`, which reports how many kernels were compiled and how many came from the disk cache.
"""
from __future__ import annotations

import inspect
import sys
import time
from typing import Callable, Iterable

import numpy as np

import jitnet

from . import runtime
from .data import augment

__all__ = ["register_warmup", "registered", "cases", "run", "kernel_counts", "ELEMENTWISE_UNARY",
           "ELEMENTWISE_BINARY", "OTHER_OPS"]

_REGISTRY: list[tuple[str, Callable]] = []
_ERRORS: list[tuple[str, str]] = []          # (op, message) of ops that raised during the current run


def _try(label, fn, *args):
    """Call ``fn(*args)``; record an exception under ``label`` instead of raising (one broken op must not stop
    the others from warming up)."""
    try:
        return fn(*args)
    except Exception as e:
        _ERRORS.append((label, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))
        return None


def register_warmup(fn: Callable | None = None, *, name: str | None = None):
    """Register ``fn`` (called as ``fn()`` or ``fn(quick=...)``) to run during warm-up; return ``fn``.

    Usable as ``@register_warmup`` or ``@register_warmup(name="optim")``. Registering the same function twice
    keeps one entry.
    """
    def deco(f):
        label = name or f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"
        if not any(g is f for _, g in _REGISTRY):
            _REGISTRY.append((label, f))
        return f
    return deco(fn) if fn is not None else deco


def registered() -> list[tuple[str, Callable]]:
    """Return the registered warm-up functions as ``(name, fn)`` pairs, in registration order."""
    return list(_REGISTRY)


# ==============================================================================================================
# The op table
# ==============================================================================================================
#
# ELEMENTWISE_UNARY / ELEMENTWISE_BINARY: name -> (function, kinds) where kinds says which dtypes the op accepts
# ("f" float, "i" int64, "b" bool). Every entry runs on contiguous operands; entries marked layouts=True also run on
# strided and broadcast operands of every rank (the layouts that compile a kernel of their own).
# OTHER_OPS: name -> (function(x, dtype) -> result, kinds), run on one array of each rank.

def _jn():
    return jitnet


def _unary(name):
    return lambda x: getattr(_jn(), name)(x)


def _binary(name):
    return lambda x, y: getattr(_jn(), name)(x, y)


ELEMENTWISE_UNARY = {
    # name: (kinds, also on strided/broadcast layouts)
    "negative": ("fi", True), "exp": ("f", True), "log": ("f", True), "log1p": ("f", False),
    "sqrt": ("f", True), "abs": ("fi", False), "sign": ("fi", False), "square": ("fi", True),
    "reciprocal": ("f", False), "sin": ("f", False), "cos": ("f", False), "tanh": ("f", True),
    "sigmoid": ("f", True), "relu": ("fi", True), "softplus": ("f", False), "floor": ("f", False),
    "ceil": ("f", False), "isnan": ("f", False), "isfinite": ("f", False), "copy": ("fib", True),
    "logical_not": ("b", False),
}

ELEMENTWISE_BINARY = {
    "add": ("fi", True), "subtract": ("fi", True), "multiply": ("fi", True), "divide": ("f", True),
    "power": ("f", False), "maximum": ("fi", True), "minimum": ("fi", False), "remainder": ("fi", False),
    "floor_divide": ("fi", False), "less": ("fi", False), "less_equal": ("fi", False),
    "greater": ("fi", True), "greater_equal": ("fi", False), "equal": ("fi", True), "not_equal": ("fi", False),
    "logical_and": ("b", False), "logical_or": ("b", False), "logical_xor": ("b", False),
}


def _each(x, label, calls):
    """Run each ``(name, fn)`` of ``calls`` on ``x`` separately, recording failures under ``label``."""
    for name, fn in calls:
        _try(f"{name} {label}", fn, x)


def _red_all(x, label):
    jn = _jn()
    nd = x.ndim
    calls = []
    for ax in sorted({0, nd - 1, nd // 2}):
        calls += [(f"sum axis {ax}", lambda x, ax=ax: jn.sum(x, axis=ax)),
                  (f"max axis {ax}", lambda x, ax=ax: jn.max(x, axis=ax))]
        if x.dtype.kind == "f":
            calls += [(f"mean axis {ax}", lambda x, ax=ax: jn.mean(x, axis=ax, keepdims=True)),
                      (f"min axis {ax}", lambda x, ax=ax: jn.min(x, axis=ax)),
                      (f"prod axis {ax}", lambda x, ax=ax: jn.prod(x, axis=ax))]
    calls += [("sum", lambda x: jn.sum(x)), ("argmax", lambda x: jn.argmax(x, axis=-1)),
              ("argmin", lambda x: jn.argmin(x, axis=0))]
    if x.dtype.kind == "f":
        calls.append(("var", lambda x: jn.var(x, axis=-1)))
    _each(x, label, calls)


def _softmax_all(x, label):
    jn = _jn()
    _each(x, label, [("softmax", lambda x: jn.softmax(x, axis=-1)),
                     ("log_softmax", lambda x: jn.log_softmax(x, axis=-1)),
                     ("softmax axis 0", lambda x: jn.softmax(x, axis=0)),
                     ("logsumexp", lambda x: jn.logsumexp(x, axis=-1))])


def _cum_all(x, label):
    jn = _jn()
    calls = [("cumsum axis 0", lambda x: jn.cumsum(x, axis=0)), ("cumsum", lambda x: jn.cumsum(x, axis=-1))]
    if x.dtype.kind == "f":
        calls += [("cumprod", lambda x: jn.cumprod(x, axis=-1)),
                  ("cumsum exclusive reverse", lambda x: jn.cumsum(x, axis=-1, exclusive=True, reverse=True))]
    _each(x, label, calls)


def _index_all(x, label):
    jn = _jn()
    idx = jn.tensor(np.array([0, x.shape[0] - 1, 0], np.int64))
    idx_last = jn.tensor(np.array([0, x.shape[-1] - 1, 0], np.int64))
    fdt = x.dtype if x.dtype.kind == "f" else jn.float32
    _each(x, label, [
        ("take axis 0", lambda x: jn.take(x, idx, axis=0)),
        ("take last axis", lambda x: jn.take(x, idx_last, axis=-1)),
        ("scatter_add", lambda x: jn.scatter_add(x, idx, jn.take(x, idx, axis=0), axis=0)),
        ("argsort + take_along_axis", lambda x: jn.take_along_axis(x, jn.argsort(x, axis=-1), axis=-1)),
        ("sort axis 0", lambda x: jn.sort(x, axis=0)),
        ("top_k", lambda x: jn.top_k(x, k=1)),
        ("one_hot", lambda x: jn.one_hot(idx, 4, dtype=fdt)),
    ])


def _join_all(x, label):
    jn = _jn()
    _each(x, label, [("concatenate axis 0", lambda x: jn.concatenate([x, x], axis=0)),
                     ("concatenate last axis", lambda x: jn.concatenate([x, x], axis=-1)),
                     ("stack", lambda x: jn.stack([x, x], axis=0)),
                     ("pad", lambda x: jn.pad(x, [(1, 1)] * x.ndim))])


def _getitem_all(x, label):
    jn = _jn()
    rows = jn.tensor(np.array([0, 0], np.int64))
    _each(x, label, [("getitem int", lambda x: x[0]), ("getitem step", lambda x: x[..., ::2]),
                     ("getitem array", lambda x: x[rows]),
                     ("getitem mask", lambda x: x[x] if x.dtype.kind == "b" else x[x > 0])])


def _matmul_all(x, label):
    jn = _jn()
    if x.ndim < 2 or x.dtype.kind != "f":
        return
    w = jn.ones((x.shape[-1], 3), x.dtype)
    calls = [("matmul", lambda x: jn.matmul(x, w)),                 # 2-D, or batch @ matrix
             ("matmul transposed b", lambda x: jn.matmul(x, jn.swapaxes(x, -1, -2))),
             ("matmul transposed a", lambda x: jn.matmul(jn.swapaxes(x, -1, -2), x))]
    if x.ndim == 2:
        calls.append(("matmul vector", lambda x: jn.matmul(x[0], w)))
    _each(x, label, calls)


OTHER_OPS = {
    # name: (function(x), kinds)
    "reductions": (_red_all, "fi"),
    "softmax": (_softmax_all, "f"),
    "cumulative": (_cum_all, "fi"),
    "indexing": (_index_all, "f"),
    "join": (_join_all, "fib"),
    "getitem": (_getitem_all, "fib"),
    "matmul": (_matmul_all, "f"),
}

# Shapes per rank: small ones run the serial kernels, large ones (>= kernelgen.PARALLEL_THRESHOLD elements) the
# parallel ones.
_SMALL = {1: (7,), 2: (5, 6), 3: (3, 4, 5), 4: (2, 3, 4, 5)}
_LARGE = {1: (70000,), 2: (300, 256), 3: (20, 60, 64), 4: (6, 10, 32, 40)}


def _data(shape, kind, rng):
    if kind == "b":
        return rng.random(shape) > 0.5
    if kind == "i":
        return rng.integers(1, 5, shape).astype(np.int64)
    return (rng.random(shape) + 0.5).astype(np.float32)


def _tensor(arr, dtype):
    return _jn().tensor(arr.astype(dtype, copy=False))


def _dtype_of(kind, fdt):
    return {"f": fdt, "i": np.dtype(np.int64), "b": np.dtype(np.bool_)}[kind]


def _strided(shape, dt, kind, rng):
    """Return a tensor of ``shape`` that is a non-contiguous view (every other element of its last axis)."""
    base = _tensor(_data(shape[:-1] + (2 * shape[-1],), kind, rng), dt)
    return base[(slice(None),) * (len(shape) - 1) + (slice(None, None, 2),)]


def _bcast_shape(shape):
    """Return a shape broadcastable to ``shape`` with every other axis (from the second-last) set to 1."""
    if len(shape) == 1:
        return (1,)
    s = list(shape)
    for k in range(len(s) - 2, -1, -2):
        s[k] = 1
    return tuple(s)


def _ew_contiguous(fdt, big, kinds):
    """Run every elementwise op on contiguous operands (flat kernels), with scalar operands too."""
    jn = _jn()
    rng = np.random.default_rng(0)
    shape = _LARGE[2] if big else _SMALL[2]
    for kind in kinds:
        dt = _dtype_of(kind, fdt)
        x = _tensor(_data(shape, kind, rng), dt)
        y = _tensor(_data(shape, kind, rng), dt)
        for name, (ks, _) in ELEMENTWISE_UNARY.items():
            if kind in ks:
                _try(f"{name} {dt}", _unary(name), x)
        for name, (ks, _) in ELEMENTWISE_BINARY.items():
            if kind in ks:
                f = _binary(name)
                _try(f"{name} {dt}", f, x, y)
                if kind != "b":
                    _try(f"{name} {dt} scalar", f, x, 2)
                    _try(f"{name} {dt} scalar", f, 3, x)
        if kind == "f":
            extra = [("where", lambda: jn.where(x > 1, x, y)), ("where scalar", lambda: jn.where(x > 1, x, 0.0)),
                     ("clip", lambda: jn.clip(x, 0.6, 1.2))]
            casts = (np.float32, np.float64, np.int64, np.bool_)
        elif kind == "i":
            extra, casts = [], (np.float32, np.float64, np.bool_)
        else:
            extra, casts = [("where bool", lambda: jn.where(x, y, x))], (np.float32, np.int64)
        extra += [(f"astype {np.dtype(to)}", lambda to=to: jn.astype(x, to)) for to in casts]
        for name, f in extra:
            _try(f"{name} {dt}", f)


def _ew_layouts(fdt, big, rank, kinds):
    """Run the layout-sensitive elementwise ops on strided and broadcast operands of one rank."""
    jn = _jn()
    rng = np.random.default_rng(rank)
    shape = (_LARGE if big else _SMALL)[rank]
    for kind in kinds:
        dt = _dtype_of(kind, fdt)
        xs = _strided(shape, dt, kind, rng)
        ys = _strided(shape, dt, kind, rng)
        xc = _tensor(_data(shape, kind, rng), dt)
        yb = _tensor(_data(_bcast_shape(shape), kind, rng), dt)
        xb = jn.broadcast_to(yb, shape)
        for name, (ks, lay) in ELEMENTWISE_UNARY.items():
            if lay and kind in ks:
                f = _unary(name)
                _try(f"{name} {dt} strided", f, xs)
                if name in ("copy", "exp", "relu"):
                    _try(f"{name} {dt} broadcast", f, xb)
        for name, (ks, lay) in ELEMENTWISE_BINARY.items():
            if lay and kind in ks:
                f = _binary(name)
                lab = f"{name} {dt} rank {rank}"
                _try(lab + " strided", f, xs, ys)
                _try(lab + " broadcast", f, xc, yb)
                _try(lab + " broadcast", f, yb, xc)
                _try(lab + " strided scalar", f, xs, 2)
        if kind == "f":
            other = np.float64 if fdt == np.float32 else np.float32
            _try(f"astype {dt} strided", lambda: jn.astype(xs, other))
            if rank >= 2:
                xt = jn.transpose(xc)
                _try(f"exp {dt} rank {rank} transposed", lambda: jn.exp(xt))
                _try(f"add {dt} rank {rank} transposed", lambda: xt + xt)


def _others(fdt, big, rank, kinds):
    rng = np.random.default_rng(10 + rank)
    shape = (_LARGE if big else _SMALL)[rank]
    for kind in kinds:
        dt = _dtype_of(kind, fdt)
        x = _tensor(_data(shape, kind, rng), dt)
        for name, (fn, ks) in OTHER_OPS.items():
            if kind in ks:
                fn(x, f"{dt} rank {rank}")
                if kind != "b" and name in ("reductions", "softmax", "matmul") and rank >= 2:
                    fn(_strided(shape, dt, kind, rng), f"{dt} rank {rank} strided")


def _backward(fdt, big):
    """A few backward passes: dense layer, softmax cross-entropy, embedding lookup, slicing, reductions."""
    jn = _jn()
    rng = np.random.default_rng(3)
    n, d, h = (512, 256, 128) if big else (4, 6, 3)
    x = jn.tensor(rng.standard_normal((n, d)).astype(fdt))
    w = jn.tensor(rng.standard_normal((d, h)).astype(fdt) * 0.1, requires_grad=True)
    b = jn.tensor(np.zeros(h, fdt), requires_grad=True)
    emb = jn.tensor(rng.standard_normal((10, d)).astype(fdt), requires_grad=True)
    ids = jn.tensor(rng.integers(0, 10, n).astype(np.int64))
    hid = jn.relu(jn.matmul(x + jn.take(emb, ids, axis=0), w) + b)
    logp = jn.log_softmax(hid, axis=-1)
    onehot = jn.one_hot(jn.tensor(np.zeros(n, np.int64)), h, dtype=fdt)
    loss = -jn.mean(jn.sum(logp * onehot, axis=-1))
    loss = loss + jn.sum(jn.tanh(hid[:, :2]) ** 2) * 0.01 + jn.mean(jn.sigmoid(hid) * jn.exp(-hid))
    loss = loss + jn.sum(jn.softmax(hid, axis=-1)[0]) + jn.sum(jn.max(hid, axis=0))
    loss.backward()
    z = jn.tensor(rng.standard_normal((3, 4, 5)).astype(fdt), requires_grad=True)
    y = jn.concatenate([z, z * 2], axis=1)
    (jn.sum(jn.cumsum(jn.pad(y, [(0, 0), (1, 1), (0, 0)]), axis=1) / (z.shape[0] + 1.0))
     + jn.sum(jn.matmul(z, jn.swapaxes(z, -1, -2)))).backward()


def _augment(quick):
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 8, 8)).astype(np.float32)
    augment.random_crop(x, 6, rng=rng, padding=1)
    augment.center_crop(x, 6)
    augment.random_flip_left_right(x, rng=rng)
    augment.random_brightness(x, 0.1, rng=rng)
    augment.random_contrast(x, 0.8, 1.2, rng=rng)
    augment.per_image_standardization(x)


def _denormals(quick):
    runtime.denormal_state()


def _quick_ops():
    """The smoke-test subset: a handful of float32 ops on small contiguous arrays."""
    jn = _jn()
    rng = np.random.default_rng(0)
    x = jn.tensor(rng.random((5, 6)).astype(np.float32))
    y = jn.tensor(rng.random((5, 6)).astype(np.float32))
    _each(x, "float32 quick", [("add", lambda x: x + y), ("multiply scalar", lambda x: x * 2.0),
                               ("exp", lambda x: jn.exp(x)), ("sum", lambda x: jn.sum(x, axis=-1)),
                               ("softmax", lambda x: jn.softmax(x, axis=-1))])


def cases(quick: bool = False) -> list[tuple[str, Callable[[], object]]]:
    """Return the warm-up steps as ``(name, fn)`` pairs: the core op table, then the registered functions.

    The full table runs float32 and float64 (int64 and bool where ops take them) on ranks 1-4 in contiguous,
    strided and broadcast layouts, on small arrays and on large ones (>= ``kernelgen.PARALLEL_THRESHOLD``
    elements, for the parallel kernels), plus backward passes and the ``jitnet.data.augment`` kernels.
    ``quick`` keeps a handful of small float32 ops (a smoke test; registered functions get ``quick=True``).
    """
    out: list[tuple[str, Callable]] = []
    if quick:
        out.append(("core ops (quick)", _quick_ops))
    else:
        for big in (False, True):
            sz = "large" if big else "small"
            for fdt in (np.dtype(np.float32), np.dtype(np.float64)):
                kinds = "fib" if fdt == np.float32 else "f"         # int64 and bool ops once, with float32
                out.append((f"elementwise {fdt} {sz} contiguous",
                            lambda fdt=fdt, big=big, kinds=kinds: _ew_contiguous(fdt, big, kinds)))
                for r in (1, 2, 3, 4):
                    out.append((f"elementwise {fdt} {sz} rank {r} strided/broadcast",
                                lambda fdt=fdt, big=big, r=r, kinds=kinds: _ew_layouts(fdt, big, r, kinds)))
                    out.append((f"ops {fdt} {sz} rank {r}",
                                lambda fdt=fdt, big=big, r=r, kinds=kinds: _others(fdt, big, r, kinds)))
                out.append((f"backward {fdt} {sz}",
                            lambda fdt=fdt, big=big: _try(f"backward {fdt} {sz}", _backward, fdt, big)))
        out.append(("data.augment", lambda: _try("data.augment", _augment, quick)))
    out.append(("runtime.denormals", lambda: _denormals(quick)))
    for name, fn in registered():
        out.append((name, _bind_quick(fn, quick)))
    return out


def _bind_quick(fn, quick):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "quick" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return lambda: fn(quick=quick)
    return fn


# ==============================================================================================================
# Counters and the runner
# ==============================================================================================================

def kernel_counts() -> dict:
    """Return ``{"compiled", "cached", "modules_written"}`` from ``jitnet.compile_stats()`` (every kernel jitnet
    owns: generated, ``kernels_cpu``, ``jitnet.data.augment``, ``jitnet.runtime``, layers' own kernels)."""
    st = runtime.compile_stats()
    return {"compiled": int(st["compiles"]), "cached": int(st["cache_hits"]),
            "modules_written": int(st.get("modules_written", 0))}


class _Progress:
    """A tqdm bar on stderr when tqdm is importable, else a plain ``[i/n] name`` counter."""

    def __init__(self, total, enabled, stream):
        self.total, self.enabled, self.stream, self.i = total, enabled, stream, 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="warmup", unit="step", file=stream, leave=True,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def step(self, name):
        self.i += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(name[:48], refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.i}/{self.total}] {name}", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(quick: bool = False, progress: bool = True, stream=None, steps: Iterable | None = None,
        shard: tuple[int, int] = (0, 1)) -> dict:
    """Run the warm-up steps; return ``{"compiled", "cached", "seconds", "steps", "errors", ...}``.

    ``shard=(i, n)`` runs every n-th step starting at i (for warming up from several processes at once). An op
    that raises is reported in ``errors`` as ``(op, message)`` and the others still run.
    """
    import warnings

    stream = sys.stderr if stream is None else stream
    todo = list(cases(quick) if steps is None else steps)
    i, n = shard
    todo = todo[i::n]
    before = kernel_counts()
    t0 = time.perf_counter()
    bar = _Progress(len(todo), progress, stream)
    del _ERRORS[:]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # Numba performance hints about the layouts warmed on purpose
            for name, fn in todo:
                _try(name, fn)
                bar.step(name)
    finally:
        bar.close()
    after = kernel_counts()
    return {"compiled": after["compiled"] - before["compiled"], "cached": after["cached"] - before["cached"],
            "modules_written": after["modules_written"] - before["modules_written"],
            "seconds": time.perf_counter() - t0, "steps": len(todo), "errors": list(_ERRORS)}
