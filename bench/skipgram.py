"""Skip-gram word2vec: jitnet's fast (Hogwild Numba) path vs gensim's Word2Vec(sg=1, hs=0, negative=K).

    python bench/skipgram.py [--corpus enwiki-test|lee|text8|PATH] [--epochs 5] [--threads 2] [--dim 100]
                             [--window 5] [--negative 5] [--min-count 5] [--sample 1e-3] [--seeds 0 1]
                             [--order alternate] [--json out.json]

Both train on the same sentences (text8-style preprocessing, 10,000-word sentences), with the same
vocabulary rule, dimensions, window, negatives, subsampling threshold, learning-rate schedule
(0.025 -> 0.0001, linear), epochs and number of threads/workers. Words/s counts the words of the corpus
(before vocabulary filtering and subsampling, as gensim's raw word count does) times epochs, divided by the
training time; vocabulary building is timed apart for both, and jitnet's encoding of the corpus into ids is
counted in its training time. jitnet's kernel is compiled (or loaded from the disk cache) before timing.
Quality: Spearman on wordsim353 and simlex999, analogy accuracy, all with coverage, computed by the same
evaluation code on both models' vectors (gensim's own evaluate_word_pairs is printed for reference).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump, table  # noqa: E402

import jitnet as jn  # noqa: E402
from jitnet.data import word2vec as W  # noqa: E402
from jitnet.data import word_eval as E  # noqa: E402
from jitnet.models import skipgram as S  # noqa: E402
from jitnet.models import skipgram_cli as CLI  # noqa: E402


def run_jitnet(sentences, a, seed):
    """Return (metrics row, SkipGram) for jitnet's fast path."""
    t0 = time.perf_counter()
    vocab = W.Vocab.build(sentences, a.min_count)
    t_vocab = time.perf_counter() - t0
    sg = S.SkipGram(vocab, a.dim, seed=seed, init=a.init)
    # compile / load the kernel from the disk cache, untimed
    S.warm_fast_kernel(sg)
    t0 = time.perf_counter()
    ids, bounds, raw = W.encode_sentences(vocab, sentences)
    t_enc = time.perf_counter() - t0
    st = sg.train_fast(ids, bounds, raw, epochs=a.epochs, window=a.window, negative=a.negative, alpha=0.025,
                       min_alpha=0.0001, sample=a.sample, threads=a.threads)
    sec = st["seconds"] + t_enc
    return {"lib": "jitnet", "seed": seed, "vocab": len(vocab), "vocab_s": t_vocab, "train_s": sec,
            "words_per_s": raw * a.epochs / sec}, sg


def run_gensim(sentences, a, seed):
    """Return (metrics row, (normalized vectors, key_to_index, model)) for gensim's Word2Vec."""
    from gensim.models import Word2Vec
    m = Word2Vec(vector_size=a.dim, window=a.window, min_count=a.min_count, sg=1, hs=0, negative=a.negative,
                 sample=a.sample, workers=a.threads, epochs=a.epochs, seed=seed, alpha=0.025, min_alpha=0.0001)
    t0 = time.perf_counter()
    m.build_vocab(sentences)
    t_vocab = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, raw = m.train(sentences, total_examples=len(sentences), epochs=a.epochs)
    sec = time.perf_counter() - t0
    kv = m.wv
    normed = kv.get_normed_vectors()
    return {"lib": "gensim", "seed": seed, "vocab": len(kv), "vocab_s": t_vocab, "train_s": sec,
            "words_per_s": raw / sec}, (normed, kv.key_to_index, m)


def quality(normed, index, row):
    """Add wordsim353 / simlex999 Spearman and analogy accuracy (with coverage) to ``row``; return it."""
    for key, fname in (("ws353", "wordsim353.tsv"), ("simlex", "simlex999.txt")):
        r = E.similarity_score(normed, index, E.read_similarity_file(CLI.gensim_test_file(fname)))
        row[key] = r["spearman"]
        row[key + "_cov"] = r["coverage"]
    r = E.analogy_score(normed, index, E.read_analogy_file(CLI.gensim_test_file("questions-words.txt")))
    row["analogy"] = r["accuracy"]
    row["analogy_cov"] = r["coverage"]
    return row


def main(argv=None):
    """Run the comparison; print the table and the ratios; return the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="enwiki-test")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negative", type=int, default=5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sample", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--init", default="gensim", choices=["gensim", "word2vec"],
                   help="input-vector initialisation: gensim's uniform(-1/D, 1/D) (the peer's) or word2vec.c's")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    jn.set_num_threads(a.threads)
    t0 = time.perf_counter()
    sentences, src = CLI.load_corpus(a.corpus)
    n_words = sum(len(s) for s in sentences)
    print(f"corpus {src}: {n_words} words, {len(sentences)} sentences, loaded in {time.perf_counter() - t0:.1f} s;"
          f" dim {a.dim}, window {a.window}, negative {a.negative}, min_count {a.min_count}, sample {a.sample}, "
          f"epochs {a.epochs}, threads {a.threads}", flush=True)
    rows = []
    for seed in a.seeds:
        # alternate which library goes first so that machine load drifts affect both alike
        order = ("jitnet", "gensim") if seed % 2 == 0 else ("gensim", "jitnet")
        for lib in order:
            if lib == "jitnet":
                row, sg = run_jitnet(sentences, a, seed)
                rows.append(quality(sg.normalized(), sg.vocab.index, row))
            else:
                row, (normed, index, m) = run_gensim(sentences, a, seed)
                ws = m.wv.evaluate_word_pairs(CLI.gensim_test_file("wordsim353.tsv"))
                print(f"  gensim's own evaluate_word_pairs on wordsim353 (seed {seed}): Spearman "
                      f"{ws[1][0]:.4f}, OOV {ws[2]:.1f}%", flush=True)
                rows.append(quality(normed, index, row))
            print(f"  {lib} seed {seed}: {rows[-1]['words_per_s']:,.0f} words/s", flush=True)
    table(rows, title=f"skip-gram, {src}")

    def mean(lib, k):
        return float(np.mean([r[k] for r in rows if r["lib"] == lib]))
    speed = mean("jitnet", "words_per_s") / mean("gensim", "words_per_s")
    summary = {"words_per_s_ratio": speed}
    for k in ("ws353", "simlex", "analogy"):
        summary[k + "_diff"] = mean("jitnet", k) - mean("gensim", k)
    print(f"jitnet / gensim words/s: {speed:.2f}x; jitnet - gensim: wordsim353 {summary['ws353_diff']:+.4f}, "
          f"simlex999 {summary['simlex_diff']:+.4f}, analogies {summary['analogy_diff']:+.4f} "
          f"(means over seeds {a.seeds})", flush=True)
    if a.json:
        dump({"args": vars(a), "rows": rows, "summary": summary}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
