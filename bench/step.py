"""Whole-step compilation: training steps under jitnet.jit vs eager jitnet vs PyTorch CPU eager.

    python bench/step.py [--threads 2] [--json out.json] [--skip-process]

1. MLP 784-256-256-10, batch 128, SGD with momentum 0.9, cross-entropy (goal: jit faster than eager jitnet
   and >= 1.2x PyTorch).
2. An LSTM cell (hidden 64, batch 16, input 32) unrolled over 20 steps, forward and backward (goal: >= 3x
   PyTorch eager): the small-op regime where per-op overhead dominates.
3. Memory of the jitted MLP step: bytes allocated per steady-state step and peak traced bytes (tracemalloc,
   which sees NumPy's allocations), against what the step must hold.
4. Process start to first finished MLP step in a new process, cold (empty kernel caches) and warm.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump, set_threads, table, timeit  # noqa: E402

import jitnet as jn  # noqa: E402
import jitnet.nn as nn  # noqa: E402
import jitnet.nn.functional as F  # noqa: E402

B, D_IN, H, D_OUT = 128, 784, 256, 10


def make_mlp(seed=0):
    jn.random.seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D_OUT))
    opt = jn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


def torch_mlp(model):
    import torch
    tm = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.ReLU(), torch.nn.Linear(H, H), torch.nn.ReLU(),
                             torch.nn.Linear(H, D_OUT))
    opt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tm(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def lstm_fn(T, Hd):
    def loss(x, h0, c0, Wx, Wh, b):
        h, c = h0, c0
        for t in range(T):
            z = x[t] @ Wx + h @ Wh + b
            i = jn.sigmoid(z[:, :Hd])
            f = jn.sigmoid(z[:, Hd:2 * Hd])
            g = jn.tanh(z[:, 2 * Hd:3 * Hd])
            o = jn.sigmoid(z[:, 3 * Hd:])
            c = f * c + i * g
            h = o * jn.tanh(c)
        return jn.sum(h * h)
    return loss


def torch_lstm_fn(T, Hd):
    import torch

    def loss(x, h0, c0, Wx, Wh, b):
        h, c = h0, c0
        for t in range(T):
            z = x[t] @ Wx + h @ Wh + b
            i = torch.sigmoid(z[:, :Hd])
            f = torch.sigmoid(z[:, Hd:2 * Hd])
            g = torch.tanh(z[:, 2 * Hd:3 * Hd])
            o = torch.sigmoid(z[:, 3 * Hd:])
            c = f * c + i * g
            h = o * torch.tanh(c)
        return (h * h).sum()
    return loss


_CHILD = """
import time, sys
t0 = time.perf_counter()
sys.path.insert(0, {bench!r})
import numpy as np
import jitnet as jn
from step import make_mlp, B, D_IN, D_OUT
model, opt, step = make_mlp()
js = jn.jit(step)
x = jn.tensor(np.random.default_rng(0).standard_normal((B, D_IN), dtype=np.float32))
y = jn.tensor(np.arange(B) % D_OUT)
js(x, y).item()
t1 = time.perf_counter()
js(x, y).item()
print("RESULT", t1 - t0, jn.compile_stats()["compiles"])
"""


def process_start(cache_root, warm):
    env = dict(os.environ)
    env["JITNET_CACHE_DIR"] = os.path.join(cache_root, "k")
    env["NUMBA_CACHE_DIR"] = os.path.join(cache_root, "n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)))],
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(r.stderr)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1].split()
    return wall, float(line[1]), int(line[2])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--skip-process", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    import torch
    rows = []
    rng = np.random.default_rng(0)

    # 1. MLP step
    xn = rng.standard_normal((B, D_IN), dtype=np.float32)
    yn = (np.arange(B) % D_OUT).astype(np.int64)
    x, y = jn.tensor(xn), jn.tensor(yn)
    model, opt, step = make_mlp()
    t_eager = timeit(lambda: step(x, y).item(), min_time=0.5)
    model, opt, step = make_mlp()
    js = jn.jit(step)
    t_jit = timeit(lambda: js(x, y).item(), min_time=0.5)
    tstep = torch_mlp(model)
    tx, ty = torch.from_numpy(xn), torch.from_numpy(yn)
    t_torch = timeit(lambda: tstep(tx, ty).item(), min_time=0.5)
    rows.append(dict(bench="MLP step (784-256-256-10, b128, SGD+mom)", jitnet_jit_ms=t_jit * 1e3,
                     jitnet_eager_ms=t_eager * 1e3, torch_ms=t_torch * 1e3, jit_vs_eager=t_eager / t_jit,
                     jit_vs_torch=t_torch / t_jit, goal=">eager, >=1.2x torch",
                     met="yes" if (t_jit < t_eager and t_torch / t_jit >= 1.2) else "NO"))

    # 2. LSTM cell unrolled 20 steps, forward + backward
    T, Hd, Bs, I = 20, 64, 16, 32
    arrs = [rng.standard_normal((T, Bs, I), dtype=np.float32), np.zeros((Bs, Hd), np.float32),
            np.zeros((Bs, Hd), np.float32), (rng.standard_normal((I, 4 * Hd)) * 0.1).astype(np.float32),
            (rng.standard_normal((Hd, 4 * Hd)) * 0.1).astype(np.float32), np.zeros(4 * Hd, np.float32)]
    jl = lstm_fn(T, Hd)
    jvg = jn.jit(jn.value_and_grad(jl, argnums=(3, 4, 5)))
    ja = [jn.tensor(a) for a in arrs]
    ev, eg = jn.value_and_grad(jl, argnums=(3, 4, 5))(*ja)
    v, g = jvg(*ja)
    np.testing.assert_allclose(jvg(*ja)[0].numpy(), ev.numpy(), rtol=1e-4)
    t_jl = timeit(lambda: jvg(*ja)[0].item())
    t_el = timeit(lambda: jn.value_and_grad(jl, argnums=(3, 4, 5))(*ja)[0].item(), min_time=0.5)
    tl = torch_lstm_fn(T, Hd)
    ta = [torch.from_numpy(a) for a in arrs]
    for k in (3, 4, 5):
        ta[k].requires_grad_(True)

    def torch_lstm():
        for k in (3, 4, 5):
            ta[k].grad = None
        out = tl(*ta)
        out.backward()
        return out.item()
    t_tl = timeit(torch_lstm, min_time=0.5)
    _, plan = jvg.lower(*ja)
    rows.append(dict(bench=f"LSTM cell h{Hd} b{Bs} x{T} steps fwd+bwd", jitnet_jit_ms=t_jl * 1e3,
                     jitnet_eager_ms=t_el * 1e3, torch_ms=t_tl * 1e3, jit_vs_eager=t_el / t_jl,
                     jit_vs_torch=t_tl / t_jl, goal=">=3x torch",
                     met="yes" if t_tl / t_jl >= 3 else "NO"))
    table(rows, f"training steps, {args.threads} threads")
    print(f"LSTM plan: {plan.kernel_count} kernels ({len(plan.groups)} fused groups), "
          f"{len(plan.steps)} plan steps")

    # 3. memory of the jitted MLP step
    model, opt, step = make_mlp()
    js = jn.jit(step)
    for _ in range(3):
        js(x, y)
    tracemalloc.start()
    js(x, y)
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    js(x, y).item()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n_params = sum(p.size for p in model.parameters())
    acts = B * (D_IN + 4 * H + 2 * D_OUT)          # input, 2x(pre, post) hidden, logits and their gradient
    must = 4 * (3 * n_params + acts)               # params + grads + momentum + activations, float32
    _, plan = js.lower(x, y)
    live_peak = 4 * (3 * n_params) + (peak - before) + plan.buffer_bytes
    mem = dict(step_alloc_bytes_peak=peak - before, retained_after_step=after - before,
               plan_buffers=plan.buffer_bytes, must_hold_bytes=must, peak_live_estimate=live_peak,
               ratio=live_peak / must)
    print("memory (jitted MLP step):", json.dumps(mem))
    rows.append(dict(bench="MLP step memory", **{k: v for k, v in mem.items()}))

    # 4. a new process: start to first finished step
    if not args.skip_process:
        with tempfile.TemporaryDirectory() as d:
            cold = process_start(d, False)
            warm = process_start(d, True)
        print(f"new process to first finished step: cold {cold[1]:.2f} s ({cold[2]} compiles), "
              f"warm {warm[1]:.2f} s ({warm[2]} compiles); goal warm < 2 s with 0 compiles")
        rows.append(dict(bench="process start -> first step", cold_s=cold[1], cold_compiles=cold[2],
                         warm_s=warm[1], warm_compiles=warm[2],
                         met="yes" if warm[1] < 2 and warm[2] == 0 else "NO"))
    dump(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
