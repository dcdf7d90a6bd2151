"""Build the embedded Fashion-MNIST subset shipped in ``jitnet/data/embedded/``.

Usage::

    python -m jitnet.data.make_embedded [SOURCE_DIR] [--train N] [--test N] [--seed S]

SOURCE_DIR defaults to /usr/share/datasets/fashion-mnist.  The subset is
class-balanced (N/10 images per class), chosen with a fixed seed, kept in the
original file order, and written with ``np.savez_compressed`` as
``fashion-mnist-{train,test}.npz`` holding ``images`` (uint8, N x 28 x 28) and
``labels`` (uint8, N) plus ``indices`` (int64, positions in the full split).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from .datasets import EMBEDDED_DIR, load_fashion_mnist

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
DEFAULT_TRAIN = 2500
DEFAULT_TEST = 500
DEFAULT_SEED = 20240601


def balanced_indices(labels: np.ndarray, n: int, seed: int, n_classes: int = 10) -> np.ndarray:
    """Return sorted indices of ``n`` examples, ``n // n_classes`` from each class, drawn with ``seed``."""
    if n % n_classes:
        raise ValueError(f"subset size {n} is not a multiple of {n_classes}")
    rng = np.random.default_rng(seed)
    per = n // n_classes
    picks = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per:
            raise ValueError(f"class {c} has only {len(idx)} examples, need {per}")
        picks.append(rng.choice(idx, size=per, replace=False))
    return np.sort(np.concatenate(picks))


def build(source: str = DEFAULT_SOURCE, out_dir: str = EMBEDDED_DIR, n_train: int = DEFAULT_TRAIN,
          n_test: int = DEFAULT_TEST, seed: int = DEFAULT_SEED) -> list[str]:
    """Write the subset files and return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = load_fashion_mnist(split, path=source, download=False)
        idx = balanced_indices(labels, n, s)
        dest = os.path.join(out_dir, f"fashion-mnist-{split}.npz")
        tmp = dest + ".part.npz"
        np.savez_compressed(tmp, images=images[idx], labels=labels[idx].astype(np.uint8),
                            indices=idx.astype(np.int64))
        os.replace(tmp, dest)
        written.append(dest)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=DEFAULT_SOURCE)
    p.add_argument("--out", default=EMBEDDED_DIR)
    p.add_argument("--train", type=int, default=DEFAULT_TRAIN)
    p.add_argument("--test", type=int, default=DEFAULT_TEST)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    a = p.parse_args(argv)
    for path in build(a.source, a.out, a.train, a.test, a.seed):
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
