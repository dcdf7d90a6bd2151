"""Compiled loops (jn.scan) vs unrolled Python loops under jitnet.jit vs PyTorch CPU eager.

    python bench/loops.py [--threads 2] [--json out.json]

1. Compile time of a jitted LSTM (hidden 128, batch 16) training step (value and gradients) at T=10 and
   T=200 with jn.scan (goal: within 1.5x of each other), and of the unrolled step at T=10 and T=50.
   "Compile" = the first jitted call in a fresh kernel cache that the eager step has already filled with the
   library's elementwise kernels: tracing, graph passes, code generation and compiling the step's kernels.
2. Run time per step at T=50, hidden 64, batch 16: scan vs unrolled (goal: at least as fast) vs PyTorch CPU
   eager (goal: >= 3x).
3. Peak memory of value-and-gradient at T=200 (hidden 128): scan with recomputation (``checkpoint=True``:
   saves one carry per step and recomputes the step in the backward pass) vs storing every step: the
   default scan (stacks the residuals its backward reads) and ``checkpoint="unroll"`` (every intermediate
   of every step, in the graph) (goal: at most half); the hand-unrolled loop for reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump, set_threads, table, timeit  # noqa: E402

import jitnet as jn  # noqa: E402
from jitnet import kernelgen  # noqa: E402


def cell(Hd):
    def step(carry, x, Wx, Wh, b):
        h, c = carry
        z = x @ Wx + h @ Wh + b
        i = jn.sigmoid(z[:, :Hd])
        f = jn.sigmoid(z[:, Hd:2 * Hd])
        g = jn.tanh(z[:, 2 * Hd:3 * Hd])
        o = jn.sigmoid(z[:, 3 * Hd:])
        c = f * c + i * g
        h = o * jn.tanh(c)
        return (h, c), h
    return step


def scan_loss(Hd, checkpoint=False):
    st = cell(Hd)

    def loss(xs, h0, c0, Wx, Wh, b):
        (h, c), hs = jn.scan(lambda carry, x: st(carry, x, Wx, Wh, b), (h0, c0), xs, checkpoint=checkpoint)
        return jn.sum(hs * hs)
    return loss


def unrolled_loss(Hd):
    st = cell(Hd)

    def loss(xs, h0, c0, Wx, Wh, b):
        carry = (h0, c0)
        total = jn.zeros(())
        for t in range(xs.shape[0]):
            carry, h = st(carry, xs[t], Wx, Wh, b)
            total = total + jn.sum(h * h)
        return total
    return loss


def torch_loss(Hd):
    import torch

    def loss(xs, h0, c0, Wx, Wh, b):
        h, c = h0, c0
        total = 0
        for t in range(xs.shape[0]):
            z = xs[t] @ Wx + h @ Wh + b
            i = torch.sigmoid(z[:, :Hd])
            f = torch.sigmoid(z[:, Hd:2 * Hd])
            g = torch.tanh(z[:, 2 * Hd:3 * Hd])
            o = torch.sigmoid(z[:, 3 * Hd:])
            c = f * c + i * g
            h = o * torch.tanh(c)
            total = total + (h * h).sum()
        return total
    return loss


def arrays(T, Hd, B=16, I=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((T, B, I), dtype=np.float32), np.zeros((B, Hd), np.float32),
            np.zeros((B, Hd), np.float32), (rng.standard_normal((I, 4 * Hd)) * 0.1).astype(np.float32),
            (rng.standard_normal((Hd, 4 * Hd)) * 0.1).astype(np.float32), np.zeros(4 * Hd, np.float32)]


def first_call_time(make_loss, T, Hd):
    """Seconds of the first jitted call: tracing, passes, code generation and compiling the step's kernels.

    Runs in a fresh generated-kernel cache into which the eager step has already loaded the library's own
    elementwise kernels (as in any process after ``jitnet warmup``), so what is timed is what compiling this
    step adds.
    """
    args = [jn.tensor(a) for a in arrays(T, Hd)]
    vg = jn.value_and_grad(make_loss(Hd), argnums=(3, 4, 5))
    old = os.environ.get("JITNET_CACHE_DIR")
    with tempfile.TemporaryDirectory() as d:
        os.environ["JITNET_CACHE_DIR"] = d
        kernelgen._modules.clear()
        for prim in jn.autodiff.REGISTRY.values():
            prim.extra.get("plans", {}).clear()
        vg(*args)                                 # eager: library kernels for these shapes, in this cache
        f = jn.jit(vg)
        t0 = time.perf_counter()
        f(*args)[0].item()
        dt = time.perf_counter() - t0
    if old is None:
        del os.environ["JITNET_CACHE_DIR"]
    else:
        os.environ["JITNET_CACHE_DIR"] = old
    kernelgen._modules.clear()
    for prim in jn.autodiff.REGISTRY.values():
        prim.extra.get("plans", {}).clear()
    return dt


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def peak_bytes(fn, args):
    """Peak memory of one call above what was resident before it (all allocators: NumPy, Numba, BLAS).

    Linux: freed heap memory is returned to the system first (``malloc_trim``), the peak-RSS mark is reset
    (``/proc/self/clear_refs``), and the peak is VmHWM - VmRSS around the call. Elsewhere: tracemalloc, which
    sees NumPy's allocations only.
    """
    fn(*args)[0].item()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn(*args)[0].item()
        return (_rss_kib("VmHWM") - base) * 1024
    except OSError:
        pass
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn(*args)[0].item()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rows = []

    # 1. compile time
    c10 = first_call_time(scan_loss, 10, 128)
    c200 = first_call_time(scan_loss, 200, 128)
    u10 = first_call_time(unrolled_loss, 10, 128)
    u50 = first_call_time(unrolled_loss, 50, 128)
    rows.append(dict(bench="first jitted call, LSTM h128 (s)", scan_T10=c10, scan_T200=c200,
                     ratio=c200 / c10, unrolled_T10=u10, unrolled_T50=u50,
                     goal="scan T200/T10 <= 1.5", met="yes" if c200 / c10 <= 1.5 else "NO"))

    # 2. run time at T=50, h64
    T, Hd = 50, 64
    a = arrays(T, Hd)
    ja = [jn.tensor(x) for x in a]
    s = jn.jit(jn.value_and_grad(scan_loss(Hd), argnums=(3, 4, 5)))
    u = jn.jit(jn.value_and_grad(unrolled_loss(Hd), argnums=(3, 4, 5)))
    np.testing.assert_allclose(s(*ja)[0].numpy(), u(*ja)[0].numpy(), rtol=1e-4)
    for x, y in zip(s(*ja)[1], u(*ja)[1]):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=2e-3, atol=1e-4)
    r = jn.jit(jn.value_and_grad(scan_loss(Hd, checkpoint=True), argnums=(3, 4, 5)))
    t_s = timeit(lambda: s(*ja)[0].item())
    t_u = timeit(lambda: u(*ja)[0].item())
    t_r = timeit(lambda: r(*ja)[0].item())
    import torch
    tl = torch_loss(Hd)
    ta = [torch.from_numpy(x) for x in a]
    for k in (3, 4, 5):
        ta[k].requires_grad_(True)

    def torch_step():
        for k in (3, 4, 5):
            ta[k].grad = None
        out = tl(*ta)
        out.backward()
        return out.item()
    t_t = timeit(torch_step)
    rows.append(dict(bench=f"LSTM h{Hd} b16 T{T} fwd+bwd (ms)", scan=t_s * 1e3, unrolled=t_u * 1e3,
                     scan_recompute=t_r * 1e3, torch=t_t * 1e3, scan_vs_unrolled=t_u / t_s, scan_vs_torch=t_t / t_s,
                     goal="scan >= unrolled, >= 3x torch",
                     met="yes" if (t_s <= t_u and t_t / t_s >= 3) else "NO"))

    # 3. peak memory at T=200, h128
    T, Hd = 200, 128
    ja = [jn.tensor(x) for x in arrays(T, Hd)]
    s = jn.jit(jn.value_and_grad(scan_loss(Hd, checkpoint=True), argnums=(3, 4, 5)))
    sr = jn.jit(jn.value_and_grad(scan_loss(Hd), argnums=(3, 4, 5)))
    st = jn.jit(jn.value_and_grad(scan_loss(Hd, checkpoint="unroll"), argnums=(3, 4, 5)))
    u = jn.jit(jn.value_and_grad(unrolled_loss(Hd), argnums=(3, 4, 5)))
    p_s = peak_bytes(s, ja)
    p_sr = peak_bytes(sr, ja)
    p_st = peak_bytes(st, ja)
    p_u = peak_bytes(u, ja)
    rows.append(dict(bench="peak bytes, value+grad, LSTM h128 b16 T200", scan_recompute=p_s,
                     scan_store_residuals=p_sr, scan_unroll_every_step=p_st, unrolled=p_u,
                     ratio_vs_residuals=p_s / p_sr, ratio_vs_unroll=p_s / p_st, goal="<= 0.5",
                     met="yes" if p_s <= 0.5 * p_st else "NO"))
    for r in rows:
        table([r])
    dump(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
