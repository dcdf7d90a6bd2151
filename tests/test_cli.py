"""The command line (warmup, info, stubs), the warm-up registry and denormal flushing."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from numba import njit, prange

import jitnet
from jitnet import runtime, warmup
from jitnet.__main__ import main

X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _cli(args, tmp_path, **env):
    """Run ``python -m jitnet ARGS`` with fresh kernel and Numba caches under tmp_path; return the process."""
    e = dict(os.environ)
    e["JITNET_CACHE_DIR"] = str(tmp_path / "kernels")
    e["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    e.update(env)
    return subprocess.run([sys.executable, "-m", "jitnet", *args], capture_output=True, text=True, env=e,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Kernel and Numba cache directories shared by this module's CLI runs (the first run fills them)."""
    return tmp_path_factory.mktemp("cli-caches")


def test_warmup_quick_compiles_then_loads_from_cache(tmp_path):
    first = _cli(["warmup", "--quick", "--json", "--no-progress"], tmp_path)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)
    assert r1["compiled"] > 0 and r1["errors"] == []
    assert r1["cache_dir"] == str(tmp_path / "kernels")
    assert any(n.endswith(".py") for n in os.listdir(tmp_path / "kernels"))

    second = _cli(["warmup", "--quick", "--json", "--no-progress"], tmp_path)
    assert second.returncode == 0, second.stderr
    r2 = json.loads(second.stdout)
    assert r2["compiled"] == 0
    assert r2["cached"] >= r1["compiled"] - 1 > 0     # everything compiled the first time now comes from disk


def test_warmup_text_report(caches):
    p = _cli(["warmup", "--quick", "--no-progress"], caches)
    assert p.returncode == 0, p.stderr
    assert "kernels compiled" in p.stdout and "loaded from cache" in p.stdout
    assert str(caches / "kernels") in p.stdout


def test_register_warmup_runs_registered_functions_with_quick():
    calls = []

    def plain():
        calls.append("plain")

    @warmup.register_warmup(name="test layer")
    def layer(quick=False):
        calls.append(("layer", quick))

    warmup.register_warmup(plain)
    warmup.register_warmup(plain)           # registering twice keeps one entry
    try:
        names = [n for n, _ in warmup.cases(quick=True)]
        assert "test layer" in names and names.count(next(n for n, f in warmup.registered() if f is plain)) == 1
        steps = [(n, f) for n, f in warmup.cases(quick=True) if n == "test layer" or "plain" in n]
        res = warmup.run(quick=True, progress=False, steps=steps)
        assert res["steps"] == 2 and res["errors"] == []
        assert calls == [("layer", True), "plain"]
    finally:
        warmup._REGISTRY[:] = [(n, f) for n, f in warmup._REGISTRY if f not in (plain, layer)]


def test_warmup_reports_op_errors_and_keeps_going():
    def broken():
        raise ValueError("boom")

    ran = []
    res = warmup.run(progress=False, steps=[("broken", broken), ("fine", lambda: ran.append(1))])
    assert res["errors"] == [("broken", "ValueError: boom")] and ran == [1]


def test_info_prints_cache_dir_and_runtime(caches):
    p = _cli(["info"], caches)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert str(caches / "kernels") in out
    for key in ("numba", "numpy", "llvmlite", "python", "threading layer", "threads", "denormals flushed",
                "malloc tuned", "kernel cache size", "cuda available"):
        assert key in out, key
    if X86_64:
        assert "denormals flushed  yes" in out


@pytest.mark.parametrize("cmd", ["bench"])
def test_stub_commands_exit_2(cmd, capsys):
    assert main([cmd]) == 2
    assert "not yet available" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Denormal flushing
# ---------------------------------------------------------------------------------------------------------------

@njit
def _mul(a, b):
    return a * b


@njit(parallel=True)
def _pmul(x, b, out):
    for i in prange(x.shape[0]):
        out[i] = x[i] * b


def _bits(x):
    return np.asarray(x, np.float32).view(np.int32)     # compare bits: printing a subnormal under DAZ reads 0


@pytest.mark.skipif(not X86_64, reason="FTZ/DAZ are x86-64 MXCSR bits")
def test_flush_denormals_main_thread_and_workers():
    was = jitnet.denormals_flushed()
    tiny = np.array([0x000AE398], np.int32).view(np.float32)[0]     # about 1e-39, built from its bits
    x = np.full(4096, tiny, np.float32)
    out = np.empty_like(x)
    try:
        assert jitnet.flush_denormals(True) is True
        assert jitnet.denormals_flushed()
        assert _bits(_mul(tiny, np.float32(1.0))) == 0
        _pmul(x, np.float32(1.0), out)
        assert (_bits(out) == 0).all()
        st = runtime.denormal_state()
        assert st["supported"] and st["main"] and st["workers"] and st["threads"] >= 1

        assert jitnet.flush_denormals(False) is True
        assert not jitnet.denormals_flushed()
        assert _bits(_mul(tiny, np.float32(1.0))) == _bits(tiny)
        _pmul(x, np.float32(1.0), out)
        assert (_bits(out) == _bits(tiny)).all()
        assert not runtime.denormal_state()["workers"]
    finally:
        jitnet.flush_denormals(was)


@pytest.mark.skipif(not X86_64, reason="FTZ/DAZ are x86-64 MXCSR bits")
def test_flush_denormals_on_import_follows_env():
    code = "import jitnet; print(jitnet.denormals_flushed())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JITNET_FLUSH_DENORMALS": "1"})
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JITNET_FLUSH_DENORMALS": "0"})
    assert on.stdout.strip() == "True", on.stderr
    assert off.stdout.strip() == "False", off.stderr


def test_flush_denormals_is_a_no_op_off_x86(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(runtime, "_mxcsr_state", {})
    assert runtime.flush_denormals(True) is False
    assert runtime.denormals_flushed() is False
    assert runtime.denormal_state()["supported"] is False


# ---------------------------------------------------------------------------------------------------------------
# malloc tuning
# ---------------------------------------------------------------------------------------------------------------

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("setting,expect", [("1", GLIBC), ("0", False)])
def test_malloc_tuning_follows_the_environment(setting, expect):
    env = dict(os.environ, JITNET_MALLOC_TUNING=setting)
    p = subprocess.run([sys.executable, "-c", "import jitnet.runtime as r, jitnet; print(r.malloc_tuned)"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(expect)
