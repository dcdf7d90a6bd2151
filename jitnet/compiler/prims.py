"""Primitives that exist for the compiler: variable assignment as an effect."""
from __future__ import annotations

from ..autodiff.core import Primitive
from ..lazy import LazyModule
from ..ops import _copy_into

# the CUDA backend, imported when a CUDA implementation first runs (never on the CPU)
_G = LazyModule("jitnet.backend_cuda")


def _assign_impl(var, value):
    _copy_into(var, value)
    return var


def _assign_cuda(var, value):
    _G.copy_into(var, value)
    return var


ASSIGN = Primitive("assign", impl={"cpu": _assign_impl, "cuda": _assign_cuda}, kind="update", nondiff=True)
ASSIGN.extra["inplace"] = (0,)
