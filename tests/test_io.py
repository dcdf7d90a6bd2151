"""Tests for jitnet.io: safetensors, checkpoints, savers, TensorBoard summaries, PNG, loggers."""
import csv
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jitnet.io as jio
from jitnet.io import safetensors as st_mod

ALL_DTYPES = {
    "F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
}


def _example(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def _temp_leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def _raw_file(header, data=b"", pad=True):
    """Build a safetensors file by hand (for malformed-file tests)."""
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


# ------------------------------------------------------------------------------------------------
# safetensors round trips


@pytest.mark.parametrize("code", sorted(ALL_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (5,), (2, 3, 4)])
def test_roundtrip_every_dtype_and_shape(tmp_path, code, shape):
    dtype = ALL_DTYPES[code]
    arr = _example(dtype, shape)
    path = tmp_path / "t.safetensors"
    jio.save_file({"x": arr}, path)
    out = jio.load_file(path)
    assert list(out) == ["x"]
    assert out["x"].dtype == np.dtype(dtype)
    assert out["x"].shape == shape
    np.testing.assert_array_equal(out["x"], arr)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert n % 8 == 0
    assert header["x"]["dtype"] == code and header["x"]["shape"] == list(shape)


def test_roundtrip_many_tensors_keeps_order_and_values(tmp_path):
    tensors = {code: _example(dt, (3, 2), seed=i) for i, (code, dt) in enumerate(ALL_DTYPES.items())}
    tensors["scalar"] = np.float64(2.5)
    tensors["empty"] = np.zeros((0,), np.int8)
    tensors["ünïcode name/with slash"] = np.arange(4, dtype=np.int16)
    tensors["strided"] = np.arange(20.0).reshape(4, 5)[::2, ::-2]
    tensors["bigendian"] = np.arange(6, dtype=">i4")
    tensors["list"] = [[1.0, 2.0], [3.0, 4.0]]
    path = tmp_path / "many.safetensors"
    jio.save_file(tensors, path)
    out = jio.load_file(path)
    assert list(out) == list(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(out[k], np.asarray(v))
        assert out[k].dtype.isnative
        assert out[k].flags.c_contiguous and out[k].flags.writeable


@st.composite
def _any_arrays(draw):
    # jitnet flushes subnormal floats on import (a process-wide CPU flag), so hypothesis cannot generate them;
    # their exact round trip is checked bit for bit in test_subnormal_bits_roundtrip
    dt = np.dtype(draw(st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.int16,
                                        np.int8, np.uint8, np.bool_])))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    elements = hnp.from_dtype(dt, allow_subnormal=False) if dt.kind == "f" else None
    return draw(hnp.arrays(dt, shape, elements=elements))


def test_subnormal_bits_roundtrip(tmp_path):
    bits = np.array([1, 2, 0x007FFFFF, 0x80000001, 0x3F800000], np.uint32)   # subnormals, -subnormal, 1.0
    arr = bits.view(np.float32)
    jio.save_file({"a": arr}, tmp_path / "s.safetensors")
    np.testing.assert_array_equal(jio.load_file(tmp_path / "s.safetensors")["a"].view(np.uint32), bits)


@settings(max_examples=40, deadline=None)
@given(_any_arrays())
def test_roundtrip_property(tmp_path_factory, arr):
    path = tmp_path_factory.mktemp("prop") / "p.safetensors"
    jio.save_file({"a": arr, "b": arr[..., None]}, path)
    out = jio.load_file(path)
    np.testing.assert_array_equal(out["a"], arr)  # NaNs compare equal here
    assert out["a"].dtype == arr.dtype and out["a"].shape == arr.shape
    assert out["b"].shape == arr.shape + (1,)


def test_exact_byte_layout(tmp_path):
    path = tmp_path / "x.safetensors"
    jio.save_file({"x": np.array([1, 2], np.int32)}, path)
    header = b'{"x":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}'
    header += b" " * (-len(header) % 8)
    expected = struct.pack("<Q", len(header)) + header + struct.pack("<ii", 1, 2)
    assert path.read_bytes() == expected


def test_metadata_roundtrip(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"format": "np", "epoch": "3", "note": "ünï \"quoted\""}
    jio.save_file({"w": np.ones(2)}, path, metadata=meta)
    assert jio.load_metadata(path) == meta
    assert list(jio.load_file(path)) == ["w"]
    jio.save_file({"w": np.ones(2)}, path)
    assert jio.load_metadata(path) == {}


def test_save_rejects_bad_input(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match="complex"):
        jio.save_file({"c": np.ones(2, np.complex64)}, path)
    with pytest.raises(TypeError, match="str"):
        jio.save_file({1: np.ones(2)}, path)
    with pytest.raises(ValueError, match="reserved"):
        jio.save_file({"__metadata__": np.ones(2)}, path)
    with pytest.raises(ValueError, match="duplicate"):
        jio.save_file([("a", np.ones(1)), ("a", np.zeros(1))], path)
    with pytest.raises(TypeError, match="metadata"):
        jio.save_file({"a": np.ones(1)}, path, metadata={"k": 1})
    assert not path.exists()
    assert _temp_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# safetensors validation


def _good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    jio.save_file({"a": np.arange(10, dtype=np.float32), "b": np.ones((3, 3))}, path)
    return path


def test_truncated_file_raises_naming_file(tmp_path):
    path = _good_file(tmp_path)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) - 40, 20, 5, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as e:
            jio.load_file(path)
        assert str(path) in str(e.value)


def test_truncated_data_names_tensor(tmp_path):
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"tensor '.*' out of range") as e:
        jio.load_file(path)
    assert str(path) in str(e.value)
    assert not jio.validate_file(path)


def test_corrupted_header_raises_naming_file(tmp_path):
    path = _good_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the opening brace of the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad header") as e:
        jio.load_file(path)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match="bad header"):
        jio.load_metadata(path)


def test_absurd_header_length(tmp_path):
    path = _good_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="header length") as e:
        jio.load_file(path)
    assert str(path) in str(e.value)


def test_overlapping_offsets_raise(tmp_path):
    path = tmp_path / "overlap.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path.write_bytes(_raw_file(header, bytes(12)))
    with pytest.raises(ValueError, match="overlap") as e:
        jio.load_file(path)
    assert str(path) in str(e.value) and "'a'" in str(e.value) and "'b'" in str(e.value)


@pytest.mark.parametrize("header,data,problem", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "trailing"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "byte count"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "out of range"),
    ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "data_offsets"),
    ({"a": [1, 2]}, b"", "not an object"),
    ([1, 2], b"", "JSON object"),
    ({"__metadata__": {"k": 3}}, b"", "__metadata__"),
    ({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x07", "BOOL"),
])
def test_malformed_headers(tmp_path, header, data, problem):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw_file(header, data))
    with pytest.raises(ValueError, match=problem) as e:
        jio.load_file(path)
    assert str(path) in str(e.value)


def test_duplicate_json_keys_rejected(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    h = ('{"a":%s,"a":%s}' % (entry, entry)).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\x01")
    with pytest.raises(ValueError, match="duplicate"):
        jio.load_file(path)


def test_unpadded_header_from_other_writers_loads(tmp_path):
    path = tmp_path / "unpadded.safetensors"
    header = {"a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]}}
    path.write_bytes(_raw_file(header, b"\x01\x02\x03", pad=False))
    np.testing.assert_array_equal(jio.load_file(path)["a"], [1, 2, 3])


# ------------------------------------------------------------------------------------------------
# Atomicity


def test_crash_midway_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    old = {"w": np.arange(100, dtype=np.float32)}
    jio.save_file(old, path)
    before = path.read_bytes()

    calls = {"n": 0}
    real = st_mod._write_buffer

    def dying_write(f, arr):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial garbage")
            raise KeyboardInterrupt("simulated kill mid-write")
        real(f, arr)

    monkeypatch.setattr(st_mod, "_write_buffer", dying_write)
    with pytest.raises(KeyboardInterrupt):
        jio.save_file({"a": np.ones(1000), "b": np.zeros(1000), "c": np.ones(5)}, path)
    assert calls["n"] == 2
    assert path.read_bytes() == before
    np.testing.assert_array_equal(jio.load_file(path)["w"], old["w"])
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_crash_before_rename_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    jio.save({"w": np.ones(3)}, path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("simulated failure at rename")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename"):
        jio.save({"w": np.zeros(7)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_new_file_gets_normal_permissions(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    path = tmp_path / "p.safetensors"
    jio.save_file({"a": np.ones(1)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


# ------------------------------------------------------------------------------------------------
# checkpoint save/load, flattening, check_state


def test_save_load_flattens_nested(tmp_path):
    state = {"layer_1": {"W": np.ones((2, 3)), "b": np.zeros(3)},
             "bn": {"running": {"mean": [1.0, 2.0]}}, "step": np.int64(7)}
    path = tmp_path / "s.safetensors"
    assert jio.save(state, path) == str(path)
    out = jio.load(path)
    assert set(out) == {"layer_1/W", "layer_1/b", "bn/running/mean", "step"}
    np.testing.assert_array_equal(out["bn/running/mean"], [1.0, 2.0])
    assert out["step"].shape == () and out["step"] == 7
    nested = jio.unflatten_state(out)
    assert set(nested) == {"layer_1", "bn", "step"}
    assert nested["layer_1"]["W"].shape == (2, 3)


def test_flatten_collision_rejected():
    with pytest.raises(ValueError, match="a/b"):
        jio.flatten_state({"a/b": np.ones(1), "a": {"b": np.ones(1)}})
    with pytest.raises(TypeError):
        jio.flatten_state({"a": {3: np.ones(1)}})


def test_check_state_messages():
    expected = {"W": (3, 4), "b": (4,), "gamma": (4,)}
    got = {"W": np.zeros((4, 3)), "b": np.zeros(4), "extra": np.zeros((2, 2))}
    with pytest.raises(KeyError) as e:
        jio.check_state(expected, got, "Linear")
    msg = str(e.value)
    assert msg.startswith("Linear")
    assert "missing" in msg and "'gamma'" in msg and "(4,)" in msg
    assert "unexpected" in msg and "'extra'" in msg and "(2, 2)" in msg
    assert "'W'" in msg and "(3, 4)" in msg and "(4, 3)" in msg
    assert "'b'" not in msg

    with pytest.raises(ValueError) as e:
        jio.check_state({"W": (3, 4)}, {"W": np.zeros((4, 3))}, "Dense")
    assert not isinstance(e.value, KeyError)
    assert "Dense" in str(e.value) and "'W' expected (3, 4), got (4, 3)" in str(e.value)

    assert jio.check_state({"W": (2,)}, {"W": [1.0, 2.0]}, "ok") == ([], [])
    missing, unexpected = jio.check_state(expected, {"W": np.zeros((3, 4)), "x": 1.0}, "m",
                                          strict=False)
    assert missing == ["b", "gamma"] and unexpected == ["x"]


# ------------------------------------------------------------------------------------------------
# Saver and latest_checkpoint


def test_saver_max_to_keep(tmp_path):
    saver = jio.Saver(tmp_path, max_to_keep=3)
    for step in range(1, 7):
        saver.save({"w": np.full(2, step)}, step)
    files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))
    assert files == ["ckpt-4.safetensors", "ckpt-5.safetensors", "ckpt-6.safetensors"]
    index = json.loads((tmp_path / "checkpoint").read_text())
    assert index["latest"] == "ckpt-6.safetensors"
    assert index["kept"] == files
    assert saver.checkpoints == [str(tmp_path / f) for f in files]
    assert saver.restore()["w"].tolist() == [6, 6]
    assert jio.load_metadata(saver.latest_checkpoint())["step"] == "6"
    assert _temp_leftovers(tmp_path) == []

    # A new saver on the same directory picks up the kept list and keeps pruning.
    saver2 = jio.Saver(tmp_path, max_to_keep=3)
    saver2.save({"w": np.zeros(1)}, 7)
    files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))
    assert files == ["ckpt-5.safetensors", "ckpt-6.safetensors", "ckpt-7.safetensors"]
    # Saving the same step again replaces it without duplicating the index entry.
    saver2.save({"w": np.ones(1)}, 7)
    assert json.loads((tmp_path / "checkpoint").read_text())["kept"].count("ckpt-7.safetensors") == 1


def test_saver_keep_all(tmp_path):
    saver = jio.Saver(tmp_path, max_to_keep=None)
    for step in range(4):
        saver.save({"w": np.ones(1)}, step)
    assert len(saver.checkpoints) == 4
    with pytest.raises(ValueError):
        saver.save({"w": np.ones(1)}, -1)


def test_latest_checkpoint_with_corrupt_index(tmp_path):
    assert jio.latest_checkpoint(tmp_path) is None
    saver = jio.Saver(tmp_path, max_to_keep=5)
    with pytest.raises(FileNotFoundError):
        saver.restore()
    for step in (5, 10, 20):
        saver.save({"w": np.full(3, step)}, step)
    assert jio.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-20.safetensors")

    (tmp_path / "checkpoint").write_text("{ this is not json")
    assert jio.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-20.safetensors")

    # Newest file broken too: skip it (with a warning naming it) and fall back to the next valid one.
    newest = tmp_path / "ckpt-20.safetensors"
    newest.write_bytes(newest.read_bytes()[:30])

    def skipped():
        return pytest.warns(UserWarning, match="skipped checkpoint .*ckpt-20.safetensors")

    with skipped():
        assert jio.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-10.safetensors")

    # Index that parses but points at a broken / missing / escaping file.
    (tmp_path / "checkpoint").write_text(json.dumps({"latest": "ckpt-20.safetensors", "kept": []}))
    with skipped():
        assert jio.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-10.safetensors")
    (tmp_path / "checkpoint").write_text(json.dumps({"latest": "../x.safetensors", "kept": []}))
    with skipped():
        assert jio.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-10.safetensors")
    os.remove(tmp_path / "checkpoint")
    with skipped():
        assert jio.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-10.safetensors")
    with skipped():
        assert jio.Saver(tmp_path).restore()["w"].tolist() == [10, 10, 10]


# ------------------------------------------------------------------------------------------------
# crc32c and TFRecord framing


def test_crc32c_known_vectors():
    assert jio.crc32c(b"123456789") == 0xE3069283
    assert jio.crc32c(b"") == 0
    assert jio.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert jio.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert jio.crc32c(bytes(range(32))) == 0x46DD794E
    assert jio.crc32c(b"6789", jio.crc32c(b"12345")) == 0xE3069283
    from jitnet.io.summary import _crc32c_py
    data = np.random.default_rng(0).bytes(1001)
    assert _crc32c_py(data) == jio.crc32c(data)
    assert _crc32c_py(b"123456789") == 0xE3069283


def _read_records(path):
    data = open(path, "rb").read()
    records, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        (len_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert len_crc == jio.masked_crc32c(data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + n]
        (data_crc,) = struct.unpack_from("<I", data, pos + 12 + n)
        assert data_crc == jio.masked_crc32c(payload)
        records.append(payload)
        pos += 16 + n
    return records


def _event_accumulator_cls():
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:  # fail loudly: this test must not pass without the real reader
        pytest.fail("tensorboard is required to verify event files "
                    f"(pip install tensorboard): {e}")
    return EventAccumulator


def test_summary_writer_read_back_by_tensorboard(tmp_path):
    EventAccumulator = _event_accumulator_cls()
    values = np.random.default_rng(1).standard_normal(1000)
    with jio.SummaryWriter(tmp_path) as w:
        for step in range(5):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
        w.add_scalar("lr", np.float32(0.125), 10)
        w.add_histogram("weights", values, step=3, bins=20)
        w.add_image("gray", np.linspace(0, 1, 12 * 7).reshape(12, 7), step=1)
        w.add_image("rgb_chw", np.random.default_rng(2).random((3, 8, 5)), step=2)
        w.add_image("rgba_hwc", np.full((4, 6, 4), 200, np.uint8), step=4)
    events = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents.")]
    assert len(events) == 1
    assert events[0].split(".")[3].isdigit()

    records = _read_records(tmp_path / events[0])
    assert b"brain.Event:2" in records[0]

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0,
                                                         "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "lr"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in loss], [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5], rtol=1e-6)
    assert acc.Scalars("lr")[0].value == 0.125 and acc.Scalars("lr")[0].step == 10

    (h,) = acc.Histograms("weights")
    hv = h.histogram_value
    assert h.step == 3
    assert hv.num == 1000 and sum(hv.bucket) == 1000 and len(hv.bucket) == 20
    assert hv.min == pytest.approx(values.min()) and hv.max == pytest.approx(values.max())
    assert hv.sum == pytest.approx(values.sum())
    assert hv.sum_squares == pytest.approx((values ** 2).sum())
    assert list(hv.bucket_limit) == sorted(hv.bucket_limit)

    (g,) = acc.Images("gray")
    assert (g.height, g.width, g.step) == (12, 7, 1)
    (c,) = acc.Images("rgb_chw")
    assert (c.height, c.width, c.step) == (8, 5, 2)
    (r,) = acc.Images("rgba_hwc")
    assert (r.height, r.width) == (4, 6)
    pixels, _ = _decode_png(r.encoded_image_string)
    assert (pixels == 200).all()


def test_summary_writer_misc(tmp_path):
    w = jio.SummaryWriter(tmp_path)
    w2 = jio.SummaryWriter(tmp_path)  # same second: must not clobber the first file
    assert w.path != w2.path
    w.add_histogram("empty", [], 0)
    w.add_histogram("with_nan", [1.0, np.nan, np.inf, 2.0], 0)
    with pytest.raises(ValueError):
        w.add_scalar("bad", [1.0, 2.0], 0)
    w.close()
    w.close()
    w2.close()
    with pytest.raises(RuntimeError):
        w.add_scalar("x", 1.0, 0)


def test_tensorboard_crc_agrees():
    try:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    except ImportError as e:
        pytest.fail(f"tensorboard is required for this test (pip install tensorboard): {e}")
    for data in (b"", b"abc", bytes(range(256)) * 3):
        assert jio.masked_crc32c(data) == masked_crc32c(data)


# ------------------------------------------------------------------------------------------------
# PNG


def _decode_png(blob):
    """Minimal decoder for our own PNGs (8-bit, filter 0): returns (pixels HxWxC, color_type)."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(blob):
        (n,) = struct.unpack_from(">I", blob, pos)
        kind = blob[pos + 4:pos + 8]
        body = blob[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack_from(">I", blob, pos + 8 + n)
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert kind == b"IEND"
    w, h, depth, color, _, _, _ = ihdr
    assert depth == 8
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[color]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, channels), color


@pytest.mark.parametrize("shape,color", [((5, 7), 0), ((5, 7, 1), 0), ((5, 7, 2), 4),
                                         ((5, 7, 3), 2), ((5, 7, 4), 6)])
def test_png_roundtrip_uint8(shape, color):
    img = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    pixels, ct = _decode_png(jio.encode_png(img))
    assert ct == color
    np.testing.assert_array_equal(pixels, img.reshape(5, 7, -1))


def test_png_float_and_chw():
    img = np.random.default_rng(4).random((3, 6, 9))
    pixels, ct = _decode_png(jio.encode_png(img))
    assert ct == 2 and pixels.shape == (6, 9, 3)
    np.testing.assert_array_equal(pixels, np.round(np.moveaxis(img, 0, -1) * 255).astype(np.uint8))
    pixels, _ = _decode_png(jio.encode_png(np.array([[-1.0, 0.5, 2.0]])))
    assert pixels.ravel().tolist() == [0, 128, 255]
    with pytest.raises(ValueError):
        jio.encode_png(np.zeros((5, 5, 7)))
    with pytest.raises(ValueError):
        jio.encode_png(np.full((2, 2), 300))


# ------------------------------------------------------------------------------------------------
# Embeddings and plain loggers


def test_add_embedding_writes_projector_files(tmp_path):
    mat = np.arange(12.0).reshape(4, 3) / 7
    labels = ["cat", "dog", "tab\there", "bird"]
    with jio.SummaryWriter(tmp_path) as w:
        tsv = w.add_embedding(mat, metadata=labels, tag="words", step=5)
        w.add_embedding(np.ones((2, 2)), tag="other")
        with pytest.raises(ValueError):
            w.add_embedding(mat, metadata=["too", "few"], tag="bad")
    assert tsv == str(tmp_path / "words" / "tensors.tsv")
    back = np.loadtxt(tmp_path / "words" / "tensors.tsv", delimiter="\t")
    np.testing.assert_array_equal(back, mat)
    assert (tmp_path / "words" / "metadata.tsv").read_text().splitlines() == \
        ["cat", "dog", "tab here", "bird"]
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 2
    assert 'tensor_path: "words/tensors.tsv"' in config
    assert 'metadata_path: "words/metadata.tsv"' in config
    assert 'tensor_path: "other/tensors.tsv"' in config
    assert 'tensor_name: "words:5"' in config


def test_csv_logger(tmp_path):
    path = tmp_path / "logs" / "train.csv"
    with jio.CSVLogger(path) as log:
        log.log({"step": 1, "loss": np.float32(0.5), "acc": np.float64(0.25)})
        log.log({"step": 2, "loss": 0.25})  # missing column -> empty cell
        with pytest.raises(ValueError, match="extra"):
            log.log({"step": 3, "extra": 1})
        # Flushed after each write: readable before close.
        assert len(path.read_text().splitlines()) == 3
    with jio.CSVLogger(path) as log:  # append: no second header
        log.log(step=3, loss=0.125, acc=1)
    rows = list(csv.DictReader(open(path, newline="")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["loss"]) == 0.5 and rows[1]["acc"] == ""
    assert path.read_text().count("step") == 1


def test_jsonl_logger(tmp_path):
    path = tmp_path / "train.jsonl"
    with jio.JSONLLogger(path) as log:
        log.log({"step": np.int64(1), "loss": np.float32(0.5), "vec": np.arange(3)})
        assert len(path.read_text().splitlines()) == 1
        log.log({"step": 2, "note": "ünï"})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "vec": [0, 1, 2]}, {"step": 2, "note": "ünï"}]


def test_public_functions_have_docstrings():
    import inspect
    for name in jio.__all__:
        obj = getattr(jio, name)
        assert obj.__doc__ and obj.__doc__.strip(), name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if callable(member) and not attr.startswith("_"):
                    assert member.__doc__ and member.__doc__.strip(), f"{name}.{attr}"
