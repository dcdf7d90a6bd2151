"""Data-parallel training over MPI: ``mpiexec -n N python train.py``.

:func:`init` joins the MPI job the process was started in (``mpiexec``/``mpirun``/``srun``); :func:`rank`,
:func:`world_size` and :func:`barrier` describe and synchronize it. The collectives :func:`allreduce`,
:func:`broadcast` and :func:`allgather` take jitnet tensors and hand their NumPy buffers straight to mpi4py's
buffer-based calls (``Allreduce``/``Bcast``/``Allgather``, no pickling, no copies); each is a registry
primitive, so it runs eagerly and also becomes a node of a ``jn.jit`` plan. Tensors on a GPU are staged through
host memory (copied to the host, reduced, copied back): mpi4py's buffer calls take host buffers here, and the
mpich wheel is not CUDA-aware.

:class:`DistributedOptimizer` wraps any optimizer: it broadcasts rank 0's parameters and optimizer state when
it is built, and each ``step()`` averages the gradients over the ranks before the update, dense gradients in
fused buckets (many small gradients packed into one flat buffer, one ``Allreduce`` per bucket), sparse
(``IndexedSlices``) gradients by an ``Allgather`` of their rows.

A failed rank must not leave the others waiting forever. Three mechanisms cover it: the launcher kills the job
when a process dies (mpich's ``mpiexec`` does so at once); an uncaught exception on a rank calls
``MPI_Abort`` (the ``sys.excepthook`` that :func:`init` installs), which ends every rank; and a watchdog
thread ends the process with a clear message when one collective has waited more than ``timeout`` seconds
(``JITNET_MPI_TIMEOUT``, default 300), for a rank that hangs without dying.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from .. import cuda as _cuda
from .. import lowp as _lowp
from ..autodiff.core import REGISTRY, Primitive, apply, enable_grad, no_grad
from ..autodiff.sparse import IndexedSlices
from ..optim.optimizer import Optimizer
from ..lazy import LazyModule
from ..tensor import Tensor

_G = LazyModule("jitnet.backend_cuda")      # the CUDA backend, imported once a GPU is in use

__all__ = ["init", "is_initialized", "rank", "world_size", "barrier", "abort", "allreduce", "broadcast",
           "allgather", "broadcast_variables", "broadcast_module", "average_buffers", "allreduce_metrics",
           "DistributedOptimizer", "plan_buckets", "launched_by_mpi", "DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT"]

DEFAULT_BUCKET_BYTES = 4 << 20      # 4 MiB: a few buckets for a CNN, one for an MLP
DEFAULT_TIMEOUT = 300.0             # seconds one collective may wait before the watchdog aborts

# Environment variables that MPI launchers set in the processes they start: mpich/Intel MPI (Hydra: PMI_*),
# Open MPI (OMPI_*), PMIx-based launchers (PMIX_RANK), MVAPICH (MV2_*), and Slurm's srun (PMI_RANK with
# --mpi=pmi2, PMIX_RANK with --mpi=pmix).
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                  "MV2_COMM_WORLD_RANK", "MPI_LOCALNRANKS")

_MISSING = ('jitnet.distributed needs mpi4py and an MPI library: pip install "jitnet[mpi]" (mpi4py and the '
            'mpich wheel), or install mpi4py against your cluster\'s MPI')


def launched_by_mpi(environ=None) -> bool:
    """Return True when the environment shows that an MPI launcher (mpiexec, mpirun, srun) started this process."""
    env = os.environ if environ is None else environ
    return any(k in env for k in _LAUNCHER_VARS)


# --------------------------------------------------------------------------------------------------------------
# The job: communicator, watchdog, abort on an uncaught exception
# --------------------------------------------------------------------------------------------------------------

class _Context:
    __slots__ = ("MPI", "comm", "rank", "size", "watchdog", "Allreduce", "SUM", "IN_PLACE")

    def __init__(self, MPI, comm, timeout):
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.Allreduce, self.SUM, self.IN_PLACE = comm.Allreduce, MPI.SUM, MPI.IN_PLACE
        self.watchdog = _Watchdog(self, timeout) if timeout and self.size > 1 else None


_CTX: _Context | None = None


class _Watchdog:
    """A daemon thread that aborts the job when one collective has waited longer than ``timeout`` seconds.

    A collective costs it two stores: ``calls`` counts the collectives begun and ``pending`` names the one in
    flight (None between them). The thread samples both every ``period``; a collective seen in flight under the
    same count for longer than ``timeout`` (measured from the first sample that saw it) fires. So the limit is
    kept to within one period, and the hot path reads no clock (a small allreduce takes a few microseconds).
    """

    __slots__ = ("ctx", "timeout", "pending", "calls", "period", "_thread")     # slots: faster stores per call

    def __init__(self, ctx, timeout):
        self.ctx, self.timeout = ctx, float(timeout)
        self.pending = None                       # the name of the collective in flight, or None
        self.calls = 0                            # collectives begun so far
        self.period = max(0.02, min(1.0, self.timeout / 5))
        self._thread = threading.Thread(target=self._run, name="jitnet-mpi-watchdog", daemon=True)
        self._thread.start()

    def _run(self):
        seen, since = -1, 0.0
        while True:
            time.sleep(self.period)
            calls, what = self.calls, self.pending
            if what is None:
                seen = -1
                continue
            now = time.monotonic()
            if calls != seen:                     # a collective not seen in flight before: start its clock
                seen, since = calls, now
            elif now - since > self.timeout:
                self._fire(what)
                return

    def _fire(self, what):
        c = self.ctx
        sys.stderr.write(f"jitnet.distributed: rank {c.rank} of {c.size}: {what} waited more than "
                         f"{self.timeout:g} s for the other ranks (one of them failed or hangs); aborting the "
                         f"job (JITNET_MPI_TIMEOUT or init(timeout=) sets this limit)\n")
        sys.stderr.flush()
        threading.Timer(10.0, os._exit, (1,)).start()      # in case MPI_Abort cannot get through
        try:
            c.comm.Abort(1)
        finally:
            os._exit(1)


def _enter(ctx, what):
    w = ctx.watchdog
    if w is not None:
        w.calls += 1
        w.pending = what


def _leave(ctx):
    w = ctx.watchdog
    if w is not None:
        w.pending = None


def _timeout_from_env():
    v = os.environ.get("JITNET_MPI_TIMEOUT", "").strip()
    if not v:
        return DEFAULT_TIMEOUT
    try:
        t = float(v)
    except ValueError:
        raise ValueError(f"JITNET_MPI_TIMEOUT={v!r}: expected a number of seconds (0 turns the watchdog off)")
    return t


def init(timeout=None, comm=None, abort_on_exception=True):
    """Join the MPI job this process was started in; return ``(rank, world_size)``.

    ``timeout`` (seconds; default ``$JITNET_MPI_TIMEOUT`` or 300, 0 for none) bounds how long one collective
    may wait before the job is aborted. ``comm`` is an mpi4py communicator (default ``COMM_WORLD``). With
    ``abort_on_exception`` an uncaught exception on any rank aborts every rank (``MPI_Abort``) instead of
    leaving the others blocked. Calling it again returns the same values. Raises ImportError when mpi4py is
    missing and RuntimeError when the process was not started by an MPI launcher.
    """
    global _CTX
    if _CTX is not None:
        return _CTX.rank, _CTX.size
    try:
        import mpi4py  # noqa: F401   (the package alone: importing mpi4py.MPI initializes MPI)
    except ImportError as e:
        raise ImportError(_MISSING, name="mpi4py") from e
    if comm is None and not launched_by_mpi():
        raise RuntimeError("jitnet.distributed.init: this process was not started by an MPI launcher (none of "
                           f"{', '.join(_LAUNCHER_VARS[:5])} is set); start it with mpiexec -n N python ... "
                           "(or srun on a Slurm cluster)")
    try:
        from mpi4py import MPI
    except ImportError as e:                         # mpi4py without a loadable MPI library
        raise ImportError(f"{_MISSING} ({e})", name="mpi4py") from e
    if timeout is None:
        timeout = _timeout_from_env()
    _CTX = _Context(MPI, MPI.COMM_WORLD if comm is None else comm, timeout)
    if abort_on_exception and _CTX.size > 1:
        _install_excepthook()
    return _CTX.rank, _CTX.size


def _install_excepthook():
    previous = sys.excepthook

    def hook(tp, value, tb):
        previous(tp, value, tb)
        abort(1, f"an uncaught {tp.__name__}")
    sys.excepthook = hook


def abort(code=1, reason=None):
    """Print ``reason`` and end every rank of the job with exit status ``code`` (``MPI_Abort``); never returns
    when the job has several ranks (with one rank, or before :func:`init`, it exits this process)."""
    c = _CTX
    r = 0 if c is None else c.rank
    n = 1 if c is None else c.size
    if reason:
        sys.stderr.write(f"jitnet.distributed: rank {r} of {n} failed ({reason}); aborting the job\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if c is None or n == 1:
        raise SystemExit(code)
    # MPI_Abort tears the job down at once; the launcher forwards this rank's last output (the traceback and
    # the line above) only if it has read it first: give it a moment
    time.sleep(0.5)
    c.comm.Abort(int(code) or 1)


def is_initialized() -> bool:
    """Return True once :func:`init` has joined an MPI job."""
    return _CTX is not None


def rank() -> int:
    """Return this process's rank (0 before :func:`init`, so single-process code runs unchanged)."""
    return 0 if _CTX is None else _CTX.rank


def world_size() -> int:
    """Return the number of processes in the job (1 before :func:`init`)."""
    return 1 if _CTX is None else _CTX.size


def _ctx():
    if _CTX is None:
        raise RuntimeError("jitnet.distributed: call jitnet.distributed.init() first (under mpiexec)")
    return _CTX


def barrier():
    """Block until every rank reaches this call; returns None."""
    c = _ctx()
    _enter(c, "barrier")
    c.comm.Barrier()
    _leave(c)


# --------------------------------------------------------------------------------------------------------------
# Collectives as primitives (host buffers; GPU arrays staged through the host)
# --------------------------------------------------------------------------------------------------------------

_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN", "prod": "PROD"}


def _allreduce_cpu(a, op="sum"):
    c = _CTX if _CTX is not None else _ctx()
    send = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    out = np.empty(send.shape, send.dtype)
    _enter(c, "allreduce")
    c.Allreduce(send, out, c.SUM if op == "sum" or op == "mean" else getattr(c.MPI, _OPS[op]))
    _leave(c)
    if op == "mean":
        np.multiply(out, out.dtype.type(1.0 / c.size), out=out)
    return out


def _bucket_cpu(*arrays, average=True):
    """Pack ``arrays`` into one flat buffer, reduce it in place (sum, or mean with ``average``); return it."""
    c = _CTX if _CTX is not None else _ctx()
    total = 0
    for a in arrays:
        total += a.size
    out = np.empty(total, arrays[0].dtype)
    scale = out.dtype.type(1.0 / c.size)
    o = 0
    for a in arrays:                        # packing and the division by N in one pass over each gradient
        n = a.size
        if average:
            np.multiply(a.reshape(-1), scale, out=out[o:o + n])
        else:
            out[o:o + n] = a.reshape(-1)
        o += n
    _enter(c, "allreduce (gradient bucket)")
    c.Allreduce(c.IN_PLACE, out, c.SUM)
    _leave(c)
    return out


def _broadcast_cpu(a, root=0):
    c = _ctx()
    out = np.array(a, order="C", copy=True)
    _enter(c, "broadcast")
    c.comm.Bcast(out, root=root)
    _leave(c)
    return out


def _allgather_cpu(a):
    """Concatenate every rank's ``a`` along axis 0 (rank order); lengths may differ eagerly."""
    c = _ctx()
    send = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    if send.ndim == 0:
        send = send.reshape(1)
    row = int(np.prod(send.shape[1:], dtype=np.int64))
    _enter(c, "allgather")
    counts = np.empty(c.size, np.int64)
    c.comm.Allgather(np.array([send.shape[0]], np.int64), counts)
    if (counts == counts[0]).all():
        out = np.empty((c.size * send.shape[0],) + send.shape[1:], send.dtype)
        c.comm.Allgather(send, out)
    else:
        total = int(counts.sum())
        out = np.empty((total,) + send.shape[1:], send.dtype)
        sizes = counts * row
        displs = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        c.comm.Allgatherv(send, [out, (sizes, displs)])
    _leave(c)
    return out


def _staged(fn):
    """Return the GPU impl of a host collective: copy to the host, run ``fn``, copy the result back."""
    def impl(*arrays, **params):
        host = [a if isinstance(a, np.ndarray) else _cuda.to_host(a) for a in arrays]
        return _cuda.to_device(fn(*host, **params))
    impl.__name__ = fn.__name__ + "_staged"
    return impl


def _allreduce_vjp(g, ans, inputs, needs, op="sum"):
    if op not in ("sum", "mean"):
        raise NotImplementedError(f"allreduce: no gradient for op {op!r} (only 'sum' and 'mean')")
    return (apply(ALLREDUCE, g, op=op),)


def _collective(name, fn, vjp=None, nondiff=False):
    p = Primitive(name, impl={"cpu": fn, "cuda": _staged(fn)}, vjp=vjp, nondiff=nondiff)
    # Collectives have an effect outside the process: never fold them into constants, merge two of them, or
    # skip one, whatever their inputs (the tracer and CSE treat "random" primitives exactly so).
    p.extra["random"] = True
    p.extra["any_device"] = True
    # They are communication, not kernels: kept out of the registry that the kernel sweeps walk (warm-up, the
    # CUDA backend's install, the bounds and low-precision checks); the tracer and plans hold the object.
    REGISTRY.pop(name, None)
    return p


ALLREDUCE = _collective("mpi_allreduce", _allreduce_cpu, vjp=_allreduce_vjp)
ALLREDUCE_BUCKET = _collective("mpi_allreduce_bucket", _bucket_cpu, nondiff=True)
BROADCAST = _collective("mpi_broadcast", _broadcast_cpu, nondiff=True)
ALLGATHER = _collective("mpi_allgather", _allgather_cpu, nondiff=True)


def _as_tensor(x, what):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return Tensor(np.asarray(x))
    raise TypeError(f"jitnet.distributed.{what}: expected a Tensor or NumPy array, got {type(x).__name__}")


_LEAN = (None, None, None, None, None)      # the lean path's last checked (input, output, context, ...)


def allreduce(x, op="mean", out=None):
    """Return the elementwise reduction of ``x`` over every rank (``op``: mean, sum, max, min, prod).

    The tensor's buffer goes to ``MPI_Allreduce`` as it is (no copy when it is contiguous). ``out`` (eager
    only) receives the result in place of a new tensor. ``mean`` and ``sum`` are differentiable (the gradient
    is the same reduction of the output gradients); works under ``jn.jit``. MPI has no bfloat16 type, so
    float16/bfloat16 tensors are reduced in float32 (widened, reduced, rounded back once, the rule of
    ``jitnet.lowp``), as are the gradient buckets of :class:`DistributedOptimizer`; broadcasts move their bits
    as they are.
    """
    global _LEAN
    if out is not None and op == "sum" and _CTX is not None:      # the lean path (gradient-sized calls and
        try:                                                         # small ones alike): no checks beyond these
            a, o = x._data, out._data
        except AttributeError:
            a = o = None
        lean = _LEAN
        if a is lean[0] and o is lean[1] and lean[2] is _CTX:          # the pair checked by the previous call
            w = lean[4]
            if w is None:
                lean[3](a, o, _CTX.SUM)
            else:
                w.calls += 1
                w.pending = "allreduce"
                lean[3](a, o, _CTX.SUM)
                w.pending = None
            return out
        if (type(a) is np.ndarray and type(o) is np.ndarray and a.dtype == o.dtype and a.shape == o.shape
                and a.flags.c_contiguous and o.flags.c_contiguous and isinstance(out, Tensor)
                and not _lowp.is_lowp(a.dtype) and not np.may_share_memory(a, o)):
            c = _CTX                        # a NumPy array keeps its dtype, shape and layout: checked once
            _LEAN = (a, o, c, c.Allreduce, c.watchdog)
            _enter(c, "allreduce")
            c.Allreduce(a, o, c.SUM)
            _leave(c)
            return out
    if op not in _OPS:
        raise ValueError(f"allreduce: op must be one of {', '.join(_OPS)}, got {op!r}")
    x = _as_tensor(x, "allreduce")
    if op == "mean" and not _lowp.is_floating(x.dtype):
        raise TypeError(f"allreduce: op 'mean' needs a floating tensor, got {x.dtype}; use op='sum'")
    if out is not None:
        return _allreduce_into(x, op, out)
    return apply(ALLREDUCE, x, op=op)


def _allreduce_into(x, op, out):
    c = _ctx()
    if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"allreduce: out must be a Tensor of shape {x.shape} and dtype {x.dtype}")
    a, o = x._data, out._data
    if isinstance(o, np.ndarray) and _lowp.is_lowp(o.dtype):    # float16/bfloat16: reduced in float32 by
        o[...] = allreduce(x, op)._data                          # the primitive, rounded back once
        return out
    if not (isinstance(a, np.ndarray) and isinstance(o, np.ndarray)) or not o.flags.c_contiguous:
        r = allreduce(x, op)._data                # a strided or GPU out: reduce into a new array, then copy
        if isinstance(o, np.ndarray):
            np.copyto(o, r)
        else:
            _G.copy_into(o, r)
        return out
    mop = c.SUM if op in ("sum", "mean") else getattr(c.MPI, _OPS[op])
    _enter(c, "allreduce")
    if a is o:                                   # in place: MPI forbids aliased send and receive buffers
        c.Allreduce(c.IN_PLACE, o, mop)
    else:
        c.Allreduce(a if a.flags.c_contiguous and not np.may_share_memory(a, o) else np.array(a, order="C"),
                    o, mop)
    _leave(c)
    if op == "mean":
        np.multiply(o, o.dtype.type(1.0 / c.size), out=o)
    return out


def broadcast(x, root=0):
    """Return rank ``root``'s value of ``x`` on every rank (shapes and dtypes must agree); works under jit."""
    x = _as_tensor(x, "broadcast")
    return apply(BROADCAST, x, root=int(root))


def allgather(x):
    """Return every rank's ``x`` concatenated along axis 0 in rank order (a 0-d tensor counts as one row).

    Eagerly the ranks may hold different numbers of rows (``Allgatherv``); inside ``jn.jit`` they must hold
    the same number, since the compiled step's shapes are fixed.
    """
    x = _as_tensor(x, "allgather")
    return apply(ALLGATHER, x)


# --------------------------------------------------------------------------------------------------------------
# State: parameters, optimizer slots, buffers
# --------------------------------------------------------------------------------------------------------------

def broadcast_variables(variables, root=0):
    """Overwrite each variable in ``variables`` with rank ``root``'s value, in place (no copy on the CPU)."""
    c = _ctx()
    if c.size == 1:
        return
    variables = list(variables)
    sig = [(tuple(v.shape), v.dtype.str) for v in variables]
    _enter(c, "broadcast of the variables")
    root_sig = c.comm.bcast(sig, root=root)
    _leave(c)
    if root_sig != sig:
        raise ValueError(f"broadcast_variables: rank {c.rank} holds {len(sig)} variables that differ from rank "
                         f"{root}'s {len(root_sig)} (first difference: "
                         f"{next((a, b) for a, b in zip(sig + [None], root_sig + [None]) if a != b)})")
    for v in variables:
        d = v._data
        _enter(c, "broadcast of the variables")
        if isinstance(d, np.ndarray) and d.flags.c_contiguous:
            # MPI has no bfloat16 (nor, in every MPI, float16) type: their bits travel as uint16, unchanged
            c.comm.Bcast(d.view(np.uint16) if _lowp.is_lowp(d.dtype) else d, root=root)
        else:                                           # a GPU variable: staged through the host
            h = np.ascontiguousarray(_cuda.to_host(d) if not isinstance(d, np.ndarray) else d)
            c.comm.Bcast(h, root=root)
            v.assign(h)
        _leave(c)


def _module_state(module):
    return list(module.state_dict().values())


def broadcast_module(module, root=0):
    """Overwrite ``module``'s parameters and buffers with rank ``root``'s, in place; returns None."""
    broadcast_variables(_module_state(module), root)


def average_buffers(module):
    """Replace each floating buffer of ``module`` (batch norm's moving mean and variance) by its mean over the
    ranks; returns None. Each rank updates them from its own batches (statistics are per-rank); call this
    before evaluating or saving so that every rank holds the same model."""
    c = _ctx()
    if c.size == 1:
        return
    params = {id(p) for p in module.parameters()}
    bufs = [v for v in module.state_dict().values() if id(v) not in params and _lowp.is_floating(v.dtype)]
    with no_grad():
        for v in bufs:
            a = np.asarray(v.numpy())
            if _lowp.is_lowp(a.dtype):             # MPI has no bfloat16: the mean is taken in float32
                v.assign(_lowp.convert(_allreduce_cpu(_lowp.convert(a, np.float32), "mean"), a.dtype))
            else:
                v.assign(_allreduce_cpu(a, "mean"))


def allreduce_metrics(metrics, weight=1.0):
    """Return {name: mean over ranks weighted by ``weight``} for a dict of floats (one small Allreduce)."""
    c = _ctx()
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float, np.floating))
                  or (isinstance(v, np.generic) and _lowp.is_floating(v.dtype)))      # (bfloat16 scalars)
    buf = np.array([float(metrics[k]) * weight for k in keys] + [float(weight)], np.float64)
    tot = _allreduce_cpu(buf, "sum")
    out = dict(metrics)
    for i, k in enumerate(keys):
        out[k] = float(tot[i] / tot[-1]) if tot[-1] else float("nan")
    return out


# --------------------------------------------------------------------------------------------------------------
# Gradient averaging in buckets
# --------------------------------------------------------------------------------------------------------------

def plan_buckets(nbytes, dtypes, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """Group gradients into buckets: return a list of lists of indices into ``nbytes``/``dtypes``.

    Gradients are taken in order; a bucket holds one dtype and grows until adding the next gradient would
    pass ``bucket_bytes`` (a gradient larger than that gets a bucket of its own). ``bucket_bytes=0`` gives one
    bucket per gradient.
    """
    if bucket_bytes < 0:
        raise ValueError(f"plan_buckets: bucket_bytes must be >= 0, got {bucket_bytes}")
    if len(nbytes) != len(dtypes):
        raise ValueError("plan_buckets: nbytes and dtypes differ in length")
    open_by_dtype = {}          # dtype -> (bucket list, bytes so far)
    buckets = []
    for i, (n, dt) in enumerate(zip(nbytes, dtypes)):
        key = np.dtype(dt).str
        cur = open_by_dtype.get(key)
        if cur is not None and cur[1] + n <= bucket_bytes:
            cur[0].append(i)
            open_by_dtype[key] = (cur[0], cur[1] + n)
            continue
        b = [i]
        buckets.append(b)
        open_by_dtype[key] = (b, n)
    return buckets


class DistributedOptimizer(Optimizer):
    """Wrap ``optimizer`` for data-parallel training: same API, gradients averaged over the ranks in ``step``.

    Built on every rank after :func:`init`, it broadcasts rank ``root``'s parameters, optimizer slots and step
    counter (and, with ``module``, the module's buffers), so all ranks start alike. ``step()`` averages each
    parameter's ``.grad`` over the ranks, then applies the wrapped optimizer's update: dense gradients are
    packed into buckets of at most ``bucket_bytes`` (one ``Allreduce`` each), sparse gradients
    (``IndexedSlices`` from embedding lookups) are gathered from every rank (``Allgather`` of values and
    indices, the values divided by the world size) and stay sparse. It works eagerly and inside a ``jn.jit``
    step, where the collectives are nodes of the compiled plan between the backward pass and the updates.
    Everything else (``zero_grad``, ``param_groups``, ``state_dict``, ...) is the wrapped optimizer's: the
    two share their parameter groups, slots and step counter, so an ``lr_scheduler`` or a checkpoint works on
    either.
    """

    def __init__(self, optimizer, bucket_bytes=DEFAULT_BUCKET_BYTES, module=None, root=0, broadcast=True):
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("DistributedOptimizer: the optimizer is already distributed")
        if bucket_bytes < 0:
            raise ValueError(f"DistributedOptimizer: bucket_bytes must be >= 0, got {bucket_bytes}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"DistributedOptimizer: expected a jitnet optimizer, got {type(optimizer).__name__}")
        _ctx()
        # No Optimizer.__init__: the wrapped optimizer's groups, slots and step counter are shared, not copied.
        self.optimizer = optimizer
        self.defaults, self.param_groups, self.state = optimizer.defaults, optimizer.param_groups, optimizer.state
        self._owner, self.global_step = optimizer._owner, optimizer.global_step
        self.bucket_bytes = int(bucket_bytes)
        self._synced = False
        if broadcast:
            self.broadcast_state(module, root)

    def __getattr__(self, name):
        return getattr(self.__dict__["optimizer"], name)

    # the wrapped optimizer's rules
    @property
    def _needs_step(self):
        return self.optimizer._needs_step

    def _slot_inits(self, group):
        return self.optimizer._slot_inits(group)

    def _check_hyper(self, group):
        return self.optimizer._check_hyper(group)

    def _dense_update(self, p, g, slots, group, lr, t):
        return self.optimizer._dense_update(p, g, slots, group, lr, t)

    def _sparse_update(self, p, g, slots, group, lr, t):
        return self.optimizer._sparse_update(p, g, slots, group, lr, t)

    def add_param_group(self, group):
        """Add a parameter group to the wrapped optimizer (shared); return the group."""
        return self.optimizer.add_param_group(group)

    def state_dict(self):
        """Return the wrapped optimizer's state_dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        """Load into the wrapped optimizer; returns None (call ``broadcast_state`` to spread rank 0's)."""
        return self.optimizer.load_state_dict(state_dict)

    def state_variables(self, module=None):
        """Return the variables that define the training state: parameters, slots, step counter (and buffers)."""
        opt = self.optimizer
        out, seen = [], set()
        params = opt._all_params()
        extra = _module_state(module) if module is not None else []
        slots = []
        for p in params:
            slots.extend(opt._slots(p, opt._owner[id(p)]).values())
        for v in params + extra + slots + [opt.global_step]:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        return out

    def broadcast_state(self, module=None, root=0):
        """Overwrite parameters, optimizer state (and ``module``'s buffers) with rank ``root``'s; returns None."""
        broadcast_variables(self.state_variables(module), root)

    # -- gradients ---------------------------------------------------------------------------------------------
    def average_gradients(self, grads_and_vars):
        """Return [(averaged gradient, variable)] for the pairs with a gradient (every rank calls it alike)."""
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        c = _ctx()
        if c.size == 1:
            return pairs
        out = [None] * len(pairs)
        dense, sparse = [], []
        with no_grad():
            for i, (g, v) in enumerate(pairs):
                if isinstance(g, IndexedSlices):
                    if not g.dense_at_leaf:
                        sparse.append((i, g, v))
                        continue
                    g = g.to_dense()
                if not isinstance(g, Tensor):
                    g = Tensor(np.asarray(g, dtype=v.dtype))
                dense.append((i, g, v))
            buckets = plan_buckets([g.size * g.dtype.itemsize for _, g, _ in dense],
                                   [g.dtype for _, g, _ in dense], self.bucket_bytes)
            # Every collective first, then the unpacking: in a compiled step the collectives then sit between
            # the backward pass's native driver and one driver for the views and updates that follow.
            reduced = []
            for b in buckets:
                items = [dense[j] for j in b]
                if len(items) == 1:
                    reduced.append((items, apply(ALLREDUCE, items[0][1], op="mean")))
                else:
                    reduced.append((items, apply(ALLREDUCE_BUCKET, *[g for _, g, _ in items], average=True)))
            gathered = [(i, g, v, apply(ALLGATHER, g.values), apply(ALLGATHER, g.indices)) for i, g, v in sparse]
            for items, flat in reduced:
                if len(items) == 1:
                    i, g, v = items[0]
                    out[i] = (flat, v)
                    continue
                o = 0
                for i, g, v in items:
                    n = g.size
                    out[i] = (flat[o:o + n].reshape(g.shape), v)
                    o += n
            for i, g, v, vals, idx in gathered:
                out[i] = (IndexedSlices(vals * (1.0 / c.size), idx, g.dense_shape), v)
        return out

    def synchronize(self):
        """Average every parameter's ``.grad`` over the ranks now (before clipping, say); ``step`` then skips it."""
        params = [p for p in self.optimizer._all_params() if p.grad is not None]
        for (g, p) in self.average_gradients([(p.grad, p) for p in params]):
            p.grad = g
        self._synced = True

    def clip_grad_norm(self, max_norm):
        """Average the gradients over the ranks, then clip them to global norm ``max_norm``; return the norm."""
        if not self._synced:
            self.synchronize()
        return self.optimizer.clip_grad_norm(max_norm)

    def step(self, closure=None):
        """Average the gradients over the ranks and apply the wrapped optimizer's update; return closure's loss."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        opt = self.optimizer
        pairs = [(p.grad, p) for p in opt._all_params() if p.grad is not None]
        if not self._synced:
            pairs = self.average_gradients(pairs)
        self._synced = False
        opt.apply_gradients(pairs)
        return loss

    def apply_gradients(self, grads_and_vars):
        """Average the (gradient, variable) pairs over the ranks and apply them; returns None."""
        self.optimizer.apply_gradients(self.average_gradients(list(grads_and_vars)))

    def minimize(self, loss_fn, var_list=None):
        """Compute this rank's gradients of ``loss_fn()``, average them over the ranks, apply; return the loss."""
        loss, gv = self.optimizer.compute_gradients(loss_fn, var_list)
        self.apply_gradients(gv)
        return loss.detach()

    def zero_grad(self, set_to_none=True):
        """Clear the gradients (the wrapped optimizer's ``zero_grad``); returns None."""
        self._synced = False
        return self.optimizer.zero_grad(set_to_none)

    def __repr__(self):
        return f"DistributedOptimizer(bucket_bytes={self.bucket_bytes}, {self.optimizer!r})"
