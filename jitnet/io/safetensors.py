"""Reading and writing the safetensors format.

Layout of a file::

    [8 bytes]  N, little-endian uint64: length of the JSON header
    [N bytes]  UTF-8 JSON object, padded with spaces to a multiple of 8 bytes:
               {"__metadata__": {str: str},            (optional)
                "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
    [rest]     raw little-endian, C-order tensor bytes; offsets are relative to the start of
               this region, and the tensors tile it exactly (no gaps, no overlaps).

Loading only parses JSON and copies bytes, so it never runs code from the file.
"""
import json
import math
import os
import stat
from collections.abc import Mapping

import numpy as np

from .. import lowp as _lowp
from ._atomic import atomic_write, remove_stale_temps

__all__ = ["save_file", "load_file", "load_metadata", "DTYPES"]

#: safetensors dtype code -> little-endian NumPy dtype (BF16, ml_dtypes' bfloat16, is resolved when used).
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {(dt.kind, dt.itemsize): code for code, dt in DTYPES.items()}
_ITEMSIZE = {**{code: dt.itemsize for code, dt in DTYPES.items()}, "BF16": 2}


def _np_dtype(code, path=None, name=None):
    """Return the NumPy dtype of safetensors ``code``; BF16 needs ml_dtypes (ImportError naming the extra)."""
    if code != "BF16":
        return DTYPES[code]
    try:
        return _lowp.bfloat16_dtype()
    except ImportError:
        where = f"{os.fspath(path)!r}: tensor {name!r} is BF16; " if path is not None else ""
        raise ImportError(f"{where}bfloat16 arrays need the ml_dtypes package: {_lowp.INSTALL_HINT}") from None

_METADATA_KEY = "__metadata__"
_MAX_HEADER = 100 * 1024 * 1024  # refuse absurd headers before allocating for them
_CHUNK = 16 * 1024 * 1024  # bytes per write call for large tensors


def _dtype_code(arr, name):
    if arr.dtype.kind == "V" and arr.dtype.name == "bfloat16":
        return "BF16"
    code = _CODES.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        supported = ", ".join(str(dt.newbyteorder("=")) for dt in DTYPES.values()) + ", bfloat16"
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors "
                        f"(supported: {supported})")
    return code


def _items(tensors):
    if isinstance(tensors, Mapping):
        return list(tensors.items())
    items = list(tensors)
    seen = set()
    for pair in items:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError("tensors must be a mapping or an iterable of (name, array) pairs")
        if pair[0] in seen:
            raise ValueError(f"duplicate tensor name {pair[0]!r}")
        seen.add(pair[0])
    return items


def _prepare(tensors):
    """Validate names and convert values to contiguous little-endian arrays."""
    prepared = []
    for name, value in _items(tensors):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}: {name!r}")
        if not name:
            raise ValueError("tensor names must be non-empty")
        if name == _METADATA_KEY:
            raise ValueError(f"{_METADATA_KEY!r} is reserved and cannot be a tensor name")
        arr = np.asarray(value)
        code = _dtype_code(arr, name)
        arr = np.asarray(arr, dtype=_np_dtype(code), order="C")
        prepared.append((name, code, arr))
    return prepared


def _check_metadata(metadata):
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping of str to str")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str, got {k!r}: {v!r}")
    return dict(metadata)


def _write_buffer(f, arr):
    """Write the raw bytes of contiguous array ``arr`` to ``f`` in bounded chunks."""
    flat = arr.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):
        f.write(flat[start:start + _CHUNK])


def _build_header(prepared, metadata):
    # Lay the data out widest-itemsize first so every tensor starts at an aligned offset
    # (the header is padded to 8 bytes); the JSON keeps the caller's order.
    order = sorted(range(len(prepared)), key=lambda i: -prepared[i][2].itemsize)
    offsets = {}
    pos = 0
    for i in order:
        n = prepared[i][2].nbytes
        offsets[i] = (pos, pos + n)
        pos += n
    header = {}
    if metadata:
        header[_METADATA_KEY] = metadata
    for i, (name, code, arr) in enumerate(prepared):
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": list(offsets[i])}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, [prepared[i] for i in order]


def save_file(tensors, path, metadata=None):
    """Atomically write ``tensors`` (name -> array-like) to ``path`` in safetensors format; returns None.

    Orphaned temporary files that crashed earlier saves left in the same directory are removed first.
    """
    _save_prepared(_prepare(tensors), path, metadata)


def _save_prepared(prepared, path, metadata=None):
    """Write the output of ``_prepare`` to ``path`` atomically (see ``save_file``)."""
    metadata = _check_metadata(metadata)
    header, layout = _build_header(prepared, metadata)
    remove_stale_temps(os.path.dirname(os.path.abspath(os.fspath(path))))
    with atomic_write(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for _, _, arr in layout:
            _write_buffer(f, arr)


# ----------------------------------------------------------------------------------------------
# Loading


def _bad(path, problem):
    return ValueError(f"{os.fspath(path)}: invalid safetensors file: {problem}")


_MAX_NDIM = 64  # NumPy's limit
_MAX_BYTES = int(np.iinfo(np.intp).max)


def _foreign_format(head):
    """Return a description of what ``head`` (a file's first bytes) is, when it is a known non-safetensors format."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (f"a Python pickle (protocol {head[1]}), e.g. from pickle.dump or an old torch.save; "
                "jitnet never unpickles files")
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save writes these), not safetensors"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file (use np.load)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML/XML document (a failed download or an error page?)"
    return None


def _not_safetensors(path, head, problem):
    """Return the ValueError for a bad header, naming the file's real format when it is recognisable."""
    what = _foreign_format(head)
    if what is not None:
        return _bad(path, f"not a safetensors file: it looks like {what}")
    return _bad(path, problem)


def _open(path):
    """Return ``path`` opened for binary reading, refusing directories and special files with ValueError."""
    st = os.stat(path)  # FileNotFoundError / PermissionError pass through unchanged
    if stat.S_ISDIR(st.st_mode):
        raise _bad(path, "is a directory, not a safetensors file")
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, "not a regular file (a pipe, socket or device?)")
    return open(path, "rb")


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r} in header")
        d[k] = v
    return d


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _read_header(f, path):
    """Parse and validate the header; return (entries, metadata, data_start).

    ``entries`` is a list of (name, dtype code, shape, begin, end) in header order.
    """
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise _bad(path, "truncated: the file is empty (0 bytes)")
    head = f.read(8)
    if len(head) < 8:
        raise _not_safetensors(path, head, f"truncated: file is {size} bytes, too short for the "
                                           "8-byte header length")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        f.seek(0)
        raise _not_safetensors(path, f.read(64), f"truncated or bad header length: header claims {n} "
                                                 f"bytes but the file has only {size - 8} after the "
                                                 "length field")
    if n > _MAX_HEADER:
        raise _bad(path, f"bad header: length {n} exceeds the {_MAX_HEADER}-byte limit")
    raw = f.read(n)
    if len(raw) != n:
        raise _bad(path, "truncated while reading the header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _bad(path, "bad header: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _not_safetensors(path, head + raw[:56],
                               f"bad header: not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"bad header: expected a JSON object, got {type(header).__name__}")

    metadata = header.pop(_METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    elif not (isinstance(metadata, dict)
              and all(isinstance(v, str) for v in metadata.values())):
        raise _bad(path, f"bad header: {_METADATA_KEY} must map str to str")

    data_len = size - 8 - n
    entries = []
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise _bad(path, f"bad header: {where} entry is not an object")
        missing = {"dtype", "shape", "data_offsets"} - info.keys()
        if missing:
            raise _bad(path, f"bad header: {where} lacks {', '.join(sorted(missing))}")
        code = info["dtype"]
        if not isinstance(code, str) or code not in _ITEMSIZE:
            raise _bad(path, f"{where} has unsupported dtype {code!r} "
                             f"(readable dtypes: {', '.join(_ITEMSIZE)})")
        shape = info["shape"]
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise _bad(path, f"bad header: {where} has invalid shape {shape!r}")
        if len(shape) > _MAX_NDIM:
            raise _bad(path, f"bad header: {where} has {len(shape)} dimensions (at most {_MAX_NDIM})")
        if math.prod(d for d in shape if d) * _ITEMSIZE[code] > _MAX_BYTES:
            raise _bad(path, f"bad header: {where} has shape {shape!r}, too large for an array")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise _bad(path, f"bad header: {where} has invalid data_offsets {offs!r}")
        begin, end = offs
        expected = math.prod(shape) * _ITEMSIZE[code]
        if end - begin != expected:
            raise _bad(path, f"{where} byte count mismatch: offsets [{begin}, {end}] span "
                             f"{end - begin} bytes but {code} {tuple(shape)} needs {expected}")
        entries.append((name, code, tuple(shape), begin, end))

    # Out of range: report truncation first, since that is the common real-world cause.
    for name, _, _, begin, end in entries:
        if end > data_len:
            raise _bad(path, f"truncated: tensor {name!r} out of range (bytes [{begin}, {end}] "
                             f"but the data section holds only {data_len} bytes)")
    pos, prev = 0, None
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin < pos:
            raise _bad(path, f"tensors {prev!r} and {name!r} overlap (offset {begin} < {pos})")
        if begin > pos:
            raise _bad(path, f"gap in data before tensor {name!r} (bytes [{pos}, {begin}) unused)")
        pos, prev = end, name
    if pos != data_len:
        raise _bad(path, f"{data_len - pos} trailing bytes after the last tensor")
    return entries, metadata, 8 + n


def _readinto_exact(f, buf, path, name):
    view = memoryview(buf)
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise _bad(path, f"truncated: tensor {name!r} ends early")
        got += k


def load_file(path):
    """Return a dict mapping tensor names (in header order) to freshly allocated NumPy arrays."""
    with _open(path) as f:
        entries, _, data_start = _read_header(f, path)
        out = {}
        for name, code, shape, begin, end in entries:
            dtype = _np_dtype(code, path, name)
            try:
                arr = np.empty(shape, dtype=dtype)
            except (ValueError, MemoryError) as e:
                raise _bad(path, f"tensor {name!r} of shape {shape} cannot be allocated ({e})") from None
            if end > begin:
                f.seek(data_start + begin)
                _readinto_exact(f, arr.reshape(-1).view(np.uint8), path, name)
            if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
                raise _bad(path, f"tensor {name!r}: BOOL data contains bytes other than 0 and 1")
            if not dtype.isnative:
                arr = arr.astype(dtype.newbyteorder("="))
            out[name] = arr
    return out


def load_metadata(path):
    """Return the file's ``__metadata__`` dict (empty if absent) after validating the header."""
    with _open(path) as f:
        _, metadata, _ = _read_header(f, path)
    return metadata


def validate_file(path):
    """Return True if ``path`` is a structurally valid safetensors file (header and size), else False."""
    try:
        with _open(path) as f:
            _read_header(f, path)
    except (OSError, ValueError):
        return False
    return True
