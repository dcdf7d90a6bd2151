"""Modules loaded on first use: how a row's CUDA implementation names the CUDA backend without importing it.

``_G = LazyModule("jitnet.backend_cuda")`` beside a primitive's CPU code lets its CUDA implementation call
``_G.launch(...)``; nothing is imported until that implementation first runs, which only happens once a GPU
is in use, so importing jitnet (and running on the CPU) never imports ``numba.cuda``.
"""
from __future__ import annotations

import importlib

__all__ = ["LazyModule"]


class LazyModule:
    """A stand-in for module ``name``: the first attribute read imports it; later reads go to the module."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)          # vars(), copy, pickle, inspect probing: never a reason to import
        mod = object.__getattribute__(self, "_module")
        if mod is None:
            mod = importlib.import_module(object.__getattribute__(self, "_name"))
            object.__setattr__(self, "_module", mod)
        return getattr(mod, attr)

    def __repr__(self):
        return f"<LazyModule {object.__getattribute__(self, '_name')!r}>"
