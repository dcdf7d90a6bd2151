"""Shared pieces of the training commands: options, datasets, progress bar, checkpoints, logs, the epoch loop.

A model object handed to :func:`fit` provides ``train_step(*batch) -> loss Tensor``, ``evaluate(x, y) ->
dict of metrics``, ``batches(x, y, loader)`` (turns a loader's batches into step inputs), and ``net`` /
``opt`` (the :class:`jitnet.nn.Module` and its optimizer, saved in checkpoints).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import jitnet as jn
from jitnet.data import DataLoader

__all__ = ["base_parser", "learning_rate", "load_dataset", "Progress", "save_checkpoint", "restore_checkpoint",
           "fit", "setup_run"]


def base_parser(prog, description, *, epochs, batch_size, lr, lr_decay=1.0, dataset="default",
                datasets=None):
    """Return an ArgumentParser with the options every training command shares."""
    p = argparse.ArgumentParser(prog=f"python -m jitnet train {prog}", description=description)
    p.add_argument("--dataset", default=dataset,
                   choices=datasets or ["default", "fashion-mnist", "mnist", "cifar10"],
                   help="default: full Fashion-MNIST when found locally, else the embedded subset "
                        f"(default: {dataset})")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files (default: search)")
    p.add_argument("--download", action="store_true", help="download the dataset when it is not found")
    p.add_argument("--epochs", type=int, default=epochs, help=f"total epochs to reach (default {epochs})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"mini-batch size (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--lr-decay", type=float, default=lr_decay,
                   help=f"multiply the learning rate by this each epoch (default {lr_decay})")
    p.add_argument("--device", default="cpu", help="device (only 'cpu' in this build)")
    p.add_argument("--logdir", default=None, help="TensorBoard events, metrics.csv and checkpoints/ go here "
                                                  f"(default runs/{prog})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --logdir")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test examples")
    p.add_argument("--no-jit", action="store_true", help="run the steps eagerly instead of under jitnet.jit")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    return p


def learning_rate(args, n_train):
    """Return args.lr, or an exponential decay by args.lr_decay per epoch of n_train examples."""
    if args.lr_decay == 1.0:
        return args.lr
    steps = max(1, n_train // args.batch_size)
    return jn.optim.schedules.ExponentialDecay(args.lr, steps, args.lr_decay)


def load_dataset(name, data_dir=None, download=False, limit=None, test_limit=None):
    """Return (x_train, y_train, x_test, y_test, source) as float32 NCHW in [0, 1] and int64 labels."""
    from jitnet import data as D
    if name == "default":
        xtr, ytr, src = D.load_default_images("train", path=data_dir, as_float=True)
        xte, yte, _ = D.load_default_images("test", path=data_dir, as_float=True)
    elif name in ("mnist", "fashion-mnist"):
        xtr, ytr = D.load_mnist("train", path=data_dir, kind=name, download=download, as_float=True)
        xte, yte = D.load_mnist("test", path=data_dir, kind=name, download=download, as_float=True)
        src = name
    elif name == "cifar10":
        xtr, ytr = D.load_cifar10("train", path=data_dir, download=download, as_float=True)
        xte, yte = D.load_cifar10("test", path=data_dir, download=download, as_float=True)
        src = "cifar10"
    else:
        raise ValueError(f"unknown dataset {name!r}")
    if limit is not None:
        xtr, ytr = xtr[:limit], ytr[:limit]
    if test_limit is not None:
        xte, yte = xte[:test_limit], yte[:test_limit]
    return xtr, ytr, xte, yte, src


class Progress:
    """A tqdm progress bar over one epoch's steps, or plain periodic prints when tqdm is missing or disabled."""

    def __init__(self, total, desc, enabled=True):
        self.total, self.desc, self.n = total, desc, 0
        self.bar = None
        self._t0 = time.perf_counter()
        self._last = self._t0
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, loss=None):
        """Advance by one step, showing ``loss``; returns None."""
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None and (self.n % 10 == 0 or self.n == self.total):
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= 10 or self.n == self.total:
            self._last = now
            msg = f"{self.desc}: {self.n}/{self.total} steps, {now - self._t0:.1f} s"
            print(msg + (f", loss {loss:.4f}" if loss is not None else ""), flush=True)

    def close(self):
        """Close the bar; returns None."""
        if self.bar is not None:
            self.bar.close()


def save_checkpoint(saver, model, epoch, step):
    """Write model and optimizer state with the epoch and step; return the checkpoint path."""
    state = {"model": dict(model.net.state_dict()), "optimizer": model.opt.state_dict()}
    return saver.save(state, step, metadata={"epoch": str(epoch), "global_step": str(step)})


def restore_checkpoint(path, model):
    """Load model and optimizer state from checkpoint ``path``; return (epoch, step) stored with it."""
    flat = jn.io.load(path)
    meta = jn.io.load_metadata(path) or {}
    net = {k[len("model/"):]: v for k, v in flat.items() if k.startswith("model/")}
    opt = {k[len("optimizer/"):]: v for k, v in flat.items() if k.startswith("optimizer/")}
    model.net.load_state_dict(net)
    model.opt.load_state_dict(opt)
    return int(meta.get("epoch", 0)), int(meta.get("global_step", int(model.opt.global_step.item())))


def setup_run(args):
    """Apply --device, --threads and --seed; return the log directory."""
    if args.device != "cpu":
        raise SystemExit(f"--device {args.device}: only 'cpu' is available in this build")
    if args.threads:
        jn.set_num_threads(args.threads)
    jn.random.seed(args.seed)
    return args.logdir or os.path.join("runs", getattr(args, "model_name", "model"))


def _fmt(metrics):
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def fit(model, args, data, logdir, name):
    """Train ``model`` for ``args.epochs`` epochs with evaluation, checkpoints and logs; return the last metrics.

    ``data`` is (x_train, y_train, x_test, y_test). With ``args.resume`` training continues from the latest
    checkpoint in ``logdir/checkpoints`` (model, optimizer, epoch and step).
    """
    xtr, ytr, xte, yte = data
    os.makedirs(logdir, exist_ok=True)
    saver = jn.io.Saver(os.path.join(logdir, "checkpoints"), max_to_keep=args.keep)
    start_epoch, step = 0, 0
    if args.resume:
        path = saver.latest_checkpoint()
        if path is None:
            print(f"{name}: no checkpoint in {saver.directory}, starting from scratch", flush=True)
        else:
            start_epoch, step = restore_checkpoint(path, model)
            print(f"{name}: resumed from {path} (epoch {start_epoch}, step {step})", flush=True)
    loader = DataLoader((xtr, ytr), batch_size=args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"{name}: {len(xtr)} training examples is less than one batch of {args.batch_size}")
    writer = jn.io.SummaryWriter(logdir)
    csv = jn.io.CSVLogger(os.path.join(logdir, "metrics.csv"))
    metrics = {}
    log_every = max(1, min(100, len(loader) // 4))
    try:
        if start_epoch >= args.epochs:
            metrics = model.evaluate(xte, yte)
            print(f"{name}: already trained for {start_epoch} epochs; {_fmt(metrics)}", flush=True)
        for epoch in range(start_epoch, args.epochs):
            loader.set_epoch(epoch)
            bar = Progress(len(loader), f"{name} epoch {epoch + 1}/{args.epochs}", enabled=not args.no_progress)
            t0 = time.perf_counter()
            total, count = 0.0, 0
            for batch in model.batches(loader):
                loss = float(model.train_step(*batch).item())
                step += 1
                total += loss
                count += 1
                bar.update(loss)
                if step % log_every == 0:
                    writer.add_scalar("train/loss", loss, step)
            bar.close()
            seconds = time.perf_counter() - t0
            metrics = {"train_loss": total / max(count, 1)}
            metrics.update(model.evaluate(xte, yte))
            row = {"epoch": epoch + 1, "step": step, **metrics, "epoch_seconds": seconds,
                   "examples_per_s": count * args.batch_size / seconds}
            for k, v in metrics.items():
                writer.add_scalar(("train/" if k.startswith("train") else "test/") + k, v, step)
            writer.add_scalar("train/examples_per_s", row["examples_per_s"], step)
            writer.flush()
            csv.log(row)
            save_checkpoint(saver, model, epoch + 1, step)
            print(f"{name} epoch {epoch + 1}/{args.epochs}: step {step}, {_fmt(metrics)}, {seconds:.1f} s "
                  f"({row['examples_per_s']:.0f} examples/s)", flush=True)
    finally:
        writer.close()
        csv.close()
    metrics["step"] = step
    return metrics
