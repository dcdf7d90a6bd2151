"""Word2vec's data: a vocabulary, subsampling of frequent words, skip-gram pairs (the TensorFlow tutorial's
``generate_batch`` and word2vec's dynamic windows), the unigram^0.75 noise table with its guide, and corpora
encoded as sentences.

These feed :mod:`jitnet.models.skipgram` (and any embedding model trained on word windows); the pair and noise
kernels are in :mod:`jitnet.kernels_skipgram`.
"""
from __future__ import annotations

import collections

import numpy as np

from ..kernels_skipgram import GUIDE_SHIFT, pairs_kernel

__all__ = ["MAX_SENTENCE", "Vocab", "keep_probabilities", "sample_ints", "subsample", "generate_batch",
           "skipgram_pairs", "unigram_table", "sample_negatives", "noise_guide", "sentences_from_tokens",
           "encode_sentences"]

MAX_SENTENCE = 10000          # long token streams (text8) are cut into sentences of this many words


class Vocab:
    """Words sorted by decreasing count with their counts and an index; optionally an UNK word at index 0."""

    def __init__(self, words, counts, unk=None):
        self.words = list(words)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unk = unk

    @classmethod
    def build(cls, tokens, min_count=5, max_size=None, unk=None):
        """Return the vocabulary of words seen >= min_count times (at most max_size words, UNK included).

        With ``unk`` (e.g. "UNK", the TensorFlow tutorial's way) the dropped words map to that word, which sits
        at index 0 and counts them; with ``unk=None`` they are left out of the encoded corpus (word2vec's way).
        Ties in count are broken by first appearance.
        """
        c = collections.Counter()
        if tokens and isinstance(tokens[0], (list, tuple)):
            for s in tokens:
                c.update(s)
        else:
            c.update(tokens)
        items = [(w, n) for w, n in c.most_common() if n >= min_count and w != unk]
        if max_size is not None:
            items = items[:max_size - (1 if unk is not None else 0)]
        words = [w for w, _ in items]
        counts = [n for _, n in items]
        if unk is not None:
            unk_count = sum(c.values()) - sum(counts)
            words, counts = [unk] + words, [unk_count] + counts
        return cls(words, counts, unk)

    def __len__(self):
        return len(self.words)

    def __contains__(self, w):
        return w in self.index

    def encode(self, tokens):
        """Return int32 ids of ``tokens``: unknown words become UNK, or are dropped when there is no UNK."""
        get = self.index.get
        if self.unk is not None:
            u = self.index[self.unk]
            return np.fromiter((get(w, u) for w in tokens), dtype=np.int32, count=len(tokens))
        ids = np.fromiter((get(w, -1) for w in tokens), dtype=np.int32, count=len(tokens))
        return ids[ids >= 0]

    def decode(self, ids):
        """Return the words of integer ``ids``."""
        return [self.words[int(i)] for i in ids]


def keep_probabilities(counts, sample):
    """Return each word's probability of being kept by word2vec's subsampling with threshold ``sample``.

    p = (sqrt(c / (sample * N)) + 1) * (sample * N) / c, capped at 1 (N the total count); sample <= 0 keeps all.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if sample <= 0:
        return np.ones_like(counts)
    t = sample * counts.sum()
    with np.errstate(divide="ignore"):
        p = (np.sqrt(counts / t) + 1.0) * t / counts
    return np.minimum(np.nan_to_num(p, nan=1.0, posinf=1.0), 1.0)


def sample_ints(keep):
    """Return keep probabilities as uint32 thresholds (a word is kept when a random uint32 is below it)."""
    return np.minimum(np.round(np.asarray(keep) * 2.0 ** 32), 2.0 ** 32 - 1).astype(np.uint32)


def subsample(ids, keep, rng=None):
    """Return ``ids`` with each occurrence kept with probability keep[id] (NumPy generator ``rng``)."""
    rng = np.random.default_rng(rng)
    ids = np.asarray(ids)
    return ids[rng.random(ids.shape[0]) < np.asarray(keep)[ids]]


def generate_batch(data, batch_size, num_skips, skip_window, data_index=0, rng=None):
    """Return (batch (B,), labels (B, 1), next data_index): the TensorFlow word2vec tutorial's generate_batch.

    A window of span 2*skip_window+1 slides over ``data`` (wrapping around); for each position num_skips
    distinct context words of the center are drawn without replacement. ``rng`` is a NumPy generator or seed.
    """
    if batch_size % num_skips:
        raise ValueError(f"generate_batch: batch_size {batch_size} must be a multiple of num_skips {num_skips}")
    if num_skips > 2 * skip_window:
        raise ValueError(f"generate_batch: num_skips {num_skips} exceeds the {2 * skip_window} context words")
    rng = np.random.default_rng(rng)
    n = len(data)
    span = 2 * skip_window + 1
    batch = np.empty(batch_size, np.int64)
    labels = np.empty((batch_size, 1), np.int64)
    buf = collections.deque(maxlen=span)
    for _ in range(span):
        buf.append(data[data_index])
        data_index = (data_index + 1) % n
    context = [w for w in range(span) if w != skip_window]
    for i in range(batch_size // num_skips):
        use = rng.choice(context, size=num_skips, replace=False)
        for j, cw in enumerate(use):
            batch[i * num_skips + j] = buf[skip_window]
            labels[i * num_skips + j, 0] = buf[cw]
        buf.append(data[data_index])
        data_index = (data_index + 1) % n
    # step back so that the words at the end of this batch are not skipped by the next one
    data_index = (data_index + n - span) % n
    return batch, labels, data_index


def skipgram_pairs(ids, window, dynamic=True, rng=None, bounds=None):
    """Return (centers, contexts) int64 arrays of all skip-gram pairs within ``window`` of each position.

    With ``dynamic`` each position uses word2vec's reduced window, uniform in 1..window. ``bounds`` (sentence
    starts plus the end) keeps windows inside sentences; by default ``ids`` is one sentence.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    bounds = np.array([0, len(ids)], np.int64) if bounds is None else np.asarray(bounds, np.int64)
    rng = np.random.default_rng(rng)
    shrink = rng.integers(0, window, len(ids)) if dynamic and window > 0 else np.zeros(len(ids), np.int64)
    cap = 2 * window * len(ids)
    c, x = np.empty(cap, np.int64), np.empty(cap, np.int64)
    k = pairs_kernel(ids, bounds, window, shrink.astype(np.int64), c, x)
    return c[:k], x[:k]


def unigram_table(counts, power=0.75, domain=2 ** 31 - 1):
    """Return the cumulative noise table (int64, one entry per word) of the unigram^power distribution.

    Word i is drawn when a uniform integer in [0, table[-1]) falls in [table[i-1], table[i]).
    """
    f = np.asarray(counts, dtype=np.float64) ** power
    if f.sum() <= 0:
        raise ValueError("unigram_table: all counts are zero")
    return np.round(np.cumsum(f) / f.sum() * domain).astype(np.int64)


def sample_negatives(table, size, rng=None):
    """Return ``size`` word ids drawn from a cumulative noise table (see :func:`unigram_table`)."""
    rng = np.random.default_rng(rng)
    r = rng.integers(0, table[-1], size=size)
    return np.searchsorted(table, r, side="right").astype(np.int64)


def sentences_from_tokens(tokens, max_len=MAX_SENTENCE):
    """Return a token stream (or list of sentences) as sentences of at most ``max_len`` tokens."""
    if tokens and isinstance(tokens[0], (list, tuple)):
        return [s[i:i + max_len] for s in tokens for i in range(0, len(s), max_len) if s]
    return [tokens[i:i + max_len] for i in range(0, len(tokens), max_len)]


def encode_sentences(vocab, sentences):
    """Return (ids int32, bounds int64 (S+1,), raw word count): sentences encoded with unknown words dropped."""
    parts, bounds, raw = [], [0], 0
    for s in sentences:
        raw += len(s)
        e = vocab.encode(s)
        if len(e):
            parts.append(e)
            bounds.append(bounds[-1] + len(e))
    ids = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    return ids, np.asarray(bounds, np.int64), raw


def noise_guide(cum):
    """Return the guide table of a cumulative noise table: guide[b] = first word with cum > b * 2**15."""
    nb = (int(cum[-1]) >> GUIDE_SHIFT) + 1
    return np.searchsorted(cum, np.arange(nb, dtype=np.int64) << GUIDE_SHIFT, side="right").astype(np.int64)

