"""The ``skipgram`` training command: corpora, the evaluation files it looks for, the 2-D plot, and the command
line. The embeddings, the fast path's chunks of sentences and the model path's batches of pairs are
:mod:`jitnet.models.skipgram`; both paths run on the shared :class:`~jitnet.models._train.Loop`.

    python -m jitnet train skipgram --corpus PATH|text8|enwiki-test|lee [--dim 100 --window 5 --negative 5
                                    --min-count 5 --epochs N --threads 2 --fast|--model] --logdir D
"""
from __future__ import annotations

import os
import time

import numpy as np

import jitnet as jn
from jitnet.data import datasets as D
from jitnet.data.word2vec import Vocab, encode_sentences, sentences_from_tokens
from ._train import (ArgumentParser, Loop, Round, UsageError, add_device_args, add_distributed_arg, apply_smoke,
                     setup_device, setup_distributed)
from .skipgram import SkipGram, SkipGramModel, pair_batches, warm_fast_kernel

__all__ = ["gensim_test_file", "smoke_corpus", "load_corpus", "pca_2d", "plot_embeddings", "evaluate_all", "train_skipgram",
           "TRAINERS"]


def gensim_test_file(name):
    """Return the path of a file in gensim's bundled test data, or None when gensim is not installed."""
    import importlib.util
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", name)
    return p if os.path.exists(p) else None


ENWIKI_TEST = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def smoke_corpus(n_sentences=16, length=8, seed=0):
    """Return a tiny two-topic corpus (sentences of ``length`` words, each from one of two 6-word topics)."""
    rng = np.random.default_rng(seed)
    topics = [[f"{t}{i}" for i in range(6)] for t in ("sun", "sea")]
    return [list(rng.choice(topics[k % 2], length)) for k in range(n_sentences)]


def load_corpus(name):
    """Return (sentences as token lists, description) for text8, enwiki-test, lee, smoke (:func:`smoke_corpus`)
    or a plain-text file path.

    Files go through text8-style preprocessing (markup stripped, lowercase letters only). A file with several
    lines keeps each line as a sentence; long sentences are cut at 10,000 words.
    """
    if name == "text8":
        return sentences_from_tokens(D.load_text8()), "text8"
    if name == "smoke":
        return smoke_corpus(), "smoke (a tiny built-in corpus)"
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



def pca_2d(x):
    """Return the projection (N, 2) of the rows of ``x`` on their first two principal components."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def plot_embeddings(sg, path, max_words=300):
    """Save a 2-D PCA scatter of the most frequent words of SkipGram ``sg`` to ``path``; return the path or None
    without matplotlib."""
    n = min(max_words, len(sg.vocab))
    xy = pca_2d(sg.normalized()[:n])
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
        ax.annotate(sg.vocab.words[i], xy[i], fontsize=7)
    ax.set_title("skip-gram embeddings, first two principal components")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parser():
    p = ArgumentParser(prog="python -m jitnet train skipgram",
                       description="Train skip-gram word2vec embeddings and evaluate them.")
    p.add_argument("--corpus", default="enwiki-test",
                   help="text8 | enwiki-test | lee (gensim's test data) | smoke (tiny, built in) | path of a text "
                        "file")
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
    add_device_args(p)
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
    args = apply_smoke(_parser().parse_args(argv), corpus="smoke", dim=8, window=2, negative=2, min_count=1,
                       epochs=1, num_sampled=4, batch_size=8, max_steps=2, sample=0.0, no_plot=True)
    device = setup_device(args)
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
    if device.type != "cpu":
        sg.to(device)                     # the matrices live on the device; the corpus follows once
    if args.path == "fast":
        warm_fast_kernel(sg)              # compile (or load from the disk cache) before timing
        chunks = sg.fast_chunks(ids, bounds, raw, epochs=args.epochs, window=args.window, negative=args.negative,
                                alpha=args.alpha or 0.025, min_alpha=args.min_alpha, sample=args.sample,
                                threads=args.threads)
        stats = {"words": 0, "effective_words": 0, "seconds": 0.0, "words_per_s": 0.0}    # (--epochs 0)
        loop = Loop("skipgram", None, None, args, unit="chunk")     # a step trains one chunk of sentences
        loop.run(lambda chunk: stats.update(chunk()), [Round(chunks, len(chunks), "skipgram (fast)")])
        print(f"skipgram: {args.epochs} epochs, {stats['words']} words in {stats['seconds']:.1f} s: "
              f"{stats['words_per_s']:,.0f} words/s ({stats['effective_words']} after subsampling)", flush=True)
    else:
        if args.threads:
            jn.set_num_threads(args.threads)
        model = SkipGramModel(sg, loss=args.loss, num_sampled=args.num_sampled, negative=args.negative,
                              lr=args.alpha or 1.0)
        # on several ranks the loop gives every rank rank 0's initial vectors (a DistributedOptimizer)
        loop = Loop("skipgram", model, None, args, hint="A smaller --alpha may help")
        steps = int(bounds[-1]) * args.window // args.batch_size * args.epochs      # about: pairs are drawn
        if args.max_steps:
            steps = min(steps, args.max_steps)
        batches = pair_batches(model, ids, args.epochs, args.batch_size, args.window, args.sample,
                               lr_end=(args.alpha or 1.0) * 0.01, seed=args.seed, max_steps=args.max_steps,
                               bounds=bounds, rank=args.rank, world_size=world)
        t1 = time.perf_counter()
        loop.run(lambda batch: model.train_step(*batch), [Round(batches, steps, f"skipgram (model, {args.loss})")])
        sec = time.perf_counter() - t1
        losses = loop.losses
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
        p = plot_embeddings(sg, os.path.join(logdir, "pca.png"))
        if p:
            print(f"skipgram: plot {p}", flush=True)
    return 0



TRAINERS = {"skipgram": train_skipgram}
