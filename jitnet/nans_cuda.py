"""The device side of ``jitnet.debug_nans``: count the NaNs and infinities of a device array on the GPU.

One grid-stride kernel counts both in registers and adds them to a two-entry record with one atomic per
thread that found any; the host reads the record after one synchronization (mapped host memory on a GPU, so
no copy is made or counted). Used only while the mode is on.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import cuda as C
from . import kernels_gpu as KG
from .autodiff import nans
from .backend_cuda import contiguous

__all__ = ["nonfinite_counts", "install"]


@cuda.jit(cache=True)
def count_nonfinite(x, out):
    """Add the number of NaNs of 1-D ``x`` to out[0] and of infinities to out[1]."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n_nan = 0
    n_inf = 0
    while i < x.shape[0]:
        v = x[i]
        if math.isnan(v):
            n_nan += 1
        elif math.isinf(v):
            n_inf += 1
        i += step
    if n_nan:
        cuda.atomic.add(out, 0, n_nan)
    if n_inf:
        cuda.atomic.add(out, 1, n_inf)


_REC = None


def _record():
    global _REC
    if _REC is None:
        if C.simulator_enabled():
            _REC = cuda.device_array(2, np.int64)
        else:
            _REC = cuda.mapped_array(2, np.int64)      # host memory the device writes: read without a copy
    return _REC


def _host(rec):
    return rec._ary if C.simulator_enabled() else rec


def nonfinite_counts(d):
    """Return (number of NaNs, number of infinities) in device array ``d`` (one kernel, one synchronization)."""
    flat = C.reshape(contiguous(d), (d.size,))
    rec = _record()
    h = _host(rec)
    h[:] = 0
    count_nonfinite[KG.grid(d.size), KG.BLOCK, C.launch_stream()](flat, rec)
    cuda.synchronize()
    return int(h[0]), int(h[1])


def install():
    """Make ``jitnet.debug_nans`` check device arrays with :func:`nonfinite_counts`."""
    nans.set_device_counter(nonfinite_counts)
