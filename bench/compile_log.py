"""Where a cold start's time goes: every Numba compile of a run, with its time, from empty kernel caches.

    python bench/compile_log.py mlp [--steps 3]                  # bench/compilers.py's MLP step, to its Nth step
    python bench/compile_log.py cli train mlp --epochs 1         # any ``python -m jitnet`` command
    python bench/compile_log.py --tree /path/to/checkout mlp     # the same with another source tree's jitnet

The run gets fresh ``JITNET_CACHE_DIR`` / ``NUMBA_CACHE_DIR`` (removed afterwards), so everything it needs is
compiled. A wrapper around Numba's ``Dispatcher.compile`` records each compile's time and its nesting depth (a
kernel compiled while compiling another, e.g. a native driver's callees, is depth >= 1). Printed: the wall time,
the number and total time of the top-level compiles, and the costliest (function, depth) pairs; for ``mlp`` also
the import time and the total to the Nth finished step (issue 21's cold-start figure counts to the third).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _install_log():
    from numba.core import dispatcher as D
    log, depth = [], [0]
    orig = D.Dispatcher.compile

    def compile_logged(self, sig):
        depth[0] += 1
        t = time.perf_counter()
        try:
            return orig(self, sig)
        finally:
            depth[0] -= 1
            f = self.py_func
            log.append((time.perf_counter() - t, depth[0], f"{f.__module__}.{f.__qualname__}"))
    D.Dispatcher.compile = compile_logged
    return log


def _report(log, t0, top):
    total = sum(dt for dt, d, _ in log if d == 0)
    print(f"wall {time.perf_counter() - t0:.2f} s; {sum(1 for x in log if x[1] == 0)} top-level compiles "
          f"taking {total:.2f} s", file=sys.stderr)
    agg = {}
    for dt, d, name in log:
        agg[(d, name)] = agg.get((d, name), 0.0) + dt
    for (d, name), dt in sorted(agg.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {dt:6.2f} s  depth {d}  {name}", file=sys.stderr)


def _child(argv):
    t0 = time.perf_counter()
    log = _install_log()
    top = int(os.environ.get("COMPILE_LOG_TOP", "25"))
    if argv[0] == "mlp":
        steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 3
        sys.path.insert(0, HERE)
        import compilers
        lib = compilers.JitnetLib(2)
        t_imp = time.perf_counter() - t0
        step, _ = lib.mlp(0)                 # traces and runs compilers.CHECK_STEPS steps
        for _ in range(max(0, steps - compilers.CHECK_STEPS)):
            step()
        print(f"import {t_imp:.2f} s; step {max(steps, compilers.CHECK_STEPS)} finished "
              f"{time.perf_counter() - t0:.2f} s after the start", file=sys.stderr)
    else:
        import runpy
        sys.argv = ["jitnet"] + argv[1:]
        try:
            runpy.run_module("jitnet", run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
    _report(log, t0, top)


def main():
    argv = sys.argv[1:]
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    tree = None
    if argv[:1] == ["--tree"]:
        tree, argv = os.path.abspath(argv[1]), argv[2:]
    if not argv or argv[0] not in ("mlp", "cli"):
        sys.exit(__doc__)
    d = tempfile.mkdtemp(prefix="jitnet-compile-log-")
    env = dict(os.environ, JITNET_CACHE_DIR=os.path.join(d, "kernels"), NUMBA_CACHE_DIR=os.path.join(d, "numba"))
    if tree:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    try:
        return subprocess.call([sys.executable, os.path.abspath(__file__), "--child"] + argv, env=env,
                               cwd=tree or os.getcwd())
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
