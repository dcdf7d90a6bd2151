"""Adam update of N float32 parameters: jitnet's fused kernel vs torch.optim.Adam (foreach=False and True).

Both sides update one parameter of N elements with a fixed gradient, on the same number of threads; the
time per step is the median over repeats after warm-up, the three contenders called in turn. The goal is jitnet >= 1.5x PyTorch's non-foreach
Adam.

    python bench/optim.py [--n 10000000] [--threads 2] [--repeats 30] [--warmup 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _time_interleaved(fns, repeats, warmup):
    """Return the median time of each function, calling them in turn (so load changes hit all alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def main():
    """Run the benchmark and print times, ratios and whether the 1.5x goal is met; return the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    import torch
    import jitnet as jn

    torch.set_num_threads(args.threads)
    jn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(args.n, dtype=np.float32)
    g0 = rng.standard_normal(args.n, dtype=np.float32) * np.float32(0.01)

    # jitnet
    p = jn.Variable(p0)
    p.grad = jn.Tensor(g0.copy())
    opt = jn.optim.Adam([p], lr=1e-3)

    # PyTorch
    topts = []
    for foreach in (False, True):
        tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        tp.grad = torch.from_numpy(g0.copy())
        topts.append(torch.optim.Adam([tp], lr=1e-3, foreach=foreach))
    t_jn, t_false, t_true = _time_interleaved([opt.step, topts[0].step, topts[1].step], args.repeats, args.warmup)
    res = {False: t_false, True: t_true}

    # same number of steps taken on both sides: check that they agree
    steps = args.repeats + args.warmup
    ref = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref.grad = torch.from_numpy(g0.copy())
    ropt = torch.optim.Adam([ref], lr=1e-3, foreach=False)
    for _ in range(steps):
        ropt.step()
    err = float(np.max(np.abs(p.numpy() - ref.detach().numpy())))

    gb = 7 * 4 * args.n / 1e9             # read p, g, m, v; write p, m, v
    print(f"Adam step, {args.n:,} float32 parameters, {args.threads} threads (torch {torch.__version__}, "
          f"numba threads {jn.get_num_threads()}), median of {args.repeats} after {args.warmup} warm-up")
    print(f"  jitnet fused kernel         {t_jn * 1e3:8.2f} ms   ({gb / t_jn:5.1f} GB/s effective)")
    print(f"  torch Adam foreach=False    {res[False] * 1e3:8.2f} ms   ratio torch/jitnet = "
          f"{res[False] / t_jn:.2f}x")
    print(f"  torch Adam foreach=True     {res[True] * 1e3:8.2f} ms   ratio torch/jitnet = "
          f"{res[True] / t_jn:.2f}x")
    print(f"  max |p_jitnet - p_torch| after {steps} steps: {err:.2e}")
    ratio = res[False] / t_jn
    print(f"goal: jitnet >= 1.5x torch.optim.Adam(foreach=False): {'met' if ratio >= 1.5 else 'not met'} "
          f"({ratio:.2f}x)")
    return ratio


if __name__ == "__main__":
    main()
