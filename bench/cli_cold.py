"""A training command from empty kernel caches, in one or more source trees, alternating: wall time and the CLI's
own compile lines.

    python bench/cli_cold.py [--rounds 2] [--tree OLD --tree NEW] [-- train mlp --epochs 1]

Each run gets fresh ``JITNET_CACHE_DIR`` / ``NUMBA_CACHE_DIR`` and its own log directory (removed afterwards) and
runs ``python -m jitnet <command>`` (default: the README's ``train mlp --epochs 1``) from the tree's directory, so
that tree's jitnet is the one imported. Printed per run: the wall time, "first step done after" and "kernels
ready after" (the CLI's clock starts with its compile notice, after imports and data loading) and the test
accuracy (or the last line of output).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time


def run_once(tree, command):
    """Run ``python -m jitnet command`` in ``tree`` with empty caches; return (seconds, output)."""
    d = tempfile.mkdtemp(prefix="jitnet-cli-cold-")
    env = dict(os.environ, JITNET_CACHE_DIR=os.path.join(d, "kernels"), NUMBA_CACHE_DIR=os.path.join(d, "numba"),
               PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jitnet"] + command
    if "train" in command and "--logdir" not in command:
        cmd += ["--logdir", os.path.join(d, "runs")]
    try:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        return time.perf_counter() - t0, p.stdout + p.stderr, p.returncode
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = ["train", "mlp", "--epochs", "1"]
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=None, help="a source tree (repeat for an A/B)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    trees = [os.path.abspath(t) for t in (args.tree or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])]
    for r in range(args.rounds):
        for tree in trees:
            sec, out, rc = run_once(tree, command)
            first = re.search(r"first step done after ([0-9.]+) s", out)
            ready = re.search(r"kernels ready after ([0-9.]+) s", out)
            acc = re.search(r"test accuracy [0-9.]+", out)
            last = acc.group(0) if acc else (out.strip().splitlines()[-1] if out.strip() else "")
            print(f"{tree} round {r + 1}: wall {sec:.1f} s, first step {first.group(1) if first else '-'} s, "
                  f"kernels ready {ready.group(1) if ready else '-'} s, exit {rc} | {last[-90:]}", flush=True)


if __name__ == "__main__":
    main()
