"""The GPU runtime: a caching device allocator, the streams kernels launch on, and prepared plan launches.

Importing this module imports nothing of Numba; it is used once a GPU is (``jitnet.cuda``).

**Caching allocator.** Every device array jitnet makes (``cuda.empty``, ``cuda.to_device``: the CUDA backend's
``empty``/``from_host``, kernels' outputs, plan buffers) is cut from a pooled block. A request of ``n`` bytes
takes a block of its size class (:func:`size_class`: 512-byte steps up to 4 KiB, then four classes per power
of two, so at most a quarter is slack). When the last array or view over a block is garbage-collected, the
block goes back to its class's free list, and the next request of that class takes it without asking the
driver (a *pool hit*). Nothing global changes: no Numba memory-manager plugin is installed. On a GPU a block
is a ``numba.cuda.device_array(bytes, uint8)``; each array over it gets its own ``AutoFreePointer`` (the
reference-counted pointer Numba's own allocator hands out), so Numba's views (``gpu_data.view``, slices,
``view(dtype)``) keep the block taken, and the pointer's finalizer returns it when the count drops to zero. In
the simulator a block is a NumPy byte array and the array is built over a small holder object that every NumPy
view of it refers to; its finalizer returns the block. Finalizers only append to a queue, which allocations
and :func:`memory_stats` drain under a lock, so a collection in the middle of the bookkeeping is harmless.
``JITNET_CUDA_POOL=0`` (read at the first allocation, or again by :func:`reload_environment`) turns the
pool off: arrays are then Numba's own, exactly sized, and only counted.

A block returned while kernels that use it are still queued is safe to hand out again: jitnet's device work
is ordered in launch order across all its streams (below), so a kernel writing the new array runs after every
kernel queued before it.

**Streams.** Kernels launch on the *current stream* (:func:`launch_stream`): inside ``with
jn.cuda.stream(s):`` the user's stream ``s``; while a compiled plan runs, the plan's own stream (made on its
first run: :func:`run_on_plan_stream`; a plan run inside another plan or inside a user stream uses that one);
else the legacy default stream. When the stream changes between two launches, the new one is ordered after
the old one: streams Numba creates are blocking, so the legacy default stream already orders them against
itself, and between any other pair an event is recorded on the old stream and waited on by the new one.
Host<->device copies run on the default stream (``to_device``/``to_host`` call :func:`on_default_stream`
first), so ``item()``/``numpy()`` wait exactly for the work queued before them; nothing else synchronizes.

**Prepared launches.** A fused group's plan step launches through a :class:`PreparedLaunch` made when the plan
is built: grid and block are fixed there; on the first launch on a stream it takes Numba's launch
configuration for that stream once (Numba's ``kernel[grid, block, stream]``, an LRU-cached call, otherwise made
on every launch); on a GPU it also looks the compiled overload up once per operand layout (the arrays'
strides: dtypes and shapes are fixed by the plan, so equal strides mean equal Numba types) and then calls the
overload's ``launch`` directly, skipping the dispatcher's per-call argument typing and overload selection.
Numba still converts the arguments to its kernel parameters on every launch (their pointers change from call
to call). Where the route is unavailable (the simulator, a kernel Numba marks launch-configuration sensitive,
an overload not found under the computed types) the configured kernel is called as usual.

What ran where: the allocator's bookkeeping, the stream selection and ordering decisions and the prepared
launches' configuration are exercised in Numba's CUDA simulator (``tests/cuda/test_runtime_cuda.py``), where
streams and events are no-ops and kernels always go through the configured-kernel call. The GPU-only parts,
the ``AutoFreePointer`` blocks, the events, and the direct overload launch, follow numba-cuda's API
(0.30) and were not run on a GPU here.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import os
import threading
import weakref

import numpy as np

__all__ = ["size_class", "memory_stats", "reset_peak_memory_stats", "empty_cache", "launch_stats",
           "reset_launch_stats", "Stream", "stream", "current_stream", "launch_stream", "on_default_stream",
           "run_on_plan_stream", "PreparedLaunch", "empty", "from_host", "reload_environment"]

MIN_BLOCK = 512            # the smallest size class, and the step of the classes up to 4 KiB


_SIM = None


def _sim() -> bool:
    """True in Numba's CUDA simulator (fixed once Numba is imported)."""
    global _SIM
    if _SIM is None:
        from numba.core import config
        _SIM = bool(config.ENABLE_CUDASIM)
    return _SIM


def _nc():
    from numba import cuda
    return cuda


def _new_event():
    nc = _nc()
    return nc.event() if _sim() else nc.event(timing=False)     # (the simulator's event takes no argument)


def _pool_enabled_by_environment() -> bool:
    v = os.environ.get("JITNET_CUDA_POOL", "1").strip().lower()
    if v in ("0", "false", "off", "no"):
        return False
    if v in ("", "1", "true", "on", "yes"):
        return True
    raise ValueError(f"JITNET_CUDA_POOL={v!r}: expected 1 (the caching allocator, the default) or 0 (off)")


def size_class(nbytes: int) -> int:
    """Return the block size (bytes) a request of ``nbytes`` bytes is served from.

    512-byte steps up to 4 KiB, then four classes per power of two (2^k, 1.25 2^k, 1.5 2^k, 1.75 2^k), so a
    block is at most 25% larger than what was asked for."""
    nbytes = int(nbytes)
    if nbytes < 0:
        raise ValueError(f"size_class: a negative size ({nbytes} bytes)")
    if nbytes <= MIN_BLOCK:
        return MIN_BLOCK
    step = max(MIN_BLOCK, 1 << ((nbytes - 1).bit_length() - 3))
    return -(-nbytes // step) * step


# ==============================================================================================================
# The caching allocator
# ==============================================================================================================

def _c_strides(shape, itemsize):
    strides, acc = [], itemsize
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


class _SimHold:
    """Owner of a simulator array's memory: every NumPy view of the array refers to it (NumPy collapses view
    chains onto the first base that is not an array), so it dies with the last view."""

    __slots__ = ("__array_interface__", "block", "__weakref__")


_STAT_KEYS = ("allocated_bytes", "cached_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "num_allocs",
              "pool_hits", "device_allocs", "num_frees")


class _Pool:
    def __init__(self):
        self.enabled = None                      # read from JITNET_CUDA_POOL on first use
        self.free = {}                           # size class -> [block]
        self.pending = collections.deque()       # (size class, block) released by finalizers, not yet filed
        self.live = {}                           # key -> the GPU route's AutoFreePointer, until released
        self.keys = itertools.count()
        self.lock = threading.Lock()
        self.st = dict.fromkeys(_STAT_KEYS, 0)

    # -- bookkeeping (under the lock) --------------------------------------------------------------------------
    def _drain(self):
        st, pend = self.st, self.pending
        while pend:
            cls, block = pend.popleft()
            st["allocated_bytes"] -= cls
            st["num_frees"] += 1
            if self.enabled:
                self.free.setdefault(cls, []).append(block)
                st["cached_bytes"] += cls

    def _take(self, cls):
        st = self.st
        self._drain()
        st["num_allocs"] += 1
        lst = self.free.get(cls)
        if lst:
            block = lst.pop()
            st["cached_bytes"] -= cls
            st["pool_hits"] += 1
        else:
            block = self._new_block(cls)
            st["device_allocs"] += 1
        st["allocated_bytes"] += cls
        reserved = st["allocated_bytes"] + st["cached_bytes"]
        if st["allocated_bytes"] > st["peak_allocated_bytes"]:
            st["peak_allocated_bytes"] = st["allocated_bytes"]
        if reserved > st["peak_reserved_bytes"]:
            st["peak_reserved_bytes"] = reserved
        return block

    def _new_block(self, cls):
        if _sim():
            return np.empty(cls, np.uint8)
        nc = _nc()
        try:
            return nc.device_array(cls, np.uint8)
        except Exception:                  # out of device memory: give the cached blocks back and try once more
            if not self.st["cached_bytes"]:
                raise
            self._release_cached()
            return nc.device_array(cls, np.uint8)

    def _release_cached(self):
        self.free.clear()
        self.st["cached_bytes"] = 0

    # -- arrays --------------------------------------------------------------------------------------------------
    def on(self) -> bool:
        if self.enabled is None:
            self.enabled = _pool_enabled_by_environment()
        return self.enabled

    def empty(self, shape, dtype):
        """Return an uninitialised C-contiguous device array (from the pool when it is on)."""
        nc = _nc()
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if not (self.enabled or self.on()) or nbytes == 0:
            if nbytes:
                with self.lock:
                    self.st["num_allocs"] += 1
            return nc.device_array(shape, dtype)
        cls = size_class(nbytes)
        with self.lock:
            block = self._take(cls)
        if _sim():
            return self._sim_array(block, cls, shape, dtype)
        return self._gpu_array(block, cls, shape, dtype, nbytes)

    def _released(self, key, cls, block):
        """A block's last user is gone (a finalizer: may run inside any allocation, so it only queues)."""
        self.live.pop(key, None)
        self.pending.append((cls, block))

    def _sim_array(self, block, cls, shape, dtype):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        h = _SimHold()
        h.block = block
        h.__array_interface__ = {"data": (block.__array_interface__["data"][0], False), "shape": shape,
                                 "strides": None, "typestr": dtype.str, "version": 3}
        arr = np.asarray(h)
        f = weakref.finalize(h, self._released, None, cls, block)
        f.atexit = False
        return FakeCUDAArray(arr)

    def _gpu_array(self, block, cls, shape, dtype, nbytes):
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        from numba.cuda.cudadrv.driver import AutoFreePointer
        key = next(self.keys)
        ptr = ctypes.c_void_p(block.device_ctypes_pointer.value)
        mem = AutoFreePointer(_nc().current_context(), ptr, nbytes,
                              finalizer=lambda: self._released(key, cls, block))
        self.live[key] = mem               # Numba's OwnedPointers hold only a weak proxy of it
        return DeviceNDArray(shape, _c_strides(shape, dtype.itemsize), dtype, gpu_data=mem.own())

    # -- statistics ----------------------------------------------------------------------------------------------
    def stats(self):
        with self.lock:
            self._drain()
            st = dict(self.st)
            st["reserved_bytes"] = st["allocated_bytes"] + st["cached_bytes"]
            st["cached_blocks"] = sum(len(v) for v in self.free.values())
            st["enabled"] = self.on()
        return st


POOL = _Pool()


def empty(shape, dtype):
    """Return an uninitialised C-contiguous device array of ``shape`` and ``dtype`` (pooled)."""
    shape = tuple(int(s) for s in shape)
    for s in shape:
        if s < 0:
            raise ValueError(f"negative dimension in shape {shape}")
    return POOL.empty(shape, np.dtype(dtype))


def from_host(a):
    """Return a device array holding a copy of host array ``a`` (C-contiguous or 0-d); the copy runs on the
    default stream, ordered after the work queued before it (not counted here: ``cuda.to_device`` counts)."""
    on_default_stream()
    nc = _nc()
    if not (POOL.enabled or POOL.on()) or a.nbytes == 0:
        if a.nbytes:
            with POOL.lock:
                POOL.st["num_allocs"] += 1
        return nc.to_device(a)
    if a.strides != _c_strides(a.shape, a.itemsize):
        a = a.copy()                   # (a contiguous array may carry any stride on a length-1 axis: Numba's
    dst = empty(a.shape, a.dtype)      # copy into an array of the same shape compares the canonical ones)
    nc.to_device(a, to=dst)
    return dst


def memory_stats() -> dict:
    """Return the caching allocator's counters (bytes are size-class bytes of blocks):

    ``allocated_bytes`` (blocks held by live arrays), ``cached_bytes`` (free blocks kept for reuse),
    ``reserved_bytes`` (both: device memory the pool holds), ``peak_allocated_bytes``, ``peak_reserved_bytes``
    (since the start or :func:`reset_peak_memory_stats`), ``num_allocs`` (arrays requested), ``pool_hits``
    (served from a free list), ``device_allocs`` (new blocks from the device), ``num_frees`` (blocks
    returned), ``cached_blocks`` and ``enabled`` (False under ``JITNET_CUDA_POOL=0``: arrays are Numba's own
    and only ``num_allocs`` counts)."""
    return POOL.stats()


def reset_peak_memory_stats() -> None:
    """Set the peaks to what is allocated and reserved now."""
    with POOL.lock:
        POOL._drain()
        st = POOL.st
        st["peak_allocated_bytes"] = st["allocated_bytes"]
        st["peak_reserved_bytes"] = st["allocated_bytes"] + st["cached_bytes"]


def empty_cache() -> None:
    """Give the free blocks back to the device (blocks of live arrays stay; they return to the pool later)."""
    with POOL.lock:
        POOL._drain()
        POOL._release_cached()


def reload_environment() -> None:
    """Read ``JITNET_CUDA_POOL`` again (the pool is emptied first; live arrays keep their blocks until freed)."""
    enabled = _pool_enabled_by_environment()
    with POOL.lock:
        POOL._drain()
        POOL._release_cached()
        POOL.enabled = enabled


# ==============================================================================================================
# Streams
# ==============================================================================================================

_LSTATS = {"stream_switches": 0, "stream_waits": 0, "prepared": 0, "overloads": 0, "plan_streams": 0}


def launch_stats() -> dict:
    """Return counters of the launch machinery: ``stream_switches`` (launches or copies on another stream than
    the previous one), ``stream_waits`` (of those, the ones that needed an event wait), ``prepared`` (prepared
    launches configured for a stream: once per fused step of a plan and stream), ``overloads`` (compiled
    overloads looked up for prepared launches: once per step and operand layout, on a GPU) and
    ``plan_streams`` (streams made for plans)."""
    return dict(_LSTATS)


def reset_launch_stats() -> None:
    """Set the launch counters to zero."""
    for k in _LSTATS:
        _LSTATS[k] = 0


class Stream:
    """A CUDA stream jitnet can launch on (a Numba stream inside).

    ``jn.cuda.Stream()`` makes a new stream; ``jn.cuda.Stream(s)`` wraps Numba stream ``s`` (for a stream of
    another library, ``numba.cuda.external_stream(ptr)``). Use it with ``with jn.cuda.stream(s):``. Streams
    Numba makes are blocking (ordered against the legacy default stream); a wrapped external stream is
    assumed not to be, so switching to or from it always records and waits on an event."""

    __slots__ = ("numba", "blocking", "_event", "__weakref__")

    def __init__(self, stream=None):
        if isinstance(stream, Stream):
            stream = stream.numba
        if stream is None:
            nc = _nc()
            if not nc.is_available():
                raise RuntimeError("jn.cuda.Stream: device 'cuda' is not available: numba.cuda found no CUDA GPU "
                                   "(or set NUMBA_ENABLE_CUDASIM=1 before Numba is imported for its simulator)")
            stream = nc.stream()
            blocking = True
        else:
            if not callable(getattr(stream, "synchronize", None)):
                raise TypeError(f"jn.cuda.Stream: expected a Numba CUDA stream, got {type(stream).__name__}")
            blocking = not getattr(stream, "external", False)
        self.numba = stream
        self.blocking = blocking
        self._event = None

    def synchronize(self) -> None:
        """Wait until every kernel queued on this stream has finished."""
        self.numba.synchronize()

    def event(self):
        """The event this stream records when a launch moves to another stream (one, reused)."""
        if self._event is None:
            self._event = _new_event()
        return self._event

    def __repr__(self):
        return f"<jitnet.cuda.Stream {self.numba!r}>"


_CUR = None          # the Stream launches go to now (None: the legacy default stream)
_LAST = None         # the Stream of the last launch or copy (None: the legacy default stream)
_DEFAULT_EVENT = None


def current_stream():
    """Return the :class:`Stream` kernels launch on now (None: the default stream)."""
    return _CUR


@contextlib.contextmanager
def stream(s):
    """``with jn.cuda.stream(s):`` launches eager kernels and compiled plans on stream ``s`` (a
    :class:`Stream` or a Numba stream); ``None`` changes nothing. Work on ``s`` is ordered after what was
    launched before the block, and later work after it; synchronize with ``s.synchronize()`` or
    ``jn.cuda.synchronize()`` (``item()``/``numpy()`` wait for it too)."""
    global _CUR
    if s is None:
        yield None
        return
    if not isinstance(s, Stream):
        s = Stream(s)
    prev = _CUR
    _CUR = s
    try:
        yield s
    finally:
        _CUR = prev


def _switch(s):
    """Make stream ``s`` (None: the default stream) the one of the next launch, ordered after ``_LAST``'s work."""
    global _LAST, _DEFAULT_EVENT
    prev = _LAST
    _LAST = s
    _LSTATS["stream_switches"] += 1
    if (prev is None and s.blocking) or (s is None and prev.blocking):
        return                         # the legacy default stream and a blocking stream are ordered already
    if prev is None:
        if _DEFAULT_EVENT is None:
            _DEFAULT_EVENT = _new_event()
        ev = _DEFAULT_EVENT
        ev.record(0)
    else:
        ev = prev.event()
        ev.record(prev.numba)
    ev.wait(0 if s is None else s.numba)
    _LSTATS["stream_waits"] += 1


def launch_stream():
    """Return the Numba stream of the next kernel launch (``0``: the default stream), ordered after the stream
    of the launch before it. Every jitnet launch takes its stream here: ``kernel[grid, block, launch_stream()]``."""
    s = _CUR
    if s is not _LAST:
        _switch(s)
    return 0 if s is None else s.numba


def on_default_stream() -> None:
    """Order the default stream after the last launch's stream (before a host<->device copy on it)."""
    if _LAST is not None:
        _switch(None)


def run_on_plan_stream(plan, run):
    """Return ``run`` (a plan's ``run_arrays``) running the plan's launches on the plan's own stream.

    The stream is made on the first run that needs it (``plan.stream``); inside a user stream or another
    plan's run, the plan launches on that stream instead."""
    def run_arrays(arrays):
        global _CUR
        if _CUR is not None:
            return run(arrays)
        s = plan.stream
        if s is None:
            s = plan.stream = Stream()
            _LSTATS["plan_streams"] += 1
        _CUR = s
        try:
            return run(arrays)
        finally:
            _CUR = None
    return run_arrays


# ==============================================================================================================
# Prepared launches
# ==============================================================================================================

_UNSET = object()


class PreparedLaunch:
    """A kernel launch with a fixed grid and block, configured once per stream (see the module docstring).

    ``launch(args)`` launches ``kernel[grid, block, <current stream>](*args)``; ``arrays`` are the positions of
    the device-array arguments, whose strides key the overload looked up on a GPU."""

    __slots__ = ("kernel", "grid", "block", "arrays", "_stream", "_cfg", "_key", "_ovl", "_sim")

    def __init__(self, kernel, grid, block, arrays):
        self.kernel, self.grid, self.block, self.arrays = kernel, grid, block, tuple(arrays)
        self._stream = _UNSET
        self._cfg = self._ovl = None
        self._key = _UNSET
        self._sim = _sim()

    def _configure(self, s):
        self._stream = s
        if not self._sim:              # (a simulated kernel is configured by mutating it: done at each launch)
            self._cfg = self.kernel[self.grid, self.block, s]
        _LSTATS["prepared"] += 1

    def __call__(self, args):
        s = launch_stream()
        if s is not self._stream:
            self._configure(s)
        if self._sim:
            self.kernel[self.grid, self.block, s](*args)
            return
        key = tuple([args[i].strides for i in self.arrays])
        if key != self._key:
            self._cfg(*args)           # Numba's whole launch (compiles for new types), then find the overload
            self._resolve(args, key)
            return
        ovl = self._ovl
        if ovl is None:
            self._cfg(*args)
        else:
            c = self._cfg
            ovl.launch(args, c.griddim, c.blockdim, c.stream, c.sharedmem)

    def _resolve(self, args, key):
        """Look up the compiled overload for ``args``' types (None where the direct route does not apply)."""
        ovl = None
        d = self.kernel
        try:
            if not getattr(d, "_launch_config_sensitive", False) and not getattr(d, "specialized", False):
                ovl = d.overloads.get(tuple(d.typeof_pyval(a) for a in args))
                if ovl is not None and (getattr(ovl, "launch_config_sensitive", False)
                                        or not callable(getattr(ovl, "launch", None))):
                    ovl = None
        except Exception:                  # another Numba version's internals: keep the configured call
            ovl = None
        self._key, self._ovl = key, ovl
        _LSTATS["overloads"] += 1
