"""Before/after timing of two jitted training steps, for the jitnet tree on PYTHONPATH (prints one JSON line).

    python bench/ab_steps.py mlp|s2s

``mlp``: MLP 784-256-256-10, batch 128, SGD momentum, integer-label cross-entropy; ``s2s``: the seq2seq date
model (embed 32, hidden 64, LSTM, batch 64, one bucket), Adam with clipping. Each prints the median of 9
blocks (50 MLP steps, 10 seq2seq steps per block) in ms per step, after warm-up. The peer is the same code at
another commit: check it out with ``git worktree add /tmp/base <commit>`` and alternate the two trees in one
session (see BENCHMARKS.md, "2026-12-07: bounds checks"), so that load from other jobs hits both alike.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet.data import seq_tasks as T
from jitnet.models import seq2seq as S


def med(f, n, reps):
    """Return the median over ``reps`` blocks of ``n`` calls of ``f``, in ms per call."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        ts.append((time.perf_counter() - t0) / n * 1e3)
    return float(np.median(ts))


def mlp():
    """Return the jitted MLP training step's median ms."""
    jn.random.seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = jn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    @jn.jit
    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    r = np.random.default_rng(0)
    x = jn.tensor(r.normal(size=(128, 784)).astype(np.float32))
    y = jn.tensor(r.integers(0, 10, 128))
    for _ in range(10):
        step(x, y).item()
    return med(lambda: step(x, y).item(), 50, 9)


def s2s():
    """Return the jitted seq2seq training step's median ms."""
    task = T.date_task(2000, 100, seed=0)
    jn.random.seed(0)
    net = S.Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=32, hidden=64, layers=1, cell="lstm")
    jt = S.Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, lr=1e-3, clip_norm=5.0,
                          max_len=task.max_target_len, eval_batch=500)
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    b = list(T.BucketBatcher(src, tgt, 64, n_buckets=1, seed=0).batches(0))[0]
    for _ in range(5):
        jt.train_step(b)[0].item()
    return med(lambda: jt.train_step(b)[0].item(), 10, 9)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "mlp"
    print(json.dumps({"tree": os.environ.get("TREE"), which: (mlp if which == "mlp" else s2s)()}), flush=True)
