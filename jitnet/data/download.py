"""Locating dataset files on disk, fetching them when they are missing, and
checking every fetched file against its published size and digests.

Every dataset loader in :mod:`jitnet.data.datasets` resolves its files through
:func:`find_dataset_files`, which looks, in this order, at

1. an explicit ``path`` argument (a directory, or the file itself for
   single-file datasets); when given, nothing else is searched,
2. ``$JITNET_DATA/<name>`` (``JITNET_DATA`` may list several roots separated
   by ``os.pathsep``),
3. the user cache, ``$XDG_CACHE_HOME/jitnet/datasets/<name>`` or
   ``~/.cache/jitnet/datasets/<name>``,
4. system dataset directories such as ``/usr/share/datasets/<name>``,
5. a download into the user cache (only when ``download=True``).

Files in the user cache are checked on every hit: against the published size
and digests of a :class:`RemoteFile`, or against the digests recorded when an
archive was unpacked.  A small sidecar (``.jitnet-verified.json`` in the cache
directory) remembers each verified file's size and mtime so that an unchanged
file is not hashed again.  A damaged cached file is removed with a warning and
fetched afresh.  Files under an explicit path, ``$JITNET_DATA`` or a system
directory belong to the user and are checked by the readers' format checks
only (a repacked ``.gz`` holds the same data under a different digest).

Downloads go to a private temporary file in the target directory, are checked
(size, digests, no HTML page in place of the file) and only then renamed into
place, so a partial or wrong answer is never kept.  Transient failures
(timeouts, dropped connections, truncated bodies, HTTP 5xx/408/429) are retried
with exponential backoff; the other failures move on to the next source.
``$JITNET_DATA_MIRROR`` (whitespace-separated base URLs) replaces the canonical
sources: a file ``<name>/<file>`` is fetched from ``<mirror>/<name>/<file>``
and checked against the same published digests.

When all of that fails a :class:`FileNotFoundError` lists every place that
was looked at and explains how to obtain the data.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ChecksumError",
    "DownloadError",
    "MIRROR_ENV",
    "RemoteFile",
    "dataset_cache_dir",
    "download_url",
    "fetch_remote",
    "file_digests",
    "find_dataset_files",
    "record_verified",
    "sha256_file",
    "source_urls",
    "verify_cached_file",
]

_CHUNK = 1 << 20
MIRROR_ENV = "JITNET_DATA_MIRROR"
SIDECAR = ".jitnet-verified.json"
_ALGOS = ("sha256", "md5", "sha1")


class DownloadError(OSError):
    """A file could not be fetched; the message names the sources tried and the next step."""


class ChecksumError(ValueError):
    """A file's size or digest differs from the expected (published) value."""


@dataclass(frozen=True)
class RemoteFile:
    """One published dataset file: its sources, size and published digests.

    ``source`` says where the digests were published.  Any of ``sha256``,
    ``md5`` and ``sha1`` may be None; every digest that is given is checked.
    """

    dataset: str
    filename: str
    urls: tuple[str, ...] = ()
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    sha1: str | None = None
    source: str = ""

    @property
    def key(self) -> str:
        """Return ``"<dataset>/<filename>"``, the file's path under a data root or mirror."""
        return f"{self.dataset}/{self.filename}"

    def digests(self) -> dict[str, str]:
        """Return the known digests as ``{algorithm: lowercase hex}``."""
        out = {}
        for algo in _ALGOS:
            value = getattr(self, algo)
            if value:
                out[algo] = value.lower()
        return out

    def describe(self) -> str:
        """Return a human-readable summary of the expected size and digests."""
        parts = [f"{self.size} bytes"] if self.size is not None else []
        parts += [f"{algo} {value}" for algo, value in self.digests().items()]
        return ", ".join(parts) if parts else "no published size or digest"


def dataset_cache_dir(name: str) -> str:
    """Return the per-user cache directory for dataset ``name`` (not created)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jitnet", "datasets", name)


def file_digests(path: str, algos: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Return ``{algorithm: hex digest}`` of the file at ``path``, reading it once."""
    hashers = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def sha256_file(path: str) -> str:
    """Return the hex sha256 digest of the file at ``path``."""
    return file_digests(path, ("sha256",))["sha256"]


class _Progress:
    """Progress display: tqdm when importable, else a one-line percentage on stderr."""

    def __init__(self, total: int | None, desc: str, enabled: bool):
        self.total = total
        self.done = 0
        self.enabled = enabled
        self._bar = None
        self._last_pct = -1
        if not enabled:
            return
        try:
            from tqdm import tqdm  # optional dependency
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
        else:
            self._desc = desc

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.total:
            pct = int(100 * self.done / self.total)
            if pct != self._last_pct:
                self._last_pct = pct
                sys.stderr.write(f"\r{self._desc}: {pct:3d}% ({self.done}/{self.total} bytes)")
                sys.stderr.flush()
        elif self.done // (1 << 20) != (self.done - n) // (1 << 20):
            sys.stderr.write(f"\r{self._desc}: {self.done >> 20} MiB")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Retryable(Exception):
    """A transient failure of one attempt: worth trying the same URL again."""


def _is_html(content_type: str, head: bytes) -> bool:
    if content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    start = head.lstrip()[:15].lower()
    return start.startswith(b"<!doctype html") or start.startswith(b"<html")


def _part_path(dest: str) -> str:
    """Create and return a private temporary file next to ``dest`` (``<dest>.<pid>.<rand>.part``)."""
    parent = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(dest)}.{os.getpid()}.", suffix=".part", dir=parent)
    os.close(fd)
    return tmp


def _remove_stale_parts(directory: str) -> None:
    """Remove ``*.part`` files left in ``directory`` by downloads whose process is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.endswith(".part"):
            continue
        fields = name[: -len(".part")].rsplit(".", 2)
        if len(fields) != 3 or not fields[1].isdigit():
            continue
        pid = int(fields[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # the writer is gone: an orphan
        except OSError:
            continue  # alive (or not ours to signal)
        else:
            continue
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass


def _download_once(
    url: str,
    part: str,
    expected: dict[str, str],
    size: int | None,
    progress: bool,
    timeout: float,
    reject_html: bool,
    desc: str,
) -> None:
    """Fetch ``url`` into ``part`` and check it; raise _Retryable for transient failures."""
    hashers = {a: hashlib.new(a) for a in expected}
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        msg = f"HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retryable(msg) from None
        raise DownloadError(msg) from None
    except urllib.error.URLError as exc:
        if urllib.parse.urlparse(url).scheme == "file":
            raise DownloadError(f"cannot read {url}: {exc.reason}") from None
        if isinstance(exc.reason, socket.gaierror):  # no such host, or offline: retrying won't help
            raise DownloadError(f"cannot resolve the host: {exc.reason}") from None
        raise _Retryable(f"cannot connect: {exc.reason}") from None
    except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from None
    done = 0
    with resp:
        headers = resp.headers if resp.headers is not None else {}
        length = headers.get("Content-Length")
        total = int(length) if length and length.strip().isdigit() else None
        ctype = headers.get("Content-Type", "") or ""
        if reject_html and _is_html(ctype, b""):
            raise DownloadError(f"the server answered with an HTML page instead of the file (Content-Type {ctype})")
        if total is not None and size is not None and total != size:
            raise ChecksumError(
                f"server announces {total} bytes, expected {size}: it is serving a different file"
            )
        bar = _Progress(total if total is not None else size, desc, progress)
        try:
            with open(part, "wb") as out:
                first = True
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except http.client.IncompleteRead as exc:
                        raise _Retryable(f"connection closed after {done + len(exc.partial)} bytes") from None
                    except (TimeoutError, socket.timeout) as exc:
                        raise _Retryable(f"read timed out after {done} bytes ({exc})") from None
                    except (ConnectionError, http.client.HTTPException) as exc:
                        raise _Retryable(f"{type(exc).__name__} after {done} bytes: {exc}") from None
                    if not chunk:
                        break
                    if first:
                        first = False
                        if reject_html and _is_html(ctype, chunk):
                            raise DownloadError(
                                "the server answered with an HTML page instead of the file "
                                f"(Content-Type {ctype or 'unset'}; starts {chunk.lstrip()[:40]!r})"
                            )
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
                    if size is not None and done > size:
                        raise ChecksumError(f"the answer is longer than the expected {size} bytes")
                out.flush()
                os.fsync(out.fileno())
        finally:
            bar.close()
    if total is not None and done != total:
        raise _Retryable(f"truncated: expected {total} bytes got {done}")
    if size is not None and done != size:
        if done < size:
            raise _Retryable(f"truncated: expected {size} bytes got {done}")
        raise ChecksumError(f"size mismatch: expected {size} bytes got {done}")
    for algo, want in expected.items():
        got = hashers[algo].hexdigest()
        if got != want:
            raise ChecksumError(f"{algo} mismatch: expected {want} got {got}")


def download_url(
    url: str,
    dest: str,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    *,
    md5: str | None = None,
    sha1: str | None = None,
    size: int | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    reject_html: bool = True,
) -> str:
    """Download ``url`` to ``dest`` atomically, check it, and return ``dest``.

    The bytes go to a private ``<dest>.<pid>.<random>.part`` file that is
    renamed to ``dest`` only after the size (``size`` and the server's
    Content-Length) and every given digest match; otherwise nothing is left at
    ``dest`` and :class:`ChecksumError` (a ValueError) or
    :class:`DownloadError` (an OSError) is raised.  Timeouts, dropped
    connections, truncated bodies and HTTP 5xx/408/429 answers are retried up
    to ``retries`` times, waiting ``backoff * 2**k`` seconds before retry k.
    An HTML page in place of the file is refused when ``reject_html``.  Any
    URL scheme :mod:`urllib` supports works, including ``file://``.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    expected = {a: v.lower() for a, v in (("sha256", sha256), ("md5", md5), ("sha1", sha1)) if v}
    attempts = max(0, int(retries)) + 1
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * (2 ** (attempt - 1)))
        part = _part_path(dest)
        try:
            _download_once(url, part, expected, size, progress, timeout, reject_html, os.path.basename(dest))
            os.replace(part, dest)
            return dest
        except _Retryable as exc:
            last = exc
        except ChecksumError as exc:
            raise ChecksumError(f"{url} (saving to {dest}): {exc}") from None
        except DownloadError as exc:
            raise DownloadError(f"{url}: {exc}") from None
        finally:
            if os.path.exists(part):
                try:
                    os.remove(part)
                except OSError:
                    pass
    raise DownloadError(f"{url}: {last} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")


# --------------------------------------------------------------------------- #
# Verified-file sidecar
# --------------------------------------------------------------------------- #


def _load_sidecar(directory: str) -> dict:
    try:
        with open(os.path.join(directory, SIDECAR), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_sidecar(directory: str, data: dict) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=SIDECAR + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(directory, SIDECAR))
    except OSError:
        pass  # a read-only cache only costs a rehash next time


def _sidecar_key(root: str, path: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")


def record_verified(root: str, path: str, digests: Mapping[str, str]) -> None:
    """Remember in ``root``'s sidecar that ``path`` (as it is now) has ``digests``."""
    st = os.stat(path)
    data = _load_sidecar(root)
    data[_sidecar_key(root, path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **dict(digests)}
    _save_sidecar(root, data)


def _forget(root: str, paths: Iterable[str]) -> None:
    data = _load_sidecar(root)
    changed = False
    for p in paths:
        changed |= data.pop(_sidecar_key(root, p), None) is not None
    if changed:
        _save_sidecar(root, data)


def verify_cached_file(root: str, path: str, spec: RemoteFile | None = None) -> str | None:
    """Check a file of the cache directory ``root``; return None when it is good, else the problem.

    The expected size and digests come from ``spec`` when given, else from the
    sidecar entry recorded when the file was unpacked.  A file with neither is
    accepted (the readers' format checks still apply).  A file whose size and
    mtime match a sidecar entry that already holds the expected digests is
    accepted without hashing it again.
    """
    entry = _load_sidecar(root).get(_sidecar_key(root, path))
    entry = entry if isinstance(entry, dict) else None
    if spec is not None:
        expected, size = spec.digests(), spec.size
    elif entry is not None:
        expected = {a: str(entry[a]) for a in _ALGOS if a in entry}
        size = entry.get("size")
    else:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat: {exc}"
    if size is not None and st.st_size != size:
        return f"size {st.st_size} bytes, expected {size}"
    if not expected:
        return None
    if (
        entry is not None
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and all(entry.get(a) == v for a, v in expected.items())
    ):
        return None
    try:
        got = file_digests(path, expected)
    except OSError as exc:
        return f"cannot read: {exc}"
    for algo, want in expected.items():
        if got[algo] != want:
            return f"{algo} {got[algo]}, expected {want}"
    record_verified(root, path, expected)
    return None


# --------------------------------------------------------------------------- #
# Fetching known files
# --------------------------------------------------------------------------- #


def _mirrors_from_env() -> list[str]:
    return os.environ.get(MIRROR_ENV, "").split()


def source_urls(spec: RemoteFile, mirrors: Sequence[str] | None = None) -> list[str]:
    """Return the URLs to try for ``spec``: the mirrors' (``mirrors`` or $JITNET_DATA_MIRROR), else its own."""
    if mirrors is None:
        mirrors = _mirrors_from_env()
    if mirrors:
        return [f"{m.rstrip('/')}/{spec.dataset}/{spec.filename}" for m in mirrors]
    return list(spec.urls)


def fetch_remote(
    spec: RemoteFile,
    directory: str,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> str:
    """Download ``spec`` into ``directory`` from the first source that gives the right bytes; return its path.

    A good copy already there is kept (checked by size and digests); a bad
    one is replaced.  When every source fails, :class:`DownloadError` names
    each URL with its failure and says how to put the file in place by hand.
    """
    os.makedirs(directory, exist_ok=True)
    _remove_stale_parts(directory)
    dest = os.path.join(directory, spec.filename)
    if os.path.isfile(dest):
        if verify_cached_file(directory, dest, spec) is None:
            return dest
        os.remove(dest)
        _forget(directory, [dest])
    urls = source_urls(spec, mirrors)
    errors = []
    for url in urls:
        try:
            download_url(
                url, dest, sha256=spec.sha256, md5=spec.md5, sha1=spec.sha1, size=spec.size,
                progress=progress, timeout=timeout, retries=retries, backoff=backoff,
            )
        except (OSError, ValueError) as exc:
            errors.append(str(exc))
            continue
        record_verified(directory, dest, spec.digests())
        return dest
    raise DownloadError(_next_step(spec, dest, urls, errors))


def _next_step(spec: RemoteFile, dest: str, urls: Sequence[str], errors: Sequence[str]) -> str:
    lines = [f"could not download {spec.key}:"]
    lines += [f"  - {e}" for e in errors] or ["  - no source URL is known"]
    url = spec.urls[0] if spec.urls else (urls[0] if urls else "<a copy of the file>")
    check = ""
    if spec.digests():
        algo, value = next(iter(spec.digests().items()))
        check = f" and check it: {spec.describe()} (`{algo}sum {dest}` must print {value})"
    elif spec.size is not None:
        check = f" and check it is {spec.size} bytes"
    lines.append(
        f"Next step: download {url} by hand (for example `curl -L -o {dest} {url}`), "
        f"put it at {dest}{check}; then run again. "
        f"Or set {MIRROR_ENV} to a server holding {spec.key}."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Resolution
# --------------------------------------------------------------------------- #

Required = Sequence[Sequence[str]]  # per needed file: accepted relative paths


def _match_dir(directory: str, required: Required) -> list[str] | None:
    """Return the matching file for each requirement under ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    found = []
    for alternatives in required:
        for rel in alternatives:
            p = os.path.join(directory, rel)
            if os.path.isfile(p):
                found.append(p)
                break
        else:
            return None
    return found


def _remove_damaged(
    cache: str, found: Sequence[str], known: Mapping[str, RemoteFile] | None, will_fetch: bool
) -> list[str]:
    """Verify cache hits; set damaged ones aside (one warning each) and return their names.

    A file jitnet downloaded or unpacked (it has a sidecar entry) is removed;
    one without an entry may have been put there by hand, so it is renamed to
    ``<name>.rejected`` instead of being deleted.
    """
    damaged = []
    recorded = _load_sidecar(cache)
    for path in found:
        rel = _sidecar_key(cache, path)
        spec = known.get(rel) if known else None
        problem = verify_cached_file(cache, path, spec)
        if problem is None:
            continue
        if rel in recorded:
            what = "removed"
            try:
                os.remove(path)
            except OSError:
                pass
        else:
            what = f"moved aside to {path}.rejected"
            os.replace(path, path + ".rejected")
        _forget(cache, [path])
        damaged.append(rel)
        then = "it will be downloaded again" if will_fetch else "call again with download=True to fetch it"
        warnings.warn(
            f"{path}: cached dataset file does not match the published checksum ({problem}); {what}; {then}. "
            f"Copies of your own belong in $JITNET_DATA/<name> or an explicit path",
            RuntimeWarning,
            stacklevel=3,
        )
    return damaged


def _describe(required: Required) -> str:
    return ", ".join(" or ".join(alts) for alts in required)


def find_dataset_files(
    name: str,
    required: Required,
    path: str | os.PathLike | None = None,
    system_dirs: Sequence[str] = (),
    download: bool = False,
    fetch: Callable[[str], None] | None = None,
    how_to_get: str = "",
    known: Mapping[str, RemoteFile] | None = None,
) -> list[str]:
    """Return the paths of the files a dataset needs, searching the standard places.

    ``required`` has one entry per needed file, each a list of accepted paths
    relative to a dataset directory (for example the ``.gz`` and the plain
    name).  ``fetch(cache_dir)`` is called to download into the cache when
    ``download`` is true and nothing was found elsewhere.  Files found in the
    user cache are verified (``known`` maps paths relative to the dataset
    directory to their published :class:`RemoteFile`; other files are checked
    against the sidecar); a damaged one is removed with a warning and the
    search goes on as if it were missing.
    """
    looked: list[str] = []

    if path is not None:
        path = os.fspath(path)
        if os.path.isfile(path) and len(required) == 1:
            return [path]
        found = _match_dir(path, required)
        if found is not None:
            return found
        raise FileNotFoundError(
            f"{name}: explicit path {path!r} does not hold the needed files ({_describe(required)})"
            + (f".\nTo get the data: {how_to_get}" if how_to_get else "")
        )

    env = os.environ.get("JITNET_DATA")
    if env:
        for root in env.split(os.pathsep):
            if not root:
                continue
            d = os.path.join(root, name)
            found = _match_dir(d, required)
            if found is not None:
                return found
            looked.append(f"$JITNET_DATA/{name}: {d}")
    else:
        looked.append(f"$JITNET_DATA/{name}: (JITNET_DATA is not set)")

    cache = dataset_cache_dir(name)
    found = _match_dir(cache, required)
    if found is not None:
        damaged = _remove_damaged(cache, found, known, download and fetch is not None)
        if not damaged:
            return found
        looked.append(f"user cache: {cache} (removed damaged {', '.join(damaged)})")
    else:
        looked.append(f"user cache: {cache}")

    for d in system_dirs:
        found = _match_dir(d, required)
        if found is not None:
            return found
        looked.append(f"system directory: {d}")

    if download and fetch is not None:
        try:
            fetch(cache)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            detail = str(exc).replace("\n", "\n    ")
            looked.append(f"download into {cache} failed: {detail}")
        else:
            found = _match_dir(cache, required)
            if found is not None:
                return found
            looked.append(f"download into {cache} finished but the files are still missing")
    elif fetch is not None:
        looked.append("download: not attempted (download=False)")

    msg = [f"could not find dataset {name!r} (needs {_describe(required)}). Looked in:"]
    msg += [f"  - {item}" for item in looked]
    msg.append(
        f"To get the data: pass path=<directory>, set JITNET_DATA so that $JITNET_DATA/{name} "
        f"holds the files, or put them in {cache} (files there must match the published checksums)"
        + ("; or call again with download=True" if fetch is not None else "")
        + (f". Source: {how_to_get}" if how_to_get else ".")
    )
    raise FileNotFoundError("\n".join(msg))
