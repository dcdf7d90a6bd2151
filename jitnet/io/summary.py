"""TensorBoard event files, PNG encoding, embedding projector files, and CSV/JSONL loggers.

Event files are sequences of TFRecords::

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

whose payloads are protobuf-encoded ``Event`` messages, written here by hand (no protobuf
dependency). Only the fields needed for scalars, histograms, images, text, hparams and graphs are
produced. A graph is a ``GraphDef`` in the event's ``graph_def`` field: one ``NodeDef`` per primitive of the
traced step (the unfused graph ``jitnet.jit`` records), named ``scope/op_N`` where the scope is that of the
first variable the node reads, so TensorBoard's Graphs tab groups each layer's ops under its name.
"""
import csv
import json
import os
import re
import socket
import struct
import time
import zlib

import numpy as np

from .. import lowp as _lowp
from ..export.graph import trace_graph
from ._atomic import atomic_write

__all__ = ["crc32c", "masked_crc32c", "encode_png", "SummaryWriter", "CSVLogger", "JSONLLogger", "graph_def"]


# ----------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78


def _make_tables():
    base = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        base.append(c)
    # Extra tables for slicing-by-4: tables[k][n] is the CRC of byte n followed by k zero bytes.
    tables = [base]
    for _ in range(3):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ base[prev[n] & 0xFF] for n in range(256)])
    return tables


_T0, _T1, _T2, _T3 = _make_tables()


def _crc32c_py(data, crc=0):
    crc ^= 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n4 = len(mv) - len(mv) % 4
    t0, t1, t2, t3 = _T0, _T1, _T2, _T3
    if n4:
        for (word,) in struct.iter_unpack("<I", mv[:n4]):
            crc ^= word
            crc = (t3[crc & 0xFF] ^ t2[(crc >> 8) & 0xFF]
                   ^ t1[(crc >> 16) & 0xFF] ^ t0[crc >> 24])
    for b in mv[n4:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:  # use an installed native implementation when there is one
    from crc32c import crc32c as _crc32c_native  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the environment
    _crc32c_native = None


def crc32c(data, crc=0):
    """Return the CRC-32C (Castagnoli) checksum of ``data`` as an int, continuing from ``crc``."""
    if _crc32c_native is not None:
        return _crc32c_native(bytes(data), crc)
    return _crc32c_py(data, crc)


def masked_crc32c(data):
    """Return the TFRecord-masked CRC-32C of ``data`` as an int."""
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(data):
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length))
            + data + struct.pack("<I", masked_crc32c(data)))


# ----------------------------------------------------------------------------------------------
# Minimal protobuf encoding


def _varint(n):
    if n < 0:
        n += 1 << 64  # int64 negatives are sent as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field, wire):
    return _varint((field << 3) | wire)


def _f_varint(field, n):
    return _key(field, 0) + _varint(int(n))


def _f_double(field, x):
    return _key(field, 1) + struct.pack("<d", float(x))


def _f_float(field, x):
    return _key(field, 5) + struct.pack("<f", float(x))


def _f_bytes(field, b):
    if isinstance(b, str):
        b = b.encode("utf-8")
    return _key(field, 2) + _varint(len(b)) + b


def _f_packed_doubles(field, values):
    return _f_bytes(field, np.asarray(values, dtype="<f8").tobytes())


def _event(wall_time, step=None, file_version=None, summary=None, graph_def=None):
    msg = _f_double(1, wall_time)
    if step:
        msg += _f_varint(2, step)
    if file_version is not None:
        msg += _f_bytes(3, file_version)
    if graph_def is not None:
        msg += _f_bytes(4, graph_def)
    if summary is not None:
        msg += _f_bytes(5, summary)
    return msg


def _summary(tag, payload):
    """Return a Summary holding one Value with ``tag`` and the given already-encoded field."""
    value = _f_bytes(1, tag) + payload
    return _f_bytes(1, value)  # Summary.value = 1 (repeated)


# ----------------------------------------------------------------------------------------------
# Tensors, plugin metadata, hparams and graphs (field numbers of TensorFlow's and TensorBoard's protos)

_DT = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6, "int64": 9, "bool": 10,
       "bfloat16": 14, "uint16": 17, "float16": 19, "uint32": 22, "uint64": 23}
_DT_STRING, _DT_VARIANT = 7, 21


def _dtype_enum(dtype):
    try:
        return _DT.get(np.dtype(dtype).name, _DT_VARIANT)
    except TypeError:
        return _DT_VARIANT


def _shape_proto(shape):
    """TensorShapeProto: one Dim (field 2) per axis with its size (field 1)."""
    return b"".join(_f_bytes(2, _f_varint(1, int(d)) if int(d) else b"") for d in shape)


def _plugin_metadata(plugin, content=b""):
    """SummaryMetadata with plugin_data {plugin_name, content}."""
    return _f_bytes(1, _f_bytes(1, plugin) + (_f_bytes(2, content) if content else b""))


def _string_tensor(strings, shape):
    return (_f_varint(1, _DT_STRING) + _f_bytes(2, _shape_proto(shape))
            + b"".join(_f_bytes(8, x) for x in strings))


# the hparams plugin's empty tensor: DT_FLOAT of shape [0]
_NULL_TENSOR = _f_varint(1, 1) + _f_bytes(2, _f_bytes(2, b""))


def _pb_value(v):
    """google.protobuf.Value: a number (2), string (3) or bool (4); the HParamInfo type code."""
    if isinstance(v, (bool, np.bool_)):
        return _f_varint(4, int(bool(v))), 2
    if isinstance(v, (int, float, np.integer, np.floating)) or (isinstance(v, np.generic)
                                                               and _lowp.is_floating(v.dtype)):  # (bfloat16)
        return _f_double(2, float(v)), 3
    return _f_bytes(3, str(v)), 1


def _map_entry(field, key, value_bytes):
    return _f_bytes(field, _f_bytes(1, key) + _f_bytes(2, value_bytes))


def _attr_shapes(shapes):
    """AttrValue{list{shape: ...}} for ``_output_shapes``."""
    return _f_bytes(1, b"".join(_f_bytes(7, _shape_proto(s)) for s in shapes))


def _node_def(name, op, inputs=(), attrs=()):
    msg = _f_bytes(1, name) + _f_bytes(2, op)
    for i in inputs:
        msg += _f_bytes(3, i)
    for k, v in attrs:
        msg += _map_entry(5, k, v)
    return _f_bytes(1, msg)        # GraphDef.node (field 1)


def _value_attrs(v):
    shape = getattr(v, "shape", ())
    return [("dtype", _f_varint(6, _dtype_enum(v.dtype))), ("shape", _f_bytes(7, _shape_proto(shape))),
            ("_output_shapes", _attr_shapes([shape]))]


def _params_text(params):
    parts = []
    for k, v in params.items():
        r = f"array{list(v.shape)}" if isinstance(v, np.ndarray) else repr(v)
        parts.append(f"{k}={r if len(r) <= 80 else r[:77] + '...'}")
    return ", ".join(parts)


def _clean_name(s):
    return re.sub(r"[^A-Za-z0-9_.\-/]+", "_", str(s)).strip("/") or "node"


def graph_def(traced):
    """Return the serialized GraphDef of a traced graph (see ``jitnet.export.trace_graph``)."""
    g = traced.graph
    names, used, out = {}, set(), []

    def unique(base):
        base = _clean_name(base)
        n, k = base, 0
        while n in used:
            k += 1
            n = f"{base}_{k}"
        used.add(n)
        return n

    def name_of(v):
        n = names.get(v.id)
        if n is not None:
            return n
        if v.kind == "arg":
            n, op = unique(f"input_{v.arg_index}"), "Placeholder"
        elif v.kind == "state":
            n, op = unique(traced.name_of(v.var)), "VariableV2"
        elif v.kind == "gradin":
            n, op = unique(f"grad_in/{traced.name_of(v.var)}"), "Placeholder"
        elif v.kind == "const":
            n, op = unique("const"), "Const"
        else:
            raise AssertionError(v.kind)
        names[v.id] = n
        out.append(_node_def(n, op, (), _value_attrs(v)))
        return n

    for v in sorted((v for v in g.values if v.kind == "arg"), key=lambda v: v.arg_index):
        name_of(v)
    for node in g.live_nodes():
        ins = [name_of(v) for v in node.inputs]
        scope = ""
        for v in node.inputs:
            if v.kind == "state":
                nm = traced.name_of(v.var)
                scope = nm.rsplit("/", 1)[0] if "/" in nm else ""
                break
        n = unique(f"{scope}/{node.prim.name}_{node.id}" if scope else f"{node.prim.name}_{node.id}")
        names[node.out.id] = n
        attrs = _value_attrs(node.out)
        if node.params:
            attrs.append(("params", _f_bytes(2, _params_text(node.params))))
        if node.effects:
            attrs.append(("writes", _f_bytes(2, ", ".join(traced.name_of(e) for e in node.effects))))
        out.append(_node_def(n, node.prim.name, ins, attrs))
    for k, v in enumerate(g.outputs):
        out.append(_node_def(unique(f"output_{k}"), "Identity", [name_of(v) if v.kind != "node" else names[v.id]],
                             _value_attrs(v)))
    for var, v in g.grad_outputs:
        if v is None or isinstance(v, tuple):
            continue
        src = names[v.id] if v.kind == "node" else name_of(v)
        out.append(_node_def(unique(f"grad/{traced.name_of(var)}"), "Identity", [src], _value_attrs(v)))
    return b"".join(out) + _f_bytes(4, _f_varint(1, 27))     # versions {producer}


# ----------------------------------------------------------------------------------------------
# PNG


def _png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA


def _to_hwc_uint8(img, dataformats=None):
    a = np.asarray(img)
    if dataformats is None:
        if a.ndim == 2:
            dataformats = "HW"
        elif a.ndim == 3 and a.shape[-1] in (1, 2, 3, 4):
            dataformats = "HWC"
        elif a.ndim == 3 and a.shape[0] in (1, 2, 3, 4):
            dataformats = "CHW"
        else:
            raise ValueError(f"cannot interpret image of shape {a.shape} as HW, HWC or CHW "
                             "(channels must be 1-4); pass dataformats=")
    dataformats = dataformats.upper()
    if dataformats == "HW":
        if a.ndim != 2:
            raise ValueError(f"HW image must be 2-D, got shape {a.shape}")
        a = a[:, :, None]
    elif dataformats in ("HWC", "CHW"):
        if a.ndim != 3:
            raise ValueError(f"{dataformats} image must be 3-D, got shape {a.shape}")
        if dataformats == "CHW":
            a = np.moveaxis(a, 0, -1)
    else:
        raise ValueError(f"dataformats must be 'HW', 'HWC' or 'CHW', not {dataformats!r}")
    if a.shape[-1] not in _PNG_COLOR_TYPE:
        raise ValueError(f"image must have 1, 2, 3 or 4 channels, got {a.shape[-1]}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image must be non-empty, got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise ValueError("integer images must lie in [0, 255]")
        a = a.astype(np.uint8)
    elif _lowp.is_floating(a.dtype):
        a = np.nan_to_num(a.astype(np.float64), nan=0.0)
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"unsupported image dtype {a.dtype}")
    return np.ascontiguousarray(a)


def encode_png(img, dataformats=None):
    """Return PNG bytes for an HW/HWC/CHW image given as uint8 or as floats in [0, 1]."""
    a = _to_hwc_uint8(img, dataformats)
    h, w, c = a.shape
    raw = np.zeros((h, 1 + w * c), dtype=np.uint8)  # filter type 0 (None) on every row
    raw[:, 1:] = a.reshape(h, w * c)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPE[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _png_chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------
# SummaryWriter


def _scalar(value, what):
    a = np.asarray(value)
    if a.size != 1:
        raise ValueError(f"{what} must be a single number, got shape {a.shape}")
    return a.reshape(())[()]


def _pbtxt_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _safe_dirname(tag):
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(tag)).lstrip(".")
    return name or "embedding"


class SummaryWriter:
    """Writes TensorBoard event files (scalars, histograms, images, text, hparams, graphs) and projector embeddings."""

    def __init__(self, logdir, flush_secs=120, filename_suffix=""):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        base = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{filename_suffix}"
        path = os.path.join(self.logdir, base)
        n = 0
        while True:
            try:  # exclusive create: never append to another writer's file
                self._file = open(path, "xb")
                break
            except FileExistsError:
                n += 1
                path = os.path.join(self.logdir, f"{base}.{n}")
        self.path = path
        self.flush_secs = flush_secs
        self._last_flush = time.time()
        self._embeddings = {}
        self._write_event(_event(time.time(), file_version="brain.Event:2"))
        self.flush()

    # -- plumbing

    def _write_event(self, event):
        if self._file is None:
            raise RuntimeError("SummaryWriter is closed")
        self._file.write(_tfrecord(event))
        if self.flush_secs is not None and time.time() - self._last_flush >= self.flush_secs:
            self.flush()

    def _add(self, tag, payload, step, wall_time):
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag must be a non-empty str, got {tag!r}")
        summary = _summary(tag, payload)
        step = 0 if step is None else int(step)
        self._write_event(_event(time.time() if wall_time is None else wall_time,
                                 step=step, summary=summary))

    # -- public API

    def add_scalar(self, tag, value, step=None, wall_time=None):
        """Record one scalar value under ``tag`` at ``step``; returns None."""
        self._add(tag, _f_float(2, float(_scalar(value, "scalar"))), step, wall_time)

    def add_histogram(self, tag, values, step=None, bins=30, wall_time=None):
        """Record a histogram of ``values`` (non-finite entries dropped) at ``step``; returns None."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if v.size:
            counts, edges = np.histogram(v, bins=bins)
            limits, buckets = edges[1:], counts.astype(np.float64)
            lo, hi = float(v.min()), float(v.max())
        else:
            limits, buckets, lo, hi = np.zeros(1), np.zeros(1), 0.0, 0.0
        histo = (_f_double(1, lo) + _f_double(2, hi) + _f_double(3, v.size)
                 + _f_double(4, float(v.sum())) + _f_double(5, float(np.dot(v, v)))
                 + _f_packed_doubles(6, limits) + _f_packed_doubles(7, buckets))
        self._add(tag, _f_bytes(5, histo), step, wall_time)

    def add_image(self, tag, img, step=None, dataformats=None, wall_time=None):
        """Record an HW/HWC/CHW image (uint8, or float in [0, 1]) as PNG at ``step``; returns None."""
        a = _to_hwc_uint8(img, dataformats)
        h, w, c = a.shape
        image = (_f_varint(1, h) + _f_varint(2, w) + _f_varint(3, c)
                 + _f_bytes(4, encode_png(a, "HWC")))
        self._add(tag, _f_bytes(4, image), step, wall_time)

    def add_text(self, tag, text, step=None, wall_time=None):
        """Record ``text`` (a string, Markdown in the Text tab, or a list of strings) at ``step``; returns None."""
        if isinstance(text, str):
            strings, shape = [text], ()
        else:
            strings = [str(t) for t in text]
            shape = (len(strings),)
        self._add(tag, _f_bytes(9, _plugin_metadata("text")) + _f_bytes(8, _string_tensor(strings, shape)),
                  step, wall_time)

    def add_hparams(self, hparams, metrics=None, step=None, wall_time=None):
        """Record a run's hyperparameters and final metrics for TensorBoard's HParams tab; returns None.

        ``hparams`` maps names to numbers, bools or strings (anything else is written as its ``str``);
        ``metrics`` maps metric tags to numbers, written as scalars at ``step``. The run (this writer's
        directory) becomes one session of the HParams table, as in TensorBoard's own ``hparams`` API.
        """
        if not isinstance(hparams, dict) or not hparams:
            raise ValueError(f"add_hparams: hparams must be a non-empty dict, got {hparams!r}")
        metrics = dict(metrics or {})
        now = time.time() if wall_time is None else wall_time
        infos, values = b"", b""
        for k, v in hparams.items():
            if hasattr(v, "item") and getattr(v, "size", 1) == 1:
                v = v.item()
            pv, kind = _pb_value(v)
            infos += _f_bytes(4, _f_bytes(1, str(k)) + _f_varint(4, kind))
            values += _map_entry(1, str(k), pv)
        for tag in metrics:
            infos += _f_bytes(5, _f_bytes(1, _f_bytes(2, str(tag))))
        experiment = _f_bytes(2, infos)                         # HParamsPluginData.experiment
        start = _f_bytes(3, values + _f_double(5, now))         # .session_start_info
        for tag, content in (("_hparams_/experiment", experiment), ("_hparams_/session_start_info", start)):
            self._add(tag, _f_bytes(9, _plugin_metadata("hparams", content)) + _f_bytes(8, _NULL_TENSOR),
                      step, now)
        for tag, value in metrics.items():
            self.add_scalar(tag, value, step, now)
        end = _f_bytes(4, _f_varint(1, 1) + _f_double(2, now))  # .session_end_info, STATUS_SUCCESS
        self._add("_hparams_/session_end_info",
                  _f_bytes(9, _plugin_metadata("hparams", end)) + _f_bytes(8, _NULL_TENSOR), step, now)

    def add_graph(self, fn, *args, wall_time=None, **kwargs):
        """Trace ``fn(*args, **kwargs)`` once and write its graph for the Graphs tab; return the number of nodes.

        ``fn`` is any function a ``jitnet.jit`` could compile (a training step, a model's forward, a Module).
        No plan is built (the ops run once, eagerly), and variables the step updates are restored after the trace.
        """
        traced = trace_graph(fn, args, kwargs)
        gd = graph_def(traced)
        self._write_event(_event(time.time() if wall_time is None else wall_time, graph_def=gd))
        return len(traced.graph.live_nodes())

    def add_embedding(self, mat, metadata=None, tag="default", step=None, metadata_header=None):
        """Write projector files for a 2-D ``mat`` (one row per point); returns the tensors.tsv path."""
        m = np.asarray(mat, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"embedding matrix must be 2-D, got shape {m.shape}")
        sub = _safe_dirname(tag)
        folder = os.path.join(self.logdir, sub)
        os.makedirs(folder, exist_ok=True)
        tensors_path = os.path.join(folder, "tensors.tsv")
        with atomic_write(tensors_path, "w") as f:
            for row in m:
                f.write("\t".join(repr(float(x)) for x in row) + "\n")
        entry = {"tensor_name": f"{tag}:{0 if step is None else int(step)}",
                 "tensor_path": f"{sub}/tensors.tsv"}
        if metadata is not None:
            labels = list(metadata)
            if len(labels) != m.shape[0]:
                raise ValueError(f"{len(labels)} metadata labels for {m.shape[0]} embedding rows")

            def clean(x):
                return re.sub(r"[\t\r\n]+", " ", str(x))

            with atomic_write(os.path.join(folder, "metadata.tsv"), "w") as f:
                if metadata_header is not None:
                    f.write("\t".join(clean(h) for h in metadata_header) + "\n")
                for label in labels:
                    if metadata_header is not None and not isinstance(label, str):
                        f.write("\t".join(clean(x) for x in label) + "\n")
                    else:
                        f.write(clean(label) + "\n")
            entry["metadata_path"] = f"{sub}/metadata.tsv"
        self._embeddings[sub] = entry
        with atomic_write(os.path.join(self.logdir, "projector_config.pbtxt"), "w") as f:
            for e in self._embeddings.values():
                f.write("embeddings {\n")
                for k, v in e.items():
                    f.write(f"  {k}: {_pbtxt_string(v)}\n")
                f.write("}\n")
        return tensors_path

    def flush(self):
        """Push buffered events to the operating system; returns None."""
        if self._file is not None:
            self._file.flush()
            self._last_flush = time.time()

    def close(self):
        """Flush and close the event file (idempotent); returns None."""
        if self._file is not None:
            self.flush()
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# Plain-text loggers


def _plain(value):
    """Convert NumPy scalars/arrays (and array-likes such as tensors) to JSON/CSV-friendly values."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    try:
        a = np.asarray(value)
    except Exception:
        return str(value)
    if a.dtype == object:
        return str(value)
    return a.item() if a.ndim == 0 else a.tolist()


class _LineLogger:
    def __init__(self, path):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", newline="")

    def log(self, row=None, **fields):
        """Append one row (a dict and/or keyword fields) and flush; returns None."""
        data = dict(row or {})
        data.update(fields)
        if self._file is None:
            raise RuntimeError(f"{type(self).__name__} for {self.path!r} is closed")
        self._write(data)
        self._file.flush()

    write = log

    def close(self):
        """Close the file (idempotent); returns None."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CSVLogger(_LineLogger):
    """Appends dict rows to a CSV file; the columns come from the first row (or the existing header)."""

    def __init__(self, path, fieldnames=None):
        super().__init__(path)
        self.fieldnames = list(fieldnames) if fieldnames is not None else None
        if self._file.tell() > 0:  # appending to an existing log: reuse its header
            with open(self.path, encoding="utf-8", newline="") as f:
                existing = next(csv.reader(f), None)
            if existing:
                if self.fieldnames is not None and existing != self.fieldnames:
                    raise ValueError(f"{self.path}: existing CSV columns {existing} differ from "
                                     f"{self.fieldnames}")
                self.fieldnames = existing
                self._header_written = True
                return
        self._header_written = False

    def _write(self, data):
        if self.fieldnames is None:
            self.fieldnames = list(data)
        extra = [k for k in data if k not in self.fieldnames]
        if extra:
            raise ValueError(f"{self.path}: row has columns {extra} not in the header "
                             f"{self.fieldnames}")
        writer = csv.writer(self._file, lineterminator="\n")
        if not self._header_written:
            writer.writerow(self.fieldnames)
            self._header_written = True

        def cell(v):
            v = _plain(v)
            if v is None:
                return ""
            if isinstance(v, float):
                return repr(v)
            return v if isinstance(v, (str, int)) else json.dumps(v)

        writer.writerow([cell(data.get(k)) for k in self.fieldnames])


class JSONLLogger(_LineLogger):
    """Appends dict rows to a JSON Lines file, one JSON object per line."""

    def _write(self, data):
        self._file.write(json.dumps(_plain(data), ensure_ascii=False) + "\n")
