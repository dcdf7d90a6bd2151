"""A training command from empty kernel caches, in one or more source trees, alternating: wall time and the CLI's
own compile lines.

    python bench/cli_cold.py [--rounds 2] [--tree OLD --tree NEW] [-- train mlp --epochs 1]

Each run gets fresh ``JITNET_CACHE_DIR`` / ``NUMBA_CACHE_DIR`` and its own log directory (removed afterwards) and
runs ``python -m jitnet <command>`` (default: the README's ``train mlp --epochs 1``; ``--no-progress`` is added
to a train command) from the tree's directory, so that tree's jitnet is the one imported. Printed per run: the
wall time, when the "first step done" line appeared counted from the process's start (issue 21's figure), the
CLI's own "first step done after" and "kernels ready after" (its clock starts with its compile notice, after
imports and data loading) and the test accuracy (or the last line of output).
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
        p = subprocess.Popen(cmd + ["--no-progress"] if "train" in command and "--no-progress" not in command
                             else cmd, cwd=tree, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines, shown = [], None
        for line in p.stdout:
            if shown is None and "first step done" in line:
                shown = time.perf_counter() - t0          # when the line appears, from the process's start
            lines.append(line)
        rc = p.wait()
        return time.perf_counter() - t0, "".join(lines), rc, shown
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
            sec, out, rc, shown = run_once(tree, command)
            first = re.search(r"first step done after ([0-9.]+) s", out)
            ready = re.search(r"kernels ready after ([0-9.]+) s", out)
            acc = re.search(r"test accuracy [0-9.]+", out)
            last = acc.group(0) if acc else (out.strip().splitlines()[-1] if out.strip() else "")
            print(f"{tree} round {r + 1}: wall {sec:.1f} s, first step shown at "
                  f"{'-' if shown is None else f'{shown:.2f}'} s from the start "
                  f"({first.group(1) if first else '-'} s on the CLI's clock), "
                  f"kernels ready {ready.group(1) if ready else '-'} s, exit {rc} | {last[-90:]}", flush=True)


if __name__ == "__main__":
    main()
