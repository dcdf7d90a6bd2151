"""Per-step cost of jitnet's checks when they are off: the jitted MLP step, the eager MLP step, a seq2seq step.

    python bench/overhead.py [--threads 1] [--reps 7] [--steps 200] [--json out.json]
    python bench/overhead.py --paired OLD_TREE NEW_TREE [--reps 25]      # the same, two trees, interleaved

Run it once per source tree with the trees alternating (``PYTHONPATH=<tree> python bench/overhead.py``), so
a change's cost is read from the same machine in the same minutes. Each figure is a triple, milliseconds per step:
the median wall-clock time and the median CPU time of this process over ``--reps`` blocks of the block's mean
(after warm-up steps that compile), and the fastest block's wall-clock time (the least disturbed by other
jobs on the machine). Models: the MLP of
``bench/step.py`` (784-256-256-10, batch 128, SGD momentum) and the seq2seq model of ``bench/seq2seq.py``
(date task, LSTM 64, batch 64, Adam, one fixed batch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import jitnet as jn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import make_mlp  # noqa: E402  (the MLP of bench/step.py)


def _blocks(fn, steps, reps, warmup):
    """Return the medians over ``reps`` blocks of the wall-clock and CPU milliseconds per call of ``fn``."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        wall.append((time.perf_counter() - t0) / steps * 1e3)
        cpu.append((time.process_time() - c0) / steps * 1e3)
    return round(statistics.median(wall), 4), round(statistics.median(cpu), 4), round(min(wall), 4)


def mlp_step(jit):
    """Return a zero-argument function running one MLP training step of ``bench/step.py`` (jitted or eager)."""
    _, _, step = make_mlp(0)
    f = jn.jit(step) if jit else step
    rng = np.random.default_rng(0)
    x = jn.tensor(rng.normal(size=(128, 784)).astype(np.float32))
    y = jn.tensor(rng.integers(0, 10, 128))
    return lambda: f(x, y)


def seq2seq_step():
    """Return a zero-argument function running one jitted seq2seq training step on a fixed batch."""
    from jitnet.data import seq_tasks as T
    from jitnet.models import seq2seq as S
    task = T.date_task(2000, 100, seed=0)
    jn.random.seed(0)
    net = S.Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=32, hidden=64)
    tr = S.Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, lr=2e-3, clip_norm=5.0,
                          max_len=task.max_target_len)
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    batch = next(iter(T.BucketBatcher(src, tgt, 64, n_buckets=1, seed=0).batches(0)))
    return lambda: tr.train_step(batch)


def serve(a):
    """Answer each line "<name>" on stdin with the milliseconds per step of one block of that model."""
    fns = {"mlp_jit": (mlp_step(True), a.steps), "mlp_eager": (mlp_step(False), a.steps // 4),
           "seq2seq_jit": (seq2seq_step(), a.steps // 10)}
    for fn, n in fns.values():
        for _ in range(5):
            fn()
    print("ready", flush=True)
    for line in sys.stdin:
        fn, n = fns[line.strip()]
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print((time.perf_counter() - t0) / n * 1e3, flush=True)


def paired(a):
    """Run the models of two source trees in two processes, blocks interleaved; print medians and their ratio."""
    import subprocess
    procs = []
    for tree in a.paired:
        env = dict(os.environ, PYTHONPATH=tree)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--threads",
                                       str(a.threads), "--steps", str(a.steps)], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    res = {"trees": a.paired}
    for name in a.only:
        times = [[], []]
        for r in range(a.reps):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for k in order:
                procs[k].stdin.write(name + "\n")
                procs[k].stdin.flush()
                times[k].append(float(procs[k].stdout.readline()))
        m = [statistics.median(t) for t in times]
        ratios = statistics.median(b / o for o, b in zip(times[0], times[1]))
        res[name] = {"old_ms": round(m[0], 4), "new_ms": round(m[1], 4), "median_pair_ratio": round(ratios, 4)}
    for p in procs:
        p.stdin.close()
        p.wait()
    print(json.dumps(res))
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--paired", nargs=2, default=None, metavar=("OLD_TREE", "NEW_TREE"))
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--only", nargs="+", default=["mlp_jit", "mlp_eager", "seq2seq_jit"],
                   choices=["mlp_jit", "mlp_eager", "seq2seq_jit"], help="with --paired: the steps to time")
    a = p.parse_args()
    if a.paired:
        res = paired(a)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        return
    jn.set_num_threads(a.threads)
    if hasattr(jn, "set_malloc_tuning"):
        jn.set_malloc_tuning(True)             # as the training CLI does
    if a.serve:
        return serve(a)
    res = {"tree": os.path.dirname(os.path.dirname(os.path.abspath(jn.__file__)))}
    res["mlp_jit_ms"] = _blocks(mlp_step(True), a.steps, a.reps, 10)
    res["mlp_eager_ms"] = _blocks(mlp_step(False), a.steps // 4, a.reps, 3)
    res["seq2seq_jit_ms"] = _blocks(seq2seq_step(), a.steps // 10, a.reps, 5)
    print(json.dumps(res))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
