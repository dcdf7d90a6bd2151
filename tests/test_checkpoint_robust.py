"""Checkpoints that fail loudly and recover: malformed files, orphaned temp files, restore fallback, NaN refusal."""
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import jitnet.io as jio
from jitnet.io import _atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw_file(header, data=b""):
    """Return the bytes of a safetensors file whose header is ``header`` (a str is used verbatim)."""
    h = header if isinstance(header, str) else json.dumps(header)
    h = h.encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _good_bytes(tmp_path):
    path = tmp_path / "_good.safetensors"
    jio.save_file({"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2))}, path)
    data = path.read_bytes()
    path.unlink()
    return data


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _deep(n):
    return '{"a":' + "[" * n + "]" * n + "}"


# Each case: (file name, bytes-or-builder, words the message must contain)
MALFORMED = [
    ("empty", lambda good: b"", "empty"),
    ("truncated", lambda good: good[: len(good) // 2], "truncated"),
    ("short_length", lambda good: good[:5], "truncated"),
    ("bad_length", lambda good: struct.pack("<Q", 2**60) + good[8:], "header length"),
    ("zero_length", lambda good: struct.pack("<Q", 0) + good[8:], "bad header"),
    ("not_json", lambda good: good[:8] + b"#" + good[9:], "not valid UTF-8 JSON"),
    ("not_utf8", lambda good: good[:9] + b"\xff" + good[10:], "not valid UTF-8 JSON"),
    ("deep_nesting", lambda good: _raw_file(_deep(100_000)), "nested too deeply"),
    ("deep_list", lambda good: _raw_file("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("dtype_unknown", lambda good: _raw_file({"a": _entry("Q7")}, bytes(8)), "unsupported dtype 'Q7'"),
    ("dtype_f8", lambda good: _raw_file({"a": _entry("F8_E4M3", (8,))}, bytes(8)), "unsupported dtype 'F8_E4M3'"),
    ("dtype_list", lambda good: _raw_file({"a": _entry([1])}, bytes(8)), "dtype"),
    ("dtype_null", lambda good: _raw_file({"a": _entry(None)}, bytes(8)), "dtype"),
    ("shape_float", lambda good: _raw_file({"a": _entry(shape=[2.0])}, bytes(8)), "shape"),
    ("shape_65_dims", lambda good: _raw_file({"a": _entry("U8", [1] * 65, (0, 1))}, b"\0"), "dimensions"),
    ("shape_huge_zero", lambda good: _raw_file({"a": _entry("U8", [0, 2**70], (0, 0))}), "shape"),
    ("shape_bytes", lambda good: _raw_file({"a": _entry(shape=[3])}, bytes(8)), "byte count"),
    ("offsets_out", lambda good: _raw_file({"a": _entry()}, bytes(4)), "out of range"),
    ("offsets_overlap", lambda good: _raw_file({"a": _entry(), "b": _entry(offsets=(4, 12))}, bytes(12)),
     "overlap"),
    ("offsets_reversed", lambda good: _raw_file({"a": _entry(offsets=(8, 0))}, bytes(8)), "data_offsets"),
    ("offsets_bool", lambda good: _raw_file({"a": _entry("U8", (1,), (False, True))}, b"\0"), "data_offsets"),
    ("pickle", lambda good: pickle.dumps({"w": np.ones(3)}), "pickle"),
    ("pickle_proto2", lambda good: pickle.dumps({"w": [1.0, 2.0]}, protocol=2), "pickle"),
    ("torch_zip", lambda good: b"PK\x03\x04" + bytes(200), "zip"),
    ("npy", lambda good: b"\x93NUMPY\x01\x00" + bytes(100), "NumPy"),
    ("html", lambda good: b"<!DOCTYPE html><html><body>Not Found</body></html>", "HTML"),
]


@pytest.mark.parametrize("name,build,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_raises_value_error_naming_file_and_problem(tmp_path, name, build, words):
    path = tmp_path / "model.safetensors"  # a neutral name: the problem words must come from the check
    path.write_bytes(build(_good_bytes(tmp_path)))
    for fn in (jio.load_file, jio.load_metadata, jio.load):
        with pytest.raises(ValueError) as e:
            fn(path)
        msg = str(e.value)
        assert str(path) in msg and words in msg.replace(str(path), ""), msg
    assert jio.validate_file(path) is False


def test_directory_and_special_paths_raise_value_error(tmp_path):
    d = tmp_path / "ckpt-1.safetensors"
    d.mkdir()
    with pytest.raises(ValueError, match="is a directory") as e:
        jio.load_file(d)
    assert str(d) in str(e.value)
    assert jio.validate_file(d) is False
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.safetensors"
        os.mkfifo(fifo)
        with pytest.raises(ValueError, match="not a regular file"):  # and does not block on open
            jio.load_file(fifo)
    # A missing file is not a malformed one: it stays FileNotFoundError.
    with pytest.raises(FileNotFoundError):
        jio.load_file(tmp_path / "missing.safetensors")


def test_safetensors_file_that_starts_like_a_pickle_still_loads(tmp_path):
    # A header of 0x0480 = 1152 bytes makes the file begin with b"\x80\x04", a pickle's opening bytes.
    path = tmp_path / "x.safetensors"
    name = "n" * (1152 - 60)
    raw = json.dumps({name: _entry("U8", (1,), (0, 1))}, separators=(",", ":"))
    raw += " " * (1152 - len(raw))
    path.write_bytes(struct.pack("<Q", 1152) + raw.encode() + b"\x07")
    assert path.read_bytes()[:2] == b"\x80\x04"
    assert jio.load_file(path)[name].tolist() == [7]


# ------------------------------------------------------------------------------------------------
# Orphaned temporary files


def _dead_pid():
    """Return the pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _make_temp(directory, target, pid, age=0.0, host=None, size=100):
    host = _atomic.host_token() if host is None else host
    path = os.path.join(directory, f".{target}.{pid}-{host}-deadbeef.tmp")
    with open(path, "wb") as f:
        f.write(b"x" * size)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return os.path.basename(path)


def test_save_removes_orphans_of_dead_processes_only(tmp_path):
    dead = _dead_pid()
    orphan = _make_temp(tmp_path, "ckpt-3.safetensors", dead)
    orphan_index = _make_temp(tmp_path, "checkpoint", dead)
    live = _make_temp(tmp_path, "ckpt-4.safetensors", os.getpid())  # being written "right now"
    other_host = _make_temp(tmp_path, "ckpt-5.safetensors", dead, host="0badc0de")
    old_other_host = _make_temp(tmp_path, "ckpt-6.safetensors", dead, host="0badc0de",
                                age=2 * _atomic.STALE_SECONDS)
    legacy_old = ".ckpt-7.safetensors.a1b2c3d4.tmp"  # the random-suffix name of earlier versions
    legacy_new = ".ckpt-8.safetensors.e5f6g7h8.tmp"
    for n, age in ((legacy_old, 2 * _atomic.STALE_SECONDS), (legacy_new, 0)):
        (tmp_path / n).write_bytes(b"y")
        if age:
            t = time.time() - age
            os.utime(tmp_path / n, (t, t))
    foreign = ["notes.tmp", ".other.tmp", ".ckpt-9.safetensors.swp"]
    for n in foreign:
        (tmp_path / n).write_bytes(b"z")
        t = time.time() - 2 * _atomic.STALE_SECONDS
        os.utime(tmp_path / n, (t, t))

    saver = jio.Saver(tmp_path, max_to_keep=2)
    saver.save({"w": np.ones(2)}, 1)
    left = set(os.listdir(tmp_path))
    for gone in (orphan, orphan_index, old_other_host, legacy_old):
        assert gone not in left, gone
    for kept in [live, other_host, legacy_new, *foreign]:
        assert kept in left, kept
    assert "ckpt-1.safetensors" in left

    # The plain save function cleans up too.
    orphan2 = _make_temp(tmp_path, "model.safetensors", dead)
    jio.save({"w": np.ones(1)}, tmp_path / "model.safetensors")
    assert orphan2 not in os.listdir(tmp_path)


def test_temp_names_carry_pid_and_host(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    jio.save_file({"a": np.ones(1)}, tmp_path / "m.safetensors")
    assert len(seen) == 1
    info = _atomic.parse_temp_name(seen[0])
    assert info is not None and info.target == "m.safetensors"
    assert info.pid == os.getpid() and info.host == _atomic.host_token()


_KILL_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from jitnet.io import Saver
saver = Saver(sys.argv[2], max_to_keep=2)
big = np.ones(25_000_000, dtype=np.float32)  # 100 MB
print("ready", flush=True)
saver.save({"w": big}, 2)
print("finished", flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_sigkill_mid_save_then_next_save_removes_orphan(tmp_path):
    import signal
    ckdir = tmp_path / "ck"
    saver = jio.Saver(ckdir, max_to_keep=2)
    first = saver.save({"W": np.arange(6.0)}, 1)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, ROOT, str(ckdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        orphan = None
        deadline = time.monotonic() + 30
        while orphan is None and time.monotonic() < deadline:
            for entry in os.scandir(ckdir):
                if entry.name.endswith(".tmp") and entry.stat().st_size > 0:
                    orphan = entry.name
                    break
        assert orphan is not None, "child never started writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert orphan in os.listdir(ckdir)
    # The interrupted checkpoint never appears under its real name; the previous one is intact.
    assert not (ckdir / "ckpt-2.safetensors").exists()
    assert jio.latest_checkpoint(ckdir) == first
    np.testing.assert_array_equal(jio.Saver(ckdir).restore()["W"], np.arange(6.0))

    saver2 = jio.Saver(ckdir, max_to_keep=2)
    saver2.save({"W": np.zeros(2)}, 3)
    assert [n for n in os.listdir(ckdir) if n.endswith(".tmp")] == []
    np.testing.assert_array_equal(jio.load(first)["W"], np.arange(6.0))
    assert saver2.restore()["W"].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Saver.restore falls back


def _saver_with_steps(tmp_path, steps=(1, 2, 3)):
    saver = jio.Saver(tmp_path, max_to_keep=None)
    for s in steps:
        saver.save({"w": np.full(2, float(s))}, s)
    return saver


def _damage(path, how):
    if how == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-3])
    elif how == "empty":
        open(path, "wb").close()
    elif how == "pickle":
        open(path, "wb").write(pickle.dumps({"w": 1}))
    elif how == "garble":
        data = bytearray(open(path, "rb").read())
        data[8:16] = b"\x00\xff" * 4
        open(path, "wb").write(bytes(data))
    elif how == "directory":
        os.remove(path)
        os.mkdir(path)
    elif how == "bool_bytes":
        open(path, "wb").write(_raw_file({"w": _entry("BOOL", (2,), (0, 2))}, b"\x01\x05"))


@pytest.mark.parametrize("how", ["truncate", "empty", "pickle", "garble", "directory", "bool_bytes"])
def test_restore_falls_back_to_newest_loadable_and_warns(tmp_path, how):
    saver = _saver_with_steps(tmp_path)
    newest = saver.filename(3)
    _damage(newest, how)
    with pytest.warns(UserWarning, match="skipped") as rec:
        state = saver.restore()
    assert state["w"].tolist() == [2.0, 2.0]
    msgs = [str(w.message) for w in rec]
    assert any("ckpt-3.safetensors" in m for m in msgs), msgs
    # A fresh Saver (re-reading the index) does the same.
    with pytest.warns(UserWarning, match="ckpt-3"):
        assert jio.Saver(tmp_path).restore()["w"].tolist() == [2.0, 2.0]


def test_restore_skips_several_and_uses_scan_without_index(tmp_path):
    saver = _saver_with_steps(tmp_path, (1, 2, 3, 4))
    _damage(saver.filename(4), "truncate")
    _damage(saver.filename(3), "empty")
    os.remove(tmp_path / "checkpoint")
    with pytest.warns(UserWarning) as rec:
        state = jio.Saver(tmp_path).restore()
    assert state["w"].tolist() == [2.0, 2.0]
    text = " ".join(str(w.message) for w in rec)
    assert "ckpt-4.safetensors" in text and "ckpt-3.safetensors" in text
    assert "truncated" in text and "empty" in text


def test_restore_raises_clearly_when_nothing_loads(tmp_path):
    saver = _saver_with_steps(tmp_path, (1, 2))
    _damage(saver.filename(1), "garble")
    _damage(saver.filename(2), "pickle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no loadable checkpoint") as e:
            saver.restore()
    msg = str(e.value)
    assert str(tmp_path) in msg and "ckpt-1.safetensors" in msg and "ckpt-2.safetensors" in msg
    assert "pickle" in msg
    # An empty directory is still FileNotFoundError.
    with pytest.raises(FileNotFoundError):
        jio.Saver(tmp_path / "none").restore()


def test_restore_of_an_explicit_path_does_not_fall_back(tmp_path):
    saver = _saver_with_steps(tmp_path, (1, 2))
    _damage(saver.filename(2), "truncate")
    with pytest.raises(ValueError, match="truncated"):
        saver.restore(saver.filename(2))


def test_latest_checkpoint_warns_about_broken_files_it_skips(tmp_path):
    saver = _saver_with_steps(tmp_path, (1, 2))
    _damage(saver.filename(2), "empty")
    with pytest.warns(UserWarning, match="ckpt-2.safetensors.*empty"):
        assert saver.latest_checkpoint() == saver.filename(1)


# ------------------------------------------------------------------------------------------------
# Non-finite values


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_saver_refuses_non_finite_state_and_keeps_good_checkpoints(tmp_path, bad):
    saver = jio.Saver(tmp_path, max_to_keep=2)
    saver.save({"layer": {"W": np.ones((2, 2), np.float32)}}, 1)
    saver.save({"layer": {"W": np.full((2, 2), 2.0, np.float32)}}, 2)
    before = sorted(os.listdir(tmp_path))
    index = (tmp_path / "checkpoint").read_text()
    W = np.full((2, 2), 3.0, np.float32)
    W[1, 0] = bad
    with pytest.raises(ValueError) as e:
        saver.save({"layer": {"W": W, "b": np.zeros(2)}, "step": np.int64(3)}, 3)
    msg = str(e.value)
    assert "'layer/W'" in msg and "non-finite" in msg and "allow_nonfinite" in msg and "step 3" in msg
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "checkpoint").read_text() == index
    assert saver.restore()["layer/W"].tolist() == [[2.0, 2.0], [2.0, 2.0]]

    # The caller may insist.
    path = saver.save({"layer": {"W": W}}, 3, allow_nonfinite=True)
    out = jio.load(path)["layer/W"]
    assert out[0, 0] == 3.0 and (np.isnan(out[1, 0]) if np.isnan(bad) else out[1, 0] == bad)


def test_saver_finite_check_ignores_integers_and_checks_float16(tmp_path):
    saver = jio.Saver(tmp_path)
    saver.save({"i": np.array([2**31 - 1], np.int32), "flag": np.array([True])}, 1)
    with pytest.raises(ValueError, match="'h'"):
        saver.save({"h": np.array([1.0, np.inf], np.float16)}, 2)
