"""Crash-safe file replacement: write to a sibling temp file, fsync, rename, fsync the directory."""
import contextlib
import os
import tempfile

# Read the process umask once so new files get ordinary permissions (mkstemp creates 0600).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

TEMP_SUFFIX = ".tmp"


def temp_prefix(path):
    """Return the name prefix used for temporary files that will become ``path``."""
    return "." + os.path.basename(path) + "."


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
    after a hard kill, the temporary file is removed.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', not {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
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
