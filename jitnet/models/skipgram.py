"""Skip-gram word2vec: the embeddings of a vocabulary and their two training paths, queries and export.

Two training paths share one :class:`jitnet.data.word2vec.Vocab`, its subsampling and the embedding matrices
of a :class:`SkipGram`:

* the *model* path (:class:`SkipGramModel`): the course's model-as-class, embedding lookups with sparse
  gradients, TensorFlow's ``nce_loss`` (or negative sampling written in jitnet ops), an optimizer applying
  sparse row updates, and a step compiled by ``jitnet.jit``;
* the *fast* path (:meth:`SkipGram.train_fast`): one ``parallel=True`` Numba kernel
  (:func:`jitnet.kernels_skipgram.sg_ns_train_chunk`) that walks chunks of sentences and, like the original
  word2vec C code, applies negative-sampling SGD to the input and output rows in place for every (center,
  context) pair, threads racing lock-free (Hogwild).

The command line (``python -m jitnet train skipgram``) is :mod:`jitnet.models.skipgram_cli`; the data helpers
are :mod:`jitnet.data.word2vec` and the evaluation scores :mod:`jitnet.data.word_eval`.
"""
from __future__ import annotations

import functools
import math
import os
import time

import numpy as np

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet.data.word2vec import (MAX_SENTENCE, keep_probabilities, noise_guide, sample_ints, sample_negatives,
                                  skipgram_pairs, subsample, unigram_table)
from jitnet.data.word_eval import analogy_score, read_analogy_file, read_similarity_file, similarity_score
from jitnet.kernels_skipgram import sg_ns_train_chunk
from jitnet.lazy import LazyModule
from jitnet.nn.embedding_ops import embedding
from ._train import NonFiniteError

_gpu = LazyModule("jitnet.kernels_skipgram_gpu")     # the CUDA kernel, loaded by a run on a GPU only

__all__ = ["SkipGram", "warm_fast_kernel", "SkipGramModel", "train_model", "pair_batches"]


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
        """The input embedding matrix (V, D) as a NumPy array (the live storage on the CPU, a copy from a GPU)."""
        return self.embeddings.numpy()

    @property
    def device(self):
        """The jn.Device holding the matrices."""
        return self.embeddings.device

    def to(self, device):
        """Move the matrices to ``device`` ('cpu', 'cuda') in place (the Parameters stay the same objects);
        return self."""
        d = jn.device(str(device))
        if d.type == "cuda":
            jn.cuda.require(f"SkipGram.to({str(d)!r})", d.index)
        for p in (self.embeddings, self.out_weights, self.out_biases):
            p._move_(d)
        self._normed = None
        return self

    def train_fast(self, sentences_ids, bounds, raw_words, epochs=5, window=5, negative=5, alpha=0.025,
                   min_alpha=0.0001, sample=1e-3, ns_exponent=0.75, threads=None, chunk_words=None,
                   progress=None):
        """Train with the parallel negative-sampling kernel; return {words, effective_words, seconds, words_per_s}.

        ``sentences_ids``/``bounds`` come from :func:`encode_sentences`; ``raw_words`` (tokens per epoch before
        vocabulary filtering and subsampling) is what words/s counts. ``progress(done_fraction)`` is called
        after each chunk. On a GPU (after :meth:`to`) the CUDA form of the kernel runs with ``threads`` parts
        (default: one per sentence, at most 4096), the corpus moved to the device once.
        """
        stats = {"words": raw_words * epochs, "effective_words": 0, "seconds": 0.0, "words_per_s": 0.0}
        for chunk in self.fast_chunks(sentences_ids, bounds, raw_words, epochs, window, negative, alpha, min_alpha,
                                      sample, ns_exponent, threads, chunk_words):
            stats = chunk()
            if progress is not None:
                progress(stats["done"])
        return {k: stats[k] for k in ("words", "effective_words", "seconds", "words_per_s")}

    def fast_chunks(self, sentences_ids, bounds, raw_words, epochs=5, window=5, negative=5, alpha=0.025,
                    min_alpha=0.0001, sample=1e-3, ns_exponent=0.75, threads=None, chunk_words=None):
        """Return :meth:`train_fast`'s work as a list of chunks of sentences to run in order, each a function that
        trains its chunk and returns the statistics so far: {done (the fraction), words, effective_words (counted
        after the last chunk, None before), seconds, words_per_s}."""
        ids = np.ascontiguousarray(sentences_ids, np.int32)
        bounds = np.ascontiguousarray(bounds, np.int64)
        n_words = int(bounds[-1])
        total, words = max(1, n_words * epochs), raw_words * epochs
        cum = unigram_table(self.vocab.counts, ns_exponent)
        sample_int = sample_ints(keep_probabilities(self.vocab.counts, sample))
        runner = self._cuda_chunk_runner if self.device.type == "cuda" else self._cpu_chunk_runner
        run, cuts, count_kept = runner(ids, bounds, cum, sample_int, window, negative, alpha, min_alpha, total,
                                       threads, chunk_words)
        plan = [(ep * n_words + int(bounds[a]), a, b) for ep in range(epochs) for a, b in zip(cuts[:-1], cuts[1:])]
        start = []                       # the clock starts with the first chunk

        def chunk(k):
            pos0, a, b = plan[k]
            start.append(start[0] if start else time.perf_counter())
            run(a, b, pos0)
            self._normed = None
            sec = time.perf_counter() - start[0]
            return {"done": (pos0 + bounds[b] - bounds[a]) / total, "words": words,
                    "effective_words": count_kept() if k == len(plan) - 1 else None, "seconds": sec,
                    "words_per_s": words / max(sec, 1e-9)}
        return [functools.partial(chunk, k) for k in range(len(plan))]

    def _cpu_chunk_runner(self, ids, bounds, cum, sample_int, window, negative, alpha, min_alpha, total, threads,
                          chunk_words):
        import numba
        nparts = min(threads or jn.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        guide = noise_guide(cum)
        w_in, w_out = self.vectors, self.out_weights.numpy()
        states = (np.arange(nparts, dtype=np.uint64) * np.uint64(7919) + np.uint64(self.seed * 1000003 + 1))
        # big chunks: few barriers between the threads (the progress bar moves once per chunk)
        cuts = _chunk_cuts(bounds, chunk_words or max(MAX_SENTENCE * 8 * nparts, int(bounds[-1]) // 20))
        kept = []

        def run(a, b, pos0):
            old = jn.get_num_threads()
            jn.set_num_threads(nparts)
            try:
                kept.append(int(sg_ns_train_chunk(ids, bounds, a, b, w_in, w_out, cum, guide, sample_int, window,
                                                  negative, alpha, min_alpha, pos0, total, states)))
            finally:
                jn.set_num_threads(old)
        return run, cuts, lambda: sum(kept)

    def _cuda_chunk_runner(self, ids, bounds, cum, sample_int, window, negative, alpha, min_alpha, total, threads,
                           chunk_words):
        n_sent = len(bounds) - 1
        nparts = max(1, threads or min(n_sent, 4096))
        states = (np.arange(nparts, dtype=np.uint64) * np.uint64(7919) + np.uint64(self.seed * 1000003 + 1))
        n_words = int(bounds[-1])
        cuts = _chunk_cuts(bounds, chunk_words or max(n_words, 1))
        maxlen = max(1, int(np.diff(bounds).max())) if n_sent else 1
        d = jn.cuda.to_device            # the corpus and tables once; nothing moves per chunk
        args = [d(a) for a in (ids, bounds)]
        tables = [d(a) for a in (cum, noise_guide(cum), sample_int)]
        st, kept, done = d(states), d(np.zeros(nparts, np.int64)), d(np.zeros(1, np.int64))
        buf, work = jn.cuda.empty((nparts, maxlen), np.int32), jn.cuda.empty((nparts, self.dim), np.float32)
        w_in, w_out = self.embeddings._data, self.out_weights._data

        def run(a, b, pos0):
            _gpu.train_chunk(*args, a, b, w_in, w_out, *tables, window, negative, alpha, min_alpha, pos0, total,
                             st, kept, done, buf, work)
        return run, cuts, lambda: int(jn.cuda.to_host(kept).sum())          # waits for the kernels

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

    def save_text(self, path):
        """Write the embeddings in word2vec's text format; return the path."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{len(self.vocab)} {self.dim}\n")
            for w, row in zip(self.vocab.words, self.vectors):
                f.write(w + " " + " ".join(f"{x:.6f}" for x in row) + "\n")
        return path


def _chunk_cuts(bounds, chunk_words):
    """Return the chunk boundaries (in sentences) of about ``chunk_words`` words each."""
    cuts = [0]
    target = chunk_words
    for s in range(1, len(bounds) - 1):
        if bounds[s] >= target:
            cuts.append(s)
            target = bounds[s] + chunk_words
    cuts.append(len(bounds) - 1)
    return cuts


def warm_fast_kernel(sg):
    """Compile (or load from Numba's disk cache) the fast kernel for ``sg``'s arrays (the CPU's; a GPU's kernel
    compiles at its first launch); returns None."""
    if sg.device.type != "cpu":
        return
    cum = unigram_table(sg.vocab.counts)
    sg_ns_train_chunk(np.zeros(0, np.int32), np.zeros(2, np.int64), 0, 0, sg.vectors, sg.out_weights.numpy(),
                      cum, noise_guide(cum), np.zeros(len(sg.vocab), np.uint32), 1, 1, 0.0, 0.0, 0, 1,
                      np.ones(1, np.uint64))


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
        dev = self.embeddings.device          # the batch moves to the model's device before the step
        c = jn.tensor(np.asarray(centers, np.int64), device=dev)
        y_host = jn.tensor(np.asarray(labels, np.int64).reshape(-1, 1))
        y = y_host.to(dev)
        if self.kind == "nce":
            s, te, se = F.log_uniform_candidate_sampler(y_host, 1, self.num_sampled, True, self.vocab_size)
            return self._step(c, y, s.to(dev), te.to(dev), se.to(dev))
        neg = sample_negatives(self.table, (len(centers), self.negative), rng)
        return self._step(c, y, jn.tensor(neg, device=dev))


def train_model(model, ids, epochs=1, batch_size=128, window=5, sample=1e-3, lr_end=None, seed=0,
                progress=None, max_steps=None, bounds=None, rank=0, world_size=1):
    """Train a :class:`SkipGramModel` on subsampled dynamic-window pairs; return the list of step losses.

    The steps are those of :func:`pair_batches` (same arguments); ``progress(loss)`` is called after each.
    """
    losses = []
    for centers, labels, rng in pair_batches(model, ids, epochs, batch_size, window, sample, lr_end, seed,
                                             max_steps, bounds, rank, world_size):
        loss = float(model.train_step(centers, labels, rng).item())
        if not math.isfinite(loss):
            raise NonFiniteError(f"skipgram: training diverged: the loss is {loss} at step {len(losses) + 1}; a "
                                 f"smaller learning rate may help")
        losses.append(loss)
        if progress is not None:
            progress(loss)
    return losses


def pair_batches(model, ids, epochs=1, batch_size=128, window=5, sample=1e-3, lr_end=None, seed=0, max_steps=None,
                 bounds=None, rank=0, world_size=1):
    """Yield the inputs (centers, labels, rng) of each training step of a :class:`SkipGramModel`, having set the
    learning rate for that step.

    Each epoch subsamples ``ids``, makes the pairs, shuffles them and cuts steps of ``batch_size``; with
    ``lr_end`` the learning rate decays linearly to it over all steps. With ``world_size`` > 1 (data-parallel,
    the model's optimizer a :class:`jitnet.distributed.DistributedOptimizer`) every rank draws the same pairs
    and order from ``seed`` and trains on its strided share (``batch_size // world_size`` pairs) of each batch.
    """
    rng = np.random.default_rng(seed)
    keep = keep_probabilities(model.sg.vocab.counts, sample)
    step = 0
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
                return
            if lr_end is not None:
                for g in model.opt.param_groups:
                    g["lr"] = lr0 + (lr_end - lr0) * step / max(total, 1)
            idx = perm[i * batch_size:(i + 1) * batch_size]
            if world_size > 1:
                idx = idx[rank::world_size]
            yield c[idx], x[idx], rng
            step += 1
    model.sg._normed = None
