"""Atomic writes: a file or a folder appears complete or not at all (the one helper of the tree).

A crash, a full disk or an exception while writing leaves the previous content (or nothing) in
place, never a half-written file or folder: content goes to a temporary sibling first, is
flushed (``fsync``) and then renamed over the target (``os.replace``, atomic on POSIX).

* :func:`atomic_write_bytes` / :func:`atomic_write_text`: one file.
* :func:`atomic_directory`: a context manager yielding a temporary folder to fill; on success it
  becomes ``path`` (an existing ``path`` is moved aside first and removed after), on error it is
  removed. Between the two renames of a replacement ``path`` is briefly absent, never partial.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "model") as tmp:
    ...     _ = atomic_write_text(tmp / "config.json", "{}")
    >>> sorted(p.name for p in root.iterdir()), (root / "model" / "config.json").read_text()
    (['model'], '{}')
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_text", "fsync_directory"]


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


# The temporary file or folder would keep mkstemp's 0600 / mkdtemp's 0700: what a plain open()
# or mkdir() makes instead (the umask's), so that a team on a shared cluster can read a run's files.
_UMASK = _read_umask()
_FILE_MODE, _DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling, ``fsync`` and ``os.replace``. Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``. Returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it is renamed to ``path``.

    An existing ``path`` is replaced as a whole (moved aside, then deleted once the new folder is
    in place): callers that must not delete foreign files check the old folder first. On an
    exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(_DIR_MODE)
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous folder back
                os.replace(old / path.name, path)
            raise
        fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
