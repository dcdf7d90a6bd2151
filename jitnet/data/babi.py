"""bAbI question answering as token sequences for sequence models (the DNC's bAbI task).

The reader of the text format (``qa1_single-supporting-fact_train.txt`` and the other 19 tasks) and the
offline generator of single-supporting-fact stories live in :mod:`jitnet.data.datasets`
(:func:`load_babi`, :func:`parse_babi`, :func:`generate_babi_single_fact`); this module turns their stories
into what a recurrent model reads:

* a story becomes one token sequence: its sentences (lower-cased words, then ``.``) and, at the point where
  each question is asked, the question (words, then ``?``) followed by one answer slot ``-`` per answer word;
* the targets are the answer words at the ``-`` slots and ``mask`` marks those slots;
* :func:`babi_batches` pads a batch to one fixed length (one compiled step for the whole data set) and gives
  one-hot inputs.

    stories = babi_stories(task=1, split="train")             # real files ($JITNET_DATA, cache, ...) or None
    stories = generated_babi_stories(200, seed=0)             # offline: generated task-1 stories
    vocab = BabiVocab.build(stories)
    data = encode_stories(stories, vocab)
    for x, y, mask in babi_batches(data, vocab, 32, rng): ...
"""
from __future__ import annotations

import os
import re

import numpy as np

from .datasets import BabiQuery, generate_babi_single_fact, load_babi, parse_babi

__all__ = ["PAD", "ANSWER", "tokenize", "story_tokens", "BabiVocab", "encode_stories", "pad_length",
           "babi_batches", "babi_stories", "generated_babi_stories", "BabiQuery"]

PAD = "<pad>"
"""The padding token (id 0)."""
ANSWER = "-"
"""The answer slot token: the model's output at this step is scored against the answer word."""

_WORD = re.compile(r"[a-z0-9_']+|[.?,!]")


def tokenize(text):
    """Return the lower-cased word and punctuation tokens of ``text`` ("Where is Mary?" -> where is mary ?)."""
    return _WORD.findall(text.lower())


def _sentence(text, end):
    toks = [t for t in tokenize(text) if t not in ".?!"]
    return toks + [end]


def story_tokens(story):
    """Return (tokens, answers) of one story (a list of :class:`BabiQuery` as :func:`load_babi` returns).

    ``answers[k]`` is the answer word of the k-th ``-`` slot in ``tokens``. Answers listing several words
    ("apple,football" in task 8) get one slot per word.
    """
    tokens, answers = [], []
    seen = 0
    for q in story:
        if len(q.context) < seen:
            raise ValueError("story_tokens: a question's context is shorter than the previous one's; pass the "
                             "queries of one story in file order")
        for s in q.context[seen:]:
            tokens += _sentence(s, ".")
        seen = len(q.context)
        tokens += _sentence(q.question, "?")
        words = [w for w in (a.strip().lower() for a in q.answer.split(",")) if w]
        if not words:
            raise ValueError(f"story_tokens: empty answer for question {q.question!r}")
        for w in words:
            tokens.append(ANSWER)
            answers.append(w)
    return tokens, answers


class BabiVocab:
    """Token <-> id maps; id 0 is :data:`PAD`, and :data:`ANSWER` is always present."""

    def __init__(self, words):
        words = list(words)
        if not words or words[0] != PAD or ANSWER not in words or len(set(words)) != len(words):
            raise ValueError("BabiVocab: words must be unique, start with PAD and contain ANSWER")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, *story_lists):
        """Return the vocabulary of every token and answer word in the given lists of stories (sorted)."""
        seen = set()
        for stories in story_lists:
            for story in stories:
                toks, ans = story_tokens(story)
                seen.update(toks)
                seen.update(ans)
        seen.discard(PAD)
        seen.discard(ANSWER)
        return cls([PAD, ANSWER] + sorted(seen))

    def __len__(self):
        return len(self.words)

    def __contains__(self, w):
        return w in self.index

    def encode(self, tokens):
        """Return the int64 ids of ``tokens``; raise KeyError naming a token not in the vocabulary."""
        try:
            return np.array([self.index[t] for t in tokens], np.int64)
        except KeyError as e:
            raise KeyError(f"BabiVocab: token {e.args[0]!r} is not in the vocabulary ({len(self)} words)") \
                from None

    def decode(self, ids):
        """Return the tokens of ``ids``."""
        return [self.words[int(i)] for i in ids]


def encode_stories(stories, vocab, max_tokens=None):
    """Return a list of (ids, targets) per story: int64 token ids and, per step, the answer id at ``-`` slots
    and -1 elsewhere. Stories longer than ``max_tokens`` are dropped (the DNC paper drops long ones too)."""
    out = []
    answer_id = vocab.index[ANSWER]
    for story in stories:
        toks, ans = story_tokens(story)
        if max_tokens is not None and len(toks) > max_tokens:
            continue
        ids = vocab.encode(toks)
        targets = np.full(len(ids), -1, np.int64)
        targets[ids == answer_id] = vocab.encode(ans)
        out.append((ids, targets))
    return out


def pad_length(data, multiple=8):
    """Return the longest sequence length in ``data`` rounded up to a multiple of ``multiple``."""
    n = max((len(ids) for ids, _ in data), default=1)
    return -(-n // multiple) * multiple


def babi_batches(data, vocab, batch_size, rng=None, length=None, shuffle=True, drop_last=False):
    """Yield (x, y, mask) batches of encoded stories: one-hot x (B, T, V) float32, y (B, T) int64 answer ids
    (0 off the slots), mask (B, T) float32 marking the answer slots; every batch padded to ``length`` steps
    (default :func:`pad_length` of the whole data set). The last batch is smaller unless ``drop_last``."""
    T = pad_length(data) if length is None else int(length)
    order = np.arange(len(data))
    if shuffle:
        (rng or np.random.default_rng()).shuffle(order)
    V = len(vocab)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        x = np.zeros((len(idx), T, V), np.float32)
        y = np.zeros((len(idx), T), np.int64)
        mask = np.zeros((len(idx), T), np.float32)
        for b, k in enumerate(idx):
            ids, tg = data[k]
            if len(ids) > T:
                raise ValueError(f"babi_batches: story {k} has {len(ids)} tokens, more than length {T}")
            x[b, np.arange(len(ids)), ids] = 1.0
            slots = tg >= 0
            y[b, :len(ids)][slots] = tg[slots]
            mask[b, :len(ids)][slots] = 1.0
        yield x, y, mask


def babi_stories(task=1, split="train", path=None, download=False):
    """Return the stories of bAbI task ``task`` (1..20), or None when the files are not found.

    ``path`` is a ``qa*.txt`` file or a directory holding them (or the ``tasks_1-20_v1-2`` release); without
    it the usual dataset search runs ($JITNET_DATA, the user cache, system dataset directories).
    """
    try:
        return load_babi(path, task=task, split=split, download=download)
    except (FileNotFoundError, OSError) as e:
        if path is not None and os.path.exists(os.fspath(path)) and not isinstance(e, FileNotFoundError):
            raise
        return None


def generated_babi_stories(n_stories, seed=0, questions_per_story=5):
    """Return ``n_stories`` generated single-supporting-fact (task 1) stories, deterministic in ``seed``."""
    text = generate_babi_single_fact(n_stories, seed=seed, questions_per_story=questions_per_story)
    return parse_babi(text, source=f"<generated task 1, seed {seed}>")
