"""Saving and restoring model state: flat safetensors checkpoints, state checks, rotating savers."""
import json
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np

from . import safetensors as _st
from ._atomic import atomic_write

__all__ = ["save", "load", "flatten_state", "unflatten_state", "check_state",
           "StateKeyError", "Saver", "latest_checkpoint"]

SEP = "/"
INDEX_NAME = "checkpoint"
_SUFFIX = ".safetensors"


# ----------------------------------------------------------------------------------------------
# Flat save / load


def flatten_state(state, sep=SEP):
    """Return a flat dict name -> value, joining nested mapping keys with ``sep`` ("a/b/c")."""
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be str, got {type(key).__name__}: {key!r}")
            if not key:
                raise ValueError(f"empty key under {prefix or 'the top level'!r}")
            name = f"{prefix}{sep}{key}" if prefix else key
            if isinstance(value, Mapping):
                visit(name, value)
            elif name in flat:
                raise ValueError(f"state entry {name!r} occurs twice after flattening")
            else:
                flat[name] = value

    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    visit("", state)
    return flat


def unflatten_state(flat, sep=SEP):
    """Return a nested dict rebuilt from a flat one by splitting names on ``sep``."""
    root = {}
    for name, value in flat.items():
        *parents, leaf = name.split(sep)
        node = root
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name!r} conflicts with an entry that is not a group")
        if leaf in node:
            raise ValueError(f"{name!r} conflicts with an existing group")
        node[leaf] = value
    return root


def save(state, path, metadata=None):
    """Atomically write ``state`` (nested dicts of arrays, flattened with "/") to ``path``; returns the path."""
    _st.save_file(flatten_state(state), path, metadata=metadata)
    return os.fspath(path)


def load(path):
    """Return the flat dict name -> np.ndarray stored in the checkpoint at ``path``."""
    return _st.load_file(path)


# ----------------------------------------------------------------------------------------------
# State comparison


class StateKeyError(KeyError):
    """KeyError whose message prints as plain text (KeyError normally shows its repr)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _fmt_shape(shape):
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_state(expected, got, where="state", strict=True):
    """Return (missing, unexpected) name lists after checking ``got`` against ``expected`` shapes.

    ``expected`` maps names to shapes, ``got`` maps names to array-likes. Raises ``KeyError`` if
    (with ``strict``) names are missing or unexpected, and ``ValueError`` if only shapes disagree;
    the message names every offending entry with both shapes.
    """
    exp = {k: tuple(int(d) for d in s) for k, s in expected.items()}
    shapes = {k: tuple(np.shape(v)) for k, v in got.items()}
    missing = sorted(k for k in exp if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in exp)
    mismatched = sorted(k for k in exp if k in shapes and shapes[k] != exp[k])
    key_problem = strict and (missing or unexpected)
    if key_problem or mismatched:
        parts = []
        if strict and missing:
            parts.append("missing entries: " + ", ".join(
                f"{k!r} (expected shape {_fmt_shape(exp[k])})" for k in missing))
        if strict and unexpected:
            parts.append("unexpected entries: " + ", ".join(
                f"{k!r} (shape {_fmt_shape(shapes[k])})" for k in unexpected))
        if mismatched:
            parts.append("shape mismatches: " + ", ".join(
                f"{k!r} expected {_fmt_shape(exp[k])}, got {_fmt_shape(shapes[k])}"
                for k in mismatched))
        msg = f"{where}: state does not match; " + "; ".join(parts)
        raise StateKeyError(msg) if key_problem else ValueError(msg)
    return missing, unexpected


# ----------------------------------------------------------------------------------------------
# Rotating saver


def _pattern(prefix):
    return re.compile(re.escape(prefix) + r"-(\d+)" + re.escape(_SUFFIX) + r"\Z")


def _scan(directory, prefix):
    """Return [(step, filename)] of checkpoint files in ``directory``, oldest step first."""
    pat = _pattern(prefix)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := pat.match(n))]
    return sorted(found)


def _read_index(directory):
    """Return the parsed index dict, or None if it is missing or corrupt."""
    try:
        with open(os.path.join(directory, INDEX_NAME), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(index, dict) and isinstance(index.get("latest"), str)
            and isinstance(index.get("kept"), list)
            and all(isinstance(n, str) for n in index["kept"])):
        return None
    return index


def _safe_name(name):
    # Index entries are plain file names inside the directory; refuse anything else.
    return bool(name) and os.path.basename(name) == name and name not in (".", "..")


def _candidates(directory, prefix):
    """Return checkpoint paths in ``directory`` to try, newest first, without duplicates.

    The index's ``latest`` comes first, then its ``kept`` list newest first, then any other
    ``<prefix>-<step>.safetensors`` files, highest step first.
    """
    names = []
    index = _read_index(directory)
    if index is not None:
        names.append(index["latest"])
        names.extend(reversed(index["kept"]))
    names.extend(n for _, n in reversed(_scan(directory, prefix)))
    seen, out = set(), []
    for n in names:
        if _safe_name(n) and n not in seen:
            seen.add(n)
            out.append(os.path.join(directory, n))
    return out


def _skip_warning(path, problem):
    where = f"{os.fspath(path)}: "
    text = str(problem)
    if text.startswith(where):
        text = text[len(where):]
    warnings.warn(f"skipped checkpoint {os.fspath(path)}: {text}", UserWarning, stacklevel=3)


def latest_checkpoint(directory, prefix="ckpt"):
    """Return the path of the newest valid checkpoint in ``directory``, or None if there is none.

    Trusts the ``checkpoint`` index when it is readable and names a valid file; otherwise scans
    for ``<prefix>-<step>.safetensors`` files, newest step first. Broken files are skipped with a
    warning naming the file and the problem (only their headers and sizes are checked here).
    """
    directory = os.fspath(directory)
    for path in _candidates(directory, prefix):
        try:
            with _st._open(path) as f:
                _st._read_header(f, path)
        except FileNotFoundError:
            continue  # listed in the index but gone: nothing to report
        except (OSError, ValueError) as e:
            _skip_warning(path, e)
            continue
        return path
    return None


def _nonfinite(prepared):
    """Return [(name, count, size)] for the floating tensors among ``prepared`` holding NaN or Inf."""
    bad = []
    for name, _, arr in prepared:
        if (arr.dtype.kind in "fc" or arr.dtype.name == "bfloat16") and arr.size:
            finite = np.isfinite(arr)
            if not finite.all():
                bad.append((name, int(arr.size - np.count_nonzero(finite)), int(arr.size)))
    return bad


class Saver:
    """Writes numbered checkpoints into a directory, keeping only the newest ``max_to_keep`` (None or 0: all)."""

    def __init__(self, directory, max_to_keep=5, prefix="ckpt"):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 0):
            raise ValueError(f"max_to_keep must be a non-negative int or None, got {max_to_keep!r}")
        if not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise ValueError(f"invalid checkpoint prefix {prefix!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.prefix = prefix
        os.makedirs(self.directory, exist_ok=True)
        self._kept = self._recover()

    def _recover(self):
        """Return the kept file names (oldest first) from the index, or by scanning."""
        index = _read_index(self.directory)
        names = []
        if index is not None:
            names = [n for n in index["kept"] if _safe_name(n)
                     and os.path.exists(os.path.join(self.directory, n))]
        if not names:
            names = [n for _, n in _scan(self.directory, self.prefix)]
        return names

    @property
    def checkpoints(self):
        """Return the paths of the checkpoints currently kept, oldest first."""
        return [os.path.join(self.directory, n) for n in self._kept]

    def filename(self, step):
        """Return the path that ``save(state, step)`` writes."""
        return os.path.join(self.directory, f"{self.prefix}-{step}{_SUFFIX}")

    def save(self, state, step, metadata=None, allow_nonfinite=False):
        """Write ``state`` as checkpoint ``step``, update the index, prune old files; returns the path.

        A state whose floating-point tensors hold NaN or Inf is refused with ValueError (nothing is
        written, nothing rotated away) unless ``allow_nonfinite`` is True, so a diverged run never
        replaces the good checkpoints it already has. Orphaned temporary files of earlier crashed
        saves in the directory are removed.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        meta = {"step": str(step)}
        if metadata:
            meta.update(metadata)
        prepared = _st._prepare(flatten_state(state))
        if not allow_nonfinite:
            bad = _nonfinite(prepared)
            if bad:
                listed = ", ".join(f"{n!r} ({k} of {size} values)" for n, k, size in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                raise ValueError(
                    f"Saver.save: refusing to save step {step} to {self.directory}: non-finite "
                    f"(NaN/Inf) values in tensor{'s' if len(bad) > 1 else ''} {listed}{more}; "
                    "the existing checkpoints are kept. "
                    "Pass allow_nonfinite=True to save it anyway.")
        path = self.filename(step)
        _st._save_prepared(prepared, path, metadata=meta)  # atomic
        name = os.path.basename(path)
        kept = [n for n in self._kept if n != name] + [name]
        doomed = []
        if self.max_to_keep:
            doomed, kept = kept[:-self.max_to_keep], kept[-self.max_to_keep:]
        index = {"latest": name, "kept": kept}
        with atomic_write(os.path.join(self.directory, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1)
            f.write("\n")
        self._kept = kept
        for n in doomed:  # only now that the new checkpoint and index are durable
            try:
                os.unlink(os.path.join(self.directory, n))
            except FileNotFoundError:
                pass
        return path

    def latest_checkpoint(self):
        """Return the path of the newest valid checkpoint in this saver's directory, or None."""
        return latest_checkpoint(self.directory, self.prefix)

    def restore(self, path=None):
        """Return the flat state dict from ``path``, or from the newest loadable checkpoint when it is None.

        Without ``path``, checkpoints that cannot be loaded (truncated, corrupt, not safetensors)
        are skipped with a warning naming each and why, falling back to the next newest. Raises
        FileNotFoundError when the directory holds no checkpoint and ValueError when none loads.
        """
        if path is not None:
            return load(path)
        skipped = []
        for candidate in _candidates(self.directory, self.prefix):
            try:
                return load(candidate)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                _skip_warning(candidate, e)
                skipped.append(f"{os.path.basename(candidate)} ({e})")
        if not skipped:
            raise FileNotFoundError(f"no checkpoint in {self.directory!r}")
        raise ValueError(f"no loadable checkpoint in {self.directory!r}; tried, newest first: "
                         + "; ".join(skipped))
