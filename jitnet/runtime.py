"""Runtime settings: thread count, denormal flushing, compile / cache counters."""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import time

import numba
import numpy as np
from numba import njit, prange

from . import blas
from . import kernelgen
from . import kernels_cpu

# Numba's OpenMP layer busy-waits after every parallel region; on a small machine those spinning workers
# fight BLAS's own threads and a training step gets 10-25x slower (measured: an MLP step took 78 ms with
# "omp" and 1.7 ms with "workqueue" on 2 cores). jitnet therefore defaults to the workqueue layer, which
# sleeps between launches. It does not accept parallel launches from two threads at once, so library code
# running outside the main thread (the DataLoader's prefetch thread) calls serial kernels.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["set_num_threads", "get_num_threads", "compile_stats", "flush_denormals", "denormals_flushed",
           "denormal_state", "set_malloc_tuning"]


def set_num_threads(n: int) -> None:
    """Set the number of threads parallel kernels and BLAS (matmul) use."""
    numba.set_num_threads(int(n))
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS that np.dot inside kernels calls)
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=int(n), user_api="blas")
    except ImportError:
        pass


def get_num_threads() -> int:
    """Return the number of threads parallel kernels use."""
    return numba.get_num_threads()


def _is_dispatcher(v) -> bool:
    return hasattr(v, "_cache_hits") and hasattr(v, "_cache_misses") and hasattr(v, "overloads")


def _all_dispatchers() -> list:
    """Return every Numba dispatcher jitnet owns, each once: generated kernels, ``kernels_cpu`` and the
    ``@njit`` kernels of any other ``jitnet.*`` module (data augmentation, this module, layers)."""
    seen: dict[int, object] = {}
    for d in list(kernelgen._dispatchers) + kernels_cpu.all_dispatchers():
        seen.setdefault(id(d), d)
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "jitnet" or name.startswith("jitnet.")):
            continue
        for v in list(vars(mod).values()):
            if _is_dispatcher(v):
                seen.setdefault(id(v), v)
    return list(seen.values())


def compile_stats() -> dict:
    """Return counters: kernels compiled, disk-cache hits, generated kernel modules written and loaded.

    ``compiles`` and ``cache_hits`` count each (kernel, signature) once, over every kernel jitnet owns (generated
    modules re-export the ``kernels_cpu`` helpers; those are not counted again).
    """
    st = kernelgen.stats()
    compiles = hits = 0
    for d in _all_dispatchers():
        compiles += sum(d._cache_misses.values())
        hits += sum(d._cache_hits.values())
    st["compiles"], st["cache_hits"] = compiles, hits
    return st


# --------------------------------------------------------------------------------------------------------------
# Subnormal floats: flush-to-zero (FTZ, MXCSR bit 15) and denormals-are-zero (DAZ, MXCSR bit 6)
#
# MXCSR is per thread, and Numba has no way to touch it, so a three-instruction function (stmxcsr, edit the bits,
# ldmxcsr) is compiled with llvmlite once per process and called through a ctypes function pointer: on the
# calling thread directly, and on every Numba worker from a ``prange`` kernel that takes the pointer as an
# argument (an argument, not a global, so the kernel stays in Numba's disk cache). Threads created afterwards
# inherit the MXCSR of the thread that creates them (Linux copies the FPU state on clone).
# --------------------------------------------------------------------------------------------------------------

_FTZ_DAZ = 0x8040
_MODE_QUERY, _MODE_CLEAR, _MODE_SET = 2, 0, 1

_MXCSR_IR = r"""
declare void @llvm.x86.sse.stmxcsr(ptr)
declare void @llvm.x86.sse.ldmxcsr(ptr)

define i32 @jitnet_mxcsr(i32 %mode) {
entry:
  %p = alloca i32, align 4
  call void @llvm.x86.sse.stmxcsr(ptr %p)
  %old = load i32, ptr %p, align 4
  %cleared = and i32 %old, -32833
  %set = or i32 %old, 32832
  %is_set = icmp eq i32 %mode, 1
  %is_clear = icmp eq i32 %mode, 0
  %keep_or_clear = select i1 %is_clear, i32 %cleared, i32 %old
  %new = select i1 %is_set, i32 %set, i32 %keep_or_clear
  store i32 %new, ptr %p, align 4
  call void @llvm.x86.sse.ldmxcsr(ptr %p)
  ret i32 %old
}
"""

_MXCSR_FN_TYPE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32)
_mxcsr_lock = threading.Lock()
_mxcsr_state: dict = {}          # engine (kept alive: it owns the machine code) and the ctypes function


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x64")


def _mxcsr_fn():
    """Return the ctypes function ``mxcsr(mode) -> old MXCSR`` (mode 0 clear, 1 set FTZ|DAZ, 2 query), or None."""
    if not _is_x86_64():
        return None
    fn = _mxcsr_state.get("fn")
    if fn is not None or "error" in _mxcsr_state:
        return fn
    with _mxcsr_lock:
        if "fn" in _mxcsr_state or "error" in _mxcsr_state:
            return _mxcsr_state.get("fn")
        try:
            import llvmlite.binding as llvm
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            mod = llvm.parse_assembly(_MXCSR_IR)
            mod.verify()
            tm = llvm.Target.from_default_triple().create_target_machine()
            engine = llvm.create_mcjit_compiler(mod, tm)
            engine.finalize_object()
            addr = engine.get_function_address("jitnet_mxcsr")
            if not addr:
                raise RuntimeError("jitnet_mxcsr has no address")
            _mxcsr_state["engine"] = engine
            _mxcsr_state["fn"] = _MXCSR_FN_TYPE(addr)
        except Exception as e:          # an LLVM without the intrinsics: flushing is an optimisation only
            _mxcsr_state["error"] = f"{type(e).__name__}: {e}"
            return None
        return _mxcsr_state["fn"]


@njit(cache=True, parallel=True, nogil=True)
def _mxcsr_all_threads(fn, mode, old, tid):
    """Call ``fn(mode)`` in every iteration of a prange loop; record its result and the Numba thread id."""
    for i in prange(old.shape[0]):
        old[i] = fn(mode)
        tid[i] = numba.get_thread_id()


def _run_on_workers(fn, mode):
    """Run ``fn(mode)`` on every Numba worker thread; return (old MXCSR values, thread ids)."""
    nmax = int(numba.config.NUMBA_NUM_THREADS)
    prev = numba.get_num_threads()
    n = nmax * 4
    old = np.empty(n, np.int32)
    tid = np.empty(n, np.int64)
    try:
        if prev != nmax:
            numba.set_num_threads(nmax)
        _mxcsr_all_threads(fn, np.int32(mode), old, tid)
    finally:
        if prev != nmax:
            numba.set_num_threads(prev)
    return old, tid


def flush_denormals(enable: bool = True) -> bool:
    """Set (or clear) FTZ and DAZ on this thread and every Numba worker; return True if the flags were changed.

    With them set, subnormal float inputs read as zero and subnormal results are written as zero, which avoids
    the 10-100x slowdown of x86 microcode assists on subnormals. Returns False (and does nothing) on CPUs other
    than x86-64 or when the helper cannot be compiled.
    """
    fn = _mxcsr_fn()
    if fn is None:
        return False
    mode = _MODE_SET if enable else _MODE_CLEAR
    fn(mode)
    _run_on_workers(fn, mode)
    _mxcsr_state["enabled"] = bool(enable)
    return True


def denormals_flushed() -> bool:
    """Return True if FTZ and DAZ are both set on the calling thread."""
    fn = _mxcsr_fn()
    if fn is None:
        return False
    return (fn(_MODE_QUERY) & _FTZ_DAZ) == _FTZ_DAZ


def denormal_state() -> dict:
    """Return ``{"supported", "main", "workers", "threads"}``: whether FTZ|DAZ is set on this thread and on all
    Numba workers (queried from a prange kernel), and how many distinct worker threads answered."""
    fn = _mxcsr_fn()
    if fn is None:
        return {"supported": False, "main": False, "workers": False, "threads": 0,
                "error": _mxcsr_state.get("error")}
    old, tid = _run_on_workers(fn, _MODE_QUERY)
    return {"supported": True, "main": (fn(_MODE_QUERY) & _FTZ_DAZ) == _FTZ_DAZ,
            "workers": bool(((old.astype(np.int64) & _FTZ_DAZ) == _FTZ_DAZ).all()),
            "threads": int(len(set(tid.tolist())))}


def _env_on(name) -> bool:
    """True when the opt-in switch ``name`` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _flush_on_import() -> None:
    """Apply ``JITNET_FLUSH_DENORMALS=1`` (opt-in) when jitnet is imported.

    Off by default: FTZ/DAZ is the thread's floating-point environment, shared with NumPy, PyTorch and Python's
    own float arithmetic, so setting it at import would change the results of code that is not jitnet's.
    """
    if not _env_on("JITNET_FLUSH_DENORMALS"):
        return
    try:
        _flush_main_thread_then_workers()
    except Exception:           # never make import fail over an optimisation
        pass


def _flush_main_thread_then_workers() -> None:
    """Set FTZ|DAZ on this thread; Numba's workers inherit it when they start (POSIX threads inherit the
    floating-point environment), so the per-worker kernel only runs if the pool already exists."""
    fn = _mxcsr_fn()
    if fn is None:
        return
    fn(_MODE_SET)
    _mxcsr_state["enabled"] = True
    try:
        from numba.np.ufunc import parallel as _par
        started = bool(getattr(_par, "_is_initialized", True))
    except ImportError:
        started = True
    if started:
        _run_on_workers(fn, _MODE_SET)


# glibc returns large freed blocks to the kernel (munmap, or trimming the heap top) and the next allocation of
# that size faults every page in again, zeroed. A training step allocates the same multi-megabyte activations
# every call: six live (128, 64, 24, 24) float32 buffers cost 19 ms allocated fresh vs 4.7 ms recycled (2-core
# machine). ``set_malloc_tuning(True)`` therefore raises malloc's mmap threshold to its maximum (32 MiB on
# 64-bit) and its trim threshold to 1 GiB, so such blocks stay in the process heap for reuse. The cost: freed
# memory up to that size is kept by the process instead of returned to the system. malloc's settings belong to
# the whole process (every library's allocations), so this is opt-in: the training CLI turns it on (it owns
# its process), a library import never does (``JITNET_MALLOC_TUNING=1`` opts in at import).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024        # glibc's initial M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
malloc_tuned = False


def set_malloc_tuning(enable: bool = True) -> bool:
    """Keep large freed blocks in the heap for reuse (glibc only); return True if malloc's settings changed.

    This changes the allocator of the whole process, so it is opt-in (``python -m jitnet train`` turns it on).
    ``set_malloc_tuning(False)`` puts back glibc's initial thresholds (128 KiB each; glibc's own dynamic
    adjustment of the mmap threshold stays off once any threshold has been set).
    """
    global malloc_tuned
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_t, trim_t = (32 << 20, 1 << 30) if enable else (_GLIBC_DEFAULT_THRESHOLD,) * 2
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_t))
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_t))
    except (OSError, AttributeError):
        return False
    if ok:
        malloc_tuned = bool(enable)
    return bool(ok)


def _tune_malloc_on_import() -> None:
    """Apply ``JITNET_MALLOC_TUNING=1`` (opt-in; glibc only) when jitnet is imported."""
    if _env_on("JITNET_MALLOC_TUNING"):
        set_malloc_tuning(True)


# --------------------------------------------------------------------------------------------------------------
# BLAS threads on a busy machine
#
# OpenBLAS's pthread pool hands each GEMM to all its threads and waits for every one of them; when another
# process holds a core, the GEMM waits for a descheduled thread, and a compiled MLP step measured 1.3 ms idle
# became 60-200 ms beside other work (Numba's workqueue threads do not show this: with them at 2 threads and
# OpenBLAS at 1 the same step took 2.1 ms). A compiled step therefore watches its own time and, when one BLAS
# thread is faster, runs its GEMMs on one: OpenBLAS's ``openblas_set_num_threads_local(1)`` for the calling
# thread, for the duration of the step only (set back to 0, "use the global count", after it), so no other code
# sees a changed setting. The choice is made by timing both settings (a few steps each) after the first runs,
# again whenever the step becomes several times slower than its best, and then at growing intervals.
# --------------------------------------------------------------------------------------------------------------

def _find_local_blas_threads():
    """Return ctypes ``openblas_set_num_threads_local`` of NumPy's OpenBLAS, or None."""
    if not blas.blas_library or os.environ.get("JITNET_ADAPTIVE_BLAS", "1") == "0":
        return None
    try:
        fn = ctypes.CDLL(blas.blas_library).openblas_set_num_threads_local
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return fn


_set_local_blas_threads = _find_local_blas_threads()
_blas_stats = {"switches": 0, "probes": 0}


class StepTimer:
    """Runs a compiled step with its BLAS on all threads or on one, whichever the step's own timing favours.

    ``run(fn, *args)`` calls ``fn(*args)``. From the fifth call, a comparison times ``PROBE`` calls with the
    current setting, then ``PROBE`` with the other, and keeps one thread only when its mean call (the first
    call of each block left out: it wakes or parks OpenBLAS's threads) beats the mean with all threads by
    ``MARGIN`` (a mean, not a minimum or median: beside a busy process most calls with all threads are as fast as
    idle ones and every few calls one waits for milliseconds). A call more than ``SLOW`` times its setting's best starts a new comparison after ``SLOW_CALLS``
    such calls in a row, and the comparison is repeated every ``interval`` seconds (doubling from 2 s to 64 s
    while the choice stands). ``single`` says which setting is in use.
    """

    SLOW = 2.5
    SLOW_CALLS = 3
    PROBE = 8
    MARGIN = 0.9
    START = 5

    __slots__ = ("single", "calls", "best", "probe", "slow", "next_probe", "interval", "times")

    def __init__(self):
        self.single = False
        self.calls = 0
        self.best = [None, None]         # best seconds per call with all threads, with one
        self.probe = None                # remaining (setting, calls) of a comparison, or None
        self.slow = 0
        self.next_probe = 0.0
        self.interval = 2.0
        self.times = [[], []]            # this comparison's times per setting

    def run(self, fn, *args):
        if _set_local_blas_threads is None:
            return fn(*args)
        self.calls += 1
        if self.calls == self.START and self.probe is None:
            self._start_probe()
        use_single = self.single if self.probe is None else self.probe[0]
        if use_single:
            _set_local_blas_threads(1)
            t0 = time.perf_counter()
            try:
                out = fn(*args)
            finally:
                dt = time.perf_counter() - t0
                _set_local_blas_threads(0)
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            dt = time.perf_counter() - t0
        self._record(int(use_single), dt)
        return out

    def _start_probe(self):
        _blas_stats["probes"] += 1
        self.probe = [self.single] * self.PROBE + [not self.single] * self.PROBE    # the settings left to time
        self.times = [[], []]

    def _record(self, k, dt):
        if self.probe is not None:
            self.times[k].append(dt)
            self.probe.pop(0)
            if self.probe:
                return
            self.probe = None
            full = _mean(self.times[0][1:]) if len(self.times[0]) > 1 else None
            one = _mean(self.times[1][1:]) if len(self.times[1]) > 1 else None
            self.best = [full, one]
            choice = one is not None and full is not None and one < self.MARGIN * full
            if choice != self.single:
                _blas_stats["switches"] += 1
                self.interval = 2.0
            else:
                self.interval = min(self.interval * 2, 64.0)
            self.single = choice
            self.slow = 0
            self.next_probe = time.monotonic() + self.interval
            return
        b = self.best[k]
        if b is None or self.calls < self.START:
            return
        if dt > self.SLOW * b:
            self.slow += 1
            if self.slow >= self.SLOW_CALLS:
                self._start_probe()
            return
        self.slow = 0
        if dt < b:
            self.best[k] = dt
        if time.monotonic() >= self.next_probe:
            self._start_probe()


def _mean(xs):
    return sum(xs) / len(xs)


def blas_thread_stats() -> dict:
    """Return how often compiled steps compared BLAS thread settings (``probes``) and changed them (``switches``)."""
    return dict(_blas_stats, available=_set_local_blas_threads is not None)
