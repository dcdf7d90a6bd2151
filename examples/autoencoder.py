"""Autoencoders with code sizes 2 and 30 on Fashion-MNIST against PCA at the same size (table), plus figures.

    python examples/autoencoder.py [--epochs 10] [--denoise] [--codes 2 30] [any autoencoder option]

Prints test reconstruction errors, per-example squared L2 and per-pixel MSE, for the autoencoder and PCA.
The figures (reconstructions; 2-D codes coloured by class) need matplotlib and are skipped without it.
"""
import argparse
import sys

import jitnet as jn
from jitnet.models.vision_cli import autoencoder_parser, run_autoencoder


def main():
    """Train one autoencoder per code size and print the comparison table; return the rows."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--codes", type=int, nargs="+", default=[2, 30])
    ns, rest = pre.parse_known_args()
    jn.set_num_threads(2)
    rows = []
    for k in ns.codes:
        argv = ["--dataset", "fashion-mnist", "--logdir", f"runs/autoencoder{k}", "--no-progress",
                "--code-size", str(k)] + rest
        rows.append(run_autoencoder(autoencoder_parser().parse_args(argv)))
    print("\ncode | autoencoder L2 | PCA L2 | autoencoder MSE/pixel | PCA MSE/pixel | beats PCA")
    for r in rows:
        print(f"{r['code_size']:4d} | {r['ae_l2']:14.3f} | {r['pca_l2']:6.3f} | {r['ae_mse']:21.5f} | "
              f"{r['pca_mse']:13.5f} | {'yes' if r['ae_l2'] < r['pca_l2'] else 'NO'}")
    print(f"args: {' '.join(sys.argv[1:])}")
    return rows


if __name__ == "__main__":
    main()
