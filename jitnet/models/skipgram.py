"""Skip-gram word2vec: vocabulary, subsampling, pair generation, NCE / negative sampling, evaluation, export.

    python -m jitnet train skipgram --corpus PATH|text8|enwiki-test|lee [--dim 100 --window 5 --negative 5
                                    --min-count 5 --epochs N --threads 2 --fast|--model] --logdir D

Two training paths share one :class:`Vocab`, the subsampling and the embedding matrices of a :class:`SkipGram`:

* the *model* path (:class:`SkipGramModel`): the course's model-as-class, embedding lookups with sparse
  gradients, TensorFlow's ``nce_loss`` (or negative sampling written in jitnet ops), an optimizer applying
  sparse row updates, and a step compiled by ``jitnet.jit``;
* the *fast* path (:meth:`SkipGram.train_fast`): one ``parallel=True`` Numba kernel that walks chunks of
  sentences and, like the original word2vec C code, applies negative-sampling SGD to the input and output
  rows in place for every (center, context) pair, threads racing lock-free (Hogwild).
"""
from __future__ import annotations

import collections
import math
import os
import sys
import time

import numpy as np
from numba import njit, prange

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet.data import datasets as D
from jitnet.lazy import LazyModule
from jitnet.nn.embedding_ops import embedding
from ._train import (ArgumentParser, NonFiniteError, Progress, UsageError, add_distributed_arg,
                     setup_distributed)

dist = LazyModule("jitnet.distributed")      # MPI data parallelism, loaded by a distributed run only

__all__ = ["Vocab", "keep_probabilities", "subsample", "generate_batch", "skipgram_pairs", "unigram_table",
           "sample_negatives", "noise_guide", "warm_fast_kernel", "sentences_from_tokens", "encode_sentences", "sg_ns_train_chunk", "SkipGram",
           "SkipGramModel", "train_model", "spearman", "read_similarity_file", "read_analogy_file",
           "pca_2d", "load_corpus", "gensim_test_file", "train_skipgram", "TRAINERS"]

MAX_SENTENCE = 10000          # long token streams (text8) are cut into sentences of this many words


# ==============================================================================================================
# Vocabulary, subsampling, pairs, noise distribution
# ==============================================================================================================

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


def _sample_ints(keep):
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


@njit(cache=True, nogil=True)
def _pairs_kernel(ids, bounds, window, shrink, out_c, out_x):
    n = 0
    for s in range(bounds.shape[0] - 1):
        lo, hi = bounds[s], bounds[s + 1]
        for i in range(lo, hi):
            w = window - shrink[i]
            for j in range(max(lo, i - w), min(hi, i + w + 1)):
                if j != i:
                    out_c[n] = ids[i]
                    out_x[n] = ids[j]
                    n += 1
    return n


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
    k = _pairs_kernel(ids, bounds, window, shrink.astype(np.int64), c, x)
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


# ==============================================================================================================
# Fast path: Hogwild negative-sampling SGD in one parallel Numba kernel
# ==============================================================================================================

_LCG_MUL = np.uint64(25214903917)
_LCG_ADD = np.uint64(11)
_LCG_MASK = np.uint64(0xFFFFFFFFFFFF)
_SH16 = np.uint64(16)


@njit(cache=True, nogil=True)
def _lcg(r):
    """Return the next state of word2vec's 48-bit linear congruential generator."""
    return (r * _LCG_MUL + _LCG_ADD) & _LCG_MASK


_GUIDE_SHIFT = 15           # guide buckets of 2**15 table units: 2**16 buckets over the 2**31 domain


def noise_guide(cum):
    """Return the guide table of a cumulative noise table: guide[b] = first word with cum > b * 2**15."""
    nb = (int(cum[-1]) >> _GUIDE_SHIFT) + 1
    return np.searchsorted(cum, np.arange(nb, dtype=np.int64) << _GUIDE_SHIFT, side="right").astype(np.int64)


@njit(cache=True, nogil=True)
def _draw(cum, guide, v):
    """Return the first word i with cum[i] > v (a noise word for the uniform integer v), via the guide."""
    i = guide[v >> _GUIDE_SHIFT]
    while cum[i] <= v:
        i += 1
    return i


@njit(cache=True, fastmath=True, nogil=True)
def _sg_ns_pair(w_in, w_out, cum, guide, center, ctx, negative, alpha, work, r):
    """One (center, context) pair: the context's input row predicts the center against ``negative`` noise
    words; updates w_out rows and the input row in place; returns the generator state."""
    dim = w_in.shape[1]
    l1 = w_in[ctx]
    for k in range(dim):
        work[k] = 0.0
    top = np.uint64(cum[cum.shape[0] - 1])
    for d in range(negative + 1):
        if d == 0:
            t = center
            label = np.float32(1.0)
        else:
            r = _lcg(r)
            t = _draw(cum, guide, np.int64((r >> _SH16) % top))
            if t == center:
                continue
            label = np.float32(0.0)
        row = w_out[t]
        f = np.float32(0.0)
        for k in range(dim):
            f += l1[k] * row[k]
        if f > 6.0:
            g = (label - np.float32(1.0)) * alpha
        elif f < -6.0:
            g = label * alpha
        else:
            g = (label - np.float32(1.0) / (np.float32(1.0) + np.exp(-f))) * alpha
        for k in range(dim):
            work[k] += g * row[k]
            row[k] += g * l1[k]
    for k in range(dim):
        l1[k] += work[k]
    return r


@njit(cache=True, fastmath=True, nogil=True)
def _sg_ns_sentences(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                     alpha1, pos0, total, done, r):
    """Train sentences s_lo..s_hi-1 serially; return (generator state, words kept after subsampling).

    The learning rate follows the words processed by all threads, pos0 + done[0] (word2vec's shared counter,
    updated without a lock after each sentence).
    """
    maxlen = 0
    for s in range(s_lo, s_hi):
        maxlen = max(maxlen, bounds[s + 1] - bounds[s])
    buf = np.empty(maxlen, np.int32)
    work = np.empty(w_in.shape[1], np.float32)
    kept = 0
    for s in range(s_lo, s_hi):
        alpha = alpha0 - (alpha0 - alpha1) * (pos0 + done[0]) / total
        if alpha < alpha1:
            alpha = alpha1
        alpha32 = np.float32(alpha)
        n = 0
        for i in range(bounds[s], bounds[s + 1]):
            w = ids[i]
            r = _lcg(r)
            if np.uint64(sample_int[w]) < (r >> _SH16) & np.uint64(0xFFFFFFFF):
                continue
            buf[n] = w
            n += 1
        kept += n
        for i in range(n):
            r = _lcg(r)
            b = np.int64((r >> _SH16) % np.uint64(window))
            lo = max(0, i - window + b)
            hi = min(n, i + window + 1 - b)
            for j in range(lo, hi):
                if j != i:
                    r = _sg_ns_pair(w_in, w_out, cum, guide, buf[i], buf[j], negative, alpha32, work, r)
        done[0] += bounds[s + 1] - bounds[s]
    return r, kept


@njit(cache=True, fastmath=True, parallel=True)
def sg_ns_train_chunk(ids, bounds, s_lo, s_hi, w_in, w_out, cum, guide, sample_int, window, negative, alpha0,
                      alpha1, pos0, total, states):
    """Train sentences s_lo..s_hi-1 split into len(states) parts run in parallel (Hogwild); return kept words.

    ``pos0`` is the number of words processed before this chunk and ``total`` the number over all epochs:
    the learning rate decays linearly from alpha0 to alpha1 with the words processed. ``cum``/``guide`` are
    the noise table and its guide (:func:`unigram_table`, :func:`noise_guide`); ``sample_int`` the uint32
    keep thresholds. ``states`` holds one generator state per part and is advanced in place.
    """
    nparts = states.shape[0]
    kept = np.zeros(nparts, np.int64)
    done = np.zeros(1, np.int64)
    ns = s_hi - s_lo
    for p in prange(nparts):
        a = s_lo + ns * p // nparts
        b = s_lo + ns * (p + 1) // nparts
        if b > a:
            r, k = _sg_ns_sentences(ids, bounds, a, b, w_in, w_out, cum, guide, sample_int, window, negative,
                                    alpha0, alpha1, pos0, total, done, states[p])
            states[p] = r
            kept[p] = k
    return kept.sum()


# ==============================================================================================================
# Embeddings: training (fast path), queries, evaluation, export
# ==============================================================================================================

class SkipGram:
    """Input embeddings (V, D), output weights (V, D) and biases (V,) of a vocabulary, as jitnet Parameters.

    Both training paths update these same arrays: the fast kernel in place, the model path via its optimizer.
    """

    def __init__(self, vocab, dim=100, seed=0, init="word2vec"):
        self.vocab, self.dim = vocab, dim
        rng = np.random.default_rng(seed)
        v = len(vocab)
        if init in ("word2vec", "gensim"):   # uniform(-0.5/D, 0.5/D) (word2vec.c) or (-1/D, 1/D) (gensim 4)
            w_in = (rng.random((v, dim), dtype=np.float32) - 0.5) * ((1.0 if init == "word2vec" else 2.0) / dim)
            w_out = np.zeros((v, dim), np.float32)
        else:                        # the TensorFlow tutorial: uniform(-1, 1), truncated normal(1/sqrt(D))
            w_in = rng.uniform(-1.0, 1.0, (v, dim)).astype(np.float32)
            w_out = np.clip(rng.normal(0, 1 / math.sqrt(dim), (v, dim)), -2 / math.sqrt(dim),
                            2 / math.sqrt(dim)).astype(np.float32)
        self.embeddings = nn.Parameter(w_in, name="embeddings")
        self.out_weights = nn.Parameter(w_out, name="nce_weights")
        self.out_biases = nn.Parameter(np.zeros(v, np.float32), name="nce_biases")
        self.seed = seed
        self._normed = None

    @property
    def vectors(self):
        """The input embedding matrix (V, D) as a NumPy array (the live storage)."""
        return self.embeddings.numpy()

    def train_fast(self, sentences_ids, bounds, raw_words, epochs=5, window=5, negative=5, alpha=0.025,
                   min_alpha=0.0001, sample=1e-3, ns_exponent=0.75, threads=None, chunk_words=None,
                   progress=None):
        """Train with the parallel negative-sampling kernel; return {words, effective_words, seconds, words_per_s}.

        ``sentences_ids``/``bounds`` come from :func:`encode_sentences`; ``raw_words`` (tokens per epoch before
        vocabulary filtering and subsampling) is what words/s counts. ``progress(done_fraction)`` is called
        after each chunk.
        """
        import numba
        old = jn.get_num_threads()
        jn.set_num_threads(min(threads or old, numba.config.NUMBA_NUM_THREADS))
        try:
            ids = np.ascontiguousarray(sentences_ids, np.int32)
            bounds = np.ascontiguousarray(bounds, np.int64)
            cum = unigram_table(self.vocab.counts, ns_exponent)
            guide = noise_guide(cum)
            sample_int = _sample_ints(keep_probabilities(self.vocab.counts, sample))
            w_in, w_out = self.vectors, self.out_weights.numpy()
            nparts = jn.get_num_threads()
            states = (np.arange(nparts, dtype=np.uint64) * np.uint64(7919) + np.uint64(self.seed * 1000003 + 1))
            n_words = int(bounds[-1])
            total = max(1, n_words * epochs)
            # big chunks: few barriers between the threads (the progress bar moves once per chunk)
            chunk_words = chunk_words or max(MAX_SENTENCE * 8 * nparts, n_words // 20)
            # chunk boundaries (in sentences), about chunk_words each
            cuts = [0]
            target = chunk_words
            for s in range(1, len(bounds) - 1):
                if bounds[s] >= target:
                    cuts.append(s)
                    target = bounds[s] + chunk_words
            cuts.append(len(bounds) - 1)
            kept = 0
            t0 = time.perf_counter()
            for ep in range(epochs):
                for a, b in zip(cuts[:-1], cuts[1:]):
                    pos0 = ep * n_words + int(bounds[a])
                    kept += int(sg_ns_train_chunk(ids, bounds, a, b, w_in, w_out, cum, guide, sample_int, window,
                                                  negative, alpha, min_alpha, pos0, total, states))
                    if progress is not None:
                        progress((pos0 + bounds[b] - bounds[a]) / total)
            sec = time.perf_counter() - t0
        finally:
            jn.set_num_threads(old)
        self._normed = None
        words = raw_words * epochs
        return {"words": words, "effective_words": kept, "seconds": sec, "words_per_s": words / max(sec, 1e-9)}

    # ---- queries ---------------------------------------------------------------------------------------------

    def normalized(self):
        """Return the unit-length rows of the input embeddings (cached until the next training)."""
        if self._normed is None:
            v = self.vectors.astype(np.float32)
            n = np.linalg.norm(v, axis=1, keepdims=True)
            self._normed = v / np.maximum(n, 1e-12)
        return self._normed

    def nearest(self, word, k=8):
        """Return the k words most cosine-similar to ``word`` (a word or a vector) as [(word, similarity)]."""
        e = self.normalized()
        if isinstance(word, str):
            if word not in self.vocab:
                raise KeyError(f"nearest: {word!r} is not in the vocabulary of {len(self.vocab)} words")
            q, skip = e[self.vocab.index[word]], {self.vocab.index[word]}
        else:
            q, skip = np.asarray(word, np.float32), set()
            q = q / max(np.linalg.norm(q), 1e-12)
        sims = e @ q
        order = np.argsort(-sims)
        return [(self.vocab.words[i], float(sims[i])) for i in order[:k + len(skip)] if i not in skip][:k]

    def analogy(self, a, b, c, k=1):
        """Return the k best d for a : b :: c : d by 3CosAdd (d ~ b - a + c, inputs excluded) as [(word, sim)]."""
        for w in (a, b, c):
            if w not in self.vocab:
                raise KeyError(f"analogy: {w!r} is not in the vocabulary")
        e = self.normalized()
        ia, ib, ic = (self.vocab.index[w] for w in (a, b, c))
        q = e[ib] - e[ia] + e[ic]
        sims = e @ (q / max(np.linalg.norm(q), 1e-12))
        sims[[ia, ib, ic]] = -np.inf
        order = np.argsort(-sims)[:k]
        return [(self.vocab.words[i], float(sims[i])) for i in order]

    # ---- evaluation ------------------------------------------------------------------------------------------

    def evaluate_similarity(self, path_or_pairs):
        """Return {spearman, pairs, covered, coverage} on a word-similarity file or [(w1, w2, score)] list."""
        pairs = read_similarity_file(path_or_pairs) if isinstance(path_or_pairs, (str, os.PathLike)) \
            else list(path_or_pairs)
        return similarity_score(self.normalized(), self.vocab.index, pairs)

    def evaluate_analogies(self, path_or_questions, restrict=300000):
        """Return {accuracy, questions, covered, coverage, sections} on a questions-words style file."""
        qs = read_analogy_file(path_or_questions) if isinstance(path_or_questions, (str, os.PathLike)) \
            else list(path_or_questions)
        return analogy_score(self.normalized(), self.vocab.index, qs, restrict)

    # ---- export ----------------------------------------------------------------------------------------------

    def export_projector(self, logdir, max_words=5000, tag="skipgram"):
        """Write the first max_words embeddings and their words for TensorBoard's projector; return the path."""
        n = min(max_words, len(self.vocab))
        w = jn.io.SummaryWriter(logdir)
        try:
            return w.add_embedding(self.vectors[:n], metadata=self.vocab.words[:n], tag=tag)
        finally:
            w.close()

    def plot(self, path, max_words=300):
        """Save a 2-D PCA scatter of the most frequent words to ``path``; return the path or None without
        matplotlib."""
        n = min(max_words, len(self.vocab))
        xy = pca_2d(self.normalized()[:n])
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("skipgram: matplotlib is not installed, skipping the 2-D plot", flush=True)
            return None
        fig, ax = plt.subplots(figsize=(14, 14))
        ax.scatter(xy[:, 0], xy[:, 1], s=4)
        for i in range(n):
            ax.annotate(self.vocab.words[i], xy[i], fontsize=7)
        ax.set_title("skip-gram embeddings, first two principal components")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save_text(self, path):
        """Write the embeddings in word2vec's text format; return the path."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{len(self.vocab)} {self.dim}\n")
            for w, row in zip(self.vocab.words, self.vectors):
                f.write(w + " " + " ".join(f"{x:.6f}" for x in row) + "\n")
        return path


def warm_fast_kernel(sg):
    """Compile (or load from Numba's disk cache) the fast kernel for ``sg``'s arrays; returns None."""
    cum = unigram_table(sg.vocab.counts)
    sg_ns_train_chunk(np.zeros(0, np.int32), np.zeros(2, np.int64), 0, 0, sg.vectors, sg.out_weights.numpy(),
                      cum, noise_guide(cum), np.zeros(len(sg.vocab), np.uint32), 1, 1, 0.0, 0.0, 0, 1,
                      np.ones(1, np.uint64))


def pca_2d(x):
    """Return the projection (N, 2) of the rows of ``x`` on their first two principal components."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


# ==============================================================================================================
# Evaluation files
# ==============================================================================================================

def read_similarity_file(path):
    """Return [(word1, word2, score)] from a tab/space separated similarity file ('#' lines are comments)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 3:
                continue
            try:
                out.append((parts[0].strip(), parts[1].strip(), float(parts[2])))
            except ValueError:          # a header line
                continue
    return out


def read_analogy_file(path):
    """Return [(section, a, b, c, d)] from a questions-words file (': section' headers, 'a b c d' lines)."""
    out, section = [], ""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith(":"):
                section = line[1:].strip()
                continue
            parts = line.split()
            if len(parts) == 4:
                out.append((section, *parts))
    return out


def _ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), np.float64)
    r[order] = np.arange(1, len(x) + 1)
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / cnt)[inv]


def spearman(x, y):
    """Return Spearman's rank correlation of x and y (tied values get their average rank)."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    d = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / d) if d > 0 else float("nan")


def similarity_score(normed, index, pairs):
    """Return {spearman, pairs, covered, coverage}: cosine vs human scores over pairs whose words are known."""
    human, model = [], []
    for a, b, s in pairs:
        a, b = a.lower(), b.lower()
        if a in index and b in index:
            human.append(s)
            model.append(float(normed[index[a]] @ normed[index[b]]))
    n = len(pairs)
    return {"spearman": spearman(human, model), "pairs": n, "covered": len(human),
            "coverage": len(human) / n if n else 0.0}


def analogy_score(normed, index, questions, restrict=300000):
    """Return {accuracy, questions, covered, coverage, sections}: 3CosAdd over the first ``restrict`` words."""
    qs = []
    for sec, *ws in questions:
        ids = [index.get(w.lower(), -1) for w in ws]
        if all(0 <= i < restrict for i in ids):
            qs.append((sec, ids))
    e = normed[:restrict]
    correct, per = 0, {}
    for start in range(0, len(qs), 512):
        part = qs[start:start + 512]
        ids = np.array([q[1] for q in part], np.int64)
        q = e[ids[:, 1]] - e[ids[:, 0]] + e[ids[:, 2]]
        sims = q @ e.T
        rows = np.arange(len(part))
        for col in range(3):
            sims[rows, ids[:, col]] = -np.inf
        pred = np.argmax(sims, axis=1)
        for (sec, qi), p in zip(part, pred):
            ok = int(p == qi[3])
            correct += ok
            c = per.setdefault(sec, [0, 0])
            c[0] += ok
            c[1] += 1
    n = len(questions)
    return {"accuracy": correct / len(qs) if qs else float("nan"), "questions": n, "covered": len(qs),
            "coverage": len(qs) / n if n else 0.0, "sections": {k: v[0] / v[1] for k, v in per.items()}}


# ==============================================================================================================
# Model path: the course's model-as-class with jitnet ops and an optimizer
# ==============================================================================================================

class SkipGramModel(nn.Module):
    """Skip-gram as a jitnet Module: embedding lookups, NCE (TensorFlow semantics) or negative-sampling loss.

    Its parameters are the Parameters of a :class:`SkipGram`, so both training paths share the matrices.
    """

    def __init__(self, sg, loss="nce", num_sampled=64, negative=5, lr=1.0, optimizer="sgd", jit=True,
                 ns_exponent=0.75):
        super().__init__()
        self.sg = sg
        self.embeddings, self.nce_weights, self.nce_biases = sg.embeddings, sg.out_weights, sg.out_biases
        self.kind, self.num_sampled, self.negative = loss, num_sampled, negative
        self.vocab_size = len(sg.vocab)
        self.table = unigram_table(sg.vocab.counts, ns_exponent)
        params = [self.embeddings, self.nce_weights] + ([self.nce_biases] if loss == "nce" else [])
        if optimizer == "sgd":
            self.opt = jn.optim.SGD(params, lr=lr)
        elif optimizer == "adagrad":
            self.opt = jn.optim.AdaGrad(params, lr=lr)
        else:
            self.opt = jn.optim.Adam(params, lr=lr)
        self._step = jn.jit(self._train_step) if jit else self._train_step

    def forward(self, centers):
        """Return the embeddings (B, D) of integer ``centers``."""
        return embedding(self.embeddings, centers)

    def nce(self, centers, labels, sampled, true_exp, samp_exp):
        """Return the mean NCE loss of a batch with candidates drawn beforehand (TensorFlow semantics)."""
        emb = self.forward(centers)
        return jn.mean(F.nce_loss(self.nce_weights, self.nce_biases, labels, emb, self.num_sampled,
                                  self.vocab_size, sampled_values=(sampled, true_exp, samp_exp)))

    def neg_sampling(self, centers, labels, negatives):
        """Return the mean negative-sampling loss: -log s(u.v) - sum log s(-u.v_neg), negatives (B, K)."""
        u = self.forward(centers)                                          # (B, D)
        v = embedding(self.nce_weights, jn.reshape(labels, (-1,)))            # (B, D)
        vn = embedding(self.nce_weights, negatives)                            # (B, K, D)
        pos = jn.sum(u * v, axis=1)
        neg = jn.sum(jn.expand_dims(u, 1) * vn, axis=2)
        return jn.mean(F.softplus(-pos) + jn.sum(F.softplus(neg), axis=1))

    def _train_step(self, *batch):
        self.opt.zero_grad()
        loss = self.nce(*batch) if self.kind == "nce" else self.neg_sampling(*batch)
        loss.backward()
        self.opt.step()
        return loss

    def train_step(self, centers, labels, rng=None):
        """Run one optimizer step on (centers (B,), labels (B, 1)); return the loss before the update."""
        c = jn.tensor(np.asarray(centers, np.int64))
        y = jn.tensor(np.asarray(labels, np.int64).reshape(-1, 1))
        if self.kind == "nce":
            s, te, se = F.log_uniform_candidate_sampler(y, 1, self.num_sampled, True, self.vocab_size)
            return self._step(c, y, s, te, se)
        neg = sample_negatives(self.table, (len(centers), self.negative), rng)
        return self._step(c, y, jn.tensor(neg))


def train_model(model, ids, epochs=1, batch_size=128, window=5, sample=1e-3, lr_end=None, seed=0,
                progress=None, max_steps=None, bounds=None, rank=0, world_size=1):
    """Train a :class:`SkipGramModel` on subsampled dynamic-window pairs; return the list of step losses.

    Each epoch subsamples ``ids``, makes the pairs, shuffles them and runs steps of ``batch_size``; with
    ``lr_end`` the learning rate decays linearly to it over all steps. With ``world_size`` > 1 (data-parallel,
    the model's optimizer a :class:`jitnet.distributed.DistributedOptimizer`) every rank draws the same pairs
    and order from ``seed`` and trains on its strided share (``batch_size // world_size`` pairs) of each batch.
    """
    rng = np.random.default_rng(seed)
    keep = keep_probabilities(model.sg.vocab.counts, sample)
    losses, step = [], 0
    lr0 = model.opt.param_groups[0]["lr"]
    for _ in range(epochs):
        if bounds is None:
            sub = subsample(ids, keep, rng)
            c, x = skipgram_pairs(sub, window, True, rng)
        else:
            cs, xs = [], []
            for s in range(len(bounds) - 1):
                sub = subsample(ids[bounds[s]:bounds[s + 1]], keep, rng)
                c1, x1 = skipgram_pairs(sub, window, True, rng)
                cs.append(c1)
                xs.append(x1)
            c, x = np.concatenate(cs), np.concatenate(xs)
        perm = rng.permutation(len(c))
        steps = len(c) // batch_size
        total = steps * epochs if max_steps is None else min(max_steps, steps * epochs)
        for i in range(steps):
            if max_steps is not None and step >= max_steps:
                return losses
            if lr_end is not None:
                for g in model.opt.param_groups:
                    g["lr"] = lr0 + (lr_end - lr0) * step / max(total, 1)
            idx = perm[i * batch_size:(i + 1) * batch_size]
            if world_size > 1:
                idx = idx[rank::world_size]
            loss = float(model.train_step(c[idx], x[idx], rng).item())
            if not math.isfinite(loss):
                raise NonFiniteError(f"skipgram: training diverged: the loss is {loss} at step {step + 1}; a "
                                     f"smaller learning rate may help")
            losses.append(loss)
            step += 1
            if progress is not None:
                progress(loss)
    model.sg._normed = None
    return losses


# ==============================================================================================================
# Corpora and the command line
# ==============================================================================================================

def gensim_test_file(name):
    """Return the path of a file in gensim's bundled test data, or None when gensim is not installed."""
    import importlib.util
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", name)
    return p if os.path.exists(p) else None


ENWIKI_TEST = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def load_corpus(name):
    """Return (sentences as token lists, description) for text8, enwiki-test, lee or a plain-text file path.

    Files go through text8-style preprocessing (markup stripped, lowercase letters only). A file with several
    lines keeps each line as a sentence; long sentences are cut at 10,000 words.
    """
    if name == "text8":
        return sentences_from_tokens(D.load_text8()), "text8"
    if name in ("enwiki-test", "lee"):
        path = gensim_test_file(ENWIKI_TEST if name == "enwiki-test" else "lee_background.cor")
        if path is None:
            raise SystemExit(f"--corpus {name}: gensim's test data is not installed (pip install gensim)")
    else:
        path = name
    if not os.path.isfile(path):
        raise SystemExit(f"--corpus {name}: no such file")
    if name == "enwiki-test" or path.endswith((".xml", ".xml.bz2", ".bz2")):
        return sentences_from_tokens(D.load_text_corpus(path, preprocess=True)), path
    text = D._read_text(path)
    lines = [D.text8_preprocess(line).split() for line in text.splitlines()]
    return sentences_from_tokens([s for s in lines if s]), path


def _parser():
    p = ArgumentParser(prog="python -m jitnet train skipgram",
                       description="Train skip-gram word2vec embeddings and evaluate them.")
    p.add_argument("--corpus", default="enwiki-test",
                   help="text8 | enwiki-test | lee (gensim's test data) | path of a text file")
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negative", type=int, default=5, help="noise words per pair (fast path / --loss neg)")
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--max-vocab", type=int, default=None, help="keep only the most frequent words")
    p.add_argument("--sample", type=float, default=1e-3, help="subsampling threshold (0: off)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--alpha", type=float, default=None,
                   help="initial learning rate (default 0.025 fast, 1.0 model with SGD)")
    p.add_argument("--min-alpha", type=float, default=0.0001)
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fast", dest="path", action="store_const", const="fast", default="fast",
                   help="the parallel Hogwild kernel (default)")
    g.add_argument("--model", dest="path", action="store_const", const="model",
                   help="the model-as-class path with jitnet ops, an optimizer and a jitted step")
    p.add_argument("--loss", choices=["nce", "neg"], default="nce", help="loss of the --model path")
    p.add_argument("--num-sampled", type=int, default=64, help="NCE noise samples per batch (--model)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step (--model)")
    p.add_argument("--max-steps", type=int, default=None, help="stop the --model path after this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default=None, help="projector files, vectors and the plot go here "
                                                  "(default runs/skipgram)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    add_distributed_arg(p)
    p.add_argument("--eval-dir", default=None, help="folder with wordsim353.tsv, simlex999.txt, "
                                                    "questions-words.txt (default: gensim's test data)")
    return p


def _eval_file(args, name):
    if args.eval_dir:
        p = os.path.join(args.eval_dir, name)
        return p if os.path.exists(p) else None
    return gensim_test_file(name)


def evaluate_all(sg, args=None, eval_dir=None):
    """Return {name: metrics} on wordsim353, simlex999 and the analogy questions found (or {})."""
    class _A:
        pass
    if args is None:
        args = _A()
        args.eval_dir = eval_dir
    out = {}
    for key, fname in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        p = _eval_file(args, fname)
        if p:
            out[key] = sg.evaluate_similarity(p)
    p = _eval_file(args, "questions-words.txt")
    if p:
        out["analogies"] = sg.evaluate_analogies(p)
    return out


def train_skipgram(argv=None):
    """Train skip-gram embeddings from the command line; return the exit code."""
    args = _parser().parse_args(argv)
    world = setup_distributed(args)
    if world > 1:
        if args.path != "model":
            raise UsageError("--distributed trains the --model path (the --fast path is one process's Hogwild "
                             "kernel); add --model")
        if args.batch_size % world:
            raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the "
                             f"{world} ranks")
    lead = args.rank == 0
    logdir = args.logdir or os.path.join("runs", "skipgram")
    if lead:
        os.makedirs(logdir, exist_ok=True)
    jn.random.seed(args.seed)
    t0 = time.perf_counter()
    sentences, src = load_corpus(args.corpus)
    vocab = Vocab.build(sentences, args.min_count, args.max_vocab)
    ids, bounds, raw = encode_sentences(vocab, sentences)
    print(f"skipgram: {src}: {raw} words, {len(sentences)} sentences, vocabulary {len(vocab)} "
          f"(min count {args.min_count}), {time.perf_counter() - t0:.1f} s", flush=True)
    sg = SkipGram(vocab, args.dim, seed=args.seed, init="word2vec" if args.path == "fast" else "tf")
    if args.path == "fast":
        bar = None
        if not args.no_progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=100, desc="skipgram (fast)", unit="%", file=sys.stderr, dynamic_ncols=True,
                           bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}<{remaining}]")
            except ImportError:
                pass

        def progress(frac):
            if bar is not None:
                bar.update(100 * frac - bar.n)
        # compile (or load from the disk cache) before timing
        warm_fast_kernel(sg)
        stats = sg.train_fast(ids, bounds, raw, epochs=args.epochs, window=args.window, negative=args.negative,
                              alpha=args.alpha or 0.025, min_alpha=args.min_alpha, sample=args.sample,
                              threads=args.threads, progress=progress)
        if bar is not None:
            bar.close()
        print(f"skipgram: {args.epochs} epochs, {stats['words']} words in {stats['seconds']:.1f} s: "
              f"{stats['words_per_s']:,.0f} words/s ({stats['effective_words']} after subsampling)", flush=True)
    else:
        if args.threads:
            jn.set_num_threads(args.threads)
        model = SkipGramModel(sg, loss=args.loss, num_sampled=args.num_sampled, negative=args.negative,
                              lr=args.alpha or 1.0)
        if world > 1:
            model.opt = dist.DistributedOptimizer(model.opt)        # rank 0's initial vectors on every rank
        n_pairs_est = int(bounds[-1]) * args.window
        steps = n_pairs_est // args.batch_size * args.epochs
        if args.max_steps:
            steps = min(steps, args.max_steps)
        bar = Progress(steps, f"skipgram (model, {args.loss})", enabled=not args.no_progress, quiet=not lead)
        t1 = time.perf_counter()
        losses = train_model(model, ids, args.epochs, args.batch_size, args.window, args.sample,
                             lr_end=(args.alpha or 1.0) * 0.01, seed=args.seed, progress=bar.update,
                             max_steps=args.max_steps, bounds=bounds, rank=args.rank, world_size=world)
        bar.close()
        sec = time.perf_counter() - t1
        if losses:
            k = max(1, len(losses) // 10)
            print(f"skipgram: {len(losses)} steps in {sec:.1f} s, loss {np.mean(losses[:k]):.3f} -> "
                  f"{np.mean(losses[-k:]):.3f}", flush=True)
    if not lead:
        return 0                          # rank 0 evaluates and writes the vectors, projector files and plot
    results = evaluate_all(sg, args)
    for k, m in results.items():
        if k == "analogies":
            print(f"  {k}: accuracy {m['accuracy']:.4f} on {m['covered']}/{m['questions']} questions "
                  f"(coverage {m['coverage']:.1%})")
        else:
            print(f"  {k}: Spearman {m['spearman']:.4f} on {m['covered']}/{m['pairs']} pairs "
                  f"(coverage {m['coverage']:.1%})")
    probes = [w for w in ("king", "city", "one", "war", "music", "water") if w in vocab][:4]
    for w in probes:
        print(f"  nearest to {w}: " + ", ".join(f"{x} {s:.2f}" for x, s in sg.nearest(w, 6)))
    if all(w in vocab for w in ("man", "king", "woman")):
        print("  man : king :: woman : " + ", ".join(f"{x}" for x, _ in sg.analogy("man", "king", "woman", 3)))
    path = sg.export_projector(logdir)
    sg.save_text(os.path.join(logdir, "vectors.txt"))
    print(f"skipgram: projector files {path}, vectors {os.path.join(logdir, 'vectors.txt')}", flush=True)
    if not args.no_plot:
        p = sg.plot(os.path.join(logdir, "pca.png"))
        if p:
            print(f"skipgram: plot {p}", flush=True)
    return 0


jn.cache.protect_module(__name__)    # imported after jitnet: give this module's kernels the self-repairing cache
