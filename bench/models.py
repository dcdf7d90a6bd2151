"""Training throughput of the vision models: a jitted jitnet step against the same network in PyTorch CPU eager.

    python bench/models.py [--threads 2] [--steps 200] [--cnn-steps 60] [--models mlp cnn_mnist ...] [--json out]

Same architecture, batch, optimizer (Adam) and thread count on both sides, measured in the same run: after
warm-up steps, jitnet and PyTorch take turns in rounds (so load from other processes hits both alike) and
examples/s is summed over all rounds. Inputs are fixed random batches of the model's input shape; for cnn_cifar
they are the 24x24 crops the model trains on (augmentation is data loading, outside the step, for both).
Goals: MLP >= 1.2x, cnn_mnist >= 0.8x, cnn_cifar >= 0.8x, autoencoder >= 1.0x PyTorch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump, set_threads, table  # noqa: E402

import jitnet as jn  # noqa: E402
from jitnet.models import vision as V  # noqa: E402

GOALS = {"mlp": 1.2, "cnn_mnist": 0.8, "cnn_cifar": 0.8, "autoencoder": 1.0}
BATCH = {"mlp": 128, "cnn_mnist": 64, "cnn_cifar": 128, "autoencoder": 100}
SHAPE = {"mlp": (1, 28, 28), "cnn_mnist": (1, 28, 28), "cnn_cifar": (3, 24, 24), "autoencoder": (1, 28, 28)}


def jitnet_step(name):
    """Return a function running one jitted jitnet training step of model ``name`` on a fixed batch."""
    jn.random.seed(0)
    model = {"mlp": lambda: V.MLP(), "cnn_mnist": lambda: V.CNNMnist(), "cnn_cifar": lambda: V.CNNCifar(),
             "autoencoder": lambda: V.Autoencoder(code_size=30)}[name]()
    rng = np.random.default_rng(0)
    b = BATCH[name]
    x = jn.tensor(rng.random((b,) + SHAPE[name], dtype=np.float32))
    y = jn.tensor(np.arange(b) % 10)
    if name == "autoencoder":
        return lambda: model.train_step(x).item()
    return lambda: model.train_step(x, y).item()


def torch_step(name):
    """Return a function running one PyTorch eager training step of the same network on a fixed batch."""
    import torch
    import torch.nn as tnn
    torch.manual_seed(0)
    if name == "mlp":
        net = tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 256), tnn.ReLU(), tnn.Linear(256, 256), tnn.ReLU(),
                             tnn.Linear(256, 10))
    elif name == "cnn_mnist":
        net = tnn.Sequential(tnn.Conv2d(1, 32, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
                             tnn.Conv2d(32, 64, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                             tnn.Linear(3136, 1024), tnn.ReLU(), tnn.Dropout(0.5), tnn.Linear(1024, 10))
    elif name == "cnn_cifar":
        net = tnn.Sequential(tnn.Conv2d(3, 64, 5, padding=2, bias=False), tnn.BatchNorm2d(64), tnn.ReLU(),
                             tnn.MaxPool2d(2), tnn.Conv2d(64, 64, 5, padding=2, bias=False), tnn.BatchNorm2d(64),
                             tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                             tnn.Linear(2304, 384, bias=False), tnn.BatchNorm1d(384), tnn.ReLU(),
                             tnn.Linear(384, 192, bias=False), tnn.BatchNorm1d(192), tnn.ReLU(), tnn.Linear(192, 10))
    else:
        dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
        layers = [tnn.Flatten()]
        for a, c in zip(dims[:-1], dims[1:]):
            layers += [tnn.Linear(a, c, bias=False), tnn.BatchNorm1d(c), tnn.Sigmoid()]
        net = tnn.Sequential(*layers)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    b = BATCH[name]
    x = torch.from_numpy(rng.random((b,) + SHAPE[name], dtype=np.float32))
    y = torch.from_numpy(np.arange(b) % 10)

    def step():
        """Run one training step; return the loss."""
        opt.zero_grad()
        out = net(x)
        if name == "autoencoder":
            loss = ((out - x.reshape(b, 784)) ** 2).sum(1).mean()
        else:
            loss = tnn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def measure(name, steps, rounds=4, warmup=5):
    """Return a result row: examples/s of jitnet (jit) and PyTorch over ``steps`` steps each, and the ratio."""
    fj, ft = jitnet_step(name), torch_step(name)
    for _ in range(warmup):
        fj()
        ft()
    per = max(1, steps // rounds)
    tj = tt = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per):
            fj()
        tj += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(per):
            ft()
        tt += time.perf_counter() - t0
    n = per * rounds * BATCH[name]
    ej, et = n / tj, n / tt
    ratio = ej / et
    return {"model": name, "batch": BATCH[name], "steps": per * rounds, "jitnet_ex_s": ej, "torch_ex_s": et,
            "ratio": ratio, "goal": f">={GOALS[name]}x", "met": "met" if ratio >= GOALS[name] else "not met"}


def main(argv=None):
    """Run the benchmark and print the table; return the rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="timed steps per framework (MLP, autoencoder)")
    p.add_argument("--cnn-steps", type=int, default=60, help="timed steps per framework (CNNs)")
    p.add_argument("--models", nargs="+", default=list(GOALS), choices=list(GOALS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows = []
    for name in args.models:
        steps = args.cnn_steps if name.startswith("cnn") else args.steps
        rows.append(measure(name, steps))
        print(f"{name}: {rows[-1]['ratio']:.2f}x PyTorch ({rows[-1]['met']})", flush=True)
    table(rows, title=f"training throughput, jitted jitnet step vs PyTorch CPU eager, {args.threads} threads")
    dump(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
