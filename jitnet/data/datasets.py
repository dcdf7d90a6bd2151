"""Dataset readers: MNIST / Fashion-MNIST (IDX), CIFAR-10 (binary), text8 and
plain-text corpora, and bAbI.  All of them return NumPy arrays or plain Python
objects; file lookup and downloading live in :mod:`jitnet.data.download`.

Dataset directory names (used under ``$JITNET_DATA/``, the user cache and
``/usr/share/datasets/``): ``mnist``, ``fashion-mnist``, ``cifar10`` (holding
``cifar-10-batches-bin/`` or the ``.bin`` files directly), ``text8`` and
``babi`` (holding ``tasks_1-20_v1-2/en/...`` or the ``qa*.txt`` files).
"""

from __future__ import annotations

import bz2
import gzip
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .download import (
    RemoteFile,
    fetch_remote,
    file_digests,
    find_dataset_files,
    record_verified,
    verify_cached_file,
)

__all__ = [
    "BabiQuery",
    "KNOWN_FILES",
    "generate_babi_single_fact",
    "load_babi",
    "load_cifar10",
    "load_default_images",
    "load_embedded_fashion_mnist",
    "load_fashion_mnist",
    "load_mnist",
    "load_text8",
    "load_text_corpus",
    "parse_babi",
    "read_idx",
    "text8_preprocess",
]

log = logging.getLogger("jitnet.data")

# --------------------------------------------------------------------------- #
# Sources and checksums
# --------------------------------------------------------------------------- #

# The published files, their sources and their published sizes and digests.
# Every value below was either published by the source (or a well-known
# loader library) or computed from a genuine copy, as each comment says;
# every digest that is given is checked after each download and, through the
# cache sidecar, on every cache hit.  Sources are https where the host offers
# it; the http ones are kept only as later fallbacks and are safe because the
# bytes are checked against the pinned digests.

_MNIST_FILES = {
    # sizes: the MNIST page; md5: torchvision's MNIST resources; sha256: the
    # TensorFlow Datasets checksum list (the same bytes on both mirrors).
    "train-images-idx3-ubyte.gz": (
        9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": (
        28881, "d53e105ee54ea40749a09fcbcd1e9432",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": (
        1648877, "9fb629c4189551a2d022fa330f9573f3",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (
        4542, "ec29112dd5afa0611ce80d1b7f02629c",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
_FASHION_FILES = {
    # md5: published in Fashion-MNIST's README; sha256 and size: computed from
    # the genuine files (their md5 matches the README) and equal to the
    # TensorFlow Datasets checksum list.
    "train-images-idx3-ubyte.gz": (
        26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    "train-labels-idx1-ubyte.gz": (
        29515, "25c81989df183df01b3e8a0aad5dffbe",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
    "t10k-images-idx3-ubyte.gz": (
        4422102, "bef4ecab320f06d8554ea6380940ec79",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    "t10k-labels-idx1-ubyte.gz": (
        5148, "bb300cfdad3c16e7a12a480ee83cd310",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
}
_MNIST_URLS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        # the source's own repository (https), then its http-only S3 website
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
}
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
# mattmahoney.net serves text8 over http only.
_TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
_BABI_URL = "https://dl.fbaipublicfiles.com/babi/tasks_1-20_v1-2.tar.gz"


def _known_table() -> dict[str, RemoteFile]:
    table: dict[str, RemoteFile] = {}
    for kind, files, source in (
        ("mnist", _MNIST_FILES, "md5: torchvision; sha256: TensorFlow Datasets"),
        ("fashion-mnist", _FASHION_FILES, "md5: Fashion-MNIST README; sha256: computed, = TensorFlow Datasets"),
    ):
        for fname, (size, md5, sha256) in files.items():
            spec = RemoteFile(kind, fname, tuple(base + fname for base in _MNIST_URLS[kind]),
                              size=size, md5=md5, sha256=sha256, source=source)
            table[spec.key] = spec
    for spec in (
        # md5: the CIFAR page; sha256: TensorFlow Datasets' checksum list.
        RemoteFile("cifar10", "cifar-10-binary.tar.gz", (_CIFAR10_URL,), size=170052171,
                   md5="c32a1d4ab5d03f1284b67883e8d87530",
                   sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                   source="md5: CIFAR page; sha256: TensorFlow Datasets"),
        # No digest of text8.zip is published by its source: the archive is
        # checked by its size (as given by TensorFlow's word2vec tutorial) and
        # the zip's own CRCs, and the unpacked corpus by its published size
        # (10**8 bytes) and SHA-1 (GluonNLP's Text8 dataset).
        RemoteFile("text8", "text8.zip", (_TEXT8_URL,), size=31344016,
                   source="size: TensorFlow word2vec tutorial; no published digest"),
        RemoteFile("text8", "text8", (), size=100_000_000,
                   sha1="0dc3edebc970dcc96137e7deda4d9995af9d93de",
                   source="sha1: GluonNLP Text8; unpacked from text8.zip"),
        # size and sha256: the Hugging Face babi_qa dataset's recorded
        # checksum of this release file.
        RemoteFile("babi", "tasks_1-20_v1-2.tar.gz",
                   (_BABI_URL, "http://www.thespermwhale.com/jaseweston/babi/tasks_1-20_v1-2.tar.gz"),
                   size=15719851, sha256="0364ebde659f14d11bc21744516c5ec49d3d06cb692733f66680771244998898",
                   source="sha256: Hugging Face datasets (babi_qa)"),
    ):
        table[spec.key] = spec
    return table


KNOWN_FILES: dict[str, RemoteFile] = _known_table()


def _known_in(dataset: str) -> dict[str, RemoteFile]:
    """Return the known files of ``dataset`` keyed by their path inside its directory."""
    return {spec.filename: spec for spec in KNOWN_FILES.values() if spec.dataset == dataset}

_MNIST_SYSTEM_DIRS = {
    "mnist": ("/usr/share/datasets/mnist",),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
}

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _fetch_all(keys: Sequence[str], cache: str) -> None:
    """Download each known file (``"<dataset>/<file>"`` of KNOWN_FILES) into ``cache``; good copies are kept."""
    for key in keys:
        fetch_remote(KNOWN_FILES[key], cache)


def _unpack_into(
    cache: str,
    archive: str,
    unpack: Callable[[str, str], None],
    known: Mapping[str, RemoteFile] | None = None,
) -> None:
    """Unpack ``archive`` (already verified) into ``cache`` and remove it.

    ``unpack(archive, directory)`` writes into a private directory inside the
    cache; each file it produced is checked against ``known`` (paths relative
    to the cache) or its sha256 recorded in the cache sidecar, and only then
    are the top-level entries moved into place, so an interrupted unpack never
    leaves partial files where the loaders look.  A damaged archive is removed
    (so the next call downloads it again) and reported as a ValueError.
    """
    tmp = tempfile.mkdtemp(prefix=".unpack.", dir=cache)
    try:
        try:
            unpack(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, KeyError) as exc:
            os.remove(archive)
            raise ValueError(f"{archive}: damaged archive removed ({type(exc).__name__}: {exc}); "
                             "it will be downloaded again") from None
        digests = {}
        for dirpath, _, files in os.walk(tmp):
            for fname in files:
                path = os.path.join(dirpath, fname)
                rel = os.path.relpath(path, tmp).replace(os.sep, "/")
                spec = (known or {}).get(rel)
                if spec is not None:
                    problem = verify_cached_file(tmp, path, spec)
                    if problem is not None:
                        os.remove(archive)
                        raise ValueError(f"{archive}: unpacked {rel} is wrong ({problem}); archive removed")
                    digests[rel] = spec.digests()
                else:
                    digests[rel] = file_digests(path, ("sha256",))
        for entry in os.listdir(tmp):
            target = os.path.join(cache, entry)
            try:
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.remove(target)
                os.replace(os.path.join(tmp, entry), target)
            except OSError:
                if not os.path.exists(target):
                    raise
                # another process placed the same verified entry meanwhile
        for rel, d in digests.items():
            path = os.path.join(cache, *rel.split("/"))
            if os.path.isfile(path):
                record_verified(cache, path, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(archive):
        os.remove(archive)


def _safe_extract_tar(archive: str, dest: str) -> None:
    with tarfile.open(archive) as tf:
        root = os.path.realpath(dest)
        for m in tf.getmembers():
            target = os.path.realpath(os.path.join(dest, m.name))
            if not (target == root or target.startswith(root + os.sep)):
                raise ValueError(f"{archive}: refusing to extract {m.name!r} outside {dest}")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing to extract special member {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:
            tf.extractall(dest)


# --------------------------------------------------------------------------- #
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------- #

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_compressed(path: str) -> bytes:
    """Return the (decompressed) bytes of ``path``; gzip/bz2 are detected by content."""
    with open(path, "rb") as f:
        head = f.read(3)
    try:
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        if head == b"BZh":
            with bz2.open(path, "rb") as f:
                return f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated compressed file ({exc})") from exc
    with open(path, "rb") as f:
        return f.read()


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Return the array stored in an IDX file (gzip or plain), checking magic and size."""
    path = os.fspath(path)
    data = _read_maybe_compressed(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX header: expected at least 4 bytes got {len(data)}")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number {magic} (0x{magic:08x})")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header: expected {header} bytes got {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing data"
        raise ValueError(
            f"{path}: IDX file {what}: expected {expected} bytes got {len(data)} (shape {shape})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _images_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W) or (N,C,H,W) -> float32 NCHW in [0, 1]."""
    x = images.astype(np.float32) / np.float32(255.0)
    if x.ndim == 3:
        x = x[:, None, :, :]
    return np.ascontiguousarray(x)


def _load_idx_pair(img_path: str, lbl_path: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise ValueError(f"{img_path}: expected 3 IDX dimensions (N, rows, cols), got {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{lbl_path}: expected 1 IDX dimension, got {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"image/label counts disagree: {img_path} has {images.shape[0]} images, "
            f"{lbl_path} has {labels.shape[0]} labels"
        )
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


def load_mnist(
    split: str = "train",
    path: str | os.PathLike | None = None,
    kind: str = "mnist",
    download: bool = True,
    as_float: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 (N, 28, 28) and int64 (N,) (float32 N1HW in [0,1] with as_float)."""
    _check_split(split)
    if kind not in _MNIST_URLS:
        raise ValueError(f"kind must be 'mnist' or 'fashion-mnist', got {kind!r}")
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    required = [[n + ".gz", n, n.replace("-idx", ".idx")] for n in names]
    keys = [f"{kind}/{n}.gz" for n in names]
    img_path, lbl_path = find_dataset_files(
        kind,
        required,
        path=path,
        system_dirs=_MNIST_SYSTEM_DIRS[kind],
        download=download,
        fetch=lambda cache: _fetch_all(keys, cache),
        how_to_get=", ".join(_MNIST_URLS[kind]),
        known=_known_in(kind),
    )
    images, labels = _load_idx_pair(img_path, lbl_path)
    if as_float:
        images = _images_to_float(images)
    return images, labels


def load_fashion_mnist(
    split: str = "train",
    path: str | os.PathLike | None = None,
    download: bool = True,
    as_float: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return Fashion-MNIST ``(images, labels)`` exactly as :func:`load_mnist` does."""
    return load_mnist(split, path=path, kind="fashion-mnist", download=download, as_float=as_float)


# --------------------------------------------------------------------------- #
# Embedded Fashion-MNIST subset and the default image dataset
# --------------------------------------------------------------------------- #

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")


def load_embedded_fashion_mnist(
    split: str = "train", as_float: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Return the bundled class-balanced Fashion-MNIST subset as ``(images uint8 (N,28,28), labels int64)``."""
    _check_split(split)
    fname = os.path.join(EMBEDDED_DIR, f"fashion-mnist-{split}.npz")
    try:
        with np.load(fname, allow_pickle=False) as z:
            images = z["images"]
            labels = z["labels"].astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"embedded Fashion-MNIST subset missing: {fname}; regenerate it with "
            "`python -m jitnet.data.make_embedded`"
        ) from None
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{fname}: {images.shape[0]} images but {labels.shape[0]} labels")
    if as_float:
        images = _images_to_float(images)
    return images, labels


def load_default_images(
    split: str = "train", path: str | os.PathLike | None = None, as_float: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """Return ``(images, labels, source)``: full Fashion-MNIST if found locally, else the embedded subset.

    Never downloads.  ``source`` is ``"fashion-mnist:<directory>"`` or
    ``"embedded"``; one line saying which was used is logged at INFO level.
    An explicit ``path`` that does not hold the data is an error.
    """
    _check_split(split)
    if path is not None:
        images, labels = load_fashion_mnist(split, path=path, download=False, as_float=as_float)
        source = f"fashion-mnist:{os.fspath(path)}"
    else:
        try:
            prefix = "train" if split == "train" else "t10k"
            n = f"{prefix}-images-idx3-ubyte"
            img_path = find_dataset_files(
                "fashion-mnist",
                [[n + ".gz", n, n.replace("-idx", ".idx")]],
                system_dirs=_MNIST_SYSTEM_DIRS["fashion-mnist"],
                known=_known_in("fashion-mnist"),
            )[0]
        except FileNotFoundError:
            images, labels = load_embedded_fashion_mnist(split, as_float=as_float)
            source = "embedded"
        else:
            directory = os.path.dirname(img_path)
            images, labels = load_fashion_mnist(split, path=directory, download=False, as_float=as_float)
            source = f"fashion-mnist:{directory}"
    log.info("load_default_images(%r): using %s (%d images)", split, source, len(labels))
    return images, labels, source


# --------------------------------------------------------------------------- #
# CIFAR-10 (binary version)
# --------------------------------------------------------------------------- #

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N,3,32,32), labels int64 (N,))`` from one CIFAR-10 binary batch file."""
    path = os.fspath(path)
    data = _read_maybe_compressed(path)
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        expected = max(1, -(-len(data) // _CIFAR_RECORD)) * _CIFAR_RECORD
        raise ValueError(
            f"{path}: not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records: "
            f"expected {expected} bytes got {len(data)}"
        )
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{path}: record {bad} has label byte {labels[bad]}, expected 0..9")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def load_cifar10(
    split: str = "train",
    path: str | os.PathLike | None = None,
    download: bool = True,
    as_float: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return CIFAR-10 ``(images uint8 (N,3,32,32) CHW, labels int64)`` from the binary release."""
    _check_split(split)
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    required = [[os.path.join("cifar-10-batches-bin", f), f] for f in files]

    def fetch(cache: str) -> None:
        archive = fetch_remote(KNOWN_FILES["cifar10/cifar-10-binary.tar.gz"], cache)
        _unpack_into(cache, archive, _safe_extract_tar)

    found = find_dataset_files(
        "cifar10",
        required,
        path=path,
        system_dirs=("/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"),
        download=download,
        fetch=fetch,
        how_to_get=_CIFAR10_URL + " (extract cifar-10-batches-bin/)",
    )
    parts = [read_cifar10_batch(p) for p in found]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if as_float:
        images = _images_to_float(images)
    return images, labels


# --------------------------------------------------------------------------- #
# Text: text8 and arbitrary corpora
# --------------------------------------------------------------------------- #

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_TABLE = {ord(str(d)): f" {w} " for d, w in enumerate(_DIGIT_WORDS)}

_RE_TEXT_ELEMENT = re.compile(r"<text\b[^>]*>(.*?)</text>", re.S | re.I)
_RE_REF = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref>", re.S | re.I)
_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_TAG = re.compile(r"<[^>]*>")
_RE_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_RE_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_RE_FILE_LINK = re.compile(r"\[\[(?:image|file|media):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_RE_CATEGORY = re.compile(r"\[\[category:([^\]|]*)(?:\|[^\]]*)?\]\]", re.I)
_RE_INTERWIKI = re.compile(r"\[\[[a-z\-]{2,12}:[^\]]*\]\]")
_RE_WIKILINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_RE_EXTLINK = re.compile(r"\[(?:https?|ftp)://\S*\s*([^\]]*)\]")
_RE_URL = re.compile(r"(?:https?|ftp)://\S+")
_RE_NONLETTER = re.compile(r"[^a-z]+")


def _unescape_entities(text: str) -> str:
    # XML dumps escape markup once; undo the common entities so the markup
    # itself can be stripped afterwards.
    for ent, ch in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&nbsp;", " "), ("&amp;", "&")):
        text = text.replace(ent, ch)
    return text


def text8_preprocess(text: str) -> str:
    """Return text8-style text (only a-z and single spaces) from raw text or Wikipedia XML markup."""
    bodies = _RE_TEXT_ELEMENT.findall(text)
    if bodies:
        text = " ".join(bodies)
    text = _unescape_entities(text)
    text = _RE_COMMENT.sub(" ", text)
    text = _RE_REF.sub(" ", text)
    text = _RE_TAG.sub(" ", text)
    # Nested templates: strip innermost first until none are left.
    while True:
        stripped = _RE_TEMPLATE.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _RE_TABLE.sub(" ", text)
    text = _RE_FILE_LINK.sub(" ", text)
    text = _RE_CATEGORY.sub(r" \1 ", text)
    text = _RE_INTERWIKI.sub(" ", text)
    text = _RE_WIKILINK.sub(r"\1", text)
    text = _RE_EXTLINK.sub(r" \1 ", text)
    text = _RE_URL.sub(" ", text)
    text = text.lower().translate(_DIGIT_TABLE)
    text = _RE_NONLETTER.sub(" ", text)
    return text.strip()


def _read_text(path: str) -> str:
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise ValueError(f"{path}: expected exactly one file in the zip archive, found {members}")
            raw = zf.read(members[0])
    else:
        raw = _read_maybe_compressed(path)
    return raw.decode("utf-8", errors="replace")


def load_text_corpus(path: str | os.PathLike, preprocess: bool = False) -> list[str]:
    """Return the lowercase whitespace-separated tokens of a text file (.gz/.bz2/.zip allowed).

    With ``preprocess=True`` the text first goes through :func:`text8_preprocess`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text corpus not found: {path}")
    text = _read_text(path)
    if preprocess:
        text = text8_preprocess(text)
    return text.lower().split()


def load_text8(path: str | os.PathLike | None = None, download: bool = True) -> list[str]:
    """Return the tokens of the text8 corpus (about 17M lowercase words) as a list of str."""

    def unzip(archive: str, dest: str) -> None:
        with zipfile.ZipFile(archive) as zf, zf.open("text8") as src, open(os.path.join(dest, "text8"), "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)  # the zip's CRC is checked at the end

    def fetch(cache: str) -> None:
        archive = fetch_remote(KNOWN_FILES["text8/text8.zip"], cache)
        _unpack_into(cache, archive, unzip, known={"text8": KNOWN_FILES["text8/text8"]})

    (found,) = find_dataset_files(
        "text8",
        [["text8", "text8.gz", "text8.bz2", "text8.zip"]],
        path=path,
        system_dirs=("/usr/share/datasets/text8",),
        download=download,
        fetch=fetch,
        how_to_get=_TEXT8_URL,
        known={"text8": KNOWN_FILES["text8/text8"]},
    )
    return load_text_corpus(found)


# --------------------------------------------------------------------------- #
# bAbI
# --------------------------------------------------------------------------- #


class BabiQuery(NamedTuple):
    """One bAbI question with the story sentences seen before it.

    ``supporting_ids`` are the line numbers used in the file (questions
    count as lines there, as in the original data).
    """

    context: list[str]
    question: str
    answer: str
    supporting_ids: list[int]


def parse_babi(text: str, source: str = "<string>") -> list[list[BabiQuery]]:
    """Return the stories of bAbI-format ``text``: each a list of :class:`BabiQuery`."""
    stories: list[list[BabiQuery]] = []
    story: list[BabiQuery] | None = None
    context: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        num, _, rest = line.partition(" ")
        if not num.isdigit():
            raise ValueError(f"{source}:{lineno}: expected a line number, got {raw!r}")
        if int(num) == 1:
            story = []
            stories.append(story)
            context = []
        if story is None:
            raise ValueError(f"{source}:{lineno}: story does not start at line number 1")
        if "\t" in rest:
            fields = rest.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{source}:{lineno}: question line without an answer: {raw!r}")
            question, answer = fields[0].strip(), fields[1].strip()
            support_field = fields[2].strip() if len(fields) > 2 else ""
            try:
                support = [int(s) for s in support_field.split()]
            except ValueError:
                raise ValueError(f"{source}:{lineno}: bad supporting ids {support_field!r}") from None
            story.append(BabiQuery(list(context), question, answer, support))
        else:
            context.append(rest.strip())
    return stories


def load_babi(
    path: str | os.PathLike | None = None,
    task: int = 1,
    split: str = "train",
    language: str = "en",
    download: bool = True,
) -> list[list[BabiQuery]]:
    """Return the stories of a bAbI file: a list of stories, each a list of (context, question, answer, supporting ids).

    ``path`` may be a bAbI ``.txt`` file itself or a directory holding the
    extracted ``tasks_1-20_v1-2`` release (searched like any other dataset).
    """
    _check_split(split)
    if path is not None and os.path.isfile(path):
        fname = os.fspath(path)
    else:
        if not 1 <= task <= 20:
            raise ValueError(f"task must be in 1..20, got {task}")
        base = f"qa{task}_{_BABI_TASK_NAMES[task - 1]}_{split}.txt"
        candidates = [
            os.path.join("tasks_1-20_v1-2", language, base),
            os.path.join(language, base),
            base,
        ]

        def fetch(cache: str) -> None:
            archive = fetch_remote(KNOWN_FILES["babi/tasks_1-20_v1-2.tar.gz"], cache)
            _unpack_into(cache, archive, _safe_extract_tar)

        (fname,) = find_dataset_files(
            "babi",
            [candidates],
            path=path,
            system_dirs=("/usr/share/datasets/babi",),
            download=download,
            fetch=fetch,
            how_to_get=_BABI_URL,
        )
    text = _read_maybe_compressed(fname).decode("utf-8")
    return parse_babi(text, source=fname)


_BABI_TASK_NAMES = (
    "single-supporting-fact", "two-supporting-facts", "three-supporting-facts",
    "two-arg-relations", "three-arg-relations", "yes-no-questions", "counting",
    "lists-sets", "simple-negation", "indefinite-knowledge", "basic-coreference",
    "conjunction", "compound-coreference", "time-reasoning", "basic-deduction",
    "basic-induction", "positional-reasoning", "size-reasoning", "path-finding",
    "agents-motivations",
)

_BABI_PEOPLE = ("Mary", "John", "Sandra", "Daniel")
_BABI_PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
_BABI_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")


def generate_babi_single_fact(
    n_stories: int, seed: int = 0, questions_per_story: int = 5
) -> str:
    """Return bAbI task-1 (single supporting fact) text with ``n_stories`` stories, deterministic in ``seed``."""
    if n_stories < 0 or questions_per_story < 1:
        raise ValueError("n_stories must be >= 0 and questions_per_story >= 1")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(n_stories):
        where: dict[str, tuple[str, int]] = {}
        line = 0
        for _ in range(questions_per_story):
            for _ in range(2):
                person = _BABI_PEOPLE[rng.integers(len(_BABI_PEOPLE))]
                place = _BABI_PLACES[rng.integers(len(_BABI_PLACES))]
                verb = _BABI_VERBS[rng.integers(len(_BABI_VERBS))]
                line += 1
                out.append(f"{line} {person} {verb} the {place}.")
                where[person] = (place, line)
            known = sorted(where)
            person = known[rng.integers(len(known))]
            place, support = where[person]
            line += 1
            out.append(f"{line} Where is {person}? \t{place}\t{support}")
    return "\n".join(out) + ("\n" if out else "")
