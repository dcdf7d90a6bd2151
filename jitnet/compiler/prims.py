"""Primitives that exist for the compiler: variable assignment as an effect."""
from __future__ import annotations

from ..autodiff.core import Primitive


def _assign_impl(var, value):
    from ..ops import _copy_into
    _copy_into(var, value)
    return var


ASSIGN = Primitive("assign", impl={"cpu": _assign_impl}, kind="update", nondiff=True)
ASSIGN.extra["inplace"] = (0,)
