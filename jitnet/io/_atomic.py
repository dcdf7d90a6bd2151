"""Crash-safe file replacement: write to a sibling temp file, fsync, rename, fsync the directory.

Temporary files are named ``.<target>.<pid>-<host>-<random>.tmp`` so that a later save can tell
an orphan of a crashed (killed) writer from a file another live process is writing right now:
``remove_stale_temps`` deletes one only when its writer is known to be dead (same host, no such
process) or it has not been written to for ``STALE_SECONDS``.
"""
import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from typing import NamedTuple

# Read the process umask once so new files get ordinary permissions (mkstemp creates 0600).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

TEMP_SUFFIX = ".tmp"
#: A temp file untouched this long is an orphan even when its writer's liveness cannot be checked.
STALE_SECONDS = 3600.0

_TEMP_RE = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d{1,10})-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}"
                      + re.escape(TEMP_SUFFIX) + r"\Z", re.DOTALL)
# Names written by earlier versions (tempfile.mkstemp's 8 random characters, no pid): only
# checkpoint files and the Saver index are matched, and only the age rule applies to them.
_LEGACY_RE = re.compile(r"\.(?P<target>.+\.safetensors|checkpoint)\.[a-z0-9_]{8}"
                        + re.escape(TEMP_SUFFIX) + r"\Z", re.DOTALL)
_HOST = None


class TempName(NamedTuple):
    """The parts of a temporary file name: the file it will become, the writer's pid and host token."""
    target: str
    pid: int
    host: str


def host_token():
    """Return 8 hex digits identifying this machine (a hash of its host name)."""
    global _HOST
    if _HOST is None:
        _HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
    return _HOST


def temp_prefix(path):
    """Return the name prefix used for temporary files that will become ``path``."""
    return "." + os.path.basename(path) + "."


def parse_temp_name(name):
    """Return the ``TempName`` of a temporary file name this module writes, or None for any other name."""
    m = _TEMP_RE.match(name)
    if m is None:
        return None
    return TempName(m.group("target"), int(m.group("pid")), m.group("host"))


def _pid_alive(pid):
    """Return False only when no process ``pid`` exists on this machine (POSIX), else True."""
    if os.name != "posix" or pid <= 0:
        return True  # cannot tell (and os.kill would terminate the process on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def remove_stale_temps(directory, now=None):
    """Return the names of orphaned temporary files of this module removed from ``directory``.

    A file counts as orphaned when its name has this module's temp pattern and either its writer
    (same host) no longer exists, or it was last modified more than ``STALE_SECONDS`` ago. Files
    that cannot be inspected or removed are left alone; other names are never touched.
    """
    now = time.time() if now is None else now
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    removed = []
    for name in names:
        if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
            continue
        info = parse_temp_name(name)
        if info is None and _LEGACY_RE.match(name) is None:
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        stale = now - st.st_mtime > STALE_SECONDS
        if not stale and info is not None and info.host == host_token():
            stale = not _pid_alive(info.pid)
        if stale:
            try:
                os.unlink(path)
            except OSError:
                continue
            removed.append(name)
    return removed


def _create_temp(directory, path):
    """Return (fd, temp path) of a new, exclusively created temporary file for ``path``."""
    prefix = f"{temp_prefix(path)}{os.getpid()}-{host_token()}-"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, prefix + secrets.token_hex(4) + TEMP_SUFFIX)
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", directory)


def fsync_directory(directory):
    """Return None after flushing the directory entry table of ``directory`` to disk (no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory or ".", flags)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None, newline=None):
    """Yield a file object whose contents replace ``path`` atomically when the block exits cleanly.

    If the block raises (or the process dies), ``path`` keeps its previous contents and, except
    after a hard kill, the temporary file is removed (after a hard kill, by ``remove_stale_temps``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', not {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, path)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
        except (AttributeError, OSError):
            pass
        kwargs = {} if "b" in mode else {"encoding": encoding or "utf-8", "newline": newline}
        with os.fdopen(fd, mode, **kwargs) as f:
            fd = None
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_directory(directory)
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
