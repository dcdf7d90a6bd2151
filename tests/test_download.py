"""Checked downloads: a local HTTP server on 127.0.0.1 serves good, truncated,
HTML, wrong, failing and slow answers; nothing bad is ever kept or accepted,
transient failures are retried, and damaged cached files are replaced."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import re
import struct
import tarfile
import threading
import time
from collections import Counter

import numpy as np
import pytest

import jitnet.data as jd
from jitnet.data import datasets, download

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes, not HTML


def _spec(name="blob.bin", data=PAYLOAD, dataset="toy", **kw):
    return jd.RemoteFile(dataset, name, (), size=len(data), sha256=hashlib.sha256(data).hexdigest(), **kw)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.hits[self.path] += 1
            plan = srv.plans.get(self.path, ["good"])
            mode = plan.pop(0) if len(plan) > 1 else plan[0]
        body = srv.files.get(self.path)
        try:
            if body is None or mode == "404":
                self.send_error(404)
            elif mode == "500":
                self.send_error(500)
            elif mode == "html":
                page = b"<!DOCTYPE html>\n<html><body>Please log in</body></html>\n"
                self._answer(page, "text/html; charset=utf-8")
            elif mode == "html-as-gzip":  # an HTML body behind a binary content type
                self._answer(b"\n  <html><head><title>moved</title></head></html>", "application/gzip")
            elif mode == "wrong":
                self._answer(bytes(len(body)), "application/octet-stream")
            elif mode == "truncated":
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 3])
                self.wfile.flush()
                self.close_connection = True
            elif mode == "slow":
                time.sleep(srv.slow_s)
                self._answer(body, "application/octet-stream")
            else:
                self._answer(body, "application/octet-stream")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)

    def _answer(self, data, ctype):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def server(monkeypatch):
    """A local server: ``files[path] = bytes``, ``plans[path] = [mode, ...]`` (the last mode repeats)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.plans, srv.hits, srv.lock, srv.slow_s = {}, {}, Counter(), threading.Lock(), 1.0
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("JITNET_DATA", raising=False)
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(datasets, "_MNIST_SYSTEM_DIRS", {"mnist": (), "fashion-mnist": ()})
    return tmp_path


def _no_parts(directory):
    return not [n for n in os.listdir(directory) if n.endswith(".part")]


FAST = dict(progress=False, timeout=5.0, backoff=0.01)


# --------------------------------------------------------------------------- #
# One file from the server
# --------------------------------------------------------------------------- #


def test_good_answer_is_verified_and_recorded(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    spec = _spec()
    path = jd.fetch_remote(spec, str(tmp_path), mirrors=[server.base], **FAST)
    assert path == str(tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert _no_parts(tmp_path)
    assert download.verify_cached_file(str(tmp_path), path, spec) is None
    # a second fetch keeps the good copy without asking the server again
    jd.fetch_remote(spec, str(tmp_path), mirrors=[server.base], **FAST)
    assert server.hits["/toy/blob.bin"] == 1


def test_truncated_answer_is_retried(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    server.plans["/toy/blob.bin"] = ["truncated", "good"]
    jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], retries=3, **FAST)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.hits["/toy/blob.bin"] == 2
    assert _no_parts(tmp_path)


def test_always_truncated_gives_up_and_keeps_nothing(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    server.plans["/toy/blob.bin"] = ["truncated"]
    spec = _spec()
    with pytest.raises(jd.DownloadError) as info:
        jd.fetch_remote(spec, str(tmp_path), mirrors=[server.base], retries=2, **FAST)
    assert server.hits["/toy/blob.bin"] == 3  # 1 + 2 retries, then stop
    assert not (tmp_path / "blob.bin").exists() and _no_parts(tmp_path)
    msg = str(info.value)
    assert "truncated" in msg and "gave up after 3 attempts" in msg
    # the next step: where to put which file, with which checksum
    assert "Next step" in msg and str(tmp_path / "blob.bin") in msg and spec.sha256 in msg


@pytest.mark.parametrize("mode", ["html", "html-as-gzip"])
def test_html_answer_is_refused_not_retried(server, tmp_path, mode):
    server.files["/toy/blob.bin"] = PAYLOAD
    server.plans["/toy/blob.bin"] = [mode]
    spec = jd.RemoteFile("toy", "blob.bin", (), sha256=hashlib.sha256(PAYLOAD).hexdigest())  # no size known
    with pytest.raises(jd.DownloadError, match="HTML page instead of the file"):
        jd.fetch_remote(spec, str(tmp_path), mirrors=[server.base], retries=3, **FAST)
    assert server.hits["/toy/blob.bin"] == 1
    assert not (tmp_path / "blob.bin").exists() and _no_parts(tmp_path)


def test_html_from_first_mirror_then_good_second(server, tmp_path):
    server.files["/a/toy/blob.bin"] = PAYLOAD
    server.files["/b/toy/blob.bin"] = PAYLOAD
    server.plans["/a/toy/blob.bin"] = ["html"]
    jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base + "/a", server.base + "/b/"], **FAST)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.hits["/a/toy/blob.bin"] == 1 and server.hits["/b/toy/blob.bin"] == 1


def test_wrong_bytes_are_refused(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    server.plans["/toy/blob.bin"] = ["wrong"]
    with pytest.raises(jd.DownloadError, match="sha256 mismatch"):
        jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], **FAST)
    assert server.hits["/toy/blob.bin"] == 1
    assert not (tmp_path / "blob.bin").exists() and _no_parts(tmp_path)


def test_wrong_size_is_refused_before_reading(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD + b"x"
    with pytest.raises(jd.DownloadError, match=f"announces {len(PAYLOAD) + 1} bytes, expected {len(PAYLOAD)}"):
        jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], **FAST)
    assert not (tmp_path / "blob.bin").exists()


def test_server_errors_retried_not_found_not(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    server.plans["/toy/blob.bin"] = ["500", "500", "good"]
    jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], retries=3, **FAST)
    assert server.hits["/toy/blob.bin"] == 3
    with pytest.raises(jd.DownloadError, match="HTTP 404"):
        jd.fetch_remote(_spec("absent.bin"), str(tmp_path), mirrors=[server.base], retries=3, **FAST)
    assert server.hits["/toy/absent.bin"] == 1


def test_slow_answer_times_out_then_retried(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    server.plans["/toy/blob.bin"] = ["slow", "good"]
    t0 = time.perf_counter()
    jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], progress=False, timeout=0.3, backoff=0.01)
    assert time.perf_counter() - t0 < 5
    assert server.hits["/toy/blob.bin"] == 2
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_always_slow_fails_with_bounded_time(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    server.plans["/toy/blob.bin"] = ["slow"]
    t0 = time.perf_counter()
    with pytest.raises(jd.DownloadError, match="timed out"):
        jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], retries=1, progress=False,
                        timeout=0.2, backoff=0.01)
    assert time.perf_counter() - t0 < 5
    assert server.hits["/toy/blob.bin"] == 2
    assert not (tmp_path / "blob.bin").exists() and _no_parts(tmp_path)


def test_concurrent_fetches_agree(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    errors = []

    def run():
        try:
            jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], **FAST)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD and _no_parts(tmp_path)


def test_orphaned_part_files_are_removed(server, tmp_path):
    server.files["/toy/blob.bin"] = PAYLOAD
    orphan = tmp_path / "blob.bin.999999999.abcd.part"  # no such pid
    orphan.write_bytes(b"half a download")
    mine = tmp_path / f"blob.bin.{os.getpid()}.live.part"  # a live writer's file stays
    mine.write_bytes(b"in progress")
    jd.fetch_remote(_spec(), str(tmp_path), mirrors=[server.base], **FAST)
    assert not orphan.exists() and mine.exists()


def test_download_url_refuses_html_even_without_checksum(server, tmp_path):
    server.files["/page.gz"] = PAYLOAD
    server.plans["/page.gz"] = ["html"]
    with pytest.raises(jd.DownloadError, match="HTML"):
        jd.download_url(server.base + "/page.gz", str(tmp_path / "page.gz"), progress=False)
    assert not (tmp_path / "page.gz").exists()


# --------------------------------------------------------------------------- #
# Mirrors, the table of known files
# --------------------------------------------------------------------------- #


def test_mirror_env_replaces_sources(monkeypatch):
    spec = datasets.KNOWN_FILES["mnist/train-labels-idx1-ubyte.gz"]
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    assert download.source_urls(spec) == list(spec.urls)
    monkeypatch.setenv(download.MIRROR_ENV, "http://m1/base/  file:///srv/m2")
    assert download.source_urls(spec) == [
        "http://m1/base/mnist/train-labels-idx1-ubyte.gz",
        "file:///srv/m2/mnist/train-labels-idx1-ubyte.gz",
    ]


HTTP_ONLY_HOSTS = {"fashion-mnist.s3-website.eu-central-1.amazonaws.com", "yann.lecun.com",
                   "mattmahoney.net", "www.thespermwhale.com"}


def test_known_files_table_is_complete():
    expected = {
        f"{kind}/{split}-{part}.gz"
        for kind in ("mnist", "fashion-mnist")
        for split in ("train", "t10k")
        for part in ("images-idx3-ubyte", "labels-idx1-ubyte")
    } | {"cifar10/cifar-10-binary.tar.gz", "text8/text8.zip", "text8/text8", "babi/tasks_1-20_v1-2.tar.gz"}
    assert set(datasets.KNOWN_FILES) == expected
    lengths = {"sha256": 64, "md5": 32, "sha1": 40}
    for key, spec in datasets.KNOWN_FILES.items():
        assert spec.key == key and spec.size and spec.size > 0, key
        assert spec.source, key
        for algo, value in spec.digests().items():
            assert re.fullmatch(f"[0-9a-f]{{{lengths[algo]}}}", value), (key, algo)
        # every file is pinned by a digest, except the text8 archive, whose
        # unpacked corpus is pinned instead (its source publishes no digest)
        assert spec.digests() or key == "text8/text8.zip", key
        for i, url in enumerate(spec.urls):
            scheme, _, host = url.partition("://")
            host = host.split("/")[0]
            assert scheme == "https" or host in HTTP_ONLY_HOSTS, url
            if scheme == "http" and host not in ("mattmahoney.net",):
                assert i > 0, f"{url}: an http-only source should come after an https one"


# --------------------------------------------------------------------------- #
# Loaders: cache hits are verified, damaged files replaced
# --------------------------------------------------------------------------- #


def _idx(arr, magic):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes()


def _serve_fake_mnist(server, monkeypatch, n=4, seed=0):
    """Serve a small fake MNIST test split and pin its digests in the table; return (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    for name, raw in (("t10k-images-idx3-ubyte.gz", _idx(images, 2051)),
                      ("t10k-labels-idx1-ubyte.gz", _idx(labels, 2049))):
        data = gzip.compress(raw, mtime=0)
        server.files[f"/mnist/{name}"] = data
        monkeypatch.setitem(datasets.KNOWN_FILES, f"mnist/{name}", _spec(name, data, "mnist", source="test"))
    monkeypatch.setenv(download.MIRROR_ENV, server.base)
    return images, labels.astype(np.int64)


def test_cached_bad_file_is_replaced(server, clean_env, monkeypatch):
    """An HTML page left in the cache (as older versions could) is set aside and fetched afresh."""
    images, labels = _serve_fake_mnist(server, monkeypatch)
    cache = clean_env / "xdg-cache" / "jitnet" / "datasets" / "mnist"
    cache.mkdir(parents=True)
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(b"<html><body>captive portal</body></html>")
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(server.files["/mnist/t10k-labels-idx1-ubyte.gz"])
    with pytest.warns(RuntimeWarning, match="does not match the published checksum") as rec:
        x, y = jd.load_mnist("test", download=True)
    assert len(rec) == 1  # one warning, for the one bad file
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert (cache / "t10k-images-idx3-ubyte.gz.rejected").is_file()  # hand-placed bytes are not deleted
    assert server.hits["/mnist/t10k-images-idx3-ubyte.gz"] == 1
    assert server.hits["/mnist/t10k-labels-idx1-ubyte.gz"] == 0  # the good one was kept


def test_downloaded_file_damaged_later_is_refetched(server, clean_env, monkeypatch):
    images, _ = _serve_fake_mnist(server, monkeypatch)
    jd.load_mnist("test", download=True)
    cache = clean_env / "xdg-cache" / "jitnet" / "datasets" / "mnist"
    img = cache / "t10k-images-idx3-ubyte.gz"
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte garbled
    img.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="sha256"):
        x, _ = jd.load_mnist("test", download=True)
    np.testing.assert_array_equal(x, images)
    assert not (cache / "t10k-images-idx3-ubyte.gz.rejected").exists()  # ours: simply removed
    assert server.hits["/mnist/t10k-images-idx3-ubyte.gz"] == 2
    # without download=True the damaged file is refused, never read
    img.write_bytes(b"\x1f\x8b" + bytes(10))
    with pytest.warns(RuntimeWarning, match="download=True"), pytest.raises(FileNotFoundError, match="damaged"):
        jd.load_mnist("test", download=False)


def test_cache_hit_skips_rehash_until_file_changes(server, clean_env, monkeypatch):
    _serve_fake_mnist(server, monkeypatch)
    jd.load_mnist("test", download=True)
    calls = []
    real = download.file_digests
    monkeypatch.setattr(download, "file_digests", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    jd.load_mnist("test", download=False)
    assert calls == []  # size and mtime match the sidecar: no hashing
    img = clean_env / "xdg-cache" / "jitnet" / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    jd.load_mnist("test", download=False)
    assert calls == [str(img)]  # changed mtime: hashed once, found good, sidecar refreshed
    jd.load_mnist("test", download=False)
    assert calls == [str(img)]


def test_failed_loader_download_says_what_to_do(server, clean_env, monkeypatch):
    _serve_fake_mnist(server, monkeypatch)
    server.plans["/mnist/t10k-images-idx3-ubyte.gz"] = ["html"]
    spec = datasets.KNOWN_FILES["mnist/t10k-images-idx3-ubyte.gz"]
    with pytest.raises(FileNotFoundError) as info:
        jd.load_mnist("test", download=True)
    msg = str(info.value)
    cache = clean_env / "xdg-cache" / "jitnet" / "datasets" / "mnist"
    assert "HTML page" in msg and server.base + "/mnist/t10k-images-idx3-ubyte.gz" in msg
    assert str(cache / "t10k-images-idx3-ubyte.gz") in msg and spec.sha256 in msg
    assert not (cache / "t10k-images-idx3-ubyte.gz").exists()


def _cifar_tar(records):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = len(records)
        tf.addfile(info, io.BytesIO(records))
    return buf.getvalue()


def test_archive_unpacked_members_are_verified(server, clean_env, monkeypatch):
    rng = np.random.default_rng(1)
    rec = rng.integers(0, 256, size=(3, 3073), dtype=np.uint8)
    rec[:, 0] = [0, 4, 9]
    archive = _cifar_tar(rec.tobytes())
    server.files["/cifar10/cifar-10-binary.tar.gz"] = archive
    monkeypatch.setitem(datasets.KNOWN_FILES, "cifar10/cifar-10-binary.tar.gz",
                        _spec("cifar-10-binary.tar.gz", archive, "cifar10", source="test"))
    monkeypatch.setenv(download.MIRROR_ENV, server.base)
    x, y = jd.load_cifar10("test", download=True)
    assert y.tolist() == [0, 4, 9] and x.shape == (3, 3, 32, 32)
    cache = clean_env / "xdg-cache" / "jitnet" / "datasets" / "cifar10"
    assert sorted(os.listdir(cache)) == [".jitnet-verified.json", "cifar-10-batches-bin"]  # archive gone
    member = cache / "cifar-10-batches-bin" / "test_batch.bin"
    data = bytearray(member.read_bytes())
    data[0] = 7  # a label flipped in place: same size, still a valid record
    member.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="test_batch.bin"):
        x2, y2 = jd.load_cifar10("test", download=True)
    assert y2.tolist() == [0, 4, 9]
    assert server.hits["/cifar10/cifar-10-binary.tar.gz"] == 2


def test_damaged_archive_is_not_kept(server, clean_env, monkeypatch):
    """An archive whose digest is not pinned (text8.zip) but is not a zip is removed, not unpacked."""
    server.files["/text8/text8.zip"] = b"PK\x03\x04" + bytes(60)
    monkeypatch.setitem(datasets.KNOWN_FILES, "text8/text8.zip",
                        jd.RemoteFile("text8", "text8.zip", (), size=64, source="test"))
    monkeypatch.setenv(download.MIRROR_ENV, server.base)
    with pytest.raises(FileNotFoundError, match="damaged archive removed"):
        jd.load_text8(download=True)
    cache = clean_env / "xdg-cache" / "jitnet" / "datasets" / "text8"
    assert [n for n in os.listdir(cache) if not n.startswith(".jitnet")] == []


def _zip_text8(text):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text)
    return buf.getvalue()


@pytest.mark.parametrize("genuine", [True, False])
def test_text8_unpacked_corpus_checked_by_its_digest(server, clean_env, monkeypatch, genuine):
    corpus = b" anarchism originated as a term of abuse"
    archive = _zip_text8(corpus if genuine else corpus.replace(b"abuse", b"ABUSE"))
    server.files["/text8/text8.zip"] = archive
    monkeypatch.setitem(datasets.KNOWN_FILES, "text8/text8.zip",
                        jd.RemoteFile("text8", "text8.zip", (), size=len(archive), source="test"))
    monkeypatch.setitem(datasets.KNOWN_FILES, "text8/text8", jd.RemoteFile(
        "text8", "text8", (), size=len(corpus), sha1=hashlib.sha1(corpus).hexdigest(), source="test"))
    monkeypatch.setenv(download.MIRROR_ENV, server.base)
    cache = clean_env / "xdg-cache" / "jitnet" / "datasets" / "text8"
    if genuine:
        assert jd.load_text8(download=True) == corpus.decode().split()
        assert sorted(os.listdir(cache)) == [".jitnet-verified.json", "text8"]
    else:
        with pytest.raises(FileNotFoundError, match=r"unpacked text8 is wrong \(sha1"):
            jd.load_text8(download=True)
        assert [n for n in os.listdir(cache) if not n.startswith(".jitnet")] == []
