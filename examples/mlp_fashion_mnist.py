"""MLP 784-256-256-10 (ReLU, He init, linear logits) on Fashion-MNIST; goal >= 89% test accuracy.

    python examples/mlp_fashion_mnist.py [--epochs 20] [--no-jit] [any option of `python -m jitnet train mlp`]
"""
from _common import run_classifier

if __name__ == "__main__":
    run_classifier("mlp", ["--dataset", "fashion-mnist", "--logdir", "runs/mlp", "--no-progress"], 0.89)
