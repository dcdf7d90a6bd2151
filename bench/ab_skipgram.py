"""Skip-gram's CPU training kernel (``kernels_skipgram.sg_ns_train_chunk``) on a fixed synthetic corpus: words/s.

    python bench/ab_skipgram.py [--rounds 10] [--threads 1] [--words 1000000] [--vocab 20000] [--dim 100]
                                [--window 5] [--negative 5] [--sample 1e-3] [--src DIR] [--json out.json]

For an A/B comparison of two commits on an idle machine, run it once against each tree: ``--src DIR`` puts
``DIR`` (a checkout, e.g. ``git worktree add /tmp/sg-old <rev>``) first on the import path, so ``jitnet`` is
that tree's (the line printed first names the file imported). The corpus is the same in every run: word ids
drawn from a Zipf law (exponent 1.1) with a fixed seed, in sentences of 1,000 words, with word2vec's noise
table (counts ** 0.75) and subsampling thresholds computed from the corpus's own counts. Each round trains the
whole corpus once, in chunks as ``SkipGram.train_fast`` cuts it, with the learning rate decaying over all
rounds; the kernel is compiled (or loaded from Numba's cache) before timing. It prints each round's words/s,
the median, and a checksum of the trained rows and generator states (SHA-256 of their bytes): with
``--threads 1`` the kernel is deterministic, so two trees that compute the same thing print the same checksum.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--rounds", type=int, default=10, help="timed passes over the corpus (default 10)")
ap.add_argument("--threads", type=int, default=1, help="parts run in parallel (default 1: deterministic)")
ap.add_argument("--words", type=int, default=1_000_000, help="corpus size in words (default 1,000,000)")
ap.add_argument("--vocab", type=int, default=20_000, help="vocabulary size (default 20,000)")
ap.add_argument("--dim", type=int, default=100)
ap.add_argument("--window", type=int, default=5)
ap.add_argument("--negative", type=int, default=5)
ap.add_argument("--sample", type=float, default=1e-3, help="subsampling threshold (0: keep every word)")
ap.add_argument("--src", help="a jitnet source tree to import instead of the installed one")
ap.add_argument("--json", help="write the per-round results to this file")
a = ap.parse_args()
for name in ("rounds", "threads", "words", "vocab", "dim", "window"):
    if getattr(a, name) < 1:
        ap.error(f"--{name} must be at least 1, got {getattr(a, name)}")
if a.negative < 0 or a.sample < 0:
    ap.error("--negative and --sample must not be negative")
if a.src:
    if not os.path.isdir(os.path.join(a.src, "jitnet")):
        ap.error(f"--src {a.src!r}: no jitnet package in that folder")
    sys.path.insert(0, os.path.abspath(a.src))

import numpy as np  # noqa: E402

import jitnet as jn  # noqa: E402
from jitnet.data import word2vec as W  # noqa: E402
from jitnet.kernels_skipgram import sg_ns_train_chunk  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump  # noqa: E402

SENTENCE = 1000


def corpus(n_words, vocab):
    """Return (ids int32, bounds int64, counts) of the fixed synthetic corpus."""
    rng = np.random.default_rng(12345)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    ids = rng.choice(vocab, n_words, p=p / p.sum()).astype(np.int32)
    bounds = np.append(np.arange(0, n_words, SENTENCE), n_words).astype(np.int64)
    counts = np.maximum(np.bincount(ids, minlength=vocab), 1)
    return ids, bounds, counts


def main():
    print(f"jitnet from {os.path.dirname(jn.__file__)}; {a.threads} thread(s), {a.words:,} words, V={a.vocab}, "
          f"D={a.dim}, window {a.window}, negative {a.negative}, sample {a.sample}")
    ids, bounds, counts = corpus(a.words, a.vocab)
    cum = W.unigram_table(counts)
    guide = W.noise_guide(cum)
    sample_int = W.sample_ints(W.keep_probabilities(counts, a.sample))
    rng = np.random.default_rng(0)
    w_in = ((rng.random((a.vocab, a.dim), dtype=np.float32) - 0.5) / a.dim)
    w_out = np.zeros((a.vocab, a.dim), np.float32)
    jn.set_num_threads(a.threads)
    states = np.arange(a.threads, dtype=np.uint64) * np.uint64(7919) + np.uint64(1)
    n_sent = len(bounds) - 1
    # compile or load the kernel, untimed (on copies: the timed rounds start from the same rows every run)
    sg_ns_train_chunk(ids, bounds, 0, min(2, n_sent), w_in.copy(), w_out.copy(), cum, guide, sample_int, a.window,
                      a.negative, 0.025, 0.0001, 0, 1, states.copy())
    chunk = max(W.MAX_SENTENCE * 8 * a.threads, a.words // 20)        # as SkipGram.train_fast cuts a corpus
    step = max(1, chunk // SENTENCE)                                    # (sentences of one length here)
    cuts = list(range(0, n_sent, step)) + [n_sent]
    total = a.words * a.rounds
    rows = []
    for rnd in range(a.rounds):
        kept = 0
        t0 = time.perf_counter()
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            kept += int(sg_ns_train_chunk(ids, bounds, lo, hi, w_in, w_out, cum, guide, sample_int, a.window,
                                          a.negative, 0.025, 0.0001, rnd * a.words + int(bounds[lo]), total,
                                          states))
        sec = time.perf_counter() - t0
        rows.append({"round": rnd, "seconds": sec, "words_per_s": a.words / sec, "kept": kept})
        print(f"round {rnd}: {a.words / sec:,.0f} words/s ({sec:.3f} s, {kept:,} words kept)")
    med = statistics.median(r["words_per_s"] for r in rows)
    check = hashlib.sha256(w_in.tobytes() + w_out.tobytes() + states.tobytes()).hexdigest()[:16]
    print(f"median: {med:,.0f} words/s over {a.rounds} rounds; checksum of the trained rows {check}")
    dump({"args": vars(a), "rounds": rows, "median_words_per_s": med, "checksum": check}, a.json)


if __name__ == "__main__":
    main()
