"""The kernel cache repairs itself: checked Numba cache files for jitnet's kernels, ``jitnet cache info/clear``.

jitnet's kernels live in two caches: generated kernel modules (``jitnet_k_<hash>.py``, written by
:mod:`jitnet.kernelgen` into :func:`cache_dir`) and Numba's compiled code for them and for the ``@njit(cache=True)``
kernels of jitnet's own modules (``.nbi`` index and ``.nbc`` data files, in ``__pycache__`` beside the source or
under ``$NUMBA_CACHE_DIR``). Numba raises ``UnpicklingError``/``EOFError`` from a truncated or garbled file in
every later process; here each of jitnet's dispatchers gets a checked variant of Numba's cache objects
(:func:`protect`; other libraries' Numba caches are untouched):

- every index and data file jitnet writes ends with a trailer: a magic string, the SHA-256 of the contents and,
  for a data file, a digest of what it was written for (function, source stamp, Numba's cache key). Files without a trailer (written before, or by
  Numba itself) are read as Numba reads them.
- a file that is empty, fails its checksum or does not unpickle is removed (see :func:`_remove_if_same`) and
  reported once per file with a :class:`CacheRepairWarning`; the kernel is then compiled and saved again.
- a data file written for another key (two processes saving different signatures at once) and an index written
  by another Numba version are stale, not damaged: the kernel is recompiled and the entry overwritten silently.
- a cached entry that still fails to load, or a save that fails (disk full), recompiles with a warning.

Writes stay atomic (Numba writes a temporary file and renames it). A reader that finds a damaged file moves it
aside by ``rename`` and deletes it only if it is the very file (device, inode, size, mtime) it found damaged;
a good file another process wrote in between is put back, so a reader racing a writer never deletes a good file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import sys
import threading
import types
import uuid
import warnings

import numba
from numba.core import config as _numba_config
from numba.core.caching import _CacheLocator
from numba.misc.appdirs import AppDirs

__all__ = ["CacheRepairWarning", "cache_dir", "stamp_source", "protect", "protect_module", "protect_loaded",
           "check_file", "info", "format_info", "clear", "cli", "stats"]


class CacheRepairWarning(UserWarning):
    """A damaged file of jitnet's kernel cache was removed or rewritten; its kernel is compiled again."""


def cache_dir() -> str:
    """Return the generated-kernel cache directory (``$JITNET_CACHE_DIR`` or ``<user cache>/jitnet/kernels``)."""
    d = os.environ.get("JITNET_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "jitnet", "kernels")
    return d


_lock = threading.RLock()
_warned: set[str] = set()
_counters = {"cache_files_repaired": 0, "cache_loads_failed": 0, "cache_saves_failed": 0}


def stats() -> dict:
    """Return counters of this process: damaged cache files repaired, cached loads and saves that failed."""
    return dict(_counters)


def _warn(key: str, message: str) -> None:
    """Issue ``message`` as a CacheRepairWarning once per ``key`` (a file path) in this process."""
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, CacheRepairWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------------
# Checked files: a trailer after Numba's pickle payload. pickle.loads ignores bytes past the pickle's STOP, so
# plain Numba still reads these files.
# --------------------------------------------------------------------------------------------------------------

_MAGIC = b"jnchk\x01\x00\x00"
_TRAILER = len(_MAGIC) + 32 + 16
_NO_TAG = bytes(16)


class _Damaged(Exception):
    """A cache file that cannot be what it claims to be (the message says why)."""


def _trailer(payload: bytes, tag: bytes) -> bytes:
    return _MAGIC + hashlib.sha256(payload).digest() + tag


def _split(data: bytes):
    """Return ``(payload, tag)`` of a file's bytes; tag is None for a file without jitnet's trailer."""
    if not data:
        raise _Damaged("empty file")
    if len(data) >= _TRAILER and data[-_TRAILER:-_TRAILER + len(_MAGIC)] == _MAGIC:
        payload = data[:-_TRAILER]
        if hashlib.sha256(payload).digest() != data[-48:-16]:
            raise _Damaged("checksum mismatch (garbled or partly overwritten)")
        return payload, data[-16:]
    return data, None


def _key_tag(cache_file, key) -> bytes:
    """Return the 16-byte digest stored in a data file: the function's index name and source stamp and the Numba
    cache key (signature, target, bytecode hashes; two functions differing only in constants share a key)."""
    what = repr((getattr(cache_file, "_index_name", ""), cache_file._source_stamp, key))
    return hashlib.sha256(what.encode()).digest()[:16]


def _read(path: str):
    """Return ``(bytes, os.stat_result)`` of ``path`` read through one descriptor."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        return f.read(), st


def _same_file(a, b) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


def _remove_if_same(path: str, st) -> bool:
    """Remove ``path`` if it is still the file described by ``st`` (found damaged); return whether it was removed.

    The file is first moved aside with an atomic rename. If what was moved is not the damaged file (another
    process replaced it with a good one meanwhile), it is linked back unless a newer file already took its place.
    """
    aside = f"{path}.damaged.{uuid.uuid4().hex[:12]}"
    try:
        os.rename(path, aside)
    except OSError:                 # already removed or replaced by another reader
        return False
    try:
        if _same_file(os.stat(aside), st):
            return True
        try:
            os.link(aside, path)    # put the good file back (fails if a newer one is there)
        except OSError:
            pass
        return False
    finally:
        try:
            os.unlink(aside)
        except OSError:
            pass


def _repair(path: str, st, reason: str, what: str) -> None:
    """Remove a damaged cache file found by this process and warn once."""
    removed = _remove_if_same(path, st)
    with _lock:
        _counters["cache_files_repaired"] += 1
    _warn(path, f"jitnet: damaged kernel cache file {path} ({reason}); "
                f"{'removed it, ' if removed else ''}{what} is compiled again")


def _func_name(cache_file) -> str:
    name = os.path.basename(getattr(cache_file, "_index_path", "?"))
    return name[:-4] if name.endswith(".nbi") else name


class _CheckedIndexDataFile:
    """Mixed into Numba's ``IndexDataCacheFile`` of one dispatcher: trailer on write, checks and repair on read."""

    _jn_tag = None

    def _load_index(self):
        path = self._index_path
        try:
            data, st = _read(path)
        except FileNotFoundError:
            return {}
        except OSError as e:                       # unreadable (permissions): compile, do not touch it
            _warn(path, f"jitnet: cannot read kernel cache file {path} ({e}); compiling instead")
            return {}
        try:
            payload, _ = _split(data)
            f = io.BytesIO(payload)
            version = pickle.load(f)
            if version != self._version:           # written by another Numba version: stale, replaced on save
                return {}
            stamp, overloads = pickle.loads(f.read())
            if not isinstance(overloads, dict):
                raise _Damaged(f"index holds a {type(overloads).__name__}, not a dict")
        except Exception as e:
            reason = str(e) if isinstance(e, _Damaged) else f"{type(e).__name__}: {e}"
            _repair(path, st, reason, f"the index of {_func_name(self)}")
            return {}
        if stamp != self._source_stamp:            # the source changed: stale, replaced on save
            return {}
        return overloads

    def _save_index(self, overloads):
        payload = pickle.dumps(self._version, protocol=-1) + self._dump((self._source_stamp, overloads))
        with self._open_for_write(self._index_path) as f:
            f.write(payload + _trailer(payload, _NO_TAG))

    def load(self, key):
        overloads = self._load_index()
        name = overloads.get(key)
        if name is None:
            return None
        path = self._data_path(name)
        try:
            data, st = _read(path)
        except OSError:                            # removed while the index still names it
            return None
        try:
            payload, tag = _split(data)
            if tag is not None and tag != _key_tag(self, key):
                return None                        # another function's or signature's entry (racing writers)
            return pickle.loads(payload)
        except Exception as e:
            reason = str(e) if isinstance(e, _Damaged) else f"{type(e).__name__}: {e}"
            _repair(path, st, reason, f"{_func_name(self)}")
            return None

    def save(self, key, data):
        self._jn_tag = _key_tag(self, key)
        try:
            super().save(key, data)
        finally:
            self._jn_tag = None

    def _save_data(self, name, data):
        payload = self._dump(data)
        with self._open_for_write(self._data_path(name)) as f:
            f.write(payload + _trailer(payload, self._jn_tag or _NO_TAG))


class _CheckedCache:
    """Mixed into a dispatcher's Numba ``Cache``: a load or save that still fails recompiles, never raises."""

    _jn_checked = True

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:
            with _lock:
                _counters["cache_loads_failed"] += 1
            path = getattr(self._cache_file, "_index_path", self._cache_path)
            _warn(f"load:{path}:{sig}", f"jitnet: could not load {_func_name(self._cache_file)}{sig} from the "
                                        f"kernel cache ({type(e).__name__}: {e}); it is compiled again")
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as e:
            with _lock:
                _counters["cache_saves_failed"] += 1
            _warn(f"save:{self._cache_path}", f"jitnet: could not save a compiled kernel to {self._cache_path} "
                                              f"({type(e).__name__}: {e}); the next process compiles it again")


_FILE_ATTRS = ("_index_path", "_version", "_source_stamp", "_data_path", "_dump", "_open_for_write",
               "_load_index", "_save_index", "_save_data", "load", "save")
_subclasses: dict = {}


def _checked_class(mixin, cls):
    sub = _subclasses.get((mixin, cls))
    if sub is None:
        sub = _subclasses[(mixin, cls)] = type(f"Checked{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return sub


def _numba_cache(obj):
    """Return the Numba cache object of dispatcher ``obj``, or None (not a dispatcher, or caching off)."""
    if isinstance(obj, (type, types.ModuleType, types.FunctionType)):
        return None
    try:
        c = vars(obj).get("_cache")
    except TypeError:
        return None
    if c is None or not (hasattr(c, "_cache_file") and hasattr(c, "load_overload") and hasattr(c, "_cache_path")):
        return None
    return c


def _file_stamp(path: str):
    st = os.stat(path)
    return st.st_mtime, st.st_size


def protect(dispatcher, depends=()) -> bool:
    """Give a Numba dispatcher with ``cache=True`` jitnet's checked, self-repairing cache; return whether it has one.

    Only this dispatcher's cache objects change (their class becomes a checked subclass); Numba itself and
    other dispatchers are untouched. ``depends`` names source files whose functions the kernel inlines (Numba
    stamps a cache entry with its own file only): their stamps join the entry's, so editing one of them
    recompiles the kernel instead of loading code built from the old body.
    """
    c = _numba_cache(dispatcher)
    if c is None:
        return False
    if getattr(c, "_jn_checked", False):
        return True
    with _lock:
        f = c._cache_file
        if all(hasattr(f, a) for a in _FILE_ATTRS) and not isinstance(f, _CheckedIndexDataFile):
            f.__class__ = _checked_class(_CheckedIndexDataFile, type(f))
            if depends:
                try:
                    f._source_stamp = (f._source_stamp,) + tuple(_file_stamp(d) for d in depends)
                except OSError:
                    pass                        # a dependency not on disk (zipped install): Numba's own stamp
        c.__class__ = _checked_class(_CheckedCache, type(c))
    return True


def protect_module(module) -> int:
    """Protect every cached dispatcher among ``module``'s globals (and one level inside jitnet objects holding
    them, such as ``kernels_cpu.Adaptive``); ``module`` is a module or its name. Return how many are protected."""
    if isinstance(module, str):
        module = sys.modules[module]
    # files (beside the module) whose helpers its kernels inline: their edits must reach the cached kernels
    here = os.path.dirname(getattr(module, "__file__", None) or ".")
    deps = tuple(os.path.join(here, d) for d in getattr(module, "_CACHE_DEPENDS", ()))
    n = 0
    for v in list(vars(module).values()):
        if protect(v, deps):
            n += 1
        elif type(v).__module__.startswith("jitnet") and not isinstance(v, (type, types.ModuleType)):
            try:
                inner = list(vars(v).values())
            except TypeError:
                continue
            n += sum(protect(w, deps) for w in inner)
    return n


_scanned: set[str] = set()


def protect_loaded() -> int:
    """Protect the cached dispatchers of every ``jitnet.*`` module imported so far (each module scanned once, after
    its import finished); return how many were protected by this call."""
    n = 0
    for name, mod in list(sys.modules.items()):
        if mod is None or name in _scanned or not (name == "jitnet" or name.startswith("jitnet.")):
            continue
        if getattr(getattr(mod, "__spec__", None), "_initializing", False):
            continue                                # still importing: scanned by a later call
        _scanned.add(name)
        n += protect_module(mod)
    return n


# --------------------------------------------------------------------------------------------------------------
# Inspection and clearing (``python -m jitnet cache info|clear``)
# --------------------------------------------------------------------------------------------------------------

def _walk_pickles(data: bytes, count: int) -> None:
    """Check that ``data`` holds ``count`` complete pickles one after another, without unpickling them."""
    f = io.BytesIO(data)
    for _ in range(count):
        try:
            for _op in pickletools.genops(f):
                pass
        except Exception as e:
            raise _Damaged(f"truncated or garbled ({type(e).__name__}: {e})") from None


_STAMP = "# jitnet kernel sha256="


def stamp_source(source: str) -> str:
    """Return the text of a generated module's cache file: a line with the SHA-256 of ``source``, then ``source``."""
    return f"{_STAMP}{hashlib.sha256(source.encode()).hexdigest()}\n{source}"


class _NoClassUnpickler(pickle.Unpickler):
    """Unpickles plain data only (the version string heading an index)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")


def check_file(path: str) -> str | None:
    """Return why a file of jitnet's kernel cache is damaged (generated module, Numba index or data), or None."""
    try:
        data, _ = _read(path)
    except OSError as e:
        return f"unreadable ({e})"
    try:
        if path.endswith(".py"):
            if not data:
                raise _Damaged("empty file")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise _Damaged("not valid Python (UnicodeDecodeError)") from None
            if text.startswith(_STAMP):
                head, _, body = text.partition("\n")
                if head != _STAMP + hashlib.sha256(body.encode()).hexdigest():
                    raise _Damaged("checksum mismatch (truncated or garbled)")
            else:                                   # written before the checksum line: check what can be
                try:
                    compile(text, path, "exec")
                except (SyntaxError, ValueError) as e:
                    raise _Damaged(f"not valid Python ({type(e).__name__})") from None
                if not text.startswith("# jitnet generated"):
                    raise _Damaged("not a generated kernel module")
        elif path.endswith(".nbi"):
            payload, _ = _split(data)
            f = io.BytesIO(payload)
            try:
                version = _NoClassUnpickler(f).load()
            except Exception as e:
                raise _Damaged(f"truncated or garbled ({type(e).__name__}: {e})") from None
            if version == numba.__version__:         # another version's index is stale, not damaged
                _walk_pickles(f.read(), 1)
        elif path.endswith(".nbc"):
            payload, _ = _split(data)
            _walk_pickles(payload, 1)
    except _Damaged as e:
        return str(e)
    return None


def _numba_dirs(src_dir: str) -> list[str]:
    """Return the directory where Numba keeps compiled code of functions defined in ``src_dir`` in this
    configuration (Numba's locator order: ``$NUMBA_CACHE_DIR``, else a writable ``__pycache__`` beside the
    source, else the user-wide cache)."""
    sub = _CacheLocator.get_suitable_cache_subpath(os.path.join(src_dir, "x.py"))
    if _numba_config.CACHE_DIR:
        return [os.path.join(_numba_config.CACHE_DIR, sub)]
    intree = os.path.join(src_dir, "__pycache__")
    if os.access(intree if os.path.isdir(intree) else src_dir, os.W_OK):
        return [intree]
    return [os.path.join(AppDirs(appname="numba", appauthor=False).user_cache_dir, sub)]


def _package_dirs() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    for root, dirs, files in os.walk(here):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        if any(n.endswith(".py") for n in files):
            out.append(root)
    return out


def _numba_kind(name: str) -> str | None:
    """Return the kind of a Numba cache file name: 'index', 'data', 'leftover' (temporary or set aside), or None."""
    if ".damaged." in name or ".nbi.tmp." in name or ".nbc.tmp." in name:
        return "leftover"
    if name.endswith(".nbi"):
        return "index"
    if name.endswith(".nbc"):
        return "data"
    if name.endswith(".lcs"):
        return "index"
    return None


def _entries(kernel_dir: str | None = None):
    """Yield ``(location, kind, path)`` for every file of jitnet's kernel caches (generated and Numba's)."""
    kdir = os.path.abspath(kernel_dir or cache_dir())
    if os.path.isdir(kdir):
        for n in sorted(os.listdir(kdir)):
            p = os.path.join(kdir, n)
            if not os.path.isfile(p):
                continue
            if n.startswith("jitnet_k_") and n.endswith(".py"):
                yield kdir, "module", p
            elif n.startswith(".tmp-") and n.endswith(".py"):
                yield kdir, "leftover", p
        pyc = os.path.join(kdir, "__pycache__")
        if os.path.isdir(pyc):
            for n in sorted(os.listdir(pyc)):
                if n.startswith("jitnet_k_") and n.endswith(".pyc"):
                    yield pyc, "leftover", os.path.join(pyc, n)
    seen = set()
    for src in [kdir] + _package_dirs():
        for d in _numba_dirs(src):
            d = os.path.abspath(d)
            if d in seen or not os.path.isdir(d):
                continue
            seen.add(d)
            for n in sorted(os.listdir(d)):
                kind = _numba_kind(n)
                p = os.path.join(d, n)
                if kind and os.path.isfile(p):
                    yield d, kind, p


def info(kernel_dir: str | None = None, check: bool = True) -> dict:
    """Return a summary of jitnet's kernel caches: locations, file counts and sizes by kind, damaged files."""
    locations: dict[str, dict] = {}
    damaged = []
    for loc, kind, path in _entries(kernel_dir):
        row = locations.setdefault(loc, {"files": 0, "bytes": 0, "module": 0, "index": 0, "data": 0,
                                         "leftover": 0})
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        row["files"] += 1
        row["bytes"] += size
        row[kind] += 1
        if check and kind in ("module", "index", "data"):
            why = check_file(path)
            if why:
                damaged.append({"path": path, "problem": why})
    return {"kernel_dir": os.path.abspath(kernel_dir or cache_dir()),
            "numba_cache_dir": _numba_config.CACHE_DIR or None,
            "locations": locations,
            "files": sum(r["files"] for r in locations.values()),
            "bytes": sum(r["bytes"] for r in locations.values()),
            "modules": sum(r["module"] for r in locations.values()),
            "numba_files": sum(r["index"] + r["data"] for r in locations.values()),
            "leftovers": sum(r["leftover"] for r in locations.values()),
            "damaged": damaged}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def format_info(rep: dict) -> str:
    """Return the text ``python -m jitnet cache info`` prints for an :func:`info` summary."""
    ncd = rep["numba_cache_dir"] or "(unset: Numba caches in __pycache__ beside each source)"
    lines = [f"kernel cache:      {rep['kernel_dir']}",
             f"NUMBA_CACHE_DIR:   {ncd}",
             f"total:             {rep['files']} files, {_mb(rep['bytes'])}: {rep['modules']} generated modules, "
             f"{rep['numba_files']} Numba files, {rep['leftovers']} leftover temporary files"]
    for loc, r in sorted(rep["locations"].items()):
        parts = [f"{r[k]} {label}" for k, label in (("module", "modules"), ("index", "index"), ("data", "data"),
                                                     ("leftover", "leftover")) if r[k]]
        lines.append(f"  {loc}: {r['files']} files, {_mb(r['bytes'])} ({', '.join(parts)})")
    if rep["damaged"]:
        lines.append(f"damaged files:     {len(rep['damaged'])} (removed and recompiled when next used; "
                     f"or run `python -m jitnet cache clear`)")
        for d in rep["damaged"][:20]:
            lines.append(f"  {d['path']}: {d['problem']}")
        if len(rep["damaged"]) > 20:
            lines.append(f"  ... and {len(rep['damaged']) - 20} more")
    else:
        lines.append("damaged files:     none")
    return "\n".join(lines)


def clear(kernel_dir: str | None = None, dry_run: bool = False) -> list[tuple[str, int, int]]:
    """Remove jitnet's generated kernel modules and Numba's cache files of jitnet's kernels (other libraries'
    Numba caches and Python's own bytecode are left alone); return ``(location, files, bytes)`` per location."""
    out: dict[str, list[int]] = {}
    for loc, _kind, path in list(_entries(kernel_dir)):
        try:
            size = os.path.getsize(path)
            if not dry_run:
                os.unlink(path)
        except OSError:                 # gone already, or not ours to remove
            continue
        row = out.setdefault(loc, [0, 0])
        row[0] += 1
        row[1] += size
    if not dry_run:                 # drop directories left empty (never a package's own __pycache__)
        kdir = os.path.abspath(kernel_dir or cache_dir())
        empty = [os.path.join(kdir, "__pycache__")]
        for src in [kdir] + _package_dirs():
            empty += [d for d in _numba_dirs(src) if src == kdir or os.path.basename(d) != "__pycache__"]
        for d in empty:
            try:
                os.rmdir(d)         # only when empty
            except OSError:
                pass
    return [(loc, n, b) for loc, (n, b) in out.items()]


def cli(action: str, as_json: bool = False, dry_run: bool = False, out=None) -> int:
    """Run ``python -m jitnet cache info|clear``: print the report (text or JSON) to ``out``; return the exit code."""
    out = out or sys.stdout
    if action == "info":
        rep = info()
        print(json.dumps(rep, indent=2) if as_json else format_info(rep), file=out)
        return 0
    removed = clear(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    if as_json:
        print(json.dumps({"dry_run": dry_run, "removed": [{"location": loc, "files": n, "bytes": b}
                                                          for loc, n, b in removed]}, indent=2), file=out)
        return 0
    for loc, n, b in removed:
        print(f"{verb} {n} files ({_mb(b)}) from {loc}", file=out)
    total = sum(n for _, n, _ in removed)
    print(f"{verb} {total} files in all" if removed else f"nothing to remove: no cached kernels under "
          f"{os.path.abspath(cache_dir())} or Numba's cache of jitnet", file=out)
    return 0
