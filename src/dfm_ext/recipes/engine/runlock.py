"""One owner per run folder: ``run.lock``, held by the main process for as long as it trains.

Two launches on one ``train.output_dir`` would both train, delete each other's unfinished checkpoints and log every
step twice. The lock is an exclusive ``flock``, which the operating system drops when its process dies however it
dies, so a crashed run never blocks the next one; where the filesystem has no ``flock`` (some network mounts), the
owner's record (process id, host, start time, command) alone decides. What a user sees: docs/recipes/index.md.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from dfm_ext.recipes.engine.config import ConfigError

__all__ = ["LOCK_FILE", "RunFolderBusy", "RunLock", "check_shared_folder", "lock_record"]

#: The lock file inside a run folder.
LOCK_FILE = "run.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunFolderBusy(ConfigError):
    """Another live run owns the run folder (a usage error: exit status 2, before any compute)."""


def _describe(owner: dict[str, Any]) -> str:
    return (f"process {owner.get('pid', '?')} on host {owner.get('host', '?')} (started {owner.get('started', '?')}, "
            f"command: {owner.get('command', '?')})")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """The lock of the run folder ``folder`` (``acquire`` on the main process only; ``release`` is idempotent)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a notice when a dead owner's record was taken over, else ``None``; raises
        :class:`RunFolderBusy` naming the owner when a live run holds it."""
        if self._fd is not None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise self._busy(self._read(fd), "") from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                locked = False
            previous = self._read(fd)
            if previous and not locked:  # no flock here: only a dead process on this host can be told apart
                if previous.get("host") != socket.gethostname():
                    raise self._busy(previous, f"; this filesystem has no file locks, so a run on another host cannot be checked: "
                                               f"delete {self.path} once that run is known to be gone")  # fmt: skip
                if _alive(int(previous.get("pid", -1))) and previous.get("pid") != os.getpid():
                    raise self._busy(previous, "")
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return f"taking over {self.path} from {_describe(previous)}, which is no longer running" if previous else None

    def release(self) -> None:
        """Empty the record and drop the lock (the file stays: deleting it could split two waiting launches)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    def _busy(self, owner: dict[str, Any], why: str) -> RunFolderBusy:
        who = _describe(owner) if owner else "another process (its record is not written yet)"
        return RunFolderBusy(
            f"train.output_dir={str(self.folder)!r} is in use by {who}{why}; wait for that run to end, or choose another train.output_dir"
        )

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        raw = os.pread(fd, 1 << 16, 0)
        try:
            record = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable record {raw[:80]!r}"}
        return record if isinstance(record, dict) else {}

    @staticmethod
    def _write(fd: int) -> None:
        record = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)[:500],
        }  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)


def lock_record(folder: str | Path) -> str:
    """The text of ``folder``'s lock record as this process sees it ("" when there is none)."""
    try:
        return (Path(folder) / LOCK_FILE).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return ""


def check_shared_folder(folder: str | Path, seen: list[tuple[int, str, bool]]) -> None:
    """Refuse a run folder that is not one folder for every process: ``seen`` holds, per process, its index, host and
    whether it reads the main process's lock record there. Every process writes its share of a checkpoint into the
    same step folder and reads all of them on resume, so a node-local ``train.output_dir`` would split every checkpoint
    between the nodes without an error until the resume."""
    blind = [(index, host) for index, host, ok in seen if not ok]
    if blind:
        who = ", ".join(f"process {index} on {host}" for index, host in blind)
        raise ConfigError(
            f"train.output_dir={str(folder)!r} is not one folder for every process: {who} do(es) not see the main process's "
            f"{LOCK_FILE} in it; put the run on a filesystem every node sees (docs/recipes/multinode.md)"
        )
