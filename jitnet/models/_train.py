"""Shared pieces of the training commands: options, datasets, the progress bar, checkpoints, logs, and the one
training loop every command runs (:class:`Loop`).

A model object handed to :func:`fit` (the vision models' epochs) provides ``train_step(*batch) -> loss Tensor``,
``evaluate(x, y) -> dict of metrics``, ``batches(loader)`` (turns a loader's batches into step inputs), and
``net`` / ``opt`` (the :class:`jitnet.nn.Module` and its optimizer, saved in checkpoints).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import namedtuple

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
           "fit", "Loop", "Round", "format_metrics", "setup_run", "ArgumentParser", "UsageError", "NonFiniteError",
           "NonFiniteGuard", "add_nonfinite_args", "compile_notice", "add_device_args", "setup_device", "apply_smoke"]

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
    """A tqdm progress bar over one round's steps, or plain periodic prints when tqdm is missing or disabled.

    The first steps run inside :class:`compile_notice` (the first call of a jitted step traces and compiles its
    kernels, and the plan's run after ``compiler.native.NATIVE_AFTER`` runs, call 4, compiles the native driver), and the bar appears
    once they are done, starting its clock there (``initial`` = those steps): its rate and ETA leave out the
    time spent compiling. ``unit`` names a step (a step, an episode, a chunk).
    """

    def __init__(self, total, desc, enabled=True, quiet=False, unit="step"):
        self.total, self.desc, self.n, self.unit = total, desc, 0, unit
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
                                  file=sys.stderr, unit=self.unit)

    def update(self, loss=None, info=None):
        """Advance by one step, showing ``loss`` and the entries of dict ``info``; returns None."""
        self.n += 1
        if self.n < self._warm:
            if self.n == 1 and self._notice.shown and not self.quiet:     # a cold start: say the step runs
                self.write(f"{self.desc}: first {self.unit} done after {time.perf_counter() - self._t0:.1f} s"
                           + (f", loss {loss:.4f}" if loss is not None else "")
                           + "; compiling the rest of the step (its native driver, once) ...")
            return                       # still compiling: no bar, no rate, no ETA yet
        if self.n == self._warm:
            self._first()
        shown = ({"loss": f"{loss:.4f}"} if loss is not None else {}) | dict(info or {})
        if self.bar is not None:
            if self.n > self._warm:
                self.bar.update(1)
            if shown and (self.n % 10 == 0 or self.n == self.total):
                self.bar.set_postfix(shown, refresh=False)
            return
        now = time.perf_counter()
        if self.quiet:
            return
        if now - self._last >= 10 or self.n == self.total:
            self._last = now
            msg = f"{self.desc}: {self.n}/{self.total} {self.unit}s, {now - self._t0:.1f} s"
            print(msg + "".join(f", {k} {v}" for k, v in shown.items()), flush=True)

    def close(self):
        """Close the bar; returns None."""
        self._notice.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()


def _state_variables(model):
    """Return what a checkpoint of ``model`` holds: the leaves of its ``state_dict()`` when it has one (an RL
    agent), else the network's variables, the optimizer's slots and its step counter; [] for no model."""
    if model is None:
        return []
    if hasattr(model, "state_dict"):
        return list(jn.io.flatten_state(model.state_dict()).values())
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


def _finite(values):
    for v in values:
        a = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        if _lowp.is_floating(a.dtype) and not np.isfinite(a).all():
            return False
    return True


class NonFiniteGuard:
    """Checks each step's loss and the state before each save: stops training, or skips the step.

    Without ``skip`` the first non-finite loss (or state) raises :class:`NonFiniteError` naming where it happened
    and the last good checkpoint. With ``skip=N`` the state is copied before each step and a step whose loss or
    state is not finite is undone (the copy restored) and counted; N such steps in a row raise. ``hint`` ends the
    message; ``skippable`` says whether the command offers ``--skip-nonfinite``.
    """

    def __init__(self, model, saver, name, skip=None, hint="A smaller --lr may help", skippable=True):
        self.model, self.saver, self.name, self.skip = model, saver, name, skip
        self.hint, self.skippable = hint, skippable
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

    def check_state(self, when, loss=None):
        """Raise NonFiniteError unless ``loss`` (a round's mean, when given) and every state variable are finite
        at ``when`` (e.g. "epoch 2 (step 8)", "episode 100"); returns None."""
        if loss is not None and not math.isfinite(loss):
            self._stop(f"the loss is {loss} at the end of {when}")
        if not _finite(self._vars or _state_variables(self.model)):
            self._stop(f"parameters or optimizer state are not finite after {when}")

    def _stop(self, what):
        msg = f"{self.name}: training diverged: {what}"
        if self.saver is not None:
            last = self.saver.latest_checkpoint()
            msg += (f"; the last good checkpoint is {last} (nothing was saved after it)" if last
                    else "; no checkpoint was saved")
        hint = "; --skip-nonfinite skips such steps" if self.skippable and self.skip is None else ""
        raise NonFiniteError(f"{msg}. {self.hint}{hint}")

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


def format_metrics(metrics):
    """Return ``metrics`` as "name value, ..." (floats with 4 decimals), as the training commands print them."""
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


Round = namedtuple("Round", "items length desc epoch", defaults=(None,))
Round.__doc__ = """One round of a :class:`Loop`: the ``items`` its steps take (any iterable, drawn one per step), how
many there are (``length``, for the progress bar), the bar's label ``desc``, and the ``epoch`` (from 1) the round
trains, or None for a round that is no epoch (the steps between two evaluations, a run of episodes)."""


class Loop:
    """The training loop of every command: rounds of steps with a progress bar, the non-finite guard, logs,
    evaluations, checkpoints and resume, in one process or on every rank of a data-parallel job.

    A *step* is whatever ``step(item)`` makes of one item of a round: a batch of images, a bucket of seq2seq pairs,
    a batch of DNC sequences, an RL episode, a chunk of skip-gram sentences. It returns its loss (a Tensor or a
    number), a dict of scalars (whose ``"loss"``, when present, is the loss; its other Tensors are read only when
    logged), or None. The loop reads the loss once per step, for the bar and the guard (:class:`NonFiniteGuard`,
    which stops the run, or with ``--skip-nonfinite`` undoes the step), and keeps it in ``losses``.

    Building the loop opens the checkpoint directory ``logdir/checkpoints``, restores the latest checkpoint with
    ``--resume`` (``epoch`` and ``step`` continue from it) and, on several ranks, wraps the model's optimizer in a
    :class:`jitnet.distributed.DistributedOptimizer` and gives every rank rank 0's state and position. Only rank 0
    writes checkpoints, logs and the bar. ``model`` is what checkpoints hold: an object with ``state_dict()`` /
    ``load_state_dict()`` (an RL agent), or one with ``net`` and ``opt``, saved as {"model", "optimizer"}; None
    keeps nothing (and ``logdir=None`` writes no file). The command's options come from ``args`` (``--resume``,
    ``--keep``, ``--skip-nonfinite``, ``--no-progress``, the rank and world size :func:`setup_distributed` set);
    ``progress`` ("bar", "lines" or "off") overrides ``--no-progress``. ``unit`` names a step in messages,
    ``csv`` / ``csv_fields`` the CSV log in ``logdir``, ``eval_prefix`` the TensorBoard group of evaluation
    metrics, ``checkpoint_every`` saves every N steps besides the end of each round, and ``hint`` ends the
    non-finite message.
    """

    def __init__(self, name, model, logdir=None, args=None, *, unit="step", csv="metrics.csv", csv_fields=None,
                 eval_prefix="test/", checkpoint_every=0, progress=None, hint="A smaller --lr may help"):
        self.name, self.model, self.logdir, self.unit = name, model, logdir, unit
        self.rank, self.world_size = getattr(args, "rank", 0), getattr(args, "world_size", 1)
        self.lead = self.rank == 0                   # only rank 0 writes checkpoints, events, CSV, the bar
        self.progress = progress or ("lines" if getattr(args, "no_progress", False) else "bar")
        self._csv_name, self._csv_fields, self.eval_prefix = csv, csv_fields, eval_prefix
        self.checkpoint_every = checkpoint_every
        if logdir and self.lead:
            os.makedirs(logdir, exist_ok=True)
        self.saver = (jn.io.Saver(os.path.join(logdir, "checkpoints"), max_to_keep=getattr(args, "keep", 3))
                      if logdir and self.lead and model is not None else None)
        self.guard = NonFiniteGuard(model, self.saver, name, getattr(args, "skip_nonfinite", None), hint=hint,
                                    skippable=hasattr(args, "skip_nonfinite"))
        self.epoch = self.step = 0                   # the epoch being (or last) trained; steps counted so far
        self.train_seconds = 0.0                     # time spent in steps (evaluations and logging left out)
        self.train_loss = float("nan")               # the mean loss of the last round's steps
        self.round_seconds, self.round_steps = 0.0, 0
        self.losses, self.metrics = [], {}           # every counted step's loss; the last evaluation's metrics
        self.writer = self.csv = _NullLog()
        self._stopping, self._saved, self._evaluated = False, None, None
        if getattr(args, "resume", False) and self.lead:
            self._resume()
        if self.world_size > 1 and model is not None:
            # rank 0's parameters, optimizer state and buffers (restored or fresh) go to every rank
            model.opt = dist.DistributedOptimizer(model.opt, module=getattr(model, "net", None))
            self.epoch, self.step = dist._ctx().comm.bcast((self.epoch, self.step), root=0)

    def stop(self):
        """End the run after the current step (or round end): the round still ends, evaluated, saved and
        reported; returns None."""
        self._stopping = True

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _resume(self):
        path = self.saver.latest_checkpoint() if self.saver is not None else None
        if path is None:
            where = os.path.join(self.logdir or ".", "checkpoints")
            print(f"{self.name}: no checkpoint in {where}, starting from scratch", flush=True)
            return
        if hasattr(self.model, "state_dict"):
            self.model.load_state_dict(jn.io.load(path))
            meta = jn.io.load_metadata(path) or {}
            self.epoch, self.step = int(meta.get("epoch", 0)), int(meta.get("global_step", 0))
        else:
            self.epoch, self.step = restore_checkpoint(path, self.model)
        at = f"epoch {self.epoch}, " if self.epoch else ""
        print(f"{self.name}: resumed from {path} ({at}{self.unit} {self.step})", flush=True)

    def _save(self):
        if self.saver is None or self._saved == self.step:
            return
        if hasattr(self.model, "state_dict"):
            self.saver.save(self.model.state_dict(), self.step,
                            metadata={"epoch": str(self.epoch), "global_step": str(self.step)})
        else:
            save_checkpoint(self.saver, self.model, self.epoch, self.step)
        self._saved = self.step

    # -- the loop --------------------------------------------------------------------------------------------------
    def run(self, step, rounds, *, evaluate=None, eval_every=0, report=None, log_every=0, max_steps=None):
        """Run ``step`` over the items of each :class:`Round` in ``rounds``; return the last metrics.

        Every ``log_every`` counted steps the step's scalars go to TensorBoard as ``train/<name>``. An evaluation
        (``evaluate()`` -> dict of metrics, every ``eval_every`` steps and at the end of each round) becomes one
        row of the CSV log, ``report(loop, metrics)[0]``, whose floats but times also go to TensorBoard
        (``train/`` for training figures and rates, ``eval_prefix`` for the rest). At the end of each round the
        loop checks the round's mean loss and the state, evaluates unless it just did, saves a checkpoint and
        prints ``report(loop, metrics)[1]``. The run stops after ``max_steps`` steps, after :meth:`stop`, or when the
        rounds run out. Returns {"train_loss", the last evaluation's metrics, "step", "skipped_steps"}.
        """
        if self.logdir and self.lead:
            self.writer = jn.io.SummaryWriter(self.logdir)
            self.csv = jn.io.CSVLogger(os.path.join(self.logdir, self._csv_name), fieldnames=self._csv_fields)
        self._evaluate, self._report = evaluate, report
        try:
            for rnd in rounds:
                self._round(step, rnd, eval_every, log_every, max_steps)
                if self._stopping:
                    break
        finally:
            self.writer.close()
            self.csv.close()
            if self.guard.report():
                print(self.guard.report(), file=sys.stderr, flush=True)
        return {"train_loss": self.train_loss, **self.metrics, "step": self.step,
                "skipped_steps": self.guard.skipped}

    def _round(self, step, rnd, eval_every, log_every, max_steps):
        if rnd.epoch is not None:
            self.epoch = rnd.epoch
        bar = Progress(rnd.length, rnd.desc, enabled=self.progress == "bar",
                       quiet=not self.lead or self.progress == "off", unit=self.unit)
        t0 = time.perf_counter()
        total, count, first = 0.0, 0, self.step
        try:
            for i, item in enumerate(rnd.items):
                where = (f"epoch {rnd.epoch}, batch {i + 1} ({self.unit} {self.step + 1})" if rnd.epoch is not None
                         else f"{self.unit} {self.step + 1}")
                values, loss = self._step(step, item, where)
                if values is None:                   # skipped: its state was restored
                    bar.update(None)
                    continue
                self.step += 1
                if loss is not None:
                    total += loss
                    count += 1
                    self.losses.append(loss)
                bar.update(loss, {k: v for k, v in values.items() if k != "loss" and not isinstance(v, jn.Tensor)})
                if log_every and self.step % log_every == 0:
                    self._log_step(values, loss)
                if eval_every and self.step % eval_every == 0:
                    self._evaluation()
                if self.saver is not None and self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.guard.check_state(f"{self.unit} {self.step}")
                    self._save()
                if max_steps and self.step >= max_steps:
                    self._stopping = True
                if self._stopping:
                    break
        finally:
            bar.close()
        self.round_seconds, self.round_steps = time.perf_counter() - t0, self.step - first
        self.train_loss = total / count if count else float("nan")
        when = f"epoch {rnd.epoch} (step {self.step})" if rnd.epoch is not None else f"{self.unit} {self.step}"
        self.guard.check_state(when, self.train_loss if count else None)
        if self.world_size > 1:                      # the mean of the ranks' training losses
            self.train_loss = dist.allreduce_metrics({"train_loss": self.train_loss})["train_loss"]
        just_evaluated = eval_every and self._evaluated == self.step
        if (self._evaluate is not None or self._report is not None) and not just_evaluated:
            self._evaluation()
        self._save()
        if self._report is not None:
            print(self._report(self, self.metrics)[1], flush=True)

    def _step(self, step, item, where):
        """Run one guarded step; return (its values as a dict, its loss as a float or None), or (None, None) when
        the guard skipped it."""
        self.guard.before()
        t0 = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore"):      # the guard reports a diverging run
            out = step(item)
            values = out if isinstance(out, dict) else {} if out is None else {"loss": out}
            loss = values.get("loss")
            if loss is not None:
                loss = float(loss.item() if hasattr(loss, "item") else loss)
        self.train_seconds += time.perf_counter() - t0
        if loss is not None and not self.guard.after(loss, where):
            return None, None
        return values, loss

    def _log_step(self, values, loss):
        for k, v in values.items():
            v = loss if k == "loss" else float(v.item()) if isinstance(v, jn.Tensor) else v
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"train/{k}", v, self.step)

    def _evaluation(self):
        self.metrics = self._evaluate() if self._evaluate is not None else {}
        self._evaluated = self.step
        if self._report is None:
            return
        row = self._report(self, self.metrics)[0]
        for k, v in row.items():                 # its metrics and rates; not the position, not the clock
            if isinstance(v, (float, np.floating)) and not k.endswith("seconds"):
                train = k.startswith("train") or k.endswith("_per_s")
                self.writer.add_scalar(("train/" if train else self.eval_prefix) + k, v, self.step)
        self.writer.flush()
        self.csv.log(row)


def fit(model, args, data, logdir, name):
    """Train ``model`` for ``args.epochs`` epochs with evaluation, checkpoints and logs; return the last metrics.

    Each epoch is one round of the shared :class:`Loop`. ``data`` is (x_train, y_train, x_test, y_test). With ``args.resume`` training continues from the latest
    checkpoint in ``logdir/checkpoints`` (model, optimizer, epoch and step).
    """
    xtr, ytr, xte, yte = data
    loop = Loop(name, model, logdir, args)
    r, n = loop.rank, loop.world_size
    evaluate = _distributed_evaluate(model, r, n) if n > 1 else model.evaluate
    loader = DataLoader((xtr, ytr), batch_size=args.batch_size // n, shuffle=True, seed=args.seed, drop_last=True,
                        **({"num_replicas": n, "rank": r} if n > 1 else {}))
    if len(loader) == 0:
        raise UsageError(f"{name}: {len(xtr)} training examples is less than one batch of {args.batch_size}")
    if loop.epoch >= args.epochs:
        metrics = evaluate(xte, yte)
        print(f"{name}: already trained for {loop.epoch} epochs; {format_metrics(metrics)}", flush=True)
        return {**metrics, "step": loop.step, "skipped_steps": 0}

    def rounds():
        for epoch in range(loop.epoch, args.epochs):
            loader.set_epoch(epoch)
            yield Round(model.batches(loader), len(loader), f"{name} epoch {epoch + 1}/{args.epochs}", epoch + 1)

    def report(lp, m):
        seconds = lp.round_seconds
        shown = {"train_loss": lp.train_loss, **m}
        row = {"epoch": lp.epoch, "step": lp.step, **shown, "epoch_seconds": seconds,
               "examples_per_s": lp.round_steps * args.batch_size / seconds}
        return row, (f"{name} epoch {lp.epoch}/{args.epochs}: step {lp.step}, {format_metrics(shown)}, {seconds:.1f} s "
                     f"({row['examples_per_s']:.0f} examples/s)")

    return loop.run(lambda batch: model.train_step(*batch), rounds(), evaluate=lambda: evaluate(xte, yte),
                    report=report, log_every=max(1, min(100, len(loader) // 4)))
