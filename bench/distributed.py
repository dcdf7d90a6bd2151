"""Data-parallel training over MPI: collective throughput and the cost of data parallelism on the same cores.

    python bench/distributed.py [--quick] [--models mlp cnn_mnist] [--steps 200] [--cnn-steps 40]
                                [--bucket-bytes N] [--repeats 3] [--json out]

1. Allreduce of float32 buffers from 1 KiB to 64 MiB between 2 ranks (``mpiexec -n 2``): mpi4py's own
   ``comm.Allreduce(a, b)`` against jitnet's ``distributed.allreduce(t, "sum", out=o)`` on the same buffers,
   and against ``distributed.allreduce(t, "sum")``, which returns a new tensor (what a training step uses;
   with the training command's malloc setting, so a new output reuses freed memory instead of faulting in
   fresh pages).
   The calls run in alternating blocks; each figure is the median time per call on rank 0, shown as
   algorithm bandwidth (bytes / time). Goal: jitnet's overhead over mpi4py <= 10%.
2. Training throughput (examples/s) of the CLI's models, jitted step, Adam, the CLI's batch: 2 ranks x 1 thread
   (``mpiexec -n 2``, per-rank batch B/2, DistributedOptimizer) against 1 rank x 2 threads (one process,
   batch B). Both use the machine's 2 cores, so the ratio is the cost of data parallelism (communication,
   smaller per-rank matrices) against threading. Goal >= 0.9x. The 2-rank worker also times the gradient
   averaging of one step alone (its Allreduce calls, eager, on the step's real gradients): the share of the
   step it takes is the most that overlapping communication with the backward pass could win.

Every configuration runs in fresh processes (``--repeats`` times, alternating; the table shows the median).
Kernels come from the disk cache; run ``python -m jitnet train mlp --epochs 1`` once first on a cold machine.
``--quick`` (sizes up to 1 MiB, few steps) only checks that everything runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _util import dump, table  # noqa: E402

BATCH = {"mlp": 128, "cnn_mnist": 64, "cnn_cifar": 128}
SHAPE = {"mlp": (1, 28, 28), "cnn_mnist": (1, 28, 28), "cnn_cifar": (3, 24, 24)}
SIZES = [1 << k for k in range(10, 27, 2)]            # 1 KiB, 4 KiB, ..., 64 MiB


def _mpiexec():
    cand = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = cand if os.path.exists(cand) else shutil.which("mpiexec")
    if exe is None:
        sys.exit("bench/distributed.py: mpiexec not found (pip install 'jitnet[mpi]')")
    return exe


def _threads_env(n):
    env = dict(os.environ)
    for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[v] = str(n)
    return env


def _run_worker(args, ranks, threads):
    """Run this file as a worker (under mpiexec when ``ranks`` > 1); return what rank 0 wrote (JSON)."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + args + ["--out", out]
    if ranks > 1:
        cmd = [_mpiexec(), "-n", str(ranks)] + cmd
    try:
        subprocess.run(cmd, check=True, env=_threads_env(threads))
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


# --------------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------------

def _median_block_time(fn, comm, iters, blocks):
    import time as _t
    out = []
    for _ in range(blocks):
        comm.Barrier()
        t0 = _t.perf_counter()
        for _ in range(iters):
            fn()
        out.append((_t.perf_counter() - t0) / iters)
    return out


def worker_allreduce(sizes, quick):
    """Time mpi4py's Allreduce and jitnet's allreduce on the same buffers; return rows (rank 0)."""
    import numpy as np

    import jitnet as jn
    import jitnet.distributed as dist
    r, n = dist.init()
    jn.set_malloc_tuning(True)                 # as in training (the CLI's setting): new outputs reuse memory
    comm = dist._ctx().comm
    rows = []
    for size in sizes:
        count = size // 4
        a = np.random.default_rng(r).random(count, dtype=np.float32)
        b = np.empty_like(a)
        t = jn.Tensor(a)                       # shares a's memory
        o = jn.Tensor(b)
        iters = max(3, min(2000, (1 << 26) // size // (8 if quick else 1)))
        blocks = 3 if quick else 7
        fns = {"mpi4py": lambda: comm.Allreduce(a, b),
               "jitnet_out": lambda: dist.allreduce(t, "sum", out=o),
               "jitnet_new": lambda: dist.allreduce(t, "sum")}
        for f in fns.values():                 # warm-up: first-touch pages, connection setup
            f()
        times = {k: [] for k in fns}
        for _ in range(blocks):                # alternate the three in blocks
            for k, f in fns.items():
                times[k] += _median_block_time(f, comm, iters, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        check = dist.allreduce(t, "sum").numpy()
        comm.Allreduce(a, b)
        assert np.array_equal(check, b)
        rows.append({"bytes": size, "iters": iters, "mpi4py_GB_s": size / med["mpi4py"] / 1e9,
                     "jitnet_GB_s": size / med["jitnet_out"] / 1e9,
                     "jitnet_new_GB_s": size / med["jitnet_new"] / 1e9,
                     "mpi4py_us": med["mpi4py"] * 1e6, "jitnet_us": med["jitnet_out"] * 1e6,
                     "jitnet_new_us": med["jitnet_new"] * 1e6,
                     "overhead": med["jitnet_out"] / med["mpi4py"] - 1,
                     "overhead_new": med["jitnet_new"] / med["mpi4py"] - 1})
    return rows if r == 0 else None


def worker_train(name, steps, warmup, threads, bucket_bytes=None):
    """Time ``steps`` jitted training steps of model ``name`` (data-parallel under mpiexec); return a dict."""
    import numpy as np

    import jitnet as jn
    from jitnet.models import vision as V
    distributed = "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ
    r, n = 0, 1
    if distributed:
        import jitnet.distributed as dist
        r, n = dist.init()
    jn.set_num_threads(threads)
    jn.set_malloc_tuning(True)
    jn.random.seed(0)
    model = {"mlp": lambda: V.MLP(), "cnn_mnist": lambda: V.CNNMnist(), "cnn_cifar": lambda: V.CNNCifar()}[name]()
    if n > 1:
        model.opt = dist.DistributedOptimizer(model.opt, module=model.net,
                                              bucket_bytes=dist.DEFAULT_BUCKET_BYTES if bucket_bytes is None
                                              else bucket_bytes)
    b = BATCH[name] // n
    rng = np.random.default_rng(r)
    x = jn.tensor(rng.random((b,) + SHAPE[name], dtype=np.float32))
    y = jn.tensor(np.arange(b) % 10)
    for _ in range(warmup):
        model.train_step(x, y).item()
    if n > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_step(x, y).item()
    if n > 1:
        dist.barrier()
    sec = time.perf_counter() - t0
    res = {"model": name, "ranks": n, "threads": threads, "batch": BATCH[name], "steps": steps,
           "step_ms": sec / steps * 1e3, "ex_s": steps * BATCH[name] / sec}
    if n > 1:                                   # the gradient averaging of one step alone, on its real gradients
        opt = model.opt
        model.net.train()
        opt.zero_grad()
        jn.nn.functional.cross_entropy(model.inference(x), y).backward()
        pairs = [(p.grad, p) for p in opt._all_params() if p.grad is not None]
        res["grad_bytes"] = int(sum(g.size * g.dtype.itemsize for g, _ in pairs))
        res["buckets"] = len(dist.plan_buckets([g.size * g.dtype.itemsize for g, _ in pairs],
                                               [g.dtype for g, _ in pairs], opt.bucket_bytes))
        for _ in range(3):
            opt.average_gradients(pairs)
        dist.barrier()
        t0 = time.perf_counter()
        reps = max(5, steps)
        for _ in range(reps):
            opt.average_gradients(pairs)
        res["comm_ms"] = (time.perf_counter() - t0) / reps * 1e3
    return res if r == 0 else None


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------

def main(argv=None):
    """Run both parts and print the tables; return the rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few steps: check that it runs")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn_mnist"], choices=list(BATCH))
    p.add_argument("--steps", type=int, default=200, help="timed steps (MLP)")
    p.add_argument("--cnn-steps", type=int, default=40, help="timed steps (CNNs)")
    p.add_argument("--repeats", type=int, default=3, help="fresh runs of each training configuration")
    p.add_argument("--bucket-bytes", type=int, default=None,
                   help="DistributedOptimizer's bucket size (default: jitnet.distributed.DEFAULT_BUCKET_BYTES)")
    p.add_argument("--skip-allreduce", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=6, help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if args.task == "allreduce":
            res = worker_allreduce(args.sizes, args.quick)
        else:
            res = worker_train(args.task, args.steps, args.warmup, args.threads, args.bucket_bytes)
        if res is not None:
            with open(args.out, "w") as f:
                json.dump(res, f)
        return res

    if args.quick:
        args.steps, args.cnn_steps, args.repeats = 10, 3, 1
    sizes = [s for s in SIZES if s <= (1 << 20)] if args.quick else SIZES
    out = {}
    if not args.skip_allreduce:
        rows = _run_worker(["--task", "allreduce", "--sizes"] + [str(s) for s in sizes]
                           + (["--quick"] if args.quick else []), 2, 1)
        shown = [{"size": _size(r["bytes"]), "mpi4py GB/s": r["mpi4py_GB_s"], "jitnet GB/s": r["jitnet_GB_s"],
                  "overhead": f"{r['overhead']:+.1%}", "new-tensor GB/s": r["jitnet_new_GB_s"],
                  "overhead (new)": f"{r['overhead_new']:+.1%}"} for r in rows]
        table(shown, title="allreduce, 2 ranks, float32 sum: mpi4py Allreduce vs jitnet.distributed.allreduce "
                           "(out=, and returning a new tensor); median of alternating blocks")
        out["allreduce"] = rows
    if not args.skip_train:
        train = []
        for name in args.models:
            steps = args.cnn_steps if name.startswith("cnn") else args.steps
            common = ["--task", name, "--steps", str(steps), "--warmup", "6" if args.quick else "8"]
            if args.bucket_bytes is not None:
                common += ["--bucket-bytes", str(args.bucket_bytes)]
            one, two = [], []
            for _ in range(args.repeats):
                one.append(_run_worker(common + ["--threads", "2"], 1, 2))
                two.append(_run_worker(common + ["--threads", "1"], 2, 1))
            e1 = statistics.median(r["ex_s"] for r in one)
            e2 = statistics.median(r["ex_s"] for r in two)
            comm = statistics.median(r["comm_ms"] for r in two)
            step2 = statistics.median(r["step_ms"] for r in two)
            train.append({"model": name, "batch": BATCH[name], "1x2 ex/s": e1, "2x1 ex/s": e2,
                          "ratio 2x1/1x2": e2 / e1, "goal": ">=0.9x", "met": "met" if e2 / e1 >= 0.9 else "not met",
                          "grad MB": two[0]["grad_bytes"] / 1e6, "buckets": two[0]["buckets"],
                          "2x1 step ms": step2, "allreduce ms": comm, "comm share": f"{comm / step2:.1%}"})
        table(train, title="training throughput, 2 ranks x 1 thread (MPI, per-rank batch B/2) vs 1 rank x 2 "
                           f"threads (batch B); median of {args.repeats} fresh runs each")
        out["train"] = train
    dump(out, args.json)
    return out


def _size(b):
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


if __name__ == "__main__":
    main()
