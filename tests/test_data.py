"""Tests for jitnet.data: dataset readers, file resolution, downloads, the
embedded subset, DataLoader and the augmentation kernels."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import os
import struct
import threading
import time

import numpy as np
import pytest

import jitnet.data as jd
from jitnet.data import augment, datasets, download, loader

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    assert arr.dtype == np.uint8
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape)
    return head + arr.tobytes()


def write_mnist(directory, split="train", n=7, rows=28, cols=28, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    os.makedirs(directory, exist_ok=True)
    for name, data in (
        (f"{prefix}-images-idx3-ubyte", idx_bytes(images, 2051)),
        (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 2049)),
    ):
        p = os.path.join(directory, name + (".gz" if gz else ""))
        with (gzip.open(p, "wb") if gz else open(p, "wb")) as f:
            f.write(data)
    return images, labels.astype(np.int64)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No JITNET_DATA, and a private empty cache dir."""
    monkeypatch.delenv("JITNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path


# --------------------------------------------------------------------------- #
# IDX / MNIST
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_roundtrip(tmp_path, gz, split):
    images, labels = write_mnist(tmp_path, split, n=5, gz=gz)
    x, y = jd.load_mnist(split, path=tmp_path, download=False)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    xf, yf = jd.load_fashion_mnist(split, path=tmp_path, download=False, as_float=True)
    assert xf.dtype == np.float32 and xf.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(xf[:, 0], images / 255.0, rtol=1e-6)


def test_read_idx_non_square(tmp_path):
    images, _ = write_mnist(tmp_path, n=3, rows=4, cols=6, gz=False)
    arr = jd.read_idx(tmp_path / "train-images-idx3-ubyte", 2051)
    np.testing.assert_array_equal(arr, images)


def test_idx_bad_magic(tmp_path):
    write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(p.read_bytes())
    data[0:4] = struct.pack(">I", 2049)  # a labels magic in the images file
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*magic"):
        jd.load_mnist("train", path=tmp_path, download=False)
    data[0:4] = b"\x12\x34\x56\x78"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*magic"):
        jd.load_mnist("train", path=tmp_path, download=False)


def test_idx_truncated_plain(tmp_path):
    write_mnist(tmp_path, n=4, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    expected = 16 + 4 * 28 * 28
    with pytest.raises(ValueError, match=rf"train-images-idx3-ubyte.*expected {expected} bytes got {expected - 10}"):
        jd.load_mnist("train", path=tmp_path, download=False)


def test_idx_truncated_gzip(tmp_path):
    write_mnist(tmp_path, n=4, gz=True)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz"):
        jd.load_mnist("train", path=tmp_path, download=False)


def test_idx_count_mismatch(tmp_path):
    write_mnist(tmp_path, n=4, gz=False)
    labels = np.zeros(3, np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    with pytest.raises(ValueError, match="4 images.*3 labels"):
        jd.load_mnist("train", path=tmp_path, download=False)


def test_bad_split_and_kind(tmp_path):
    with pytest.raises(ValueError, match="split"):
        jd.load_mnist("valid", path=tmp_path, download=False)
    with pytest.raises(ValueError, match="kind"):
        jd.load_mnist("train", path=tmp_path, kind="kmnist", download=False)


# --------------------------------------------------------------------------- #
# Resolution order and not-found errors
# --------------------------------------------------------------------------- #


def test_not_found_lists_places(clean_env, monkeypatch):
    monkeypatch.setenv("JITNET_DATA", str(clean_env / "jd"))
    monkeypatch.setattr(datasets, "_MNIST_SYSTEM_DIRS", {"mnist": (str(clean_env / "sys-mnist"),),
                                                         "fashion-mnist": ()})
    with pytest.raises(FileNotFoundError) as info:
        jd.load_mnist("train", download=False)
    msg = str(info.value)
    assert str(clean_env / "jd" / "mnist") in msg
    assert str(clean_env / "xdg-cache" / "jitnet" / "datasets" / "mnist") in msg
    assert str(clean_env / "sys-mnist") in msg
    assert "download=False" in msg and "download=True" in msg
    assert "train-images-idx3-ubyte" in msg


def test_not_found_unset_env_and_explicit_path(clean_env):
    with pytest.raises(FileNotFoundError, match="JITNET_DATA is not set"):
        jd.load_cifar10("test", download=False)
    with pytest.raises(FileNotFoundError, match="explicit path"):
        jd.load_cifar10("test", path=clean_env / "nowhere", download=False)


def test_resolution_order(clean_env, monkeypatch):
    env_root = clean_env / "envroot"
    cache_dir = clean_env / "xdg-cache" / "jitnet" / "datasets" / "mnist"
    sys_dir = clean_env / "sys"
    explicit = clean_env / "explicit"
    e_img, _ = write_mnist(env_root / "mnist", seed=1)
    c_img, _ = write_mnist(cache_dir, seed=2)
    s_img, _ = write_mnist(sys_dir, seed=3)
    x_img, _ = write_mnist(explicit, seed=4)
    monkeypatch.setattr(datasets, "_MNIST_SYSTEM_DIRS", {"mnist": (str(sys_dir),), "fashion-mnist": ()})
    # the synthetic files are not the published ones: without a table entry the
    # cache accepts them (checksum checks of cache hits are in test_download.py)
    monkeypatch.setattr(datasets, "KNOWN_FILES", {})

    # system dir only (no env var; cache hidden by pointing XDG elsewhere)
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "empty-cache"))
    np.testing.assert_array_equal(jd.load_mnist(download=False)[0], s_img)
    # cache beats system dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg-cache"))
    np.testing.assert_array_equal(jd.load_mnist(download=False)[0], c_img)
    # $JITNET_DATA beats cache
    monkeypatch.setenv("JITNET_DATA", str(env_root))
    np.testing.assert_array_equal(jd.load_mnist(download=False)[0], e_img)
    # explicit path beats everything
    np.testing.assert_array_equal(jd.load_mnist(path=explicit, download=False)[0], x_img)
    # JITNET_DATA may list several roots
    monkeypatch.setenv("JITNET_DATA", os.pathsep.join([str(clean_env / "none"), str(env_root)]))
    np.testing.assert_array_equal(jd.load_mnist(download=False)[0], e_img)


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jd.dataset_cache_dir("mnist") == os.path.join(str(tmp_path), ".cache", "jitnet", "datasets", "mnist")


# --------------------------------------------------------------------------- #
# Downloads (file:// only; there is no network in tests)
# --------------------------------------------------------------------------- #


def test_download_file_url_sha256(tmp_path, capsys):
    src = tmp_path / "src.bin"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "out" / "dest.bin"
    got = jd.download_url(src.as_uri(), str(dest), sha256=digest)
    assert got == str(dest) and dest.read_bytes() == payload
    assert not os.path.exists(str(dest) + ".part")
    assert jd.sha256_file(str(dest)) == digest
    err = capsys.readouterr().err
    assert "100%" in err or err == ""  # plain progress line (or tqdm's own output)


def test_download_wrong_checksum(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello world")
    dest = tmp_path / "dest.bin"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        jd.download_url(src.as_uri(), str(dest), sha256="0" * 64, progress=False)
    assert not dest.exists() and not os.path.exists(str(dest) + ".part")


def test_download_missing_source(tmp_path):
    with pytest.raises(OSError):
        jd.download_url((tmp_path / "absent").as_uri(), str(tmp_path / "d"), progress=False)
    assert not os.path.exists(str(tmp_path / "d.part"))


def test_loader_downloads_into_cache(clean_env, monkeypatch):
    """The download fallback fetches from $JITNET_DATA_MIRROR into the cache, checking the table's digests."""
    mirror = clean_env / "mirror"
    images, labels = write_mnist(mirror / "mnist", split="test", n=3)
    for f in (mirror / "mnist").iterdir():
        data = f.read_bytes()
        monkeypatch.setitem(datasets.KNOWN_FILES, f"mnist/{f.name}", jd.RemoteFile(
            "mnist", f.name, (), size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    monkeypatch.setenv("JITNET_DATA_MIRROR", "file:///nonexistent/ " + mirror.as_uri())
    monkeypatch.setattr(datasets, "_MNIST_SYSTEM_DIRS", {"mnist": (), "fashion-mnist": ()})
    with pytest.raises(FileNotFoundError):
        jd.load_mnist("test", download=False)
    x, y = jd.load_mnist("test", download=True)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    cache = clean_env / "xdg-cache" / "jitnet" / "datasets" / "mnist"
    assert (cache / "t10k-images-idx3-ubyte.gz").is_file()
    assert not list(cache.glob("*.part"))


def test_failed_download_reported(clean_env, monkeypatch):
    monkeypatch.setenv("JITNET_DATA_MIRROR", "file:///nonexistent/")
    monkeypatch.setattr(datasets, "_MNIST_SYSTEM_DIRS", {"mnist": (), "fashion-mnist": ()})
    with pytest.raises(FileNotFoundError, match="download into .* failed"):
        jd.load_mnist("train", download=True)


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #


def write_cifar(directory, names, n=4, seed=0):
    rng = np.random.default_rng(seed)
    out_i, out_l = [], []
    for name in names:
        imgs = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n).astype(np.uint8)
        rec = np.concatenate([labs[:, None], imgs.reshape(n, -1)], axis=1)
        os.makedirs(directory, exist_ok=True)
        (directory / name).write_bytes(rec.tobytes())
        out_i.append(imgs)
        out_l.append(labs)
    return np.concatenate(out_i), np.concatenate(out_l).astype(np.int64)


def test_cifar10_roundtrip(tmp_path):
    sub = tmp_path / "cifar-10-batches-bin"
    train_i, train_l = write_cifar(sub, [f"data_batch_{i}.bin" for i in range(1, 6)], n=3)
    test_i, test_l = write_cifar(sub, ["test_batch.bin"], n=2, seed=9)
    x, y = jd.load_cifar10("train", path=tmp_path, download=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, train_i)
    np.testing.assert_array_equal(y, train_l)
    # the batch directory itself also works
    x, y = jd.load_cifar10("test", path=sub, download=False, as_float=True)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, test_i / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, test_l)


def test_cifar10_truncated_and_bad_label(tmp_path):
    write_cifar(tmp_path, ["test_batch.bin"], n=2)
    p = tmp_path / "test_batch.bin"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"test_batch\.bin.*expected 6146 bytes got {6146 - 100}"):
        jd.load_cifar10("test", path=tmp_path, download=False)
    bad = bytearray(data)
    bad[3073] = 42
    p.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"test_batch\.bin.*label"):
        jd.load_cifar10("test", path=tmp_path, download=False)


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2"])
def test_text_corpus(tmp_path, suffix):
    text = "The quick  brown\nFox jumps\tover the LAZY dog\n"
    p = tmp_path / f"corpus.txt{suffix}"
    opener = {"": open, ".gz": gzip.open, ".bz2": bz2.open}[suffix]
    with opener(p, "wb") as f:
        f.write(text.encode())
    assert jd.load_text_corpus(p) == "the quick brown fox jumps over the lazy dog".split()


def test_text8_loader(tmp_path, clean_env):
    (tmp_path / "text8").write_text(" anarchism originated as a term of abuse")
    assert jd.load_text8(tmp_path, download=False)[:3] == ["anarchism", "originated", "as"]
    assert jd.load_text8(tmp_path / "text8", download=False)[-1] == "abuse"
    with pytest.raises(FileNotFoundError, match="text8"):
        jd.load_text8(download=False)


def test_text8_preprocess():
    assert jd.text8_preprocess("Hello, World! In 1984...") == "hello world in one nine eight four"
    xml = (
        "<mediawiki><page><title>T</title><text xml:space=\"preserve\">"
        "'''Anarchism''' is a [[political philosophy|philosophy]] {{cite|x=1}}"
        "&lt;ref&gt;Some ref&lt;/ref&gt; of [[Category:Stuff]] 2 "
        "[http://example.com the site] &amp; [[Image:a.png|thumb|caption]] done"
        "</text></page></mediawiki>"
    )
    out = jd.text8_preprocess(xml)
    assert out == "anarchism is a philosophy of stuff two the site done"
    assert set(out) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert "  " not in out


# --------------------------------------------------------------------------- #
# bAbI
# --------------------------------------------------------------------------- #

BABI_SAMPLE = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Where is Sandra? \toffice\t1
"""


def test_babi_parse_file(tmp_path):
    p = tmp_path / "qa1_single-supporting-fact_train.txt"
    p.write_text(BABI_SAMPLE)
    stories = jd.load_babi(p)
    assert len(stories) == 2 and len(stories[0]) == 2 and len(stories[1]) == 1
    ctx, q, a, sup = stories[0][1]
    assert ctx == ["Mary moved to the bathroom.", "John went to the hallway.",
                   "Daniel went back to the hallway.", "Sandra moved to the garden."]
    assert (q, a, sup) == ("Where is Daniel?", "hallway", [4])
    assert stories[1][0] == (["Sandra travelled to the office."], "Where is Sandra?", "office", [1])
    # resolution through a directory laid out like the release
    d = tmp_path / "rel" / "tasks_1-20_v1-2" / "en"
    d.mkdir(parents=True)
    (d / "qa1_single-supporting-fact_test.txt").write_text(BABI_SAMPLE)
    assert jd.load_babi(tmp_path / "rel", task=1, split="test") == stories


def test_babi_bad_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("x Mary moved.\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        jd.load_babi(p)


def test_babi_generator_consistent(tmp_path):
    text = jd.generate_babi_single_fact(20, seed=3)
    assert text == jd.generate_babi_single_fact(20, seed=3)
    assert text != jd.generate_babi_single_fact(20, seed=4)
    p = tmp_path / "gen.txt"
    p.write_text(text)
    stories = jd.load_babi(p)
    assert len(stories) == 20
    lines = {}
    for raw in text.splitlines():
        num, _, rest = raw.partition(" ")
        if int(num) == 1:
            lines = {}
        lines[int(num)] = rest
    n_checked = 0
    for story in stories:
        for ctx, q, a, sup in story:
            person = q.split()[-1].rstrip("?")
            assert len(sup) == 1
            # the answer is where the person was last seen in the context
            last = [s for s in ctx if s.startswith(person + " ")][-1]
            assert last.endswith(f"the {a}.")
            n_checked += 1
    assert n_checked == 100


# --------------------------------------------------------------------------- #
# Embedded subset and real Fashion-MNIST
# --------------------------------------------------------------------------- #


def test_embedded_fashion_mnist():
    total = 0
    for split in ("train", "test"):
        x, y = jd.load_embedded_fashion_mnist(split)
        assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28)
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
        assert y.min() >= 0 and y.max() <= 9
        counts = np.bincount(y, minlength=10)
        assert (counts == counts[0]).all() and counts[0] > 0
        total += os.path.getsize(os.path.join(datasets.EMBEDDED_DIR, f"fashion-mnist-{split}.npz"))
    assert total < 2_000_000
    assert os.path.isfile(os.path.join(datasets.EMBEDDED_DIR, "LICENSE-fashion-mnist.txt"))
    xf, _ = jd.load_embedded_fashion_mnist("test", as_float=True)
    assert xf.dtype == np.float32 and xf.shape[1] == 1 and 0.0 <= xf.min() and xf.max() <= 1.0


def test_default_images_falls_back_to_embedded(clean_env, monkeypatch):
    monkeypatch.setattr(datasets, "_MNIST_SYSTEM_DIRS", {"mnist": (), "fashion-mnist": ()})
    x, y, source = jd.load_default_images("test")
    assert source == "embedded"
    ex, ey = jd.load_embedded_fashion_mnist("test")
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)


def test_default_images_prefers_full(clean_env, monkeypatch):
    full = clean_env / "full"
    images, labels = write_mnist(full, split="test", n=4)
    monkeypatch.setattr(datasets, "_MNIST_SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (str(full),)})
    x, y, source = jd.load_default_images("test")
    assert source == f"fashion-mnist:{full}"
    np.testing.assert_array_equal(x, images)
    x, y, source = jd.load_default_images("test", path=full)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="system Fashion-MNIST not installed")
def test_real_fashion_mnist(clean_env):
    x, y = jd.load_fashion_mnist("test", download=False)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 1000))
    xt, yt = jd.load_fashion_mnist("train", path=FASHION_DIR, download=False)
    assert xt.shape == (60000, 28, 28) and np.bincount(yt).tolist() == [6000] * 10
    # the embedded subset is drawn from it
    with np.load(os.path.join(datasets.EMBEDDED_DIR, "fashion-mnist-test.npz")) as z:
        idx = z["indices"]
    ex, ey = jd.load_embedded_fashion_mnist("test")
    np.testing.assert_array_equal(ex, x[idx])
    np.testing.assert_array_equal(ey, y[idx])


# --------------------------------------------------------------------------- #
# DataLoader
# --------------------------------------------------------------------------- #


def make_arrays(n=23):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int64)
    return x, y


def test_array_dataset_checks():
    with pytest.raises(ValueError, match=r"\[5, 4\]"):
        jd.ArrayDataset(np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError):
        jd.ArrayDataset()
    ds = jd.ArrayDataset(*make_arrays(6))
    assert len(ds) == 6
    xb, yb = ds[np.array([4, 1])]
    assert yb.tolist() == [4, 1]
    with pytest.raises(ValueError, match="lengths"):
        jd.DataLoader((np.zeros(3), np.zeros(2)))


def test_loader_sequential_and_len():
    x, y = make_arrays(23)
    dl = jd.DataLoader((x, y), batch_size=5)
    assert len(dl) == 5
    batches = list(dl)
    assert len(batches) == 5 and all(isinstance(b, tuple) and len(b) == 2 for b in batches)
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    dl = jd.DataLoader((x, y), batch_size=5, drop_last=True)
    assert len(dl) == 4
    assert [len(b[1]) for b in dl] == [5, 5, 5, 5]
    assert len(jd.DataLoader((x, y), batch_size=30, drop_last=True)) == 0
    assert len(jd.DataLoader((x, y), batch_size=23)) == 1
    with pytest.raises(ValueError):
        jd.DataLoader((x, y), batch_size=0)


def test_loader_shuffle_determinism():
    x, y = make_arrays(50)

    def epochs(dl, k):
        return [np.concatenate([b[1] for b in dl]) for _ in range(k)]

    a = epochs(jd.DataLoader((x, y), batch_size=8, shuffle=True, seed=7), 3)
    b = epochs(jd.DataLoader((x, y), batch_size=8, shuffle=True, seed=7), 3)
    c = epochs(jd.DataLoader((x, y), batch_size=8, shuffle=True, seed=8), 1)
    for ea, eb in zip(a, b):
        np.testing.assert_array_equal(ea, eb)
        assert sorted(ea.tolist()) == list(range(50))
    assert not np.array_equal(a[0], a[1])  # reshuffled per epoch
    assert not np.array_equal(a[0], c[0])
    # x rows stay paired with their labels
    for xb, yb in jd.DataLoader((x, y), batch_size=8, shuffle=True, seed=7):
        np.testing.assert_array_equal(xb, x[yb])
    # set_epoch reproduces a given epoch
    dl = jd.DataLoader((x, y), batch_size=8, shuffle=True, seed=7)
    dl.set_epoch(2)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in dl]), a[2])
    # drop_last with shuffle drops the tail of the permutation
    dl = jd.DataLoader((x, y), batch_size=8, shuffle=True, seed=7, drop_last=True)
    got = np.concatenate([b[1] for b in dl])
    np.testing.assert_array_equal(got, a[0][:48])


def test_loader_custom_dataset():
    class Squares:
        def __len__(self):
            return 10

        def __getitem__(self, idx):
            return idx**2

    out = list(jd.DataLoader(Squares(), batch_size=4))
    assert [o.tolist() for o in out] == [[0, 1, 4, 9], [16, 25, 36, 49], [64, 81]]
    with pytest.raises(TypeError):
        jd.DataLoader(42)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_loader_prefetch_matches(prefetch):
    x, y = make_arrays(37)
    plain = jd.DataLoader((x, y), batch_size=6, shuffle=True, seed=11)
    pre = jd.DataLoader((x, y), batch_size=6, shuffle=True, seed=11, prefetch=prefetch)
    for _ in range(2):
        a, b = list(plain), list(pre)
        assert len(a) == len(b) == len(pre)
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "jitnet-data-prefetch"]


def test_loader_prefetch_early_stop():
    x, y = make_arrays(1000)
    before = len(_prefetch_threads())
    it = iter(jd.DataLoader((x, y), batch_size=2, prefetch=2))
    first = next(it)
    assert first[1].tolist() == [0, 1]
    it.close()
    deadline = time.time() + 5
    while len(_prefetch_threads()) > before and time.time() < deadline:
        time.sleep(0.01)
    assert len(_prefetch_threads()) == before
    # breaking out of a for loop and dropping the iterator also shuts down
    for i, _ in enumerate(jd.DataLoader((x, y), batch_size=2, prefetch=1)):
        if i == 3:
            break
    deadline = time.time() + 5
    while len(_prefetch_threads()) > before and time.time() < deadline:
        time.sleep(0.01)
    assert len(_prefetch_threads()) == before


def test_loader_prefetch_propagates_errors():
    class Bad:
        def __len__(self):
            return 10

        def __getitem__(self, idx):
            if idx[0] >= 4:
                raise RuntimeError("boom")
            return idx

    it = iter(jd.DataLoader(Bad(), batch_size=2, prefetch=2))
    assert next(it).tolist() == [0, 1]
    assert next(it).tolist() == [2, 3]
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_to_output_makes_tensors_sharing_memory():
    import jitnet as jn
    a = np.arange(3)
    t = loader._to_output(a)
    assert isinstance(t, jn.Tensor) and t.numpy() is a


# --------------------------------------------------------------------------- #
# Augmentation vs NumPy references
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).normal(size=(6, 3, 9, 7)).astype(np.float32)


def test_random_crop(batch):
    out = jd.random_crop(batch, (5, 4), np.random.default_rng(1))
    rng = np.random.default_rng(1)
    oy = rng.integers(0, 9 - 5 + 1, size=6)
    ox = rng.integers(0, 7 - 4 + 1, size=6)
    ref = np.stack([batch[i, :, oy[i] : oy[i] + 5, ox[i] : ox[i] + 4] for i in range(6)])
    assert out.dtype == np.float32 and out.shape == (6, 3, 5, 4)
    np.testing.assert_array_equal(out, ref)
    # same generator state, same result; square int size
    np.testing.assert_array_equal(jd.random_crop(batch, 5, 3), jd.random_crop(batch, 5, 3))
    assert jd.random_crop(batch, 5, 3).shape == (6, 3, 5, 5)


def test_random_crop_padding(batch):
    out = jd.random_crop(batch, (9, 7), np.random.default_rng(2), padding=2)
    rng = np.random.default_rng(2)
    oy = rng.integers(0, 9 + 4 - 9 + 1, size=6)
    ox = rng.integers(0, 7 + 4 - 7 + 1, size=6)
    padded = np.pad(batch, ((0, 0), (0, 0), (2, 2), (2, 2)))
    ref = np.stack([padded[i, :, oy[i] : oy[i] + 9, ox[i] : ox[i] + 7] for i in range(6)])
    np.testing.assert_array_equal(out, ref)


def test_center_crop(batch):
    out = jd.center_crop(batch, (5, 4))
    np.testing.assert_array_equal(out, batch[:, :, 2:7, 1:5])
    np.testing.assert_array_equal(jd.center_crop(batch, (9, 7)), batch)


def test_random_flip(batch):
    out = jd.random_flip_left_right(batch, np.random.default_rng(5))
    flags = np.random.default_rng(5).random(6) < 0.5
    ref = np.where(flags[:, None, None, None], batch[..., ::-1], batch)
    np.testing.assert_array_equal(out, ref)
    assert 0 < flags.sum() < 6  # both branches exercised
    np.testing.assert_array_equal(jd.random_flip_left_right(batch, 0, p=1.0), batch[..., ::-1])
    np.testing.assert_array_equal(jd.random_flip_left_right(batch, 0, p=0.0), batch)


def test_random_brightness(batch):
    out = jd.random_brightness(batch, 0.3, np.random.default_rng(6))
    d = np.random.default_rng(6).uniform(-0.3, 0.3, size=6).astype(np.float32)
    np.testing.assert_allclose(out, batch + d[:, None, None, None], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_delta"):
        jd.random_brightness(batch, -1.0, 0)


def test_random_contrast(batch):
    out = jd.random_contrast(batch, 0.2, 1.8, np.random.default_rng(7))
    f = np.random.default_rng(7).uniform(0.2, 1.8, size=6).astype(np.float32)
    mean = batch.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    ref = (batch - mean) * f[:, None, None, None] + mean
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lower"):
        jd.random_contrast(batch, 1.5, 0.5, 0)


def test_per_image_standardization(batch):
    x = batch.copy()
    x[2] = 0.5  # constant image: std clamps to 1/sqrt(N)
    out = jd.per_image_standardization(x)
    flat = x.reshape(6, -1).astype(np.float64)
    mean = flat.mean(axis=1, keepdims=True)
    std = np.maximum(flat.std(axis=1, keepdims=True), 1.0 / np.sqrt(flat.shape[1]))
    ref = ((flat - mean) / std).reshape(x.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(x, np.where(np.arange(6)[:, None, None, None] == 2, 0.5, batch))


def test_augment_input_validation(batch):
    with pytest.raises(ValueError, match="4-d"):
        jd.random_crop(batch[0], 3, 0)
    with pytest.raises(ValueError, match="larger than the image"):
        jd.random_crop(batch, (10, 3), 0)
    with pytest.raises(ValueError, match="larger than the image"):
        jd.center_crop(batch, 8)
    with pytest.raises(ValueError, match="4-d"):
        jd.per_image_standardization(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="p must"):
        jd.random_flip_left_right(batch, 0, p=2.0)
    # non-float32 input is converted, input untouched
    xi = (np.arange(2 * 1 * 4 * 4) % 7).reshape(2, 1, 4, 4)
    out = jd.center_crop(xi, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, xi[:, :, 1:3, 1:3])


def test_public_docstrings():
    for name in jd.__all__:
        obj = getattr(jd, name)
        if callable(obj) and not isinstance(obj, type(np.float32)):
            assert obj.__doc__ and obj.__doc__.strip(), name
    assert augment.__doc__ and download.__doc__
