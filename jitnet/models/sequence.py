"""Sequence models of the curriculum and their training commands (``python -m jitnet train NAME``)."""
from __future__ import annotations

from .dnc_cli import train_dnc_babi, train_dnc_copy
from ._seq2seq_cli import train_seq2seq_dates, train_seq2seq_reverse
from .skipgram_cli import train_skipgram

__all__ = ["TRAINERS"]

TRAINERS = {"skipgram": train_skipgram, "dnc-copy": train_dnc_copy, "dnc-babi": train_dnc_babi,
            "seq2seq-dates": train_seq2seq_dates, "seq2seq-reverse": train_seq2seq_reverse}
