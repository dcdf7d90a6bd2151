"""The curriculum's models, each a small readable class, and their training commands.

Every module listed in ``_TRAINER_MODULES`` defines ``TRAINERS = {name: function(argv) -> exit code}``;
``python -m jitnet train NAME [options]`` runs ``TRAINERS[NAME]`` with the remaining arguments.
"""
from __future__ import annotations

from ..lazy import LazyModule

__all__ = ["trainers", "get_trainer"]

# loaded when a command asks for them (``python -m jitnet train NAME``), not when jitnet.models is imported
_TRAINER_MODULES = (LazyModule("jitnet.models.vision_cli"), LazyModule("jitnet.models.policy_gradient"),
                    LazyModule("jitnet.models.dqn"), LazyModule("jitnet.models.sequence"))


def trainers() -> dict:
    """Return {model name: train function} over every model module."""
    out = {}
    for m in _TRAINER_MODULES:
        out.update(m.TRAINERS)
    return out


def get_trainer(name):
    """Return the train function of model ``name``; raise KeyError listing the known names."""
    t = trainers()
    if name not in t:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(t)) or '(none)'}")
    return t[name]
