"""Atomic, verified, pruned checkpoints on top of ``accelerator.save_state``.

Layout under ``<run>/checkpoints``::

    step-000200/            complete checkpoints (accelerate state + ``extra_state.pt`` + ``complete.json``)
    step-000400/
    corrupt-step-000600/    a checkpoint that failed verification, moved aside at resume (kept, never read)
    latest                  text file naming the newest checkpoint written, e.g. "step-000400"

A checkpoint is written into ``tmp-<step>``; once every process finished writing, the main
process writes ``complete.json`` (the size and SHA-256 of every file in the folder) *last*,
then renames the folder (``os.replace``, atomic on POSIX) to ``step-<step>`` and rewrites
``latest`` through a temporary file. ``complete.json`` is what makes a checkpoint count:
:func:`verify_manifest` checks sizes and hashes against it, so a file truncated or damaged
after the fact (a copy cut short, a full disk, bit rot) is detected before anything is loaded.
SHA-256 from ``hashlib`` was chosen over faster non-cryptographic hashes because it is in the
standard library and measured 0.9 GB/s here: a few seconds for a multi-GB optimiser state,
once per checkpoint written and once per checkpoint resumed from.

:func:`find_resumable` picks the newest step folder that verifies, whatever ``latest`` says
(the marker is informational); newer ones that fail are reported so the caller can warn and
move them aside with :func:`quarantine`. Checkpoints written before ``complete.json`` existed
("legacy") are validated by opening every file the way resume will (safetensors header,
``torch.load(weights_only=True)``). :func:`save_checkpoint` never writes over an existing
step folder, and leftover ``tmp-*`` folders (a crash or a full disk while writing) are removed
by :func:`clean_partial` at the next start. The output folder must be on a filesystem that
every process (and node) sees.

Objects beyond the model and optimiser (LR scheduler, EMA, step counters) are *not* handed to
``accelerator.register_for_checkpointing``: accelerate reloads those with a full pickle
(``torch.load(weights_only=False)``), which runs code from the file. They are written here into
``extra_state.pt`` and read back with ``weights_only=True``, so resuming from a checkpoint
someone else wrote cannot execute anything; accelerate itself loads the model from safetensors
and the optimiser and RNG states with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from dfm_ext.fileio import atomic_write_text, fsync_directory

__all__ = [
    "DISK_FULL_ERRNOS",
    "MANIFEST",
    "CorruptCheckpointError",
    "DiskFullError",
    "Resumable",
    "Stateful",
    "check_checkpoint",
    "clean_partial",
    "disk_full_error",
    "find_latest",
    "find_resumable",
    "list_checkpoints",
    "load_checkpoint",
    "load_extra_state",
    "quarantine",
    "save_checkpoint",
    "step_dir_name",
    "validate_legacy",
    "verify_manifest",
    "write_checkpoint_atomically",
    "write_manifest",
]

EXTRA_STATE = "extra_state.pt"
MANIFEST = "complete.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 22  # 4 MiB reads while hashing


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (schedulers, EMA models, counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or damaged; the message names the folder and the file."""


class DiskFullError(OSError):
    """``ENOSPC``/``EDQUOT`` while writing a checkpoint; ``str()`` says the disk is full and names the path."""


_STEP = re.compile(r"^step-(\d+)$")
#: The ``errno`` values of a full disk (or an exceeded quota).
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def step_dir_name(step: int) -> str:
    """``step-000123``: zero padded so that names sort by step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    fsync_directory(path)


def _write_atomic(path: Path, text: str) -> None:
    """Atomic text write (the library's one helper, :func:`dfm_ext.fileio.atomic_write_text`)."""
    atomic_write_text(path, text)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Step folders ``(step, path)`` under ``root``, oldest first (not verified: see :func:`find_resumable`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint named by ``root/latest``, or ``None`` when there is none.

    The marker is informational; resuming uses :func:`find_resumable`, which does not trust it.

    Raises:
        FileNotFoundError: ``latest`` names a folder that does not exist (edited by hand?).
    """
    root = Path(root)
    marker = root / "latest"
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    if not _STEP.match(name):
        raise FileNotFoundError(f"{marker} holds {name!r}, not a checkpoint name like 'step-000100'")
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path}, which does not exist")
    return path


# -- completeness record ---------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(path: Path) -> list[Path]:
    """Every regular file below ``path`` (sharded states have sub-folders) except the record itself."""
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(p for p in files if p.relative_to(path).as_posix() != MANIFEST and not p.name.startswith(f".{MANIFEST}."))


def write_manifest(path: str | Path, *, step: int | None = None) -> dict[str, Any]:
    """Write ``path/complete.json``: size and SHA-256 of every file in the checkpoint folder ``path``.

    Call it after every file of the checkpoint is written and synced: the record is what marks
    the folder complete. Written atomically (temporary file, ``fsync``, ``os.replace``).

    Returns:
        The record: ``{"format": 1, "step": step, "files": {relative/path: {"size": n, "sha256": hex}}}``.
    """
    path = Path(path)
    files = {}
    for f in _payload_files(path):
        with open(f, "rb") as fh:  # the data must be on disk before the record says it is
            os.fsync(fh.fileno())
        files[f.relative_to(path).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    record = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    _write_atomic(path / MANIFEST, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def verify_manifest(path: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check the checkpoint folder ``path`` against its ``complete.json``.

    Sizes are always checked (cheap: a truncated file fails here); with ``hashes`` every file is
    read and its SHA-256 compared too (a damaged byte fails).

    Returns:
        The record.

    Raises:
        FileNotFoundError: ``path`` has no ``complete.json`` (not written by this version: see
            :func:`validate_legacy`).
        CorruptCheckpointError: unreadable record, a listed file missing, or a size or hash that differs.
    """
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}")
    try:
        record = json.loads(file.read_text())
        files = record["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} is unreadable ({e})") from None
    for rel, want in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"{path}: {rel} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CorruptCheckpointError(f"{path}: {rel} has {size} bytes, {MANIFEST} says {want['size']} (truncated?)")
    if hashes:
        for rel, want in sorted(files.items()):
            if _sha256(path / rel) != want["sha256"]:
                raise CorruptCheckpointError(f"{path}: {rel} does not match its sha256 in {MANIFEST} (damaged)")
    return record


def validate_legacy(path: str | Path) -> None:
    """Open every file of a checkpoint without ``complete.json`` the way resume will read it.

    ``*.safetensors``: header and coverage of the file (``safe_open`` refuses a truncated one);
    ``*.bin``, ``*.pt``, ``*.pkl``: a full ``torch.load(weights_only=True)`` (through accelerate's
    loader, which allows its NumPy RNG states). Other files (sharded ``.distcp``) cannot be
    checked without the model and are only required to be non-empty.

    Raises:
        CorruptCheckpointError: naming the folder and the first file that does not load.
    """
    path = Path(path)
    files = _payload_files(path)
    if not any(f.name.startswith(("model", "pytorch_model")) for f in files):
        raise CorruptCheckpointError(f"{path}: no model weights in the folder")
    for f in files:
        rel = f.relative_to(path).as_posix()
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), "pt") as st:
                    st.keys()
            elif f.suffix in (".bin", ".pt", ".pkl"):
                from accelerate.utils import load

                load(str(f), map_location="cpu")
            elif f.stat().st_size == 0:
                raise ValueError("empty file")
        except Exception as e:  # any failure to read means: do not resume from here
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptCheckpointError(f"{path}: {rel} does not load ({reason[:200]})") from None


def check_checkpoint(path: str | Path, *, hashes: bool = True) -> bool:
    """Verify one checkpoint folder; returns ``True`` when it has a ``complete.json``, ``False`` for a
    legacy folder that loaded (see :func:`validate_legacy`).

    Raises:
        CorruptCheckpointError: the folder is incomplete or damaged (the message says which file).
    """
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(f"{path} is not a folder")
    if (path / MANIFEST).is_file():
        verify_manifest(path, hashes=hashes)
        return True
    validate_legacy(path)
    return False


@dataclass(frozen=True)
class Resumable:
    """What :func:`find_resumable` found.

    Attributes:
        path: the newest checkpoint that verifies (``None``: none does).
        step: its step (``None`` with ``path``).
        legacy: ``path`` has no ``complete.json`` and was validated by loading its files.
        rejected: newer step folders that failed, ``(path, reason)``, newest first.
    """

    path: Path | None
    step: int | None
    legacy: bool = False
    rejected: list[tuple[Path, str]] = field(default_factory=list)


def find_resumable(root: str | Path, *, hashes: bool = True) -> Resumable:
    """The newest step folder under ``root`` (a run's ``checkpoints/``) that verifies.

    Does not read ``latest``: a deleted or stale marker cannot send a run back to step 0.
    Folders are tried newest first with :func:`check_checkpoint`; the first that passes wins and
    every newer one is listed in ``rejected`` with the reason.
    """
    rejected: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(root)):
        try:
            legacy = not check_checkpoint(path, hashes=hashes)
        except CorruptCheckpointError as e:
            rejected.append((path, str(e)))
            continue
        return Resumable(path, step, legacy, rejected)
    return Resumable(None, None, False, rejected)


def quarantine(path: str | Path) -> Path:
    """Move a failed step folder aside to ``corrupt-<name>`` (``-1``, ``-2`` ... if taken); nothing is deleted.

    The new name no longer looks like a checkpoint, so it is neither resumed from, pruned, nor
    in the way of the run writing that step again.
    """
    path = Path(path)
    target = path.with_name(f"corrupt-{path.name}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"corrupt-{path.name}-{n}")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


def clean_partial(root: str | Path) -> list[Path]:
    """Remove the ``tmp-*`` folders under ``root`` that a crash or a full disk left; returns them.

    Call on one process, at start-up, before any process writes a checkpoint.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.glob("tmp-*") if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def disk_full_error(e: OSError, path: Path, what: str) -> DiskFullError:
    """A :class:`DiskFullError` for ``e`` (an errno in :data:`DISK_FULL_ERRNOS`) naming ``what`` and ``path``."""
    return DiskFullError(
        e.errno,
        f"the disk is full (no space left) while writing {what} {path}: {e}; free space on that disk or point "
        "train.output_dir elsewhere, then run again (the partial folder is removed at the next start)",
    )


def save_checkpoint(
    accelerator: Any,
    root: str | Path,
    step: int,
    *,
    keep: int | None = None,
    extra: Mapping[str, Stateful] | None = None,
) -> Path:
    """Save the accelerator's state atomically as ``root/step-<step>`` and point ``latest`` at it.

    Every process must call this (``save_state`` gathers and writes per-rank RNG states).

    Args:
        accelerator: an ``accelerate.Accelerator`` with the model, optimiser and any
            ``register_for_checkpointing`` objects prepared.
        root: the checkpoints folder.
        step: the optimiser step the state belongs to.
        keep: keep only the newest ``keep`` checkpoints (``None``: keep all).
        extra: further objects to save into ``extra_state.pt`` (from the main process; their
            state must be the same on every rank), restored by :func:`load_checkpoint`.

    Returns:
        The final checkpoint folder.

    Raises:
        FileExistsError: ``root/step-<step>`` already exists (checked on every process before
            anything is written): a checkpoint is never written over.
        DiskFullError: the disk filled up while writing; ``tmp-<step>`` stays until
            :func:`clean_partial` (the next start) or the next save removes it.
    """

    def write_extra(tmp: Path) -> None:
        if extra:
            import torch

            torch.save({k: v.state_dict() for k, v in extra.items()}, tmp / EXTRA_STATE)

    return write_checkpoint_atomically(
        root, step, keep=keep, is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
        write_all=lambda tmp: accelerator.save_state(str(tmp)), write_main=write_extra,
    )  # fmt: skip


def write_checkpoint_atomically(
    root: str | Path,
    step: int,
    *,
    keep: int | None,
    is_main: bool,
    barrier: Callable[[], None],
    write_all: Callable[[Path], None],
    write_main: Callable[[Path], None],
) -> Path:
    """The atomic write of ``root/step-<step>`` that every checkpoint format shares.

    Every process calls this: ``write_all(tmp)`` runs on every process (the collective part),
    then the main process runs ``write_main(tmp)``, writes the completeness record last, renames
    ``tmp-step-<step>`` to ``step-<step>`` (``os.replace``), points ``latest`` at it and keeps
    the newest ``keep``. A crash at any moment leaves no folder that counts as complete.

    Raises:
        ValueError: ``keep`` < 1.
        FileExistsError: ``root/step-<step>`` exists (checked on every process first).
        DiskFullError: the disk filled up while writing.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(root)
    name = step_dir_name(step)
    tmp = root / f"tmp-{name}"
    final = root / name
    if final.exists():
        raise FileExistsError(
            f"checkpoint {final} already exists; refusing to write over it (move it away, or resume from it)"
        )
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        clean_partial(root)
    barrier()
    try:
        write_all(tmp)
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(e, tmp, "checkpoint") from e
        raise
    barrier()
    if is_main:
        try:
            write_main(tmp)
            write_manifest(tmp, step=step)  # last: the record is what marks the folder complete
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_atomic(root / "latest", name + "\n")
        except OSError as e:
            if e.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(e, tmp if tmp.exists() else final, "checkpoint") from e
            raise
        if keep is not None:
            for _, old in list_checkpoints(root)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(accelerator: Any, path: str | Path, *, extra: Mapping[str, Stateful] | None = None) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint`; nothing is unpickled.

    Verify it first (:func:`check_checkpoint` / :func:`find_resumable`): a damaged file found
    half-way through would leave the model restored and the optimiser not.

    Args:
        accelerator: the ``Accelerator`` whose prepared model and optimiser receive the state.
        path: a ``step-*`` folder.
        extra: the same names and objects that were passed to :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` is missing, or lacks ``extra_state.pt`` while ``extra`` asks for it.
        KeyError: ``extra_state.pt`` lacks one of the names in ``extra``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    accelerator.load_state(str(path))
    load_extra_state(path, extra, writer="save_checkpoint")


def load_extra_state(path: Path, extra: Mapping[str, Stateful] | None, *, writer: str) -> None:
    """Restore ``extra``'s objects from ``path/extra_state.pt`` (``weights_only``); nothing if ``extra`` is empty.

    Raises:
        FileNotFoundError: the file is missing (``writer``: the function that should have written it).
        KeyError: the file lacks one of the names in ``extra``.
    """
    if not extra:
        return
    import torch

    file = path / EXTRA_STATE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; {path} was not written by {writer} with extra state")
    states = torch.load(file, map_location="cpu", weights_only=True)
    missing = sorted(set(extra) - set(states))
    if missing:
        raise KeyError(f"{file} has no state for {missing}; it holds {sorted(states)}")
    for name, obj in extra.items():
        obj.load_state_dict(states[name])
