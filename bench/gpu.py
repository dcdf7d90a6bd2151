"""GPU benchmarks: jitnet's CUDA backend against PyTorch CUDA measured in the same run, on the same GPU.

Figures (each a ratio; ratio = peer time / jitnet time, so > 1 means jitnet is faster):

* a fused elementwise chain ``relu(x * 2 + 1) * x - 0.5`` on 100M float32 under ``jn.jit`` (one generated
  kernel), as a fraction of the device-to-device copy bandwidth measured with PyTorch's ``copy_`` on the same
  bytes (goal: >= 70% of the copy bandwidth); PyTorch's eager chain (four kernels) is printed alongside;
* float32 matmul 4096 x 4096 against PyTorch with TF32 off (goal: >= 0.30x);
* an MLP training step (784-256-10, batch 512, SGD with momentum, cross entropy) jitted, against PyTorch's
  eager step (goal: >= 0.8x); jitnet's eager step is printed alongside.

GPU times are taken between synchronizations (``jn.cuda.synchronize`` / ``torch.cuda.synchronize``) around
``--number`` calls; the median of ``--repeats`` runs is reported. It needs a CUDA GPU, numba-cuda
(``pip install -e ".[cuda]"``) and a CUDA build of PyTorch; without them it exits with a message.

    python bench/gpu.py [--repeats 10] [--size 100000000] [--matmul 4096] [--batch 512] [--json PATH] [--only ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need_gpu():
    """Exit with a message unless a CUDA GPU, numba.cuda and PyTorch CUDA are all usable (not the simulator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.exit("bench/gpu.py: NUMBA_ENABLE_CUDASIM=1 is set; the simulator cannot be timed. Unset it and run on "
                 "a machine with a CUDA GPU.")
    try:
        from numba import cuda
        ok = cuda.is_available()
    except Exception as e:                      # no numba.cuda / no driver
        ok, why = False, str(e)
    else:
        why = "numba.cuda.is_available() is False"
    if not ok:
        sys.exit(f"bench/gpu.py needs a CUDA GPU ({why}). Install a CUDA driver and jitnet's cuda extra "
                 f"(pip install -e \".[cuda]\") and run it on a GPU machine.")
    try:
        import torch
    except ImportError:
        sys.exit("bench/gpu.py compares against PyTorch CUDA: install a CUDA build of torch")
    if not torch.cuda.is_available():
        sys.exit(f"bench/gpu.py compares against PyTorch CUDA, but torch {torch.__version__} sees no GPU "
                 f"(a CPU-only build?)")
    return torch


def _time_gpu(fn, sync, repeats, number, warmup=3):
    """Return the median seconds per call of ``fn`` (``number`` calls between two synchronizations)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        ts.append((time.perf_counter() - t0) / number)
    return statistics.median(ts)


def _fmt(t):
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.3f} ms"


ROWS = []


def _row(name, jt, peer, pt, ratio, goal=None, goal_text="", extra=""):
    met = None if goal is None else bool(ratio >= goal)
    ROWS.append({"name": name, "jitnet_s": jt, "peer": peer, "peer_s": pt, "ratio": ratio, "goal": goal_text,
                 "met": met, "extra": extra})
    m = "-" if met is None else ("yes" if met else "NOT MET")
    print(f"{name:<46} {_fmt(jt):>11} {peer:>14} {_fmt(pt):>11} {ratio:>6.2f}x  {goal_text:<24} {m}  {extra}",
          flush=True)


def bench_elementwise(args, jn, np, torch):
    """Fused elementwise chain on N float32 vs the device-to-device copy bandwidth."""
    n = args.size
    f = jn.jit(lambda x: jn.relu(x * 2.0 + 1.0) * x - 0.5)
    with jn.device("cuda"):
        x = jn.random.uniform((n,), -1.0, 1.0)
    tx = torch.as_tensor(x, device="cuda")                  # the same memory (__cuda_array_interface__)
    ty = torch.empty_like(tx)
    y = f(x)
    ref = torch.relu(tx * 2 + 1) * tx - 0.5
    err = float((torch.as_tensor(y, device="cuda") - ref).abs().max())
    del y
    sync = jn.cuda.synchronize
    tj = _time_gpu(lambda: f(x), sync, args.repeats, args.number)
    tc = _time_gpu(lambda: ty.copy_(tx), torch.cuda.synchronize, args.repeats, args.number)
    tt = _time_gpu(lambda: torch.relu(tx * 2 + 1) * tx - 0.5, torch.cuda.synchronize, args.repeats, args.number)
    nbytes = 2 * n * 4                                       # read x, write y (both kernels and the copy)
    bw_j, bw_c = nbytes / tj, nbytes / tc
    label = f"fused relu(x*2+1)*x-0.5 {n / 1e6:.0f}M f32"
    _row(label, tj, "torch copy_", tc, bw_j / bw_c, 0.70, ">= 70% copy bandwidth",
         f"{bw_j / 1e9:.0f} GB/s vs copy {bw_c / 1e9:.0f} GB/s; max err {err:.1e}")
    _row(label, tj, "torch eager", tt, tt / tj)


def bench_matmul(args, jn, np, torch):
    """float32 matmul n x n against PyTorch without TF32."""
    n = args.matmul
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    with jn.device("cuda"):
        jn.random.seed(0)
        a = jn.random.normal((n, n))
        b = jn.random.normal((n, n))
    ta, tb = torch.as_tensor(a, device="cuda"), torch.as_tensor(b, device="cuda")
    c = jn.matmul(a, b)
    tc = ta @ tb
    rel = float((torch.as_tensor(c, device="cuda") - tc).abs().max() / tc.abs().max())
    del c
    tj = _time_gpu(lambda: jn.matmul(a, b), jn.cuda.synchronize, args.repeats, max(1, args.number // 4))
    tt = _time_gpu(lambda: ta @ tb, torch.cuda.synchronize, args.repeats, max(1, args.number // 4))
    flops = 2.0 * n ** 3
    _row(f"matmul {n}x{n} f32 (no TF32)", tj, "torch", tt, tt / tj, 0.30, ">= 0.30x torch",
         f"{flops / tj / 1e12:.1f} vs {flops / tt / 1e12:.1f} TFLOP/s; max rel err {rel:.1e}")


def bench_mlp(args, jn, np, torch):
    """MLP 784-256-10 training step, batch B: jitted jitnet step vs PyTorch's eager step."""
    import jitnet.nn as nn
    import jitnet.nn.functional as F
    bsz = args.batch
    rng = np.random.default_rng(0)
    xh = rng.normal(size=(bsz, 784)).astype(np.float32)
    yh = rng.integers(0, 10, bsz)
    x, y = jn.tensor(xh).to("cuda"), jn.tensor(yh).to("cuda")

    jn.random.seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to("cuda")
    opt = jn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(xb, yb):
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss

    jstep = jn.jit(step)
    jstep(x, y)

    tm = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    topt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.as_tensor(xh, device="cuda"), torch.as_tensor(yh, device="cuda")
    lossf = torch.nn.functional.cross_entropy

    def tstep():
        topt.zero_grad(set_to_none=True)
        loss = lossf(tm(tx), ty)
        loss.backward()
        topt.step()
        return loss

    jn.cuda.reset_transfer_stats()
    tj = _time_gpu(lambda: jstep(x, y), jn.cuda.synchronize, args.repeats, args.number)
    transfers = jn.cuda.transfer_stats()
    te = _time_gpu(lambda: step(x, y), jn.cuda.synchronize, args.repeats, max(1, args.number // 4))
    tt = _time_gpu(tstep, torch.cuda.synchronize, args.repeats, args.number)
    label = f"MLP 784-256-10 train step batch {bsz}"
    _row(label + " (jit)", tj, "torch eager", tt, tt / tj, 0.8, ">= 0.8x torch",
         f"host<->device copies in {args.repeats * args.number + 3} steps: {transfers['h2d']}+{transfers['d2h']}")
    _row(label + " (eager)", te, "torch eager", tt, tt / te)


BENCHES = {"elementwise": bench_elementwise, "matmul": bench_matmul, "mlp": bench_mlp}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed runs per figure (median; default 10)")
    p.add_argument("--number", type=int, default=20, help="calls per timed run (default 20)")
    p.add_argument("--size", type=int, default=100_000_000, help="elements of the elementwise chain")
    p.add_argument("--matmul", type=int, default=4096, help="matmul size n (n x n times n x n)")
    p.add_argument("--batch", type=int, default=512, help="MLP batch size")
    p.add_argument("--json", help="also write the results as JSON")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benchmarks")
    args = p.parse_args(argv)
    torch = _need_gpu()
    sys.path.insert(0, ROOT)
    import numpy as np

    import jitnet as jn
    jn.cuda.require("bench/gpu.py")
    from numba import cuda
    dev = cuda.get_current_device()
    print(f"GPU {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}; torch {torch.__version__} "
          f"({torch.cuda.get_device_name(0)})")
    print(f"{'benchmark':<46} {'jitnet':>11} {'peer':>14} {'peer time':>11} {'ratio':>7}  {'goal':<24} met?")
    for name in (args.only or list(BENCHES)):
        BENCHES[name](args, jn, np, torch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": str(dev.name), "rows": ROWS}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
