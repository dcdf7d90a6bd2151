"""Generated elementwise kernels and the on-disk kernel cache.

Every elementwise primitive carries a scalar expression template (see ``jitnet.ops``). This module turns a
small *elementwise program* -- one op in eager mode, a whole fused group under ``jitnet.jit`` -- into Python
source for ``@njit(cache=True)`` kernels, writes that source atomically into the kernel cache directory as a
module whose name is the hash of its text, registers it in ``sys.modules`` and executes it. Numba's own disk
cache then sits next to the module file, so a second process compiles nothing.

Kernels come in two flavours per program: a serial one (a few hundred nanoseconds per call, for small arrays)
and a ``parallel=True`` one with ``prange`` over the outermost loop (for large arrays). Ranks are arbitrary:
the loop nest is generated for the rank of the (collapsed) output.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import types
import warnings

import numpy as np

from . import __version__
from . import cache as _cache
from . import kernels_cpu as _K

__all__ = ["cache_dir", "load_source", "ElementwiseProgram", "elementwise_kernels", "stats"]

_lock = threading.RLock()
_modules: dict[str, object] = {}
_dispatchers: list = []          # every generated dispatcher, for compile / cache-hit counters
_counters = {"modules_written": 0, "modules_loaded": 0, "modules_rebuilt": 0}

#: Arrays with at least this many elements use the parallel kernel (a parallel launch costs tens of
#: microseconds, more on a busy machine: below about a megabyte of data it does not pay).
PARALLEL_THRESHOLD = 1 << 18


cache_dir = _cache.cache_dir


def _versions_salt() -> str:
    import numba

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "kernels_scalar.py"), "rb") as f:
        kc = hashlib.sha256(f.read()).hexdigest()[:16]
    return f"jitnet={__version__};numba={numba.__version__};numpy={np.__version__};kernels_scalar={kc}"


_salt: str | None = None


def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".py", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_source(source: str, target: str = "cpu", flags: str = ""):
    """Return the module built from generated ``source``, writing it to the cache directory if needed.

    The module name is ``jitnet_k_<sha256(source, target, flags, versions)>``; the file holds ``source`` after a
    checksum line (:func:`jitnet.cache.stamp_source`). A file whose text differs (corrupt, truncated) is rewritten
    with a :class:`jitnet.cache.CacheRepairWarning`. The module is executed from that text (no bytecode cache to
    go stale), and its dispatchers get the checked, self-repairing Numba cache of :func:`jitnet.cache.protect`.
    """
    global _salt
    if _salt is None:
        _salt = _versions_salt()
    key = hashlib.sha256("\0".join((source, target, flags, _salt)).encode()).hexdigest()[:32]
    name = f"jitnet_k_{key}"
    mod = _modules.get(name)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(name)
        if mod is not None:
            return mod
        d = cache_dir()
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, name + ".py")
        stamped = _cache.stamp_source(source)
        text = None
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            damage = None if text in (stamped, source) else "its text is not the kernel's source: truncated or garbled"
        except FileNotFoundError:
            damage = None
        except (OSError, UnicodeDecodeError) as e:
            damage = f"unreadable: {type(e).__name__}"
        if text not in (stamped, source):       # files written before the checksum line hold the bare source
            _atomic_write(path, stamped)
            _counters["modules_written"] += 1
            text = stamped
        if damage:
            _counters["modules_rebuilt"] += 1
            warnings.warn(f"jitnet: damaged generated kernel module {path} ({damage}); rewrote it",
                          _cache.CacheRepairWarning, stacklevel=2)
        # Executed from its text, not through the import system: a stale or damaged .pyc cannot be read.
        mod = types.ModuleType(name)
        mod.__file__ = path
        mod.__spec__ = importlib.util.spec_from_file_location(name, path)
        mod.__loader__ = mod.__spec__.loader
        sys.modules[name] = mod
        try:
            exec(compile(text, path, "exec"), mod.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
        _counters["modules_loaded"] += 1
        for v in vars(mod).values():
            if hasattr(v, "_cache_hits") and hasattr(v, "overloads"):
                _cache.protect(v)
                _dispatchers.append(v)
        _cache.protect_loaded()          # jitnet modules imported since (models, the CUDA kernels)
        _modules[name] = mod
        return mod


def stats() -> dict:
    """Return counters: generated modules written/loaded/rebuilt, and compiles / disk-cache hits of kernels."""
    disps = list(_dispatchers) + _K.all_dispatchers()
    compiles = sum(sum(d._cache_misses.values()) for d in disps)
    hits = sum(sum(d._cache_hits.values()) for d in disps)
    return dict(_counters, compiles=compiles, cache_hits=hits, **_cache.stats())


# --------------------------------------------------------------------------------------------------------------
# Elementwise programs
# --------------------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {np.dtype(t): n for t, n in [
    (np.float32, "float32"), (np.float64, "float64"), (np.float16, "float16"), (np.int8, "int8"),
    (np.int16, "int16"), (np.int32, "int32"), (np.int64, "int64"), (np.uint8, "uint8"), (np.bool_, "bool_")]}


def dtype_name(dt) -> str:
    """Return the NumPy scalar-type name used in generated source for dtype ``dt``."""
    return _DTYPE_NAMES[np.dtype(dt)]


def _header(what):
    """Return the first lines of a generated kernel module."""
    return [f"# jitnet generated {what}, not this file", "import math", "import numpy as np",
            "from numpy import float16, float32, float64, int8, int16, int32, int64, uint8, bool_",
            "from numba import njit, prange", "from jitnet.kernels_scalar import *  # scalar helpers", ""]


def _signature(parallel, nin, nout):
    """Return the decorator and def lines of the serial or parallel kernel over nin inputs, nout outputs."""
    args = [f"in{i}" for i in range(nin)] + [f"out{j}" for j in range(nout)]
    if parallel:
        return ["@njit(parallel=True, cache=True, nogil=True, error_model='numpy')",
                f"def kernel_parallel({', '.join(args)}):"]
    return ["@njit(cache=True, nogil=True, error_model='numpy')", f"def kernel_serial({', '.join(args)}):"]


class ElementwiseProgram:
    """A straight-line program over scalars: inputs, a list of ops, outputs.

    ``inputs``: list of ``(dtype, is_scalar)``. ``ops``: list of ``(expr, dtype)`` where ``expr`` is a Python
    expression over names ``x0..`` (inputs) and ``t0..`` (earlier ops); each op's value is stored in ``tK``
    cast to ``dtype``. ``outputs``: list of ``(name, dtype)`` naming the values written to output arrays.
    """

    __slots__ = ("inputs", "ops", "outputs")

    def __init__(self, inputs, ops, outputs):
        self.inputs = [(np.dtype(d), bool(s)) for d, s in inputs]
        self.ops = [(e, np.dtype(d)) for e, d in ops]
        self.outputs = [(n, np.dtype(d)) for n, d in outputs]

    def source(self, rank: int) -> str:
        """Return the source of the serial and parallel kernels.

        ``rank == 0`` means *flat* mode: every array operand is C-contiguous with the output's shape (any
        rank) and is flattened inside the kernel. Otherwise operands are strided views of the output's
        ``rank``-dimensional shape (zero strides for broadcast dims). Scalar operands are size-1 arrays read
        once before the loop.
        """
        lines = _header("elementwise kernel: edit the program")
        for par in (False, True):
            lines += _signature(par, len(self.inputs), len(self.outputs))
            ind = "    "
            for i, (dt, sc) in enumerate(self.inputs):
                if sc:
                    lines.append(f"{ind}x{i} = in{i}.reshape(1)[0]")
            if rank == 0:
                lines.append(f"{ind}n = out0.size")
                for i, (dt, sc) in enumerate(self.inputs):
                    if not sc:
                        lines.append(f"{ind}f{i} = in{i}.reshape(n)")
                for j in range(len(self.outputs)):
                    lines.append(f"{ind}o{j} = out{j}.reshape(n)")
                lines.append(f"{ind}for i in {'prange' if par else 'range'}(n):")
                ind += "    "
                idx, src, dst = "i", "f", "o"
            else:
                for k in range(rank):
                    rng = "prange" if (par and k == 0) else "range"
                    lines.append(f"{ind}for i{k} in {rng}(out0.shape[{k}]):")
                    ind += "    "
                idx, src, dst = ", ".join(f"i{k}" for k in range(rank)), "in", "out"
            for i, (dt, sc) in enumerate(self.inputs):
                if not sc:
                    lines.append(f"{ind}x{i} = {src}{i}[{idx}]")
            for k, (expr, dt) in enumerate(self.ops):
                lines.append(f"{ind}t{k} = {dtype_name(dt)}({expr})")
            for j, (n, dt) in enumerate(self.outputs):
                lines.append(f"{ind}{dst}{j}[{idx}] = {n}")
            lines.append("")
        return "\n".join(lines) + "\n"


def indexed_source(program: "ElementwiseProgram", out_rank: int, in_maps) -> str:
    """Return kernel source for a fused group whose operand shapes are known when the kernel is generated.

    The loop nest runs over the output's ``out_rank`` dims (at least 1: a 0-d output is passed as shape
    (1,)). ``in_maps[i]`` gives, for each dim of input ``i``, the output loop index it follows or ``None`` for a
    broadcast dim of length 1 (index 0), or a source expression over the loop indices (an input read through
    a basic slice: ``"64 + i1"``); a map of ``"scalar"`` marks a size-1 operand read once. Operands may have
    any strides. Each program output ``j`` is written to ``out{j}`` of the output's shape.
    """
    lines = _header("fused kernel: edit the graph")
    for par in (False, True):
        lines += _signature(par, len(program.inputs), len(program.outputs))
        ind = "    "
        for i, m in enumerate(in_maps):
            if m == "scalar":
                lines.append(f"{ind}x{i} = in{i}.reshape(1)[0]")
        for k in range(out_rank):
            rng = "prange" if (par and k == 0) else "range"
            lines.append(f"{ind}for i{k} in {rng}(out0.shape[{k}]):")
            ind += "    "
        for i, m in enumerate(in_maps):
            if m != "scalar":
                idx = ", ".join("0" if d is None else d if isinstance(d, str) else f"i{d}" for d in m)
                lines.append(f"{ind}x{i} = in{i}[{idx}]")
        for k, (expr, dt) in enumerate(program.ops):
            lines.append(f"{ind}t{k} = {dtype_name(dt)}({expr})")
        oidx = ", ".join(f"i{k}" for k in range(out_rank))
        for j, (n, dt) in enumerate(program.outputs):
            lines.append(f"{ind}out{j}[{oidx}] = {n}")
        lines.append("")
    return "\n".join(lines) + "\n"


def entry_point(dispatcher, args):
    """Return the compiled C entry point of ``dispatcher`` for ``args`` (skips type dispatch), or None."""
    from numba import typeof
    try:
        sig = tuple(typeof(a) for a in args)
        cres = dispatcher.overloads.get(sig)
        if cres is None:
            sig = tuple(t.copy(readonly=False) if hasattr(t, "readonly") and t.readonly else t for t in sig)
            cres = dispatcher.overloads.get(sig)
        return None if cres is None else cres.entry_point
    except Exception:
        return None


def elementwise_kernels(program: ElementwiseProgram, rank: int):
    """Return ``(serial, parallel)`` dispatchers for ``program`` (rank 0: flat mode; else strided of rank)."""
    mod = load_source(program.source(rank), "cpu")
    return mod.kernel_serial, mod.kernel_parallel


# --------------------------------------------------------------------------------------------------------------
# Source helpers for native-driver emitters (``extra["native"]`` of a row, and compiler/native.py)
# --------------------------------------------------------------------------------------------------------------

def dtype_source(dtype) -> str:
    """Return the source text of NumPy dtype ``dtype`` inside a driver (``np.float32``)."""
    return "np." + dtype_name(dtype)


def flag_source(v) -> str:
    """Return the source of a bool or int kernel argument as a typed, non-literal value (``np.bool_(True)``,
    ``np.int64(0)``). A bare ``True`` or ``0`` in a driver makes Numba compile the kernel again for
    ``Literal[bool](True)`` (seconds for a fused LSTM kernel) beside the one the Python steps compiled."""
    return f"np.bool_({bool(v)})" if isinstance(v, (bool, np.bool_)) else f"np.int64({int(v)})"


def shape_source(s) -> str:
    """Return the source text of shape ``s`` as a tuple literal (``(3,)``)."""
    s = tuple(int(d) for d in s)
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


def use_kernel(kernels, kernel, size=0):
    """Return the driver-global name of ``kernel`` (a Numba dispatcher or a kernels_cpu ``Adaptive``).

    An ``Adaptive`` kernel contributes its serial twin below the parallel threshold (by ``size``), else its
    parallel dispatcher. Emitters call this for every kernel their lines call.
    """
    if isinstance(kernel, _K.Adaptive):
        which = "parallel" if size >= _K.SERIAL_BELOW else "serial"
        line = f"from {kernel.parallel.py_func.__module__} import {kernel.__name__} as _a"
        for kname, ln in kernels:
            if ln == (line, which):
                return kname
        kname = f"k{len(kernels)}"
        kernels.append((kname, (line, which)))
        return kname
    line = f"from {kernel.py_func.__module__} import {kernel.py_func.__name__} as"
    for kname, ln in kernels:
        if ln == line:
            return kname
    kname = f"k{len(kernels)}"
    kernels.append((kname, line))
    return kname


# --------------------------------------------------------------------------------------------------------------
# Helpers of the elementwise launchers (the CPU one in ops.py, the CUDA one in backend_cuda.py)
# --------------------------------------------------------------------------------------------------------------

def collapse_dims(shape, strides_list):
    """Merge adjacent dims that are contiguous in every operand; return (shape, [strides per operand])."""
    dims = [(s, [st[i] for st in strides_list]) for i, s in enumerate(shape) if s != 1]
    if not dims:
        return (1,), [(0,) for _ in strides_list]
    out_shape = [dims[0][0]]
    out_strides = [[st] for st in dims[0][1]]
    for s, sts in dims[1:]:
        if all(o[-1] == st * s for o, st in zip(out_strides, sts)):
            out_shape[-1] *= s
            for o, st in zip(out_strides, sts):
                o[-1] = st
        else:
            out_shape.append(s)
            for o, st in zip(out_strides, sts):
                o.append(st)
    return tuple(out_shape), [tuple(o) for o in out_strides]


def template_expr(template, in_dtypes, cdtype, odtype=None):
    """Return a row's scalar ``template`` spelled over inputs ``x0, x1, ...`` of ``in_dtypes``, computed in
    ``cdtype`` (inputs of another dtype converted) with result dtype ``odtype`` (``{T}``, ``{O}``)."""
    cn = dtype_name(cdtype)
    names = [f"x{i}" if d == cdtype else f"{cn}(x{i})" for i, d in enumerate(in_dtypes)]
    return template.format(*names, T=cn, O=dtype_name(odtype or cdtype))


def cast_template(params):
    """The scalar template of a cast to ``params["dtype"]`` (to bool: a test against zero)."""
    return "({0} != 0)" if params["dtype"] == np.dtype(np.bool_) else "{O}({0})"
