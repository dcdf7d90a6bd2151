"""Train a Differentiable Neural Computer on the copy task and report its bit error per length.

    python examples/dnc_copy.py [--steps 8000] [--max-len 8] [--repeat-copy] [any option of `jitnet train dnc-copy`]

Sequences of 1..max_len random 6-bit vectors are read, then written back after a delimiter; the goal is a bit
error below 1% for every length within the training range. The run leaves TensorBoard logs, metrics.csv,
checkpoints and a plot of memory usage and read/write weights over time in runs/dnc-copy/.
"""
import sys
import time

import jitnet as jn
from jitnet.models import dnc_cli


def main():
    """Train with the defaults below followed by the command-line arguments; print the result line."""
    jn.set_num_threads(2)
    argv = ["--steps", "8000", "--eval-every", "1000"] + sys.argv[1:]
    t0 = time.perf_counter()
    m = dnc_cli.run_copy(argv)
    wall = time.perf_counter() - t0
    by_len = {k[len("bit_error_len"):]: v for k, v in m.items() if k.startswith("bit_error_len")}
    worst = m["worst_bit_error"]
    print("bit error by length: " + ", ".join(f"{k}: {v:.2%}" for k, v in by_len.items()))
    print(f"RESULT dnc-copy: worst bit error {worst:.3%} over lengths {min(by_len, key=int)}-{max(by_len, key=int)} "
          f"after {m['step']} steps (goal < 1%: {'met' if worst < 0.01 else 'NOT met'}), wall {wall:.0f} s; "
          f"args: {' '.join(argv)}", flush=True)


if __name__ == "__main__":
    main()
