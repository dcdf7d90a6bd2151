"""Helpers of the example scripts: run a classifier command and print its figure with the goal."""
import sys
import time

import jitnet as jn
from jitnet.models.vision_cli import TRAINERS


def run_classifier(name, defaults, goal):
    """Train ``name`` with ``defaults`` followed by the command-line arguments; print accuracy against goal."""
    jn.set_num_threads(2)
    argv = defaults + sys.argv[1:]
    t0 = time.perf_counter()
    m = TRAINERS[name].run(argv)
    wall = time.perf_counter() - t0
    acc = m["test_accuracy"]
    print(f"RESULT {name}: Fashion-MNIST test accuracy {acc * 100:.2f}% after {m['step']} steps "
          f"(goal >= {goal * 100:.1f}%: {'met' if acc >= goal else 'NOT met'}), wall {wall:.0f} s; "
          f"args: {' '.join(argv)}", flush=True)
    return m
