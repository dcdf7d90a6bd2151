"""Shared pieces of the training commands: options, datasets, progress bar, checkpoints, logs, the epoch loop.

A model object handed to :func:`fit` provides ``train_step(*batch) -> loss Tensor``, ``evaluate(x, y) ->
dict of metrics``, ``batches(x, y, loader)`` (turns a loader's batches into step inputs), and ``net`` /
``opt`` (the :class:`jitnet.nn.Module` and its optimizer, saved in checkpoints).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
from numba.core import event as _numba_event

import jitnet as jn
from jitnet import data as D
from jitnet import kernelgen
from jitnet import lowp as _lowp
from jitnet.data import DataLoader
from jitnet.compiler.native import NATIVE_AFTER
from jitnet.lazy import LazyModule

__all__ = ["base_parser", "learning_rate", "load_dataset", "Progress", "save_checkpoint", "restore_checkpoint",
           "fit", "setup_run", "ArgumentParser", "UsageError", "NonFiniteError", "NonFiniteGuard",
           "add_nonfinite_args", "compile_notice", "add_device_args", "setup_device", "apply_smoke"]

dist = LazyModule("jitnet.distributed")      # MPI data parallelism, loaded by a distributed run only


class UsageError(Exception):
    """A mistake in the command's options or inputs (a bad path, a bad value): reported in one line, exit 2."""


class NonFiniteError(FloatingPointError):
    """Training stopped on a non-finite loss or state; the message names the step and the last good checkpoint."""


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (and exit 2) that points at ``--help``."""

    def error(self, message):
        """Print ``message`` in one line and exit with status 2; never returns."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """Parse as argparse does; the result also records which options the command line gave
        (``_given``), so ``apply_smoke`` changes only the ones left at their defaults."""
        argv = list(sys.argv[1:] if args is None else args)
        ns, rest = super().parse_known_args(argv, namespace)
        given = set()
        for a in self._actions:
            if any(o == tok or tok.startswith(o + "=") for o in a.option_strings for tok in argv):
                given.add(a.dest)
        ns._given = given
        return ns, rest


def add_nonfinite_args(p):
    """Add ``--skip-nonfinite [N]`` to parser ``p``; return ``p``."""
    p.add_argument("--skip-nonfinite", type=int, nargs="?", const=10, default=None, metavar="N",
                   help="skip a step whose loss or parameters are not finite (the state before it is restored) "
                        "instead of stopping; give up after N such steps in a row (default N: 10)")
    return p


def base_parser(prog, description, *, epochs, batch_size, lr, lr_decay=1.0, dataset="default",
                datasets=None):
    """Return an ArgumentParser with the options every training command shares."""
    p = ArgumentParser(prog=f"python -m jitnet train {prog}", description=description)
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
    add_device_args(p)
    p.add_argument("--logdir", default=None, help="TensorBoard events, metrics.csv and checkpoints/ go here "
                                                  f"(default runs/{prog})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --logdir")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test examples")
    p.add_argument("--no-jit", action="store_true", help="run the steps eagerly instead of under jitnet.jit")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="kernel threads (default: all cores; with --distributed, the cores shared out among the "
                        "ranks on this machine)")
    add_distributed_arg(p)
    add_nonfinite_args(p)
    return p


def add_device_args(p):
    """Add ``--device`` and ``--smoke`` to parser ``p``; return ``p``."""
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (an NVIDIA GPU through numba-cuda; NUMBA_ENABLE_CUDASIM=1 runs Numba's CUDA "
                        "simulator instead: slow, for checking) (default cpu)")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on the smallest data, to check an install or a device in seconds")
    return p


def setup_device(args):
    """Check ``args.device`` ('cpu', 'cuda', 'cuda:N'); return the jn.Device (a UsageError when it is unknown or
    not available, with the reason)."""
    try:
        return jn.device(args.device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--device {args.device}: {e}") from e


def apply_smoke(args, **settings):
    """Under ``--smoke``, set each option in ``settings`` (e.g. ``epochs=1, limit=256``) on ``args`` unless the
    command line gave it (``--smoke --epochs 3`` runs 3 epochs); return args."""
    if getattr(args, "smoke", False):
        given = getattr(args, "_given", set())
        for k, v in settings.items():
            if k not in given:
                setattr(args, k, v)
    return args


def add_distributed_arg(p):
    """Add ``--distributed`` (data-parallel training over MPI) to parser ``p``; return ``p``."""
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel training over MPI: start with mpiexec -n N python -m jitnet train ...; "
                        "--batch-size is the global batch, split over the ranks (on by itself when MPI started "
                        "several processes; needs pip install 'jitnet[mpi]')")
    return p


def _mpi_world_from_env():
    """Return the number of processes an MPI launcher says it started (0 when not started by one)."""
    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE"):
        v = os.environ.get(k)
        if v and v.strip().isdigit():
            return int(v)
    return 0


def _local_ranks():
    """Return how many ranks of the job run on this machine, from the launcher's environment (1 if unknown)."""
    for k in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE",
              "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(k, "").split("(")[0].strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1


def setup_distributed(args):
    """Join the MPI job when ``args.distributed`` is set (or MPI started several processes); set ``args.rank``
    and ``args.world_size``; return the world size. Ranks other than 0 print nothing on stdout."""
    args.rank, args.world_size = 0, 1
    if not getattr(args, "distributed", False):
        if _mpi_world_from_env() <= 1:
            return 1
        args.distributed = True          # mpiexec -n N without the flag: N copies would overwrite each other
    try:
        args.rank, args.world_size = dist.init()
    except RuntimeError as e:
        raise UsageError(f"--distributed: {e}") from e
    local = _local_ranks()
    if args.world_size > 1 and local > 1 and getattr(args, "threads", None) is None:
        # ranks on one machine share its cores: each rank's kernel and BLAS threads, and MPI's busy-polling
        # while a rank waits in a collective, must not outnumber them (default: cores // local ranks)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.threads = max(1, cores // local)
        jn.set_num_threads(args.threads)
    if args.world_size > 1 and args.rank != 0:
        sys.stdout = open(os.devnull, "w")          # one rank speaks; errors still reach stderr
        for flag in ("no_plot", "no_pca"):          # figures and baselines: rank 0's job
            if hasattr(args, flag):
                setattr(args, flag, True)
    if args.rank == 0 and args.world_size > 1:
        print(f"distributed: {args.world_size} ranks (MPI), gradients averaged over them", flush=True)
    return args.world_size


def learning_rate(args, n_train):
    """Return args.lr, or an exponential decay by args.lr_decay per epoch of n_train examples."""
    if args.lr_decay == 1.0:
        return args.lr
    steps = max(1, n_train // args.batch_size)
    return jn.optim.schedules.ExponentialDecay(args.lr, steps, args.lr_decay)


def load_dataset(name, data_dir=None, download=False, limit=None, test_limit=None):
    """Return (x_train, y_train, x_test, y_test, source) as float32 NCHW in [0, 1] and int64 labels."""
    if data_dir is not None and not os.path.exists(data_dir):
        raise UsageError(f"--data-dir {data_dir}: no such file or directory")
    try:
        return _load_dataset(name, data_dir, download, limit, test_limit)
    except (OSError, ValueError, EOFError) as e:      # missing, unreadable or malformed files: the user's data
        where = f" from {data_dir}" if data_dir else ""
        raise UsageError(f"dataset {name}{where}: {e}") from e


def _load_dataset(name, data_dir, download, limit, test_limit):
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


class _CompileListener(_numba_event.Listener):
    """Numba compile-event listener: on the first compile past ``after`` seconds, calls ``say(notice)`` once."""

    def __init__(self, say, after):
        self.say, self.after, self.t0, self.shown, self.done = say, after, time.perf_counter(), False, False

    def on_start(self, event):
        """Show the notice once the work has compiled for ``after`` seconds; returns None."""
        if not self.shown and time.perf_counter() - self.t0 >= self.after:
            self.shown = True
            self.say(f"compiling kernels (once; cached in {kernelgen.cache_dir()}) ...")

    def on_end(self, event):
        """Nothing to do at the end of one compile; returns None."""


_NOTICE_SHOWN = [False]       # the notice is shown once per process, on the first run of steps that compiles


class compile_notice:
    """Context that says "compiling kernels (once; cached in DIR) ..." while the code inside compiles kernels.

    Numba's compile events are watched only inside the context: the notice appears at the first compile after
    ``after`` seconds (a warm run that loads everything from the disk cache says nothing), and leaving the
    context says how long it took. ``say`` prints one line (default: to stderr).
    """

    def __init__(self, say=None, after=0.5):
        self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._after = after
        self._listener = None

    @property
    def shown(self):
        """Return whether the notice was shown inside this context."""
        return self._listener is not None and self._listener.shown

    def __enter__(self):
        event = _numba_event
        if not _NOTICE_SHOWN[0]:
            self._listener = _CompileListener(self._say, self._after)
            event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        if self._listener is None or self._listener.done:
            return False
        self._listener.done = True
        _numba_event.unregister("numba:compile", self._listener)
        if self._listener.shown:
            _NOTICE_SHOWN[0] = True
            if exc[0] is None:
                self._say(f"kernels ready after {time.perf_counter() - self._listener.t0:.1f} s")
        return False


class Progress:
    """A tqdm progress bar over one epoch's steps, or plain periodic prints when tqdm is missing or disabled.

    The first steps run inside :class:`compile_notice` (the first call of a jitted step traces and compiles its
    kernels, and the plan's run after ``compiler.native.NATIVE_AFTER`` runs, call 4, compiles the native driver), and the bar appears
    once they are done, starting its clock there (``initial`` = those steps): its rate and ETA leave out the
    time spent compiling.
    """

    def __init__(self, total, desc, enabled=True, quiet=False):
        self.total, self.desc, self.n = total, desc, 0
        self.quiet = quiet                   # prints nothing at all (ranks other than 0 of a distributed run)
        enabled = enabled and not quiet
        self._warm = max(1, min(NATIVE_AFTER + 2, total))     # call 1 traces; plan runs 2.. compile natively
        self.bar = None
        self._tqdm = None
        self._t0 = time.perf_counter()
        self._last = self._t0
        if enabled:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm
            except ImportError:
                pass
        self._notice = compile_notice(self.write)
        self._notice.__enter__()

    def write(self, msg):
        """Print one line to stderr without breaking the bar; returns None."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _first(self):
        self._notice.__exit__(None, None, None)
        if self._tqdm is not None:
            self.bar = self._tqdm(total=self.total, initial=self.n, desc=self.desc, leave=True, dynamic_ncols=True,
                                  file=sys.stderr)

    def update(self, loss=None):
        """Advance by one step, showing ``loss``; returns None."""
        self.n += 1
        if self.n < self._warm:
            if self.n == 1 and self._notice.shown and not self.quiet:     # a cold start: say the step runs
                self.write(f"{self.desc}: first step done after {time.perf_counter() - self._t0:.1f} s"
                           + (f", loss {loss:.4f}" if loss is not None else "")
                           + "; compiling the rest of the step (its native driver, once) ...")
            return                       # still compiling: no bar, no rate, no ETA yet
        if self.n == self._warm:
            self._first()
        if self.bar is not None:
            if self.n > self._warm:
                self.bar.update(1)
            if loss is not None and (self.n % 10 == 0 or self.n == self.total):
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        now = time.perf_counter()
        if self.quiet:
            return
        if now - self._last >= 10 or self.n == self.total:
            self._last = now
            msg = f"{self.desc}: {self.n}/{self.total} steps, {now - self._t0:.1f} s"
            print(msg + (f", loss {loss:.4f}" if loss is not None else ""), flush=True)

    def close(self):
        """Close the bar; returns None."""
        self._notice.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()


def _state_variables(model):
    """Return the variables a checkpoint holds: the network's, the optimizer's slots and its step counter."""
    out, seen = [], set()
    opt = model.opt
    slots = []
    for p in opt._all_params():
        slots.extend(opt._slots(p, opt._owner[id(p)]).values())     # created now if the first step has not run
    for v in list(model.net.state_dict().values()) + slots + [opt.global_step]:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _finite(variables):
    return all(np.isfinite(v.numpy()).all() for v in variables if _lowp.is_floating(v.dtype))


class NonFiniteGuard:
    """Checks each step's loss and the state before each save: stops training, or skips the step.

    Without ``skip`` the first non-finite loss (or state) raises :class:`NonFiniteError` naming the epoch, the
    step and the last good checkpoint. With ``skip=N`` the state is copied before each step and a step whose
    loss or state is not finite is undone (the copy restored) and counted; N such steps in a row raise.
    """

    def __init__(self, model, saver, name, skip=None):
        self.model, self.saver, self.name, self.skip = model, saver, name, skip
        self.skipped = self.in_a_row = 0
        self._vars = self._copies = None

    def before(self):
        """Copy the state when skipping is on (nothing otherwise); returns None."""
        if self.skip is None:
            return
        if self._vars is None:
            self._vars = _state_variables(self.model)
            self._copies = [v.numpy().copy() for v in self._vars]
        else:
            for c, v in zip(self._copies, self._vars):
                np.copyto(c, v.numpy())

    def after(self, loss, where):
        """Return True when the step at ``where`` counts, False when it was skipped; raise when it must stop."""
        ok = math.isfinite(loss)
        if self.skip is None:
            if not ok:
                self._stop(f"the loss is {loss} at {where}")
            return True
        ok = ok and _finite(self._vars)
        if ok:
            self.in_a_row = 0
            return True
        for c, v in zip(self._copies, self._vars):
            v.assign(c)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.skip:
            self._stop(f"{self.in_a_row} steps in a row up to {where} had a non-finite loss or parameters "
                       f"(each was skipped)")
        return False

    def run(self, step_fn, where):
        """Run ``step_fn()`` (returning a loss tensor) guarded; return the loss as a float, or None if skipped."""
        self.before()
        with np.errstate(over="ignore", invalid="ignore"):      # the guard reports a diverging run
            loss = float(step_fn().item())
        return loss if self.after(loss, where) else None

    def check_state(self, epoch, step, loss=None):
        """Raise NonFiniteError unless ``loss`` (when given) and every state variable are finite; returns None."""
        if loss is not None and not math.isfinite(loss):
            self._stop(f"the loss is {loss} at the end of epoch {epoch} (step {step})")
        if not _finite(self._vars or _state_variables(self.model)):
            self._stop(f"parameters or optimizer state are not finite at epoch {epoch}, step {step}")

    def _stop(self, what):
        last = self.saver.latest_checkpoint() if self.saver is not None else None
        keep = (f"the last good checkpoint is {last} (nothing was saved after it)" if last
                else "no checkpoint was saved")
        hint = "" if self.skip is not None else "; --skip-nonfinite skips such steps"
        raise NonFiniteError(f"{self.name}: training diverged: {what}; {keep}. A smaller --lr may help{hint}")

    def report(self):
        """Return a line counting the skipped steps, or '' when none was skipped."""
        return f"{self.name}: skipped {self.skipped} steps with a non-finite loss or state" if self.skipped else ""


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
    """Apply --device, --threads, --seed and --distributed; return the log directory."""
    args.device_obj = setup_device(args)
    n = setup_distributed(args)
    if n > 1:
        if args.batch_size % n:
            raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the "
                             f"{n} ranks")
        if getattr(args, "skip_nonfinite", None) is not None:
            raise UsageError("--skip-nonfinite is not supported with --distributed (the ranks must take the "
                             "same steps)")
    if args.threads:
        jn.set_num_threads(args.threads)
    jn.random.seed(args.seed)
    return args.logdir or os.path.join("runs", getattr(args, "model_name", "model"))


def _fmt(metrics):
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class _NullLog:
    """Stands in for the SummaryWriter and CSVLogger on ranks other than 0: writes nothing."""

    def add_scalar(self, *a, **k):
        """Ignore a scalar; returns None."""

    def log(self, *a, **k):
        """Ignore a row; returns None."""

    def flush(self):
        """Nothing to flush; returns None."""

    def close(self):
        """Nothing to close; returns None."""


def _distributed_evaluate(model, r, n):
    """Return evaluate(x, y) for data-parallel runs: batch-norm averages are made equal on every rank, each rank
    evaluates its share of the examples, and the metrics (means) are combined over the ranks."""

    def evaluate(x, y):
        dist.average_buffers(model.net)
        lo, hi = len(x) * r // n, len(x) * (r + 1) // n
        if len(x) < n:                                   # fewer examples than ranks: each evaluates them all
            lo, hi = 0, len(x)
        m = model.evaluate(x[lo:hi], None if y is None else y[lo:hi])
        return dist.allreduce_metrics(m, weight=hi - lo)
    return evaluate


def fit(model, args, data, logdir, name):
    """Train ``model`` for ``args.epochs`` epochs with evaluation, checkpoints and logs; return the last metrics.

    ``data`` is (x_train, y_train, x_test, y_test). With ``args.resume`` training continues from the latest
    checkpoint in ``logdir/checkpoints`` (model, optimizer, epoch and step).
    """
    xtr, ytr, xte, yte = data
    r, n = getattr(args, "rank", 0), getattr(args, "world_size", 1)
    lead = r == 0                                      # only rank 0 writes checkpoints, events, CSV, the bar
    if lead:
        os.makedirs(logdir, exist_ok=True)
    saver = jn.io.Saver(os.path.join(logdir, "checkpoints"), max_to_keep=args.keep) if lead else None
    start_epoch, step = 0, 0
    if args.resume and lead:
        path = saver.latest_checkpoint()
        if path is None:
            print(f"{name}: no checkpoint in {saver.directory}, starting from scratch", flush=True)
        else:
            start_epoch, step = restore_checkpoint(path, model)
            print(f"{name}: resumed from {path} (epoch {start_epoch}, step {step})", flush=True)
    evaluate = model.evaluate
    if n > 1:
        # rank 0's parameters, optimizer state and buffers (restored or fresh) go to every rank
        model.opt = dist.DistributedOptimizer(model.opt, module=model.net)
        start_epoch, step = dist._ctx().comm.bcast((start_epoch, step), root=0)
        evaluate = _distributed_evaluate(model, r, n)
    loader = DataLoader((xtr, ytr), batch_size=args.batch_size // n, shuffle=True, seed=args.seed, drop_last=True,
                        **({"num_replicas": n, "rank": r} if n > 1 else {}))
    if len(loader) == 0:
        raise UsageError(f"{name}: {len(xtr)} training examples is less than one batch of {args.batch_size}")
    writer = jn.io.SummaryWriter(logdir) if lead else _NullLog()
    csv = jn.io.CSVLogger(os.path.join(logdir, "metrics.csv")) if lead else _NullLog()
    metrics = {}
    log_every = max(1, min(100, len(loader) // 4))
    guard = NonFiniteGuard(model, saver, name, getattr(args, "skip_nonfinite", None))
    try:
        if start_epoch >= args.epochs:
            metrics = evaluate(xte, yte)
            print(f"{name}: already trained for {start_epoch} epochs; {_fmt(metrics)}", flush=True)
        for epoch in range(start_epoch, args.epochs):
            loader.set_epoch(epoch)
            bar = Progress(len(loader), f"{name} epoch {epoch + 1}/{args.epochs}",
                           enabled=not args.no_progress, quiet=not lead)
            t0 = time.perf_counter()
            total, count = 0.0, 0
            try:
                for i, batch in enumerate(model.batches(loader)):
                    loss = guard.run(lambda: model.train_step(*batch),
                                     f"epoch {epoch + 1}, batch {i + 1} (step {step + 1})")
                    if loss is None:
                        bar.update(None)
                        continue
                    step += 1
                    total += loss
                    count += 1
                    bar.update(loss)
                    if step % log_every == 0:
                        writer.add_scalar("train/loss", loss, step)
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
            metrics = {"train_loss": total / count if count else float("nan")}
            guard.check_state(epoch + 1, step, metrics["train_loss"] if count else None)
            if n > 1:
                metrics = dist.allreduce_metrics(metrics)        # the mean of the ranks' training losses
            metrics.update(evaluate(xte, yte))
            row = {"epoch": epoch + 1, "step": step, **metrics, "epoch_seconds": seconds,
                   "examples_per_s": count * args.batch_size / seconds}
            for k, v in metrics.items():
                writer.add_scalar(("train/" if k.startswith("train") else "test/") + k, v, step)
            writer.add_scalar("train/examples_per_s", row["examples_per_s"], step)
            writer.flush()
            csv.log(row)
            if lead:
                save_checkpoint(saver, model, epoch + 1, step)
            print(f"{name} epoch {epoch + 1}/{args.epochs}: step {step}, {_fmt(metrics)}, {seconds:.1f} s "
                  f"({row['examples_per_s']:.0f} examples/s)", flush=True)
    finally:
        writer.close()
        csv.close()
        if guard.report():
            print(guard.report(), file=sys.stderr, flush=True)
    metrics["step"] = step
    metrics["skipped_steps"] = guard.skipped
    return metrics
