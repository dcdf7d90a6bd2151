"""Sequence models of the curriculum and their training commands (``python -m jitnet train NAME``)."""
from __future__ import annotations

from .skipgram import train_skipgram

__all__ = ["TRAINERS"]

TRAINERS = {"skipgram": train_skipgram}
