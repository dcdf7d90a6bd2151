"""CIFAR-10 CNN with batch norm on augmented 24x24 crops; prints the loss per epoch, test accuracy and throughput.

    python examples/cnn_cifar10.py [--data-dir DIR_WITH_cifar-10-batches-bin] [--download] [--epochs 10]
    python examples/cnn_cifar10.py --synthetic 512 --epochs 3     # no CIFAR-10 here: generated binary files

CIFAR-10's binary release is read by jitnet.data.load_cifar10 (searched in the usual places, downloaded only
with --download). ``--synthetic N`` writes N records per batch file in that exact format (3072 bytes of
class-dependent colour patterns plus noise after a label byte) into a temporary directory and trains on them.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

import jitnet as jn
from jitnet.models.vision_cli import TRAINERS


def write_synthetic_cifar(root, n_per_file, seed=0):
    """Write data_batch_1..5.bin and test_batch.bin (CIFAR-10 binary records) under root; return the dir."""
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    proto = rng.random((10, 3, 32, 32))
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for f in files:
        y = rng.integers(0, 10, n_per_file)
        x = 0.6 * proto[y] + 0.4 * rng.random((n_per_file, 3, 32, 32))
        rec = np.concatenate([y.astype(np.uint8)[:, None], (x * 255).astype(np.uint8).reshape(n_per_file, -1)], 1)
        rec.tofile(os.path.join(d, f))
    return d


def main():
    """Train cnn_cifar (on CIFAR-10 or generated files) and print the result line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--synthetic", type=int, default=0)
    ns, rest = pre.parse_known_args()
    jn.set_num_threads(2)
    argv = ["--logdir", "runs/cnn_cifar", "--no-progress"]
    tmp = None
    if ns.synthetic:
        tmp = tempfile.TemporaryDirectory()
        write_synthetic_cifar(tmp.name, ns.synthetic)
        argv += ["--data-dir", tmp.name]
    argv += rest
    m = TRAINERS["cnn_cifar"].run(argv)
    print(f"RESULT cnn_cifar{' (synthetic CIFAR-format files)' if tmp else ''}: test accuracy "
          f"{m['test_accuracy'] * 100:.2f}% after {m['step']} steps, {m['seconds']:.0f} s; args: {' '.join(argv)}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
