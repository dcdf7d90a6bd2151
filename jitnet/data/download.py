"""Locating dataset files on disk and fetching them when they are missing.

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

When all of that fails a :class:`FileNotFoundError` lists every place that
was looked at and explains how to obtain the data.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

__all__ = [
    "dataset_cache_dir",
    "download_url",
    "find_dataset_files",
    "sha256_file",
]

_CHUNK = 1 << 16


def dataset_cache_dir(name: str) -> str:
    """Return the per-user cache directory for dataset ``name`` (not created)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jitnet", "datasets", name)


def sha256_file(path: str) -> str:
    """Return the hex sha256 digest of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


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


def download_url(
    url: str,
    dest: str,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> str:
    """Download ``url`` to ``dest`` atomically (via ``dest + '.part'``) and return ``dest``.

    When ``sha256`` is given the digest of the downloaded bytes must match or a
    ``ValueError`` is raised and nothing is left at ``dest``.  Any URL scheme
    supported by :mod:`urllib` works, including ``file://``.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    part = dest + ".part"
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length") if resp.headers else None
            total = int(length) if length and length.isdigit() else None
            bar = _Progress(total, os.path.basename(dest), progress)
            try:
                with open(part, "wb") as out:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            finally:
                bar.close()
        if total is not None and bar.done != total:
            raise ValueError(f"download of {url} is truncated: expected {total} bytes got {bar.done}")
        digest = h.hexdigest()
        if sha256 is not None and digest.lower() != sha256.lower():
            raise ValueError(
                f"sha256 mismatch for {url} (saving to {dest}): expected {sha256.lower()} got {digest}"
            )
        os.replace(part, dest)
    except BaseException:
        try:
            os.remove(part)
        except OSError:
            pass
        raise
    return dest


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
) -> list[str]:
    """Return the paths of the files a dataset needs, searching the standard places.

    ``required`` has one entry per needed file, each a list of accepted paths
    relative to a dataset directory (for example the ``.gz`` and the plain
    name).  ``fetch(cache_dir)`` is called to download into the cache when
    ``download`` is true and nothing was found elsewhere.
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
        return found
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
            looked.append(f"download into {cache} failed: {exc}")
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
        f"holds the files, or put them in {cache}"
        + ("; or call again with download=True" if fetch is not None else "")
        + (f". Source: {how_to_get}" if how_to_get else ".")
    )
    raise FileNotFoundError("\n".join(msg))
