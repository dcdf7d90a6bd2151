"""PyTorch-trained CNN weights in jitnet, and jitnet-trained weights in PyTorch: the same test accuracy.

    python bench/torch_weights.py [--steps 300] [--jitnet-steps N] [--batch-size 64] [--data-dir DIR]
                                   [--test-limit N]

The network is jitnet's ``cnn_mnist`` (``jitnet.models.vision.CNNMnist``: conv5x5-32 'same', pool, conv5x5-64
'same', pool, fc-1024, dropout, 10) and the same layers in ``torch.nn``. Both directions:

1. PyTorch trains it (Adam, ``--steps`` steps), ``safetensors.torch.save_file`` writes the state dict, and
   ``jitnet.interop.load_torch_state_dict`` reads the file into ``CNNMnist``'s network;
2. jitnet trains its own (the jitted ``train_step``), ``save_torch_safetensors`` writes it in PyTorch's layout,
   and ``safetensors.torch.load_file`` + ``load_state_dict`` read it into the PyTorch network.

Each direction prints the test accuracy in both libraries and on how many test images their predictions
differ. Data: full Fashion-MNIST when found locally (``/usr/share/datasets/fashion-mnist`` from the
``dataset-fashion-mnist`` package, or ``--data-dir``), else jitnet's embedded subset. Needs PyTorch and
safetensors (``pip install "jitnet[interop]"``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def torch_cnn(dropout=0.5):
    """Return CNNMnist's layers in torch.nn (padding 2 = 'same' for 5x5)."""
    from torch import nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(1024, 10))


def load_data(data_dir=None, test_limit=None):
    """Return (x_train, y_train, x_test, y_test, source): float32 NCHW in [0, 1], int64 labels."""
    from jitnet.data import load_default_images
    xtr, ytr, src = load_default_images("train", path=data_dir, as_float=True)
    xte, yte, _ = load_default_images("test", path=data_dir, as_float=True)
    if test_limit:
        xte, yte = xte[:test_limit], yte[:test_limit]
    return xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), src


def torch_logits(net, x, batch=500):
    """Return the logits of ``x`` from torch ``net`` in eval mode, as a NumPy array."""
    import torch
    net.eval()
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def train_torch(xtr, ytr, steps, batch, seed):
    """Return a torch CNN trained for ``steps`` Adam steps on random batches."""
    import torch
    torch.manual_seed(seed)
    net = torch_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(steps):
        idx = rng.integers(0, len(ytr), batch)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(xtr[idx])), torch.from_numpy(ytr[idx]))
        loss.backward()
        opt.step()
    return net


def train_jitnet(xtr, ytr, steps, batch, seed):
    """Return a jitnet CNNMnist trained for ``steps`` jitted Adam steps on random batches."""
    import jitnet as jn
    from jitnet.models.vision import CNNMnist
    jn.random.seed(seed)
    model = CNNMnist()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(ytr), batch)
        model.train_step(jn.tensor(xtr[idx]), jn.tensor(ytr[idx]))
    return model


def torch_to_jitnet(xtr, ytr, xte, yte, steps, batch, seed, workdir):
    """Train in torch, save with safetensors.torch, load into jitnet; return the measurements."""
    from safetensors.torch import save_file

    from jitnet.interop import load_torch_state_dict
    from jitnet.models.vision import CNNMnist
    t0 = time.perf_counter()
    tnet = train_torch(xtr, ytr, steps, batch, seed)
    train_s = time.perf_counter() - t0
    path = os.path.join(workdir, "torch_cnn.safetensors")
    save_file(tnet.state_dict(), path)
    model = CNNMnist()
    load_torch_state_dict(model.net, path)            # strict: every weight mapped
    tl = torch_logits(tnet, xte)
    jl = model.predict(xte)
    return dict(direction="torch -> jitnet", steps=steps, train_s=train_s,
                trained_in=float((tl.argmax(1) == yte).mean()),
                loaded_in=float(model.evaluate(xte, yte)["test_accuracy"]),
                differ=int((tl.argmax(1) != jl.argmax(1)).sum()), max_logit_diff=float(np.abs(tl - jl).max()))


def jitnet_to_torch(xtr, ytr, xte, yte, steps, batch, seed, workdir):
    """Train in jitnet, save in PyTorch's layout, load with safetensors.torch into torch; return measurements."""
    from safetensors.torch import load_file

    from jitnet.interop import save_torch_safetensors
    t0 = time.perf_counter()
    model = train_jitnet(xtr, ytr, steps, batch, seed)
    train_s = time.perf_counter() - t0
    path = os.path.join(workdir, "jitnet_cnn.safetensors")
    save_torch_safetensors(model.net, path)           # PyTorch's names for the same Sequential: 0.weight, ...
    tnet = torch_cnn()
    tnet.load_state_dict(load_file(path))             # strict in torch too
    tl = torch_logits(tnet, xte)
    jl = model.predict(xte)
    return dict(direction="jitnet -> torch", steps=steps, train_s=train_s,
                trained_in=float(model.evaluate(xte, yte)["test_accuracy"]),
                loaded_in=float((tl.argmax(1) == yte).mean()),
                differ=int((tl.argmax(1) != jl.argmax(1)).sum()), max_logit_diff=float(np.abs(tl - jl).max()))


def run(steps=300, batch=64, seed=0, data_dir=None, test_limit=None, jitnet_steps=None):
    """Return (data source, number of test images, [measurements of both directions]).

    ``steps`` training steps in PyTorch, ``jitnet_steps`` (default ``steps``) in jitnet.
    """
    xtr, ytr, xte, yte, src = load_data(data_dir, test_limit)
    js = steps if jitnet_steps is None else jitnet_steps
    with tempfile.TemporaryDirectory() as d:
        rows = [torch_to_jitnet(xtr, ytr, xte, yte, steps, batch, seed, d),
                jitnet_to_torch(xtr, ytr, xte, yte, js, batch, seed, d)]
    return src, len(yte), rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jitnet-steps", type=int, default=None, help="training steps in jitnet (default --steps)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-limit", type=int, default=None)
    a = p.parse_args(argv)
    try:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        sys.exit('bench/torch_weights.py needs PyTorch and safetensors: pip install "jitnet[interop]"')
    src, n, rows = run(a.steps, a.batch_size, a.seed, a.data_dir, a.test_limit, a.jitnet_steps)
    print(f"# CNNMnist weights across PyTorch and jitnet: Adam, batch {a.batch_size}, data {src}, {n} test images")
    print("| direction | training steps | accuracy where trained | accuracy where loaded | difference "
          "| predictions that differ | max logit difference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['direction']} | {r['steps']} | {r['trained_in']:.4f} | {r['loaded_in']:.4f} | "
              f"{abs(r['trained_in'] - r['loaded_in']) * 100:.2f}% | {r['differ']} of {n} | "
              f"{r['max_logit_diff']:.2e} |")


if __name__ == "__main__":
    main()
