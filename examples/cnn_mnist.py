"""CNN (conv5x5-32, pool, conv5x5-64, pool, fc-1024, dropout 0.5) on Fashion-MNIST; goal >= 91.5% accuracy.

    python examples/cnn_mnist.py [--epochs 5] [--no-jit] [any option of `python -m jitnet train cnn_mnist`]
"""
from _common import run_classifier

if __name__ == "__main__":
    run_classifier("cnn_mnist", ["--dataset", "fashion-mnist", "--logdir", "runs/cnn_mnist", "--no-progress"], 0.915)
