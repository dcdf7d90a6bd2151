"""Importing jitnet changes nothing other code sees: not the floating-point environment (subnormals), not malloc.

Each check runs in a fresh process that measures NumPy's and Python's arithmetic and malloc's behaviour before
``import jitnet`` and after it (and after a jitnet kernel ran). The opt-in switches flip the same checks, which
shows the checks can see the change they guard against.
"""
import os
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

_PROBE = r'''
import ctypes, json, sys
import numpy as np

libc = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
if libc is not None:
    # A fixed mmap threshold (1 MiB) turns off glibc's dynamic threshold, so whether a 4 MiB block is mmapped
    # depends only on the threshold, which is what jitnet must leave alone.
    libc.mallopt(-3, ctypes.c_int(1 << 20))

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

def probe():
    tiny64 = np.finfo(np.float64).tiny
    tiny32 = np.float32(np.finfo(np.float32).tiny)
    out = {
        "numpy_f64_half_tiny": float(tiny64 / 2) != 0.0,
        "numpy_f32_subnormal": bool((np.full(8, tiny32, np.float32) * np.float32(0.5) != 0).all()),
        "python_float_subnormal": (sys.float_info.min / 2) > 0.0,
        "numpy_sum_subnormals": float(np.full(16, 1e-310).sum()) > 0.0,
    }
    if libc is not None and hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        before = libc.mallinfo2().hblks
        p = libc.malloc(4 << 20)
        out["malloc_4mib_mmapped"] = libc.mallinfo2().hblks == before + 1
        libc.free(p)
    return out

before = probe()
import jitnet as jn
x = jn.tensor(np.full(1024, 1e-39, np.float32))
(x * 0.5 + x).numpy()                  # run a kernel: lazily started threads and pools count too
after = probe()
print(json.dumps({"before": before, "after": after}))
'''


def _run(**env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JITNET_FLUSH_DENORMALS", "JITNET_MALLOC_TUNING")}
    env.update(env_extra)
    p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    import json
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_leaves_floating_point_and_malloc_alone():
    r = _run()
    assert all(r["before"].values()), r          # subnormals exist and 4 MiB is mmapped before the import
    assert r["after"] == r["before"]


@pytest.mark.skipif(not X86_64, reason="FTZ/DAZ are x86-64 MXCSR bits")
def test_opt_in_flush_is_seen_by_the_same_probe():
    r = _run(JITNET_FLUSH_DENORMALS="1")
    assert r["before"]["numpy_f64_half_tiny"] and not r["after"]["numpy_f64_half_tiny"]
    assert not r["after"]["python_float_subnormal"]


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_opt_in_malloc_tuning_is_seen_by_the_same_probe():
    r = _run(JITNET_MALLOC_TUNING="1")
    assert r["before"]["malloc_4mib_mmapped"] and not r["after"]["malloc_4mib_mmapped"]


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_set_malloc_tuning_turns_on_and_off():
    code = ("import jitnet as jn, jitnet.runtime as r; a = jn.set_malloc_tuning(True); t = r.malloc_tuned; "
            "b = jn.set_malloc_tuning(False); print(a, t, b, r.malloc_tuned)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "True", "False"]


def test_import_keeps_other_codes_numba_warnings():
    code = r'''
import warnings, numpy as np
import jitnet
from numba import njit

@njit
def f(a, b):
    return np.dot(a, b)            # non-contiguous operands: Numba warns about performance

a = np.ones((4, 4))
with warnings.catch_warnings(record=True) as w:
    f(a[:, ::2], a[::2, :])
print(sorted({x.category.__name__ for x in w}))
'''
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "NumbaPerformanceWarning" in p.stdout
