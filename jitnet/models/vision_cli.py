"""The vision models' training commands and the autoencoder's figure (the models are
:mod:`jitnet.models.vision`).

    python -m jitnet train logreg|mlp|cnn_mnist|cnn_cifar|autoencoder [--epochs N] [--batch-size B] ...

A classifier's command is a :class:`ClassifierCommand` (its parser, its ``--smoke`` widths, ``fit``); the
autoencoder's command also fits the PCA baseline and plots reconstructions and codes.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ._train import UsageError, apply_smoke, base_parser, fit, learning_rate, load_dataset, setup_run
from .vision import Autoencoder, CNNCifar, CNNMnist, LogisticRegression, MLP, pca_errors

__all__ = ["plot_autoencoder", "ClassifierCommand", "SMOKE", "SMOKE_SIZE", "shrink_images", "autoencoder_parser",
           "run_autoencoder", "train_autoencoder", "TRAINERS"]


# ==============================================================================================================
# The autoencoder's figure
# ==============================================================================================================

def plot_autoencoder(model, x_test, y_test, path, n=10):
    """Save a figure of test images, their reconstructions and (code size 2) the codes coloured by class."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("autoencoder: matplotlib is not installed, skipping the plot", flush=True)
        return None
    rec = model.reconstruct(x_test[:n]).reshape(n, 28, 28)
    two_d = model.code_size == 2
    fig = plt.figure(figsize=(12, 8 if two_d else 3))
    for i in range(n):
        for r, img in enumerate((x_test[i].reshape(28, 28), rec[i])):
            ax = fig.add_subplot(3 if two_d else 2, n, r * n + i + 1)
            ax.imshow(img, cmap="gray")
            ax.axis("off")
    if two_d:
        codes = model.codes(x_test)
        ax = fig.add_subplot(3, 1, 3)
        sc = ax.scatter(codes[:, 0], codes[:, 1], c=y_test, cmap="tab10", s=2)
        fig.colorbar(sc, ax=ax)
        ax.set_title("2-D codes of the test set by class")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ==============================================================================================================
# Training commands
# ==============================================================================================================

class ClassifierCommand:
    """The training command of one classifier: ``cmd(argv) -> exit code``; ``cmd.run(argv) -> final metrics``."""

    def __init__(self, name, build, *, epochs, batch_size, lr, lr_decay=1.0, dataset="default",
                 datasets=("default", "fashion-mnist", "mnist"), tiny=None):
        self.name, self.build = name, build
        self.tiny = tiny or (lambda shape: {})  # --smoke: image shape -> the model's tiny widths and input size
        self.defaults = dict(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, dataset=dataset,
                             datasets=list(datasets))

    def parser(self):
        """Return the ArgumentParser of ``python -m jitnet train NAME``."""
        return base_parser(self.name, self.build.__doc__.splitlines()[0], **self.defaults)

    def run(self, argv=None):
        """Train with the options in argv; return the last epoch's metrics (with "step" and "seconds")."""
        args = apply_smoke(self.parser().parse_args(argv), **SMOKE)
        args.model_name = self.name
        logdir = setup_run(args)
        xtr, ytr, xte, yte, src = _smoke_data(args) if args.smoke else load_dataset(
            args.dataset, args.data_dir, args.download, args.limit, args.test_limit)
        print(f"{self.name}: {len(ytr)} training / {len(yte)} test examples from {src}; logdir {logdir}",
              flush=True)
        args.lr = learning_rate(args, len(ytr))
        model = self.build(args, **(self.tiny(xtr.shape[1:]) if args.smoke else {}))
        t0 = time.perf_counter()
        metrics = fit(model, args, (xtr, ytr, xte, yte), logdir, self.name)
        metrics["seconds"] = time.perf_counter() - t0
        print(f"{self.name}: test accuracy {metrics['test_accuracy']:.4f} after {args.epochs} epochs "
              f"({metrics['step']} steps), {metrics['seconds']:.0f} s", flush=True)
        return metrics

    def __call__(self, argv=None):
        self.run(argv)
        return 0


# --smoke: one epoch of two batches of 2 and 2 test images shrunk to 4x4 (6x6 for CIFAR-10's model, which crops
# them to 4x4), with the models' widths and input sizes shrunk to match (see TRAINERS' tiny): every layer still
# runs, on inputs that Numba's CUDA simulator (one Python thread per GPU thread) gets through in seconds
SMOKE = dict(epochs=1, batch_size=2, limit=4, test_limit=2, lr_decay=1.0, keep=1)
SMOKE_SIZE = {"cifar10": 6}          # the side of the --smoke images by dataset (default 4)


def shrink_images(x, size):
    """Return NCHW images ``x`` as ``size`` x ``size`` images: the largest centred square whose side is a multiple
    of ``size``, averaged over blocks (28x28 to 4x4: 7x7 blocks; 32x32 to 6x6: the centre 30x30 in 5x5 blocks)."""
    n, c, h, w = x.shape
    k = min(h, w) // size
    if k < 1:
        raise ValueError(f"images of {h}x{w} are smaller than {size}x{size}")
    top, left = (h - k * size) // 2, (w - k * size) // 2
    x = x[:, :, top:top + k * size, left:left + k * size]
    return np.ascontiguousarray(x.reshape(n, c, size, k, size, k).mean(axis=(3, 5), dtype=np.float32))


def _smoke_data(args):
    """Return the --smoke data: the first images of the dataset when it is found locally, else (and always for
    a dataset that is not embedded, e.g. CIFAR-10) the embedded Fashion-MNIST images, made 3-channel for
    CIFAR-10's models; all shrunk to 4x4 or 6x6 (:func:`shrink_images`, ``SMOKE_SIZE``). A check of the install
    and the device, not of the model."""
    try:
        xtr, ytr, xte, yte, src = load_dataset(args.dataset, args.data_dir, False, args.limit, args.test_limit)
    except UsageError:
        if args.dataset != "cifar10":
            raise
        xtr, ytr, xte, yte, src = load_dataset("default", None, False, args.limit, args.test_limit)
        xtr, xte = (np.repeat(x, 3, axis=1) for x in (xtr, xte))
        src = f"{src}, 3-channel (--smoke stand-in for {args.dataset})"
    size = SMOKE_SIZE.get(args.dataset, 4)
    return shrink_images(xtr, size), ytr, shrink_images(xte, size), yte, f"{src} as {size}x{size}"


def _build_logreg(args, **tiny):
    """Multinomial logistic regression (784 -> 10 softmax)."""
    return LogisticRegression(lr=args.lr, jit=not args.no_jit, device=args.device_obj, **tiny)


def _build_mlp(args, **tiny):
    """MLP 784-256-256-10 with ReLU and He init."""
    return MLP(lr=args.lr, jit=not args.no_jit, device=args.device_obj, **tiny)


def _build_cnn_mnist(args, **tiny):
    """CNN for 28x28 images: two conv5x5/pool layers, fc-1024, dropout 0.5."""
    return CNNMnist(lr=args.lr, jit=not args.no_jit, device=args.device_obj, **tiny)


def _build_cnn_cifar(args, **tiny):
    """CIFAR-10 CNN with batch norm on augmented 24x24 crops."""
    return CNNCifar(lr=args.lr, seed=args.seed, jit=not args.no_jit, device=args.device_obj, **tiny)


def autoencoder_parser():
    """Return the ArgumentParser of ``python -m jitnet train autoencoder``."""
    p = base_parser("autoencoder", "Autoencoder 784-1000-500-250-code with batch norm and sigmoid",
                    epochs=10, batch_size=100, lr=1e-3, datasets=["default", "fashion-mnist", "mnist"])
    p.add_argument("--code-size", type=int, default=2, help="code dimension (default 2; try 30)")
    p.add_argument("--denoise", action="store_true", help="train on inputs with half the pixels zeroed")
    p.add_argument("--no-pca", action="store_true", help="skip the PCA baseline")
    p.add_argument("--plot", default=None, help="figure path (default LOGDIR/autoencoder.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    return p


def run_autoencoder(args):
    """Train the autoencoder described by parsed ``args``, compare with PCA, plot; return a dict of results."""
    apply_smoke(args, **SMOKE, no_pca=True, no_plot=True)
    args.model_name = f"autoencoder{args.code_size}" + ("_denoise" if args.denoise else "")
    logdir = setup_run(args)
    xtr, ytr, xte, yte, src = _smoke_data(args) if args.smoke else load_dataset(
        args.dataset, args.data_dir, args.download, args.limit, args.test_limit)
    print(f"autoencoder: code size {args.code_size}{', denoising' if args.denoise else ''}; {len(ytr)} training / "
          f"{len(yte)} test examples from {src}; logdir {logdir}", flush=True)
    model = Autoencoder(args.code_size, lr=learning_rate(args, len(ytr)), denoise=args.denoise,
                        jit=not args.no_jit, device=args.device_obj,
                        **({"hidden": (4,), "in_features": int(np.prod(xtr.shape[1:]))} if args.smoke else {}))
    m = fit(model, args, (xtr, ytr, xte, yte), logdir, "autoencoder")
    out = {"code_size": args.code_size, "denoise": args.denoise, "ae_l2": m["test_l2"], "ae_mse": m["test_mse"],
           "steps": m["step"]}
    print(f"autoencoder (code {args.code_size}): test per-example L2 {m['test_l2']:.3f}, "
          f"per-pixel MSE {m['test_mse']:.5f}", flush=True)
    if not args.no_pca:
        out.update(pca_errors(xtr, xte, args.code_size))
        print(f"PCA (k={args.code_size}): test per-example L2 {out['pca_l2']:.3f}, per-pixel MSE "
              f"{out['pca_mse']:.5f} -> the autoencoder "
              f"{'beats' if out['ae_l2'] < out['pca_l2'] else 'does not beat'} PCA", flush=True)
    if not args.no_plot:
        path = plot_autoencoder(model, xte, yte, args.plot or os.path.join(logdir, "autoencoder.png"))
        if path:
            print(f"autoencoder: figure written to {path}", flush=True)
    return out


def train_autoencoder(argv=None):
    """Train the autoencoder with the options in argv (see --help); return the exit code."""
    run_autoencoder(autoencoder_parser().parse_args(argv))
    return 0


def _pixels(shape):
    return int(np.prod(shape))


TRAINERS = {
    "logreg": ClassifierCommand("logreg", _build_logreg, epochs=10, batch_size=100, lr=0.05, lr_decay=0.8,
                                tiny=lambda shape: dict(in_features=_pixels(shape))),
    "mlp": ClassifierCommand("mlp", _build_mlp, epochs=20, batch_size=128, lr=1e-3, lr_decay=0.85,
                             tiny=lambda shape: dict(hidden=(8,), in_features=_pixels(shape))),
    "cnn_mnist": ClassifierCommand("cnn_mnist", _build_cnn_mnist, epochs=5, batch_size=64, lr=1e-3,
                                   lr_decay=0.6, tiny=lambda shape: dict(channels=(2, 2), fc=8, size=shape[-1])),
    "cnn_cifar": ClassifierCommand("cnn_cifar", _build_cnn_cifar, epochs=10, batch_size=128, lr=1e-3, lr_decay=0.9,
                                   dataset="cifar10", datasets=["cifar10"],
                                   tiny=lambda shape: dict(channels=(2, 2), fc=(4, 4), crop=4)),
    "autoencoder": train_autoencoder,
}
