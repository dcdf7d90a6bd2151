"""The ``jitnet`` command line: ``python -m jitnet {warmup,info,train,bench}``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import jitnet
from jitnet import cache, kernelgen, runtime, warmup
from jitnet.models import get_trainer, trainers
from jitnet.models._train import ArgumentParser, NonFiniteError, UsageError


def _parse_shard(s: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N, got {s!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {s}: need 0 <= I < N")
    return i, n


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


# --------------------------------------------------------------------------------------------------------------
# warmup
# --------------------------------------------------------------------------------------------------------------

def _warmup_shard(args) -> int:
    """Child process of ``warmup --jobs``: run one shard, report each step and the result on stdout."""
    todo = warmup.cases(args.quick)
    i, n = args.shard
    steps = []
    for name, fn in todo[i::n]:
        def step(name=name, fn=fn):
            fn()
            print("step\t" + name, flush=True)
        steps.append((name, step))
    res = warmup.run(quick=args.quick, progress=False, steps=steps)
    print("result\t" + json.dumps(res), flush=True)
    return 0


def _warmup_parallel(args):
    """Run ``args.jobs`` shard processes; return the summed result."""
    total = len(warmup.cases(args.quick))
    bar = warmup._Progress(total, not args.no_progress, sys.stderr)
    lock = threading.Lock()
    results, errors = [], []
    procs = []
    base = [sys.executable, "-m", "jitnet", "warmup", "--no-progress"] + (["--quick"] if args.quick else [])
    for i in range(args.jobs):
        procs.append(subprocess.Popen(base + ["--shard", f"{i}/{args.jobs}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=os.environ.copy()))

    def reader(p):
        for line in p.stdout:
            kind, _, rest = line.rstrip("\n").partition("\t")
            with lock:
                if kind == "step":
                    bar.step(rest)
                elif kind == "result":
                    results.append(json.loads(rest))

    threads = [threading.Thread(target=reader, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    for p, t in zip(procs, threads):
        p.wait()
        t.join()
        if p.returncode != 0:
            errors.append(("warmup process", f"exit code {p.returncode}: {p.stderr.read()[-2000:]}"))
    bar.close()
    out = {"compiled": 0, "cached": 0, "modules_written": 0, "steps": 0, "errors": list(errors)}
    for r in results:
        for k in ("compiled", "cached", "modules_written", "steps"):
            out[k] += r[k]
        out["errors"] += [tuple(e) for e in r["errors"]]
    return out


def cmd_warmup(args) -> int:
    if args.cache_dir:
        os.environ["JITNET_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    if args.shard is not None:
        return _warmup_shard(args)
    t0 = time.perf_counter()
    jobs = max(1, int(args.jobs or 1))
    if jobs > 1:
        res = _warmup_parallel(args)
    else:
        res = warmup.run(quick=args.quick, progress=not args.no_progress)
    res["seconds"] = time.perf_counter() - t0
    res["jobs"] = jobs
    res["cache_dir"] = kernelgen.cache_dir()
    res["numba_cache_dir"] = os.environ.get("NUMBA_CACHE_DIR") or "(next to each module, in __pycache__)"
    res["jitnet"] = jitnet.__version__
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"warmup: {res['compiled']} kernels compiled, {res['cached']} loaded from cache, "
              f"{res['steps']} steps in {_fmt_seconds(res['seconds'])}"
              + (f" ({jobs} processes)" if jobs > 1 else ""))
        print(f"kernel cache: {res['cache_dir']}")
        print(f"numba cache:  {res['numba_cache_dir']}")
        for name, msg in res["errors"][:20]:
            print(f"error: {name}: {msg}", file=sys.stderr)
        if len(res["errors"]) > 20:
            print(f"... and {len(res['errors']) - 20} more errors", file=sys.stderr)
    return 1 if (args.strict and res["errors"]) else 0


# --------------------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------------------

def _dir_usage(path: str) -> tuple[float, int]:
    """Return (size in MB, number of files) of the tree under ``path`` (0, 0 when it does not exist)."""
    size = files = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                size += os.path.getsize(os.path.join(root, n))
                files += 1
            except OSError:
                pass
    return size / 1e6, files


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cuda_available() -> str:
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from numba import cuda
            return "yes" if cuda.is_available() else "no"
    except Exception as e:
        return f"no ({type(e).__name__})"


def _numba_cache_line() -> str:
    d = os.environ.get("NUMBA_CACHE_DIR")
    if not d:
        return "(next to each module, in __pycache__)"
    mb, n = _dir_usage(d)
    return f"{d} ({mb:.1f} MB in {n} files)"


def cmd_info(args) -> int:
    import llvmlite
    import numba
    import numpy as np


    dn = runtime.denormal_state()           # runs one parallel kernel, so the threading layer is chosen
    try:
        layer = numba.threading_layer()
    except ValueError as e:
        layer = f"unknown ({e})"
    cdir = kernelgen.cache_dir()
    mb, nfiles = _dir_usage(cdir)
    if not dn["supported"]:
        ftz = "not supported on this CPU" + (f" ({dn.get('error')})" if dn.get("error") else "")
    else:
        ftz = (f"{'yes' if dn['main'] else 'no'} (main thread), "
               f"{'yes' if dn['workers'] else 'no'} (all {dn['threads']} worker threads)")
    env = os.environ.get("JITNET_FLUSH_DENORMALS")
    rows = [
        ("jitnet", jitnet.__version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("numba", numba.__version__),
        ("numpy", np.__version__),
        ("llvmlite", llvmlite.__version__),
        ("platform", f"{platform.system()} {platform.machine()}, {_cpu_model()}, {os.cpu_count()} CPUs"),
        ("threading layer", layer),
        ("threads", f"{numba.get_num_threads()} (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS})"),
        ("denormals flushed", ftz + (f" [JITNET_FLUSH_DENORMALS={env}]" if env is not None else "")),
        ("malloc tuned", _malloc_line()),
        ("kernel cache", cdir),
        ("kernel cache size", f"{mb:.1f} MB in {nfiles} files"),
        ("numba cache", _numba_cache_line()),
        ("cuda available", _cuda_available()),
    ]
    if args.json:
        print(json.dumps({k: v for k, v in rows}, indent=2))
    else:
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{w}}  {v}")
    return 0


def _malloc_line():
    env = os.environ.get("JITNET_MALLOC_TUNING")
    v = ("yes (large freed blocks kept for reuse: mmap threshold 32 MiB, trim threshold 1 GiB)"
         if runtime.malloc_tuned else "no")
    return v + (f" [JITNET_MALLOC_TUNING={env}]" if env is not None else "")


# --------------------------------------------------------------------------------------------------------------

def cmd_cache(args) -> int:
    return cache.cli(args.action, as_json=args.json, dry_run=args.dry_run)


def cmd_not_yet(args) -> int:
    print(f"jitnet {args.cmd}: not yet available", file=sys.stderr)
    return 2


def cmd_train(args) -> int:
    if not args.model:
        names = sorted(trainers())
        print("models: " + (", ".join(names) if names else "(none)"))
        return 0
    try:
        fn = get_trainer(args.model)
    except KeyError as e:
        print(f"jitnet train: error: {e.args[0]}", file=sys.stderr)
        return 2
    if os.environ.get("JITNET_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off"):
        runtime.set_malloc_tuning(True)      # the CLI owns its process: keep activations' memory for reuse
    return int(fn(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="jitnet", description="jitnet command line")
    p.add_argument("--traceback", action="store_true",
                   help="show the full traceback of an error (anywhere on the line; or set JITNET_DEBUG)")
    sub = p.add_subparsers(dest="cmd", metavar="command")
    sub.required = True

    w = sub.add_parser("warmup", help="compile (or load from the disk cache) every kernel the library uses")
    w.add_argument("--quick", action="store_true", help="a tiny subset of ops (smoke test)")
    w.add_argument("--jobs", "-j", type=int, default=1, help="compile in this many processes (default 1)")
    w.add_argument("--cache-dir", help="kernel cache directory (sets JITNET_CACHE_DIR)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.add_argument("--json", action="store_true", help="print the result as JSON")
    w.add_argument("--strict", action="store_true", help="exit 1 if any op failed while warming up")
    w.add_argument("--shard", type=_parse_shard, default=None, help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_warmup)

    i = sub.add_parser("info", help="versions, threads, denormal flushing, kernel cache, CUDA")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", help="train a model: python -m jitnet train MODEL [options] (MODEL --help)")
    t.add_argument("model", nargs="?", help="model name (omit to list them)")
    t.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("cache", help="jitnet's kernel cache: info (locations, sizes, damaged files) or clear")
    c.add_argument("action", choices=("info", "clear"),
                   help="info: show the caches; clear: remove jitnet's generated kernels and their Numba files")
    c.add_argument("--json", action="store_true", help="print as JSON")
    c.add_argument("--dry-run", action="store_true", help="clear: list what would be removed, remove nothing")
    c.set_defaults(func=cmd_cache)
    s = sub.add_parser("bench", help="run benchmarks (not yet available)")
    s.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_not_yet)
    return p


# --------------------------------------------------------------------------------------------------------------
# Errors: the user's mistakes are one line and exit 2; bugs keep their traceback
# --------------------------------------------------------------------------------------------------------------

_OPTIONAL = {"gymnasium": "rl", "tqdm": "progress", "matplotlib": "plot", "torch": "bench", "gensim": "bench",
             "numba_cuda": "cuda", "tensorboard": "dev", "mpi4py": "mpi"}
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def user_error(e: BaseException):
    """Return (message, exit code) when ``e`` is a user error to report in one line, else None (a bug)."""
    if isinstance(e, SystemExit):
        return (_one_line(e.code), 2) if isinstance(e.code, str) else None
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, UsageError) or isinstance(e, _PATH_ERRORS):
        return _one_line(e), 2
    if isinstance(e, (NonFiniteError, FloatingPointError)):
        return _one_line(e), 1
    if isinstance(e, ImportError):
        name = (getattr(e, "name", None) or "").split(".")[0]
        if name == "jitnet":
            return None
        if name in _OPTIONAL:
            return (f"this needs the optional package {name} (pip install 'jitnet[{_OPTIONAL[name]}]' or "
                    f"pip install {name})"), 2
        if not name:                                    # an ImportError raised with its own advice
            return _one_line(e), 2
        return f"this needs the package {name} (pip install {name}): {_one_line(e)}", 2
    return None


def _show_traceback(argv) -> bool:
    return "--traceback" in argv or os.environ.get("JITNET_DEBUG", "").strip() not in ("", "0")


def main(argv=None) -> int:
    """Run the jitnet command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = _show_traceback(argv)
    args = build_parser().parse_args([a for a in argv if a != "--traceback"])
    try:
        return args.func(args)
    except (Exception, SystemExit, KeyboardInterrupt) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise                                       # --help (0) and argparse's own errors (2)
        found = user_error(e)
        if found is None:
            raise
        msg, code = found
        if show_tb:
            import traceback
            traceback.print_exc()
        print(f"jitnet {args.cmd}: error: {msg}", file=sys.stderr, flush=True)
        _abort_other_ranks(code)
        return code


def _abort_other_ranks(code):
    """In a data-parallel run with several ranks, end them all (the others would wait for this one forever)."""
    dist = sys.modules.get("jitnet.distributed")
    if dist is not None and dist.is_initialized() and dist.world_size() > 1 and code:
        dist.abort(code, "the error above")


if __name__ == "__main__":
    sys.exit(main())
