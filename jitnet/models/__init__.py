"""The curriculum's models, each a small readable class, and their training commands.

Every module listed in ``_TRAINER_MODULES`` defines ``TRAINERS = {name: function(argv) -> exit code}``;
``python -m jitnet train NAME [options]`` runs ``TRAINERS[NAME]`` with the remaining arguments.
"""
from __future__ import annotations

import importlib

__all__ = ["trainers", "get_trainer"]

_TRAINER_MODULES = ("vision", "rl", "sequence")


def trainers() -> dict:
    """Return {model name: train function} over every model module that is present."""
    out = {}
    for m in _TRAINER_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{m}":
                continue
            raise
        out.update(getattr(mod, "TRAINERS", {}))
    return out


def get_trainer(name):
    """Return the train function of model ``name``; raise KeyError listing the known names."""
    t = trainers()
    if name not in t:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(t)) or '(none)'}")
    return t[name]
