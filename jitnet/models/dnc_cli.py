"""The ``dnc-copy`` and ``dnc-babi`` training commands and the memory plot (the model is :mod:`jitnet.models.dnc`).

    python -m jitnet train dnc-copy [--min-len 1 --max-len 8 --bits 6 --repeat-copy] [--steps N] ...
    python -m jitnet train dnc-babi [--data-dir DIR] [--steps N] ...
"""
from __future__ import annotations

import os

import numpy as np

import jitnet as jn
from jitnet.data import babi as BB
from jitnet.io import encode_png
from ._train import (ArgumentParser, Loop, Round, UsageError, add_device_args, add_nonfinite_args, apply_smoke,
                     format_metrics, setup_device)
from .dnc import BabiModel, CopyModel

__all__ = ["plot_memory", "copy_parser", "run_copy", "babi_parser", "run_babi", "train_dnc_copy", "train_dnc_babi",
           "TRAINERS"]


# ==============================================================================================================
# Plot of the addressing over time
# ==============================================================================================================

def plot_memory(trace, path, index=0, inputs=None, outputs=None):
    """Save a figure of memory usage, write weights and read weights (rows: memory locations, columns:
    time steps) of sequence ``index`` of a ``DNC(..., return_trace=True)`` trace; return ``path``.

    With matplotlib installed the panels are titled heat maps (inputs and outputs (B, T, C) are added when
    given); without it the panels are stacked into one grayscale PNG (white = 1) by ``jitnet.io.encode_png``.
    """
    get = lambda k: np.asarray(trace[k].numpy() if isinstance(trace[k], jn.Tensor) else trace[k])  # noqa: E731
    usage = get("usage")[:, index].T                       # (N, T)
    ww = get("write_weights")[:, index].T
    wr = get("read_weights")[:, index]                      # (T, R, N)
    panels = [("usage", usage), ("write weights", ww)]
    panels += [(f"read weights, head {r}", wr[:, r].T) for r in range(wr.shape[1])]
    extra = [(n, np.asarray(a.numpy() if isinstance(a, jn.Tensor) else a)[index].T)
             for n, a in (("inputs", inputs), ("outputs", outputs)) if a is not None]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        T = usage.shape[1]
        gap = np.full((1, T), 0.5)
        rows = []
        for _, p in extra + panels:
            p = np.asarray(p, np.float64)
            if p.shape[1] != T:
                continue
            lo, hi = float(p.min()), float(p.max())
            rows += [(p - lo) / (hi - lo) if hi > 1 or lo < 0 else p, gap]
        img = np.concatenate(rows[:-1], axis=0)
        with open(path, "wb") as f:
            f.write(encode_png(np.kron(img, np.ones((6, max(2, 640 // max(T, 1)))))))
        return path
    allp = extra + panels
    fig, axes = plt.subplots(len(allp), 1, figsize=(10, 1.6 * len(allp) + 1), sharex=True, squeeze=False)
    for ax, (name, p) in zip(axes[:, 0], allp):
        im = ax.imshow(p, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0 if name not in ("inputs", "outputs") else None)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("location" if name not in ("inputs", "outputs") else "channel")
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("time step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ==============================================================================================================
# Training commands
# ==============================================================================================================

def _parser(prog, description, *, steps, batch_size, lr, hidden, memory, word, reads):
    p = ArgumentParser(prog=f"python -m jitnet train {prog}", description=description)
    add_nonfinite_args(p)
    add_device_args(p)
    p.add_argument("--steps", type=int, default=steps, help=f"training steps to reach (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"sequences per step (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--optimizer", default="adam", choices=["adam", "rmsprop"],
                   help="adam, or rmsprop with momentum 0.9 as in the paper (default adam)")
    p.add_argument("--clip", type=float, default=10.0, help="clip gradients to this global norm (0: off)")
    p.add_argument("--hidden", type=int, default=hidden, help=f"controller LSTM units (default {hidden})")
    p.add_argument("--memory-size", type=int, default=memory, help=f"memory locations N (default {memory})")
    p.add_argument("--word-size", type=int, default=word, help=f"memory word size W (default {word})")
    p.add_argument("--reads", type=int, default=reads, help=f"read heads R (default {reads})")
    p.add_argument("--composed", action="store_true",
                   help="run the memory step as separate jitnet ops instead of the fused kernel")
    p.add_argument("--eval-every", type=int, default=500, help="evaluate and checkpoint every N steps")
    p.add_argument("--logdir", default=None, help=f"TensorBoard events, metrics.csv, checkpoints/ and the memory "
                                                  f"plot go here (default runs/{prog})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --logdir")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--no-jit", action="store_true", help="run the steps eagerly instead of under jitnet.jit")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not save the memory plot")
    return p


def _fit_steps(model, args, name, logdir, next_batch, evaluate):
    """Train ``model`` to ``args.steps`` steps, evaluating, logging and saving every ``args.eval_every``; return
    the last metrics (the shared :class:`~jitnet.models._train.Loop`, one round per evaluation)."""
    loop = Loop(name, model, logdir, args, eval_prefix="eval/")

    def rounds():
        while loop.step < args.steps:
            n = min(args.eval_every, args.steps - loop.step)
            yield Round((next_batch() for _ in range(n)), n, f"{name} steps {loop.step + 1}-{loop.step + n}")

    def report(lp, m):
        shown = {"train_loss": lp.train_loss, **m}
        rate = lp.round_steps / lp.round_seconds
        row = {"step": lp.step, **shown, "seconds": lp.round_seconds, "steps_per_s": rate}
        return row, f"{name} step {lp.step}/{args.steps}: {format_metrics(shown)}, {rate:.1f} steps/s"

    return loop.run(lambda batch: model.train_step(*batch), rounds(), evaluate=evaluate, report=report,
                    log_every=50)


def _setup(args):
    if args.threads:
        jn.set_num_threads(args.threads)
    jn.random.seed(args.seed)
    return np.random.default_rng(args.seed)


def copy_parser():
    """Return the argument parser of ``python -m jitnet train dnc-copy``."""
    p = _parser("dnc-copy", "Train a DNC on the copy (or repeat-copy) task of random binary vectors.",
                steps=3000, batch_size=16, lr=1e-3, hidden=64, memory=16, word=16, reads=1)
    p.add_argument("--bits", type=int, default=6, help="bits per vector (default 6)")
    p.add_argument("--min-len", type=int, default=1, help="shortest training sequence (default 1)")
    p.add_argument("--max-len", type=int, default=8, help="longest training sequence (default 8)")
    p.add_argument("--repeat-copy", action="store_true", help="the repeat-copy task instead of copy")
    p.add_argument("--max-repeats", type=int, default=3, help="repeat-copy: most repeats (default 3)")
    p.add_argument("--eval-batches", type=int, default=4, help="batches per length at evaluation (default 4)")
    return p


def run_copy(argv=None):
    """Train the copy command with ``argv``; return the final metrics (bit error per length included)."""
    args = apply_smoke(copy_parser().parse_args(argv), steps=2, eval_every=2, batch_size=2, hidden=2, memory_size=3,
                       word_size=2, reads=1, bits=2, min_len=1, max_len=1, eval_batches=1, no_plot=True)
    dev = setup_device(args)
    name = "dnc-repeat-copy" if args.repeat_copy else "dnc-copy"
    logdir = args.logdir or os.path.join("runs", name)
    rng = _setup(args)
    model = CopyModel(args.bits, args.hidden, args.memory_size, args.word_size, args.reads, args.repeat_copy,
                      args.lr, args.optimizer, args.clip, jit=not args.no_jit, fused=not args.composed)
    model.to(dev)
    print(f"{name}: DNC({model.net.extra_repr()}), {model.net.num_parameters()} parameters; lengths "
          f"{args.min_len}-{args.max_len}, batch {args.batch_size}", flush=True)
    probe = model.batch(rng, args.batch_size, args.min_len, args.max_len, max_repeats=args.max_repeats)
    T = probe[0].shape[1]
    eval_rng = np.random.default_rng(args.seed + 1)
    lengths = list(range(args.min_len, args.max_len + 1))

    def next_batch():
        return model.batch(rng, args.batch_size, args.min_len, args.max_len, length=T, max_repeats=args.max_repeats)

    def evaluate():
        errs = model.evaluate(eval_rng, lengths, args.batch_size, args.eval_batches, args.max_repeats, length=T)
        out = {"bit_error": float(np.mean(list(errs.values()))), "worst_bit_error": float(max(errs.values()))}
        out.update({f"bit_error_len{L}": float(e) for L, e in errs.items()})
        return out

    m = _fit_steps(model, args, name, logdir, next_batch, evaluate)
    if not args.no_plot:
        x, y, mask = model.batch(eval_rng, 1, args.max_len, args.max_len, length=T, max_repeats=args.max_repeats)
        with jn.no_grad():
            logits, trace = model.net(jn.tensor(x), return_trace=True)
        path = plot_memory(trace, os.path.join(logdir, "memory.png"), inputs=x,
                           outputs=1.0 / (1.0 + np.exp(-logits.numpy())))
        print(f"{name}: memory plot {path}", flush=True)
    return m


def train_dnc_copy(argv=None):
    """``python -m jitnet train dnc-copy``: train on copy / repeat-copy; return the exit code."""
    run_copy(argv)
    return 0


def babi_parser():
    """Return the argument parser of ``python -m jitnet train dnc-babi``."""
    p = _parser("dnc-babi", "Train a DNC on bAbI question answering (the real files when found, else generated "
                "single-supporting-fact stories).", steps=2000, batch_size=16, lr=1e-3, hidden=64, memory=32,
                word=16, reads=2)
    p.add_argument("--task", type=int, default=1, help="bAbI task 1..20 (default 1)")
    p.add_argument("--data-dir", default=None, help="a qa*.txt file or a directory holding the bAbI files")
    p.add_argument("--download", action="store_true", help="download the bAbI release when it is not found")
    p.add_argument("--generated", type=int, default=None,
                   help="train on N generated task-1 stories instead of the files (test: N // 5)")
    p.add_argument("--max-tokens", type=int, default=400, help="drop stories longer than this (default 400)")
    p.add_argument("--story-questions", type=int, default=5,
                   help="questions per generated story (default 5; the stories grow with them)")
    p.add_argument("--pad-multiple", type=int, default=8,
                   help="pad every story to a multiple of this many steps (default 8; one compiled length)")
    return p


def run_babi(argv=None):
    """Train the bAbI command with ``argv``; return the final metrics (answer accuracy included)."""
    args = apply_smoke(babi_parser().parse_args(argv), steps=2, eval_every=2, batch_size=1, hidden=2, memory_size=3,
                       word_size=2, reads=1, generated=2, story_questions=1, pad_multiple=1,
                       max_tokens=400, no_plot=True)
    dev = setup_device(args)
    name = "dnc-babi"
    logdir = args.logdir or os.path.join("runs", name)
    rng = _setup(args)
    train = test = None
    if args.generated is None:
        train = BB.babi_stories(args.task, "train", args.data_dir, args.download)
        test = BB.babi_stories(args.task, "test", args.data_dir, args.download) if train is not None else None
    if train is None or test is None:
        n = args.generated or 1000
        if args.generated is None:
            print(f"{name}: bAbI task {args.task} files not found (give --data-dir, $JITNET_DATA or --download); "
                  f"using {n} generated single-supporting-fact stories", flush=True)
        train = BB.generated_babi_stories(n, seed=args.seed, questions_per_story=args.story_questions)
        test = BB.generated_babi_stories(max(n // 5, 1), seed=args.seed + 10_000,
                                         questions_per_story=args.story_questions)
        source = f"generated task 1 ({n} stories)"
    else:
        source = f"bAbI task {args.task}"
    vocab = BB.BabiVocab.build(train, test)
    tr = BB.encode_stories(train, vocab, args.max_tokens)
    te = BB.encode_stories(test, vocab, args.max_tokens)
    if not tr or not te:
        raise SystemExit(f"{name}: no story of at most {args.max_tokens} tokens")
    if args.pad_multiple < 1:
        raise UsageError(f"--pad-multiple {args.pad_multiple}: must be at least 1")
    T = max(BB.pad_length(tr, args.pad_multiple), BB.pad_length(te, args.pad_multiple))
    model = BabiModel(len(vocab), args.hidden, args.memory_size, args.word_size, args.reads, args.lr,
                      args.optimizer, args.clip, jit=not args.no_jit, fused=not args.composed)
    model.to(dev)
    print(f"{name}: {source}: {len(tr)} train / {len(te)} test stories, vocabulary {len(vocab)}, padded length "
          f"{T}; DNC({model.net.extra_repr()}), {model.net.num_parameters()} parameters", flush=True)
    it = [iter(())]

    def next_batch():
        for _ in range(2):
            try:
                return next(it[0])
            except StopIteration:
                it[0] = BB.babi_batches(tr, vocab, args.batch_size, rng, length=T, drop_last=True)
        raise SystemExit(f"{name}: {len(tr)} training stories is less than one batch of {args.batch_size}")

    def evaluate():
        def padded():
            for x, y, mask in BB.babi_batches(te, vocab, args.batch_size, length=T, shuffle=False):
                k = args.batch_size - len(x)
                if k:
                    x = np.concatenate([x, np.zeros((k,) + x.shape[1:], x.dtype)])
                    y = np.concatenate([y, np.zeros((k,) + y.shape[1:], y.dtype)])
                    mask = np.concatenate([mask, np.zeros((k,) + mask.shape[1:], mask.dtype)])
                yield x, y, mask
        return model.evaluate(padded())

    m = _fit_steps(model, args, name, logdir, next_batch, evaluate)
    if not args.no_plot:
        x, _, _ = next(BB.babi_batches(te[:1], vocab, 1, length=T, shuffle=False))
        with jn.no_grad():
            _, trace = model.net(jn.tensor(x), return_trace=True)
        print(f"{name}: memory plot {plot_memory(trace, os.path.join(logdir, 'memory.png'))}", flush=True)
    return m


def train_dnc_babi(argv=None):
    """``python -m jitnet train dnc-babi``: train on bAbI; return the exit code."""
    run_babi(argv)
    return 0


TRAINERS = {"dnc-copy": train_dnc_copy, "dnc-babi": train_dnc_babi}
