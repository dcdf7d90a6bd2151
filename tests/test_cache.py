"""The kernel cache repairs itself: a damaged generated module or Numba cache file is removed (or rewritten) and
its kernel compiled again, with one warning, in a fresh process; ``python -m jitnet cache info|clear``.

Every test points JITNET_CACHE_DIR and NUMBA_CACHE_DIR at a temporary directory: the shared caches are never
touched.
"""
import glob
import io
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import jitnet
from jitnet import cache
from jitnet.__main__ import main

# One tiny generated kernel per case (f(x) = 2x + i) and one of jitnet's own kernels (kernels_scalar.exp_f32).
N = 9
_WORKER = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import jitnet
        from jitnet import kernelgen, kernels_scalar
        src = "# jitnet generated test kernel\\nfrom numba import njit\\n\\n\\n@njit(cache=True)\\ndef f(x):\\n"
        mods = [kernelgen.load_source(src + "    return x * 2.0 + %d\\n" % i, "cpu", "test-cache")
                for i in range(int(sys.argv[1]))]
        results = [m.f(1.0) for m in mods] + [float(kernels_scalar.exp_f32(np.float32(0.5)))]
    disps = [m.f for m in mods] + [kernels_scalar.exp_f32]
    print(json.dumps(dict(
        results=results, modules=[m.__name__ for m in mods],
        compiled=[sum(d._cache_misses.values()) for d in disps],
        loaded=[sum(d._cache_hits.values()) for d in disps],
        repairs=[str(w.message) for w in caught if issubclass(w.category, jitnet.CacheRepairWarning)])))
""")
EXPECTED = [2.0 + i for i in range(N)] + [float(np.float32(math.exp(0.5)))]


def _env(tmp_path):
    env = dict(os.environ)
    env["JITNET_CACHE_DIR"] = str(tmp_path / "k")
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "n")
    return env


def _start(tmp_path):
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(N)], env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert r["results"] == pytest.approx(EXPECTED, rel=1e-6)
    return r


def _run(tmp_path):
    return _finish(_start(tmp_path))


def _one(pattern):
    hits = glob.glob(pattern)
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


def _files(tmp_path, modules):
    """Return {case: path} of the files each case damages."""
    n = str(tmp_path / "n")
    nbi = [_one(f"{n}/*/{m}.f-*.nbi") for m in modules]
    nbc = [_one(f"{n}/*/{m}.f-*.1.nbc") for m in modules]
    return {"nbi-truncated": nbi[0], "nbi-garbled": nbi[1], "nbi-empty": nbi[2], "nbc-truncated": nbc[3],
            "nbc-garbled": nbc[4], "nbc-empty": nbc[5], "nbi-other-numba": nbi[6],
            "py-truncated": str(tmp_path / "k" / f"{modules[7]}.py"), "nbc-other-key": nbc[8],
            "package-nbi-garbled": _one(f"{n}/jitnet_*/kernels_scalar.exp_f32-*.nbi"), "_donor": nbc[7]}


def _damage(files):
    """Damage each file as its case says; return the paths a repairing reader must report."""
    def rd(p):
        with open(p, "rb") as f:
            return f.read()

    def wr(p, b):
        with open(p, "wb") as f:
            f.write(b)

    def garble(p):
        b = bytearray(rd(p))
        mid = len(b) // 2
        b[mid:mid + 24] = bytes(x ^ 0xFF for x in b[mid:mid + 24])
        wr(p, bytes(b))

    for case, p in files.items():
        if case.endswith("truncated"):
            wr(p, rd(p)[:len(rd(p)) // 2])
        elif case.endswith("garbled"):
            garble(p)
        elif case.endswith("empty"):
            wr(p, b"")
    # An index as another Numba version writes it: its version first, then data this version cannot read.
    wr(files["nbi-other-numba"], pickle.dumps("0.50.1", protocol=2) + b"\x80\x05 another version's index")
    # A valid data file of another kernel (f(x) = 2x + 7) under kernel 8's name: stale, must not be run.
    wr(files["nbc-other-key"], rd(files["_donor"]))
    return sorted(p for c, p in files.items() if c not in ("nbi-other-numba", "nbc-other-key", "_donor"))


def _reported(repairs, path):
    return sum(path in msg for msg in repairs)


def test_damaged_cache_files_are_removed_and_recompiled_with_one_warning(tmp_path, monkeypatch):
    first = _run(tmp_path)
    assert first["compiled"] == [1] * (N + 1) and first["repairs"] == []
    files = _files(tmp_path, first["modules"])
    damaged = _damage(files)

    # `jitnet cache info` finds exactly the damaged files (stale ones are not damage).
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", str(tmp_path / "n"))
    rep = cache.info(kernel_dir=str(tmp_path / "k"))
    assert sorted(d["path"] for d in rep["damaged"]) == damaged

    r = _run(tmp_path)
    assert len(r["repairs"]) == len(damaged), r["repairs"]
    for p in damaged:
        assert _reported(r["repairs"], p) == 1, (p, r["repairs"])
    assert all("CacheRepairWarning" not in m for m in r["repairs"])
    # every kernel whose cache entry was damaged or stale compiled again; the rewritten module's entry is good
    assert r["compiled"] == [1, 1, 1, 1, 1, 1, 1, 0, 1, 1]
    assert r["loaded"][7] == 1
    assert not glob.glob(str(tmp_path / "**" / "*.damaged.*"), recursive=True)

    again = _run(tmp_path)
    assert again["repairs"] == [] and again["compiled"] == [0] * (N + 1) and again["loaded"] == [1] * (N + 1)
    assert cache.info(kernel_dir=str(tmp_path / "k"))["damaged"] == []


@pytest.mark.slow
def test_two_processes_repair_the_same_damaged_cache_at_once(tmp_path):
    first = _run(tmp_path)
    damaged = _damage(_files(tmp_path, first["modules"]))
    a, b = _start(tmp_path), _start(tmp_path)
    ra, rb = _finish(a), _finish(b)
    for p in damaged:              # reported by one of them at least, by neither twice
        assert 1 <= _reported(ra["repairs"], p) + _reported(rb["repairs"], p) <= 2, p
        assert _reported(ra["repairs"], p) <= 1 and _reported(rb["repairs"], p) <= 1
    again = _run(tmp_path)
    assert again["repairs"] == [] and again["compiled"] == [0] * (N + 1)


def test_a_reader_never_removes_a_file_replaced_after_it_found_it_damaged(tmp_path):
    p = str(tmp_path / "f.nbi")
    with open(p, "wb") as f:
        f.write(b"damaged")
    st = os.stat(p)
    tmp = p + ".tmp"
    with open(tmp, "wb") as f:           # a writer replaces it, atomically, with a good file
        f.write(b"a good, newer file")
    os.replace(tmp, p)
    assert not cache._remove_if_same(p, st)
    with open(p, "rb") as f:
        assert f.read() == b"a good, newer file"
    assert cache._remove_if_same(p, os.stat(p))
    assert os.listdir(tmp_path) == []


def _fake_caches(tmp_path, monkeypatch):
    """A kernel cache and a NUMBA_CACHE_DIR with jitnet's files, one damaged, and another library's file."""
    kdir, ndir = tmp_path / "k", tmp_path / "n"
    monkeypatch.setenv("JITNET_CACHE_DIR", str(kdir))
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", str(ndir))
    kdir.mkdir()
    (kdir / "jitnet_k_0123.py").write_text("# jitnet generated elementwise kernel\nx = 1\n")
    (kdir / ".tmp-abc.py").write_text("# jitnet gen")                 # a write cut short
    ours = tmp_path / "n" / os.path.basename(cache._numba_dirs(str(kdir))[0])
    ours.mkdir(parents=True)
    (ours / "jitnet_k_0123.kernel_serial-8.py311.nbi").write_bytes(b"\x80\x05garbage")
    other = ndir / "mylib_0123"
    other.mkdir()
    (other / "mylib.f-3.py311.nbi").write_bytes(b"not jitnet's")
    return kdir, ours, other


def test_cache_info_and_clear_cover_jitnets_files_only(tmp_path, monkeypatch, capsys):
    kdir, ours, other = _fake_caches(tmp_path, monkeypatch)
    assert main(["cache", "info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kernel_dir"] == str(kdir) and rep["numba_cache_dir"] == str(tmp_path / "n")
    assert (rep["modules"], rep["numba_files"], rep["leftovers"], rep["files"]) == (1, 1, 1, 3)
    assert [d["path"] for d in rep["damaged"]] == [str(next(ours.iterdir()))]

    buf = io.StringIO()
    assert cache.cli("info", out=buf) == 0
    assert "damaged files:     1" in buf.getvalue() and "1 generated modules" in buf.getvalue()

    assert main(["cache", "clear", "--dry-run"]) == 0
    assert "would remove 3 files in all" in capsys.readouterr().out
    assert len(list(kdir.iterdir())) == 2

    assert main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 3 files in all" in out and str(kdir) in out
    assert list(kdir.iterdir()) == [] and not ours.exists()
    assert (other / "mylib.f-3.py311.nbi").read_bytes() == b"not jitnet's"     # another library's cache
    assert main(["cache", "clear"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_check_file_names_each_kind_of_damage(tmp_path):
    good = tmp_path / "jitnet_k_1.py"
    good.write_text("# jitnet generated elementwise kernel\n")
    assert cache.check_file(str(good)) is None
    for name, data, why in [("a.nbi", b"", "empty"), ("b.nbc", b"\x80\x05\x95", "truncated"),
                            ("c.py", b"\xff\xfe(", "not valid Python"),
                            ("d.nbi", pickle.dumps(numba.__version__) + b"\x80\x05garbage", "garbled")]:
        (tmp_path / name).write_bytes(data)
        assert why in cache.check_file(str(tmp_path / name)), name
    payload = pickle.dumps({"a": 1})
    ok = tmp_path / "e.nbc"
    ok.write_bytes(payload + cache._trailer(payload, cache._NO_TAG))
    assert cache.check_file(str(ok)) is None
    ok.write_bytes(payload[:-2] + b"xx" + cache._trailer(payload, cache._NO_TAG))
    assert "checksum" in cache.check_file(str(ok))
    stale = tmp_path / "f.nbi"
    stale.write_bytes(pickle.dumps("0.50.1") + b"unreadable by this version")
    assert cache.check_file(str(stale)) is None


def test_every_cached_kernel_of_jitnet_has_the_checked_cache():
    import importlib
    for m in ("jitnet.models.dnc", "jitnet.models.seq2seq", "jitnet.models.skipgram",
              "jitnet.models.policy_gradient", "jitnet.winograd", "jitnet.data.augment"):
        importlib.import_module(m)
    disps = [d for d in jitnet.runtime._all_dispatchers() if cache._numba_cache(d) is not None]
    assert len(disps) > 100
    unchecked = [d.py_func.__qualname__ for d in disps if not getattr(d._cache, "_jn_checked", False)]
    assert unchecked == []
    assert all(isinstance(d._cache._cache_file, cache._CheckedIndexDataFile) for d in disps)


_CUDA_CHILD = textwrap.dedent("""
    import glob, sys, warnings
    sys.path.insert(0, sys.argv[1])
    import jitnet
    from jitnet import cache
    import kmod                       # a @cuda.jit(cache=True) kernel: its dispatcher and cache need no GPU
    assert cache.protect(kmod.k) and kmod.k._cache._jn_checked
    f = kmod.k._cache._cache_file
    f.save(("sig",), {"payload": 1})
    assert f.load(("sig",)) == {"payload": 1} and f.load(("other",)) is None
    open(glob.glob(sys.argv[2] + "/*/*.nbc")[0], "wb").close()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert f.load(("sig",)) is None
    assert [x.category for x in w] == [jitnet.CacheRepairWarning], [str(x.message) for x in w]
    print("ok")
""")


def test_cuda_kernels_get_the_checked_cache_too(tmp_path):
    pytest.importorskip("numba.cuda")
    (tmp_path / "kmod.py").write_text("from numba import cuda\n\n\n@cuda.jit(cache=True)\ndef k(x):\n"
                                      "    i = cuda.grid(1)\n    if i < x.size:\n        x[i] += 1\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "n"), JITNET_CACHE_DIR=str(tmp_path / "k"))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", _CUDA_CHILD, str(tmp_path), str(tmp_path / "n")], env=env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


_DEP_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import jitnet, kmod
    jitnet.cache.protect_module(kmod)
    print(kmod.k(1.0), sum(kmod.k._cache_hits.values()))
""")


def test_editing_an_inlined_helper_file_recompiles_the_kernels_that_inline_it(tmp_path):
    # Numba stamps a cache entry with its own source file only; a module's _CACHE_DEPENDS adds the files whose
    # helpers its kernels inline (kernels_cpu and kernels_gpu name kernels_scalar.py).
    (tmp_path / "helper.py").write_text("from numba import njit\n\n\n@njit(inline='always')\n"
                                        "def h(x):\n    return x + 1.0\n")
    (tmp_path / "kmod.py").write_text("from numba import njit\nfrom helper import h\n_CACHE_DEPENDS = ('helper.py',)"
                                      "\n\n\n@njit(cache=True)\ndef k(x):\n    return h(x) * 2.0\n")
    env = _env(tmp_path)

    def run():
        out = subprocess.run([sys.executable, "-c", _DEP_WORKER, str(tmp_path)], env=env, capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert out.returncode == 0, out.stderr
        value, hits = out.stdout.split()
        return float(value), int(hits)

    assert run() == (4.0, 0)                       # compiled and saved
    assert run() == (4.0, 1)                       # loaded from the cache
    src = (tmp_path / "helper.py").read_text().replace("x + 1.0", "x + 3.0")
    (tmp_path / "helper.py").write_text(src + "\n")     # another size: a new stamp even within the mtime's tick
    assert run() == (8.0, 0)                       # the edit reaches the cached kernel: compiled again


def test_jitnets_kernel_files_are_tied_to_the_helpers_they_inline():
    from jitnet import kernels_cpu
    f = kernels_cpu.adam_update._cache._cache_file
    scalar_py = os.path.join(os.path.dirname(kernels_cpu.__file__), "kernels_scalar.py")
    assert isinstance(f._source_stamp, tuple) and cache._file_stamp(scalar_py) in f._source_stamp[1:]
