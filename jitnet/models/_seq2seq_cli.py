"""The ``seq2seq-dates`` and ``seq2seq-reverse`` commands: options, the training run on the shared loop
(:class:`~jitnet.models._train.Loop`: evaluation, checkpoints, TensorBoard/CSV logs, resume, non-finite stop)
with an early stop at a target exact match, decoded samples and attention plots.

    python -m jitnet train seq2seq-dates   [--epochs N --hidden 64 --batch-size 64 --cell lstm|gru ...]
    python -m jitnet train seq2seq-reverse [...]

The model and its trainer are :mod:`jitnet.models.seq2seq` (:class:`Seq2Seq`, :class:`Seq2SeqTrainer`).

``--device cuda`` trains on the GPU: the network and Adam's state live there and each batch moves there once,
before its step; the loop then reads one scalar per step (the loss, for the progress bar and the non-finite
guard) and the gradient norm every 20 steps (TensorBoard). Evaluation decodes on the device and reads the
tokens back. ``--smoke`` trains a 4-unit model for two steps on 8 pairs (a check of an install or a device).
"""
from __future__ import annotations

import os

import numpy as np

import jitnet as jn
from jitnet.data import seq_tasks as T
from ._train import (ArgumentParser, Loop, Round, UsageError, add_device_args, add_nonfinite_args, apply_smoke,
                     setup_device)
from ._seq2seq_trainer import Seq2SeqTrainer
from .seq2seq import Seq2Seq

__all__ = ["plot_attention", "ascii_attention", "show_samples", "build", "fit", "run_dates", "run_reverse",
           "dates_parser", "reverse_parser", "train_seq2seq_dates", "train_seq2seq_reverse", "TRAINERS"]


def plot_attention(weights, src_tokens, out_tokens, path, title=None):
    """Save a heat map of attention ``weights`` (T, S) with source tokens on x and outputs on y; return path.

    Returns None (after printing why) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("seq2seq: matplotlib is not installed, skipping the attention plot (pip install matplotlib)",
              flush=True)
        return None
    w = np.asarray(weights)[:len(out_tokens), :len(src_tokens)]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(src_tokens) + 2), max(3, 0.35 * len(out_tokens) + 1.5)))
    im = ax.imshow(w, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(w.max()), 1e-6))
    ax.set_xticks(range(len(src_tokens)))
    ax.set_xticklabels([repr(c)[1:-1] if c != " " else "␣" for c in src_tokens], fontsize=8)
    ax.set_yticks(range(len(out_tokens)))
    ax.set_yticklabels(out_tokens, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ascii_attention(weights, src_tokens, out_tokens):
    """Return the attention weights (T, S) as a text heat map (one character per cell, darker = larger)."""
    shades = " .:-=+*#%@"
    w = np.asarray(weights)[:len(out_tokens), :len(src_tokens)]
    lines = ["     " + "".join(c if c != " " else "_" for c in src_tokens)]
    for o, wt in zip(out_tokens, w):           # (an output of max_len tokens has no row for its end mark)
        row = "".join(shades[min(int(x * (len(shades) - 1) + 0.5), len(shades) - 1)] for x in wt)
        lines.append(f"{o:>4} {row}")
    return "\n".join(lines)


# ==============================================================================================================
# Training commands
# ==============================================================================================================


def _parser(name, description, *, epochs, batch_size, lr, hidden, embed, target):
    p = ArgumentParser(prog=f"python -m jitnet train {name}", description=description)
    add_nonfinite_args(p)
    add_device_args(p)
    p.add_argument("--train-size", type=int, default=None, help="training examples (default: the task's)")
    p.add_argument("--test-size", type=int, default=None, help="held-out test examples (default: the task's)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"maximum epochs (default {epochs})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr})")
    p.add_argument("--clip-norm", type=float, default=5.0, help="clip gradients to this global norm (default 5)")
    p.add_argument("--embed", type=int, default=embed, help=f"embedding size (default {embed})")
    p.add_argument("--hidden", type=int, default=hidden, help=f"encoder/decoder units (default {hidden})")
    p.add_argument("--layers", type=int, default=1, help="recurrent layers in the encoder and decoder (default 1)")
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm", help="recurrent cell (default lstm)")
    p.add_argument("--attention-units", type=int, default=None, help="attention units (default: --hidden)")
    p.add_argument("--reverse-source", action="store_true", help="read each source sequence reversed")
    p.add_argument("--num-sampled", type=int, default=0,
                   help="sampled softmax with this many candidates (default 0: full softmax)")
    p.add_argument("--buckets", type=int, default=3, help="source length buckets (compiled shapes, default 3)")
    p.add_argument("--target", type=float, default=target,
                   help=f"stop once the held-out exact match reaches this (default {target}; 0: never)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps (default 0: at the end of each epoch)")
    p.add_argument("--eval-batch", type=int, default=256,
                   help="rows per decoding batch (every batch is padded to it: one compiled decoder; default 256)")
    p.add_argument("--beam", type=int, default=4, help="beam width of the decoded samples (default 4; 0: none)")
    p.add_argument("--samples", type=int, default=6, help="decoded test samples to print (default 6)")
    p.add_argument("--seed", type=int, default=0, help="data and initialization seed (default 0)")
    p.add_argument("--logdir", default=None, help=f"TensorBoard events, metrics.csv, checkpoints/ and the "
                                                  f"attention plot (default runs/{name})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --logdir")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--no-plot", action="store_true", help="skip the attention heat map")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--no-jit", action="store_true", help="run the steps eagerly")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    return p


def build(task, args):
    """Return the :class:`Seq2SeqTrainer` (with its :class:`Seq2Seq`) that ``args`` describe for ``task``."""
    net = Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=args.embed, hidden=args.hidden,
                  layers=args.layers, cell=args.cell, attention_units=args.attention_units,
                  reverse_source=args.reverse_source)
    return Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, lr=args.lr, clip_norm=args.clip_norm,
                          num_sampled=args.num_sampled, max_len=task.max_target_len, eval_batch=args.eval_batch,
                          jit=not args.no_jit, device=getattr(args, "device_obj", None))


def fit(trainer, task, args, name):
    """Train on ``task`` with evaluation, early stop at ``args.target``, checkpoints and logs; return metrics.

    Returns the last evaluation's metrics plus "step", "epochs", "train_seconds" (the clock stops while
    evaluating) and "reached_target_s" (training seconds when the target was first reached, else None).
    """
    logdir = args.logdir or os.path.join("runs", name)
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    batcher = T.BucketBatcher(src, tgt, args.batch_size, n_buckets=args.buckets, seed=args.seed)
    if len(batcher) == 0:
        raise SystemExit(f"{name}: {len(src)} training examples make no full batch of {args.batch_size}")
    loop = Loop(name, trainer, logdir, args)
    reached = None

    def evaluate():
        nonlocal reached
        m = trainer.evaluate(task.test)
        if reached is None and args.target and m["exact_match"] >= args.target:
            reached = loop.train_seconds
            loop.stop()
        return m

    def report(lp, m):
        row = {"epoch": lp.epoch, "step": lp.step, "train_seconds": round(lp.train_seconds, 3), **m}
        return row, (f"{name} epoch {lp.epoch}: step {lp.step}, train loss {lp.train_loss:.4f}, held-out exact "
                     f"match {m['exact_match']:.4f} (char accuracy {m['char_accuracy']:.4f}), "
                     f"{lp.train_seconds:.1f} s training")

    def step(batch):
        loss, norm = trainer.train_step(batch)
        return {"loss": loss, "grad_norm": norm}          # the norm is read only when logged

    rounds = (Round(batcher.batches(e), len(batcher), f"{name} epoch {e + 1}/{args.epochs}", e + 1)
              for e in range(loop.epoch, args.epochs))
    metrics = loop.run(step, rounds, evaluate=evaluate, eval_every=args.eval_every, report=report, log_every=20,
                       max_steps=args.max_steps)
    metrics.update(epochs=loop.epoch, train_seconds=loop.train_seconds, reached_target_s=reached, logdir=logdir,
                   test_src_len=max(len(s) for s in task.test.sources))
    return metrics


def show_samples(trainer, task, n=6, beam=4, plot_path=None):
    """Print ``n`` held-out sources with their greedy and beam decodings, and an attention map of the first."""
    srcs, tgts = task.test.sources[:n], task.test.targets[:n]
    if not srcs:
        return None
    greedy, weights = trainer.greedy_decode(srcs, return_weights=True)
    beams = trainer.beam_decode(srcs, beam_size=beam) if beam else [None] * len(srcs)
    for s, t, g, b in zip(srcs, tgts, greedy, beams):
        mark = "ok " if g == t else "BAD"
        extra = f"   beam{beam}: {b!r}" if b is not None else ""
        print(f"  [{mark}] {s!r:34} -> {g!r:14} (target {t!r}){extra}", flush=True)
    src_toks = list(srcs[0][::-1] if trainer.net.reverse_source else srcs[0])
    out_toks = list(greedy[0]) + ["</s>"]
    print(ascii_attention(weights[0], src_toks, out_toks), flush=True)
    if plot_path:
        p = plot_attention(weights[0], src_toks, out_toks, plot_path, title=f"{srcs[0]!r} -> {greedy[0]!r}")
        if p:
            print(f"seq2seq: attention heat map written to {p}", flush=True)
        return p
    return None


def _run(name, args, task):
    if args.threads:
        jn.set_num_threads(args.threads)
    jn.random.seed(args.seed)
    trainer = build(task, args)
    print(f"{name}: {len(task.train)} training / {len(task.test)} held-out pairs; vocabularies "
          f"{len(task.src_vocab)} -> {len(task.tgt_vocab)}; {trainer.net.extra_repr()}", flush=True)
    m = fit(trainer, task, args, name)
    reached = (f"reached {args.target:.0%} after {m['reached_target_s']:.1f} s of training"
               if m["reached_target_s"] is not None else f"did not reach {args.target:.0%}")
    print(f"{name}: held-out exact match {m['exact_match']:.4f} after {m['step']} steps; {reached}", flush=True)
    plot = None if args.no_plot else os.path.join(m["logdir"], "attention.png")
    show_samples(trainer, task, args.samples, args.beam, plot)
    return trainer, m


#: what ``--smoke`` sets: a few steps of a tiny model on the smallest data, one short evaluation
SMOKE = dict(train_size=8, test_size=2, epochs=1, max_steps=2, batch_size=4, embed=4, hidden=4, buckets=1,
             eval_batch=2, beam=0, samples=1, no_plot=True, target=0.0)


def _setup(parser, argv):
    """Parse ``argv``, apply ``--smoke`` and check ``--device`` (stored as ``args.device_obj``)."""
    args = apply_smoke(parser.parse_args(argv), **SMOKE)
    args.device_obj = setup_device(args)
    return args


def dates_parser():
    """Return the ArgumentParser of ``python -m jitnet train seq2seq-dates``."""
    p = _parser("seq2seq-dates", "Seq2seq with attention: human-written dates -> ISO YYYY-MM-DD "
                "(character level, held-out dates and format/month pairs)", epochs=20, batch_size=64,
                lr=2e-3, hidden=64, embed=32, target=0.99)
    p.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                   help="write the dates in only these formats, by name (quoted: 'd MMM yyyy') or index in "
                        "jitnet.data.seq_tasks.DATE_FORMATS (default: all)")
    return p


def reverse_parser():
    """Return the ArgumentParser of ``python -m jitnet train seq2seq-reverse``."""
    p = _parser("seq2seq-reverse", "Seq2seq with attention: reverse random letter strings", epochs=10,
                batch_size=64, lr=2e-3, hidden=64, embed=16, target=0.99)
    p.add_argument("--min-len", type=int, default=3)
    p.add_argument("--max-len", type=int, default=12)
    p.add_argument("--alphabet", default="abcdefghijklmnopqrstuvwxyz")
    return p


def run_dates(argv=None):
    """Train on the date task with the options in argv; return (trainer, final metrics)."""
    # --smoke: the shortest dates (6-8 characters; every target is 11 tokens), two batches of 2
    args = apply_smoke(_setup(dates_parser(), argv), formats=["m/d/yy"], train_size=4, batch_size=2, hidden=2,
                       embed=2)
    formats = None if args.formats is None else [int(f) if f.isdigit() else f for f in args.formats]
    names = [n for n, _ in T.DATE_FORMATS]
    for f in formats or ():
        if not (0 <= f < len(names) if isinstance(f, int) else f in names):
            raise UsageError(f"--formats: no date format {f!r}; the formats are {', '.join(map(repr, names))} "
                             f"(or their indices 0-{len(names) - 1})")
    task = T.date_task(args.train_size or 20000, args.test_size or 2000, seed=args.seed, formats=formats)
    return _run("seq2seq-dates", args, task)


def run_reverse(argv=None):
    """Train on the reversal task with the options in argv; return (trainer, final metrics)."""
    args = apply_smoke(_setup(reverse_parser(), argv), min_len=1, max_len=2, alphabet="abc")
    task = T.reverse_task(args.train_size or 10000, args.test_size or 1000, args.min_len, args.max_len,
                          args.alphabet, seed=args.seed)
    return _run("seq2seq-reverse", args, task)


def train_seq2seq_dates(argv=None):
    """Command ``seq2seq-dates``; return the exit code."""
    run_dates(argv)
    return 0


def train_seq2seq_reverse(argv=None):
    """Command ``seq2seq-reverse``; return the exit code."""
    run_reverse(argv)
    return 0


TRAINERS = {"seq2seq-dates": train_seq2seq_dates, "seq2seq-reverse": train_seq2seq_reverse}
