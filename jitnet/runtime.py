"""Runtime settings: thread count, denormal flushing, compile / cache counters."""
from __future__ import annotations

import numba

from . import kernelgen

__all__ = ["set_num_threads", "get_num_threads", "compile_stats"]


def set_num_threads(n: int) -> None:
    """Set the number of threads parallel kernels use."""
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    """Return the number of threads parallel kernels use."""
    return numba.get_num_threads()


def compile_stats() -> dict:
    """Return counters: kernels compiled, disk-cache hits, generated kernel modules written and loaded."""
    return kernelgen.stats()
