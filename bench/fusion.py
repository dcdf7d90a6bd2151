"""Fused elementwise chain vs NumPy and PyTorch, and vs the machine's memory bandwidth (STREAM triad).

    python bench/fusion.py [--n 10000000] [--threads 2] [--json out.json]

The chain is relu(a*b + c) * d - e on float32: five arrays read, one written = 24 bytes per element. The
bandwidth reference is a Numba STREAM triad (x = y + s*z: 12 bytes per element, parallel, output
preallocated) measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump, set_threads, table, timeit  # noqa: E402

import jitnet as jn  # noqa: E402


@njit(parallel=True, cache=True)
def triad(x, y, z, s):
    for i in prange(x.size):
        x[i] = y[i] + s * z[i]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds (medians reported)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    n = args.n
    rng = np.random.default_rng(0)
    arrs = [rng.standard_normal(n, dtype=np.float32) for _ in range(5)]
    a, b, c, d, e = arrs

    x = np.empty_like(a)

    f = jn.jit(lambda a, b, c, d, e: jn.relu(a * b + c) * d - e)
    ts = [jn.tensor(v) for v in arrs]
    ref = np.maximum(a * b + c, 0) * d - e
    np.testing.assert_allclose(f(*ts).numpy(), ref, rtol=1e-6)
    try:
        import torch
        tt = [torch.from_numpy(v) for v in arrs]
        torch_fn = lambda: torch.relu(tt[0] * tt[1] + tt[2]) * tt[3] - tt[4]  # noqa: E731
    except ImportError:
        torch_fn = None
    # Shared machines drift by 2x within a minute: measure the contenders in alternation, several rounds,
    # and take each one's median, so a slow spell hits all of them.
    got = {"triad": [], "jn": [], "np": [], "torch": []}
    for _ in range(args.rounds):
        got["triad"].append(timeit(lambda: triad(x, b, c, np.float32(3.0)), repeat=3))
        got["jn"].append(timeit(lambda: f(*ts), repeat=3))
        got["np"].append(timeit(lambda: np.maximum(a * b + c, 0) * d - e, repeat=3))
        if torch_fn is not None:
            got["torch"].append(timeit(torch_fn, repeat=3))
    t_triad, t_jn, t_np = (statistics.median(got[k]) for k in ("triad", "jn", "np"))
    t_torch = statistics.median(got["torch"]) if got["torch"] else None
    bw_triad = 12 * n / t_triad
    rows = []
    bw_jn = 24 * n / t_jn
    rows.append(dict(bench="relu(a*b+c)*d-e", n=n, jitnet_ms=t_jn * 1e3, numpy_ms=t_np * 1e3,
                     vs_numpy=t_np / t_jn, torch_ms=None if t_torch is None else t_torch * 1e3,
                     vs_torch=None if t_torch is None else t_torch / t_jn, goal="3x numpy",
                     met="yes" if t_np / t_jn >= 3 else "NO"))
    rows.append(dict(bench="bandwidth GB/s", n=n, jitnet_ms=bw_jn / 1e9, numpy_ms=None, vs_numpy=None,
                     torch_ms=None, vs_torch=None, goal=f"80% of triad {bw_triad / 1e9:.2f} GB/s",
                     met=f"{bw_jn / bw_triad:.0%} " + ("yes" if bw_jn >= 0.8 * bw_triad else "NO")))
    table(rows, f"fused elementwise chain, {args.threads} threads (bytes: 24/elt fused, 12/elt triad)")
    dump(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
