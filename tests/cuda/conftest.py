"""CUDA tests: run in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported), or on a
real GPU when one is present.

CI runs this directory in its own pytest process with the simulator on (``.ci/run``). Without the simulator
and without a GPU the directory is skipped (``python -m pytest tests`` on a CPU machine),
unless ``JITNET_REQUIRE_CUDA_TESTS=1`` is set (``.ci/run`` sets it for its simulator run), where that is an
error.

The simulator runs kernels as Python and its device arrays wrap NumPy arrays, so host code could use them in
ways a real ``DeviceNDArray`` refuses (NumPy arithmetic, element indexing, implicit copies). Here the simulator
is made strict: outside a kernel, a device array allows only what a real one does without a hidden copy
(shape, strides, dtype, size, ...), and launching a kernel with a host NumPy array (an implicit transfer on a
GPU) fails. Every real copy between host and device is counted by the simulator's own ``copy_to_host`` /
``to_device`` as well, so tests can check that jitnet's transfer counters miss nothing.
"""
import os
import sys
import threading
import warnings

import numpy as np
import pytest
from numba.core import config

SIM = bool(config.ENABLE_CUDASIM)

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:              # tests/helpers.py, and the op suite that test_ops_cuda.py collects
    sys.path.insert(0, _TESTS)

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    assert SIM, "NUMBA_ENABLE_CUDASIM=1 was set after Numba was imported: run tests/cuda in their own process"


def _gpu_present():
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:
        return False


if not SIM and not _gpu_present():
    if os.environ.get("JITNET_REQUIRE_CUDA_TESTS") == "1":
        raise RuntimeError("tests/cuda need NUMBA_ENABLE_CUDASIM=1 (set before Numba is imported) or a GPU")
    collect_ignore_glob = ["test_*.py"]

RAW = {"h2d": 0, "d2h": 0}       # copies seen by the simulator itself


def _make_strict():
    from numba.cuda import simulator as sim
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator.cudadrv import devicearray as sda

    FakeCUDAArray = sda.FakeCUDAArray
    BlockThread = sim_kernel.BlockThread

    sim_dir = os.path.dirname(sim.__file__)

    def in_kernel():
        """True inside a simulated kernel, or when the simulator's own code is the caller."""
        if isinstance(threading.current_thread(), BlockThread):
            return True
        return sys._getframe(2).f_code.co_filename.startswith(sim_dir)

    allowed = {"dtype", "strides", "size", "ndim", "nbytes", "itemsize", "flags", "squeeze"}
    orig_getattr = FakeCUDAArray.__getattr__

    def strict_getattr(self, name):
        if in_kernel() or name in allowed:
            return orig_getattr(self, name)
        raise AttributeError(f"host code used .{name} of a device array (a real DeviceNDArray has none, or it "
                             f"copies to the host)")

    FakeCUDAArray.__getattr__ = strict_getattr

    def refuse(name, fn):
        def f(self, *a, **k):
            if in_kernel():
                return fn(self, *a, **k)
            raise AssertionError(f"host code used {name} on a device array (a real GPU array refuses it or "
                                 f"copies to the host)")
        return f

    for name in ("__getitem__", "__setitem__", "reshape", "ravel", "view", "transpose", "__eq__", "__ne__",
                 "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__sub__", "__mul__", "__floordiv__",
                 "__truediv__", "__mod__", "__pow__", "__neg__", "__iter__"):
        if hasattr(FakeCUDAArray, name):
            setattr(FakeCUDAArray, name, refuse(name, getattr(FakeCUDAArray, name)))

    def no_array(self, *a, **k):
        raise AssertionError("np.asarray of a device array (a hidden copy to the host)")

    FakeCUDAArray.__array__ = no_array

    orig_copy_to_host = FakeCUDAArray.copy_to_host

    def copy_to_host(self, *a, **k):
        RAW["d2h"] += 1
        return orig_copy_to_host(self, *a, **k)

    FakeCUDAArray.copy_to_host = copy_to_host
    orig_to_device = sda.to_device

    def to_device(*a, **k):
        RAW["h2d"] += 1
        return orig_to_device(*a, **k)

    sda.to_device = to_device
    sim.to_device = to_device
    import numba.cuda
    numba.cuda.to_device = to_device

    orig_call = sim_kernel.FakeCUDAKernel.__call__

    def call(self, *args):
        if not self._device:
            for a in args:
                if isinstance(a, np.ndarray):
                    raise AssertionError(f"kernel {self.fn.__name__} launched with a host array of shape {a.shape} "
                                         f"(an implicit transfer on a GPU)")
        return orig_call(self, *args)

    sim_kernel.FakeCUDAKernel.__call__ = call


def _one_cpu():
    """Keep this process (and the commands it starts) on one CPU, a different one per xdist worker: the
    simulator runs every GPU thread as a Python thread and polls them from the launching thread, and spread over
    cores they pass the GIL between cores, which made simulated kernels 2-3x slower than on one core."""
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
        os.sched_setaffinity(0, {cpus[(int(worker) if worker.isdigit() else 0) % len(cpus)]})


if SIM:
    _make_strict()
    _one_cpu()


@pytest.fixture(scope="session")
def device():
    """The op suite (tests/test_ops.py, collected by test_ops_cuda.py) runs on the GPU here."""
    return "cuda"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Skip a test that reaches a registry row without a CUDA implementation, with the row's reason."""
    try:
        return (yield)
    except (NotImplementedError, ExceptionGroup) as e:
        from helpers import no_cuda_reason
        reason = no_cuda_reason(e)
        if reason is None:
            raise
        pytest.skip(f"no CUDA implementation: {reason}")


@pytest.fixture(scope="session", autouse=True)
def _cuda_backend():
    import jitnet as jn
    jn.cuda.require("tests")
    yield


@pytest.fixture
def raw_transfers():
    """The simulator's own count of host<->device copies (reset for the test)."""
    RAW["h2d"] = RAW["d2h"] = 0
    return RAW


@pytest.fixture(autouse=True)
def _quiet_kernels():
    """Kernels compute in NumPy scalars in the simulator: overflow/invalid warnings stand for the GPU's silent
    IEEE and wrap-around results (the random generator multiplies uint64 on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
