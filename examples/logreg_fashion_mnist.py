"""Multinomial logistic regression (784 -> 10 softmax) on Fashion-MNIST; goal >= 84% test accuracy.

    python examples/logreg_fashion_mnist.py [--epochs 10] [--no-jit] [any option of `python -m jitnet train logreg`]
"""
from _common import run_classifier

if __name__ == "__main__":
    run_classifier("logreg", ["--dataset", "fashion-mnist", "--logdir", "runs/logreg", "--no-progress"], 0.84)
