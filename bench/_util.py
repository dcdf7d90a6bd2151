"""Shared helpers for the benchmarks: timing with warm-up and repeats, threads, result tables."""
from __future__ import annotations

import json
import statistics
import time


def timeit(fn, repeat=7, number=None, min_time=0.2, warmup=2):
    """Return the median seconds per call of ``fn`` over ``repeat`` timed batches (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    if number is None:
        t0 = time.perf_counter()
        fn()
        dt = max(time.perf_counter() - t0, 1e-7)
        number = max(1, int(min_time / dt))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def compare(fn_a, fn_b, repeats, per_block=3, gap=0.3, warmup=2):
    """Return the median seconds per call of ``fn_a`` and of ``fn_b``, timed in alternating blocks.

    Each block runs one function ``per_block`` times after a pause of ``gap`` seconds and one untimed call.
    Calls are not interleaved one by one: each library keeps its own pool of threads that spin for a while
    after a parallel region (OpenBLAS's, PyTorch's OpenMP), so a call right after the other library's ran on
    a 2-core machine measured the other's spinning threads (PyTorch's LSTM: 62 ms interleaved, 33 ms in
    blocks). Alternating blocks still spread slow spells of a shared machine over both.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(max(1, -(-repeats // per_block))):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            time.sleep(gap)
            fn()
            for _ in range(per_block):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def set_blas_threads_env(n):
    """Set the BLAS/OpenMP thread variables to ``n`` (call before NumPy or PyTorch load their libraries)."""
    import os
    for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(n)


def set_threads(n, torch=True):
    """Set jitnet's and (if installed; ``torch=False``: never) PyTorch's thread counts to ``n``, and apply the
    training CLI's process setting (malloc keeps large freed blocks for reuse; it serves both libraries in the
    process alike). A process that runs jitnet alone passes ``torch=False``: importing torch costs ~1.7 s."""
    import jitnet as jn
    jn.set_num_threads(n)
    jn.set_malloc_tuning(True)
    if not torch:
        return
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def table(rows, title=None):
    """Print rows of dicts as an aligned table; return the text."""
    if not rows:
        return ""
    cols = list(rows[0].keys())
    fmt = [max(len(c), *(len(_f(r.get(c))) for r in rows)) for c in cols]
    lines = []
    if title:
        lines.append(title)
    lines.append(" | ".join(c.ljust(w) for c, w in zip(cols, fmt)))
    lines.append("-|-".join("-" * w for w in fmt))
    for r in rows:
        lines.append(" | ".join(_f(r.get(c)).ljust(w) for c, w in zip(cols, fmt)))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _f(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def dump(rows, path):
    """Write rows as JSON to ``path`` (if given)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
