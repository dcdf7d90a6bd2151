"""Core op benchmarks: jitnet against NumPy and PyTorch (CPU) measured in the same run, on the same threads.

Figures (each a ratio against a peer; ratio = peer time / jitnet time, so > 1 means jitnet is faster):

* eager dispatch of ``a + b`` on 8x8 float32, with and without ``requires_grad`` (goal: at most 2x PyTorch);
* contiguous elementwise ``a * b`` and ``exp(a)`` on 10M float32 (goal: >= 1.0x NumPy);
* softmax over (4096, 1024) float32 (goal: >= 1.5x a standard NumPy softmax);
* matmul 1024x1024 float32 (goal: within 10% of NumPy);
* cold vs warm start: a fresh process that imports jitnet and runs 20 different ops, first with empty kernel and
  Numba caches, then again after ``python -m jitnet warmup`` in the same caches (goal: warm under 2 s); the peer
  is a fresh process that imports torch and runs the same 20 ops;
* subnormals: ``a * 0.5`` on 10M subnormal float32 with and without flush-to-zero (no goal; measured).

Times are the median (``--stat min``: the minimum) of ``--repeats`` runs after warm-up calls.

    python bench/ops.py [--threads 2] [--repeats 15] [--stat median|min] [--quick] [--json PATH] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STAT = statistics.median          # --stat min: the best run, steadier on a machine shared with other jobs


def _timeit(fn, repeats, number=1, warmup=3):
    """Return the median (or min) time of one call of ``fn`` over ``repeats`` runs of ``number`` calls each."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t0) / number)
    return STAT(ts)


class Table:
    """Rows of (name, jitnet time, peer, peer time, ratio, goal, met)."""

    def __init__(self):
        self.rows = []

    def add(self, name, jt, peer, pt, goal=None, goal_text="", higher_is_better=True, ratio=None, unit="s"):
        """Add a row; ``goal`` is the minimal ratio peer/jitnet (or a callable on the row) or None."""
        r = (pt / jt) if ratio is None else ratio
        if goal is None:
            met = None
        elif callable(goal):
            met = bool(goal(jt, pt, r))
        else:
            met = bool(r >= goal)
        row = {"name": name, "jitnet_s": jt, "peer": peer, "peer_s": pt, "ratio": r, "goal": goal_text,
               "met": met}
        self.rows.append(row)
        print(_fmt_row(row), flush=True)
        return row


def _fmt_time(t):
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.2f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


_HEADER = f"{'benchmark':<44} {'jitnet':>10} {'peer':>8} {'peer time':>10} {'ratio':>7}  {'goal':<26} met?"


def _fmt_row(r):
    met = "-" if r["met"] is None else ("yes" if r["met"] else "NOT MET")
    return (f"{r['name']:<44} {_fmt_time(r['jitnet_s']):>10} {r['peer']:>8} {_fmt_time(r['peer_s']):>10} "
            f"{r['ratio']:>6.2f}x  {r['goal']:<26} {met}")


def markdown(rows):
    """Return the rows as a Markdown table."""
    out = ["| benchmark | jitnet | peer | peer time | ratio (peer/jitnet) | goal | met? |",
           "|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**not met**")
        out.append(f"| {r['name']} | {_fmt_time(r['jitnet_s'])} | {r['peer']} | {_fmt_time(r['peer_s'])} | "
                   f"{r['ratio']:.2f}x | {r['goal']} | {met} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------

def bench_dispatch(t, args, jn, np, torch):
    """Eager per-op overhead of a + b on 8x8 float32."""
    rng = np.random.default_rng(0)
    a0, b0 = rng.random((8, 8), dtype=np.float32), rng.random((8, 8), dtype=np.float32)
    n = 2000 if args.quick else 20000
    for grad in (False, True):
        a, b = jn.tensor(a0, requires_grad=grad), jn.tensor(b0)
        ta, tb = torch.tensor(a0, requires_grad=grad), torch.tensor(b0)
        tj = _timeit(lambda: a + b, args.repeats, n)
        tt = _timeit(lambda: ta + tb, args.repeats, n)
        label = "dispatch a + b 8x8 f32" + (" requires_grad" if grad else "")
        t.add(label, tj, "torch", tt, goal=0.5, goal_text="<= 2x torch (ratio >= 0.5)")
        if not grad:
            tn = _timeit(lambda: a0 + b0, args.repeats, n)
            t.add(label, tj, "numpy", tn)


def bench_elementwise(t, args, jn, np, torch):
    """Contiguous elementwise ops on N float32."""
    n = 1_000_000 if args.quick else 10_000_000
    rng = np.random.default_rng(1)
    a0 = rng.random(n, dtype=np.float32)
    b0 = rng.random(n, dtype=np.float32)
    a, b = jn.tensor(a0), jn.tensor(b0)
    ta, tb = torch.from_numpy(a0), torch.from_numpy(b0)
    size = f"{n // 1_000_000}M"
    for name, fj, fn, ft in (("a * b", lambda: a * b, lambda: a0 * b0, lambda: ta * tb),
                             ("exp(a)", lambda: jn.exp(a), lambda: np.exp(a0), lambda: torch.exp(ta))):
        tj = _timeit(fj, args.repeats)
        t.add(f"{name} {size} f32", tj, "numpy", _timeit(fn, args.repeats), goal=1.0, goal_text=">= 1.0x numpy")
        t.add(f"{name} {size} f32", tj, "torch", _timeit(ft, args.repeats))


def bench_softmax(t, args, jn, np, torch):
    """Softmax over the last axis."""
    shape = (1024, 1024) if args.quick else (4096, 1024)
    x0 = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    x, tx = jn.tensor(x0), torch.from_numpy(x0)

    def np_softmax():
        e = np.exp(x0 - x0.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    ref = np_softmax()
    assert np.allclose(jn.softmax(x, axis=-1).numpy(), ref, atol=1e-6)
    tj = _timeit(lambda: jn.softmax(x, axis=-1), args.repeats)
    label = f"softmax {shape[0]}x{shape[1]} f32"
    t.add(label, tj, "numpy", _timeit(np_softmax, args.repeats), goal=1.5, goal_text=">= 1.5x numpy")
    t.add(label, tj, "torch", _timeit(lambda: torch.softmax(tx, dim=-1), args.repeats))


def bench_matmul(t, args, jn, np, torch):
    """Matmul of two square float32 matrices."""
    n = 512 if args.quick else 1024
    rng = np.random.default_rng(3)
    a0, b0 = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a, b = jn.tensor(a0), jn.tensor(b0)
    ta, tb = torch.from_numpy(a0), torch.from_numpy(b0)
    tj = _timeit(lambda: a @ b, args.repeats)
    label = f"matmul {n}x{n} f32"
    t.add(label, tj, "numpy", _timeit(lambda: a0 @ b0, args.repeats), goal=1 / 1.1,
          goal_text="within 10% of numpy (>= 0.91)")
    t.add(label, tj, "torch", _timeit(lambda: ta @ tb, args.repeats))


def bench_denormals(t, args, jn, np, torch):
    """a * 0.5 on subnormal float32 with flush-to-zero / denormals-are-zero off and on."""
    n = 1_000_000 if args.quick else 10_000_000
    tiny = np.array([0x00400000], np.int32).view(np.float32)[0]       # 5.9e-39, subnormal
    a0 = np.full(n, tiny, np.float32)
    a = jn.tensor(a0)
    was = jn.denormals_flushed()
    try:
        if not jn.flush_denormals(False):
            print("subnormals: flush_denormals is not supported on this CPU; skipped", flush=True)
            return
        t_off = _timeit(lambda: a * 0.5, args.repeats)
        tn_off = _timeit(lambda: a0 * np.float32(0.5), args.repeats)
        jn.flush_denormals(True)
        t_on = _timeit(lambda: a * 0.5, args.repeats)
        tn_on = _timeit(lambda: a0 * np.float32(0.5), args.repeats)
    finally:
        jn.flush_denormals(was)
    size = f"{n // 1_000_000}M"
    t.add(f"subnormal a * 0.5 {size} f32: flush on", t_on, "flush off", t_off)
    t.add(f"numpy subnormal a * 0.5 {size}: flush on", tn_on, "flush off", tn_off)


_COLD_OPS = r"""
import time, sys
t0 = time.perf_counter()
import numpy as np
rng = np.random.default_rng(0)
a0 = rng.random((16, 32), dtype=np.float32); b0 = rng.random((16, 32), dtype=np.float32)
w0 = rng.random((32, 8), dtype=np.float32); i0 = np.array([0, 3, 5], np.int64)
{imp}
{body}
t1 = time.perf_counter()
print("OPS_SECONDS", t1 - t0)
{tail}
"""

_JN_IMP = "import jitnet as jn\na = jn.tensor(a0); b = jn.tensor(b0); w = jn.tensor(w0); i = jn.tensor(i0)"
_JN_OPS = """
r = [a + b, a - b, a * b, a / b, jn.exp(a), jn.log(a), jn.tanh(a), jn.sigmoid(a), jn.relu(a - 0.5),
     jn.maximum(a, b), jn.sum(a, axis=-1), jn.mean(a), jn.max(a, axis=0), jn.softmax(a, axis=-1),
     jn.log_softmax(a, axis=-1), jn.matmul(a, w), jn.concatenate([a, b], axis=0), jn.take(a, i, axis=0),
     jn.argmax(a, axis=-1), jn.cumsum(a, axis=1)]
assert len(r) == 20
"""
_JN_TAIL = "import json; print('STATS', json.dumps(jn.compile_stats()))"
_TORCH_IMP = ("import torch\ntorch.set_num_threads({threads})\n"
              "a = torch.from_numpy(a0); b = torch.from_numpy(b0); w = torch.from_numpy(w0); i = torch.from_numpy(i0)")
_TORCH_OPS = """
r = [a + b, a - b, a * b, a / b, torch.exp(a), torch.log(a), torch.tanh(a), torch.sigmoid(a), torch.relu(a - 0.5),
     torch.maximum(a, b), torch.sum(a, dim=-1), torch.mean(a), torch.amax(a, dim=0), torch.softmax(a, dim=-1),
     torch.log_softmax(a, dim=-1), a @ w, torch.cat([a, b], dim=0), torch.index_select(a, 0, i),
     torch.argmax(a, dim=-1), torch.cumsum(a, dim=1)]
assert len(r) == 20
"""


def _run_fresh(code, env):
    """Run ``code`` in a fresh Python process; return (wall seconds, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"fresh process failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout


def _stats(out):
    for line in out.splitlines():
        if line.startswith("STATS "):
            return json.loads(line[6:])
    return {}


def bench_cold_warm(t, args, jn, np, torch):
    """Fresh process: import + 20 ops, with empty caches (cold) and after ``jitnet warmup`` (warm)."""
    tmp = tempfile.mkdtemp(prefix="jitnet-bench-")
    try:
        env = dict(os.environ)
        env["JITNET_CACHE_DIR"] = os.path.join(tmp, "kernels")
        env["NUMBA_CACHE_DIR"] = os.path.join(tmp, "numba")           # Numba's cache cleared: an empty dir
        env["NUMBA_NUM_THREADS"] = str(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
        jcode = _COLD_OPS.format(imp=_JN_IMP, body=_JN_OPS, tail=_JN_TAIL)
        tcode = _COLD_OPS.format(imp=_TORCH_IMP.format(threads=args.threads), body=_TORCH_OPS, tail="")
        cold, out = _run_fresh(jcode, env)
        st_cold = _stats(out)
        print(f"  cold: {cold:.2f} s, {st_cold.get('compiles')} kernels compiled", flush=True)
        wcmd = [sys.executable, "-m", "jitnet", "warmup", "--no-progress"]
        if args.quick:
            wcmd.append("--quick")
        else:
            wcmd += ["--jobs", str(max(1, args.threads))]
        t0 = time.perf_counter()
        w = subprocess.run(wcmd, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
        wsec = time.perf_counter() - t0
        print(f"  {' '.join(wcmd[1:])}: {wsec:.1f} s: {w.stdout.strip().splitlines()[0] if w.stdout else ''}",
              flush=True)
        if w.returncode != 0:
            print(w.stderr[-2000:], file=sys.stderr)
        warm, out = _run_fresh(jcode, env)
        st_warm = _stats(out)
        print(f"  warm: {warm:.2f} s, {st_warm.get('compiles')} kernels compiled, "
              f"{st_warm.get('cache_hits')} loaded from cache", flush=True)
        peer, _ = _run_fresh(tcode, env)
        _run_fresh(tcode, env)
        peer = min(peer, _run_fresh(tcode, env)[0])       # torch has no cache to warm: best of two
        t.add("cold start: import + 20 ops (empty caches)", cold, "torch", peer)
        t.add("warm start: import + 20 ops (after warmup)", warm, "torch", peer, goal=lambda jt, pt, r: jt < 2.0,
              goal_text="warm < 2 s")
        return {"cold_s": cold, "warm_s": warm, "torch_s": peer, "warmup_s": wsec,
                "cold_compiles": st_cold.get("compiles"), "warm_compiles": st_warm.get("compiles"),
                "warm_cache_hits": st_warm.get("cache_hits")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


BENCHES = {
    "dispatch": bench_dispatch,
    "elementwise": bench_elementwise,
    "softmax": bench_softmax,
    "matmul": bench_matmul,
    "denormals": bench_denormals,
    "coldwarm": bench_cold_warm,
}


def _machine():
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version()}


def main(argv=None):
    """Run the selected benchmarks, print the table and return the rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for jitnet, torch and BLAS (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median; default 15)")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="statistic over repeats")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benchmarks")
    args = ap.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # before numpy loads BLAS
        os.environ.setdefault(var, str(args.threads))

    import numpy as np
    import torch

    import jitnet as jn
    import numba

    torch.set_num_threads(args.threads)
    jn.set_num_threads(args.threads)
    info = dict(_machine(), threads=args.threads, stat=args.stat, jitnet=jn.__version__, numba=numba.__version__,
                numpy=np.__version__, torch=torch.__version__, quick=args.quick,
                command="python bench/ops.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"# {info['cpu']} ({info['cpus']} CPUs), threads={args.threads}, jitnet {info['jitnet']}, "
          f"numba {info['numba']}, numpy {info['numpy']}, torch {info['torch']}, {args.stat} of {args.repeats}"
          + (" [--quick: smaller sizes]" if args.quick else ""), flush=True)
    print(_HEADER, flush=True)
    table = Table()
    extra = {}
    for name in (args.only or list(BENCHES)):
        r = BENCHES[name](table, args, jn, np, torch)
        if r:
            extra[name] = r
    print("\n" + markdown(table.rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": table.rows, "extra": extra}, f, indent=2)
    return table.rows


if __name__ == "__main__":
    main()
