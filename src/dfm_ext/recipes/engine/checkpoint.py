"""The run folder and its checkpoints: atomic step folders with a completeness record, ``final/``, digests.

The layout and its promises: docs/recipes/index.md, "Outputs and resume". Only a folder whose ``complete.json``
(written last, before the rename of ``tmp-step-<step>``) verifies counts, so a crash or a full disk never leaves
a checkpoint that looks complete. ``extra_state.pt`` is read with ``weights_only=True``: resuming from someone
else's checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dfm_ext.fileio import atomic_directory, atomic_write_text, fsync_directory
from dfm_ext.recipes.engine.config import ConfigError

__all__ = [
    "DISK_FULL_ERRNOS", "EXTRA_STATE", "MANIFEST", "CorruptCheckpointError", "DiskFullError", "Stateful",
    "check_output_writable", "clean_partial", "disk_full", "hash_share", "list_checkpoints", "load_extra_state",
    "save_extra_state", "save_final_model", "state_digest", "step_dir_name", "verify_manifest", "write_manifest", "write_step_folder",
]  # fmt: skip

EXTRA_STATE = "extra_state.pt"  # the states of the objects beyond model and optimiser
MANIFEST = "complete.json"  # the completeness record, written last into a checkpoint folder
_CHUNK = 1 << 22  # 4 MiB reads while hashing
_STEP = re.compile(r"^step-(\d+)$")
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # a full disk or an exceeded quota
FULL_BELOW = 1 << 20  # below this many free bytes after a failed write, the disk counts as full whatever the error said
_PART = ".complete-part-"  # one process's hashes, merged into complete.json by the main process


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (schedulers, EMA counters, step counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> Any: ...


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or damaged; the message names the folder and the file."""


class DiskFullError(OSError):
    """``ENOSPC``/``EDQUOT`` while writing; ``str()`` says the disk is full and names the path."""


def disk_full(error: BaseException, path: str | Path, what: str) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` when ``error`` (raised writing ``what`` there) came from a full disk, else ``None``.
    ``torch.save`` reports a full disk as ``RuntimeError: ... unexpected pos``, not ``ENOSPC``: after any failed write,
    the free space of ``path``'s filesystem decides (under ``FULL_BELOW`` bytes: full)."""
    code = getattr(error, "errno", None)
    full = code in DISK_FULL_ERRNOS
    if not full and isinstance(error, (OSError, RuntimeError)):
        probe = Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(probe).free < FULL_BELOW
    if not full:
        return None
    cause = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return DiskFullError(
        code if code in DISK_FULL_ERRNOS else errno.ENOSPC,
        f"the disk is full (no space left) while writing {what}{' ' if what else ''}{path} ({cause}); free space on that disk "
        "or point train.output_dir elsewhere, then run the same command again (it removes the partial files and resumes "
        "from the last complete checkpoint)",
    )


def step_dir_name(step: int) -> str:
    """``step-000123``: zero padded so that names sort by step."""
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Step folders ``(step, path)`` under ``root``, oldest first (not verified)."""
    return sorted((int(m.group(1)), p) for p in Path(root).glob("step-*") if (m := _STEP.match(p.name)) and p.is_dir())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_one(f: Path) -> dict[str, Any]:
    with open(f, "rb") as fh:  # the data must be on disk before the record says it is
        os.fsync(fh.fileno())
    return {"size": f.stat().st_size, "sha256": _sha256(f)}


def _payload(path: Path) -> list[str]:
    """The files a record lists: every file under ``path`` but the record itself and its partial shares, and
    their atomic writes' temporary files (``.<name>.<random>.tmp``: another process may be writing its share)."""
    files = (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    names = (p.relative_to(path).as_posix() for p in files)
    return sorted(n for n in names if n != MANIFEST and not n.startswith((f".{MANIFEST}.", _PART, f".{_PART}")))


def hash_share(path: str | Path, rank: int, world: int, *, write: bool = True) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of this process's share of ``path``'s files (every ``world``-th, from ``rank``), fsynced first;
    with ``write`` also into ``path/.complete-part-<rank>.json`` for the main process to merge."""
    path = Path(path)
    share = {rel: _hash_one(path / rel) for rel in _payload(path)[rank::world]}
    if write:
        atomic_write_text(path / f"{_PART}{rank}.json", json.dumps(share))
    return share


def write_manifest(path: str | Path, *, step: int | None = None) -> dict[str, Any]:
    """Write ``path/complete.json``, size and SHA-256 of every file of ``path``, after every file is written: the
    shares other processes hashed (:func:`hash_share`) are merged and removed, the rest is hashed here."""
    path, files = Path(path), {}
    for part in sorted(path.glob(f"{_PART}*.json")):
        files.update(json.loads(part.read_text()))
        part.unlink()
    payload = _payload(path)
    for rel in payload:
        if rel not in files or files[rel]["size"] != (path / rel).stat().st_size:  # written after the shares were hashed
            files[rel] = _hash_one(path / rel)
    record = {"format": 1, "step": step, "files": {rel: files[rel] for rel in payload}}
    atomic_write_text(path / MANIFEST, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def verify_manifest(path: str | Path, *, hashes: bool = True, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Check ``path`` against its ``complete.json`` (sizes; with ``hashes`` every byte); else :class:`CorruptCheckpointError`.
    ``share=(rank, world)``: hash only every ``world``-th listed file from ``rank`` (the processes split the work)."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(f"{path} is not a folder")
    try:
        record = json.loads((path / MANIFEST).read_text())
        files = record["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} has no {MANIFEST} (an unfinished write)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} is unreadable ({e})") from None
    for rel, want in sorted(files.items()):
        if not (f := path / rel).is_file():
            raise CorruptCheckpointError(f"{path}: {rel} is missing")
        if (size := f.stat().st_size) != want["size"]:
            raise CorruptCheckpointError(f"{path}: {rel} has {size} bytes, {MANIFEST} says {want['size']} (truncated?)")
    for rel, want in sorted(files.items())[share[0] :: share[1]] if hashes else ():
        if _sha256(path / rel) != want["sha256"]:
            raise CorruptCheckpointError(f"{path}: {rel} does not match its sha256 in {MANIFEST} (damaged)")
    return record


def clean_partial(root: str | Path) -> list[Path]:
    """Remove the ``tmp-*`` folders a crash or a full disk left under ``root``; returns them (main process, at start)."""
    stale = sorted(p for p in Path(root).glob("tmp-*") if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_extra_state(folder: Path, extra: Mapping[str, Stateful]) -> None:
    """``extra``'s state dicts into ``folder/extra_state.pt`` (read back with ``weights_only=True``)."""
    torch.save({k: v.state_dict() for k, v in extra.items()}, folder / EXTRA_STATE)


def load_extra_state(folder: Path, extra: Mapping[str, Stateful]) -> None:
    """Restore ``extra``'s objects from ``folder/extra_state.pt`` (:class:`CorruptCheckpointError` if missing or incomplete)."""
    if not extra:
        return
    file = folder / EXTRA_STATE
    if not file.is_file():
        raise CorruptCheckpointError(f"{file} is missing")
    states = torch.load(file, map_location="cpu", weights_only=True)
    if missing := sorted(set(extra) - set(states)):
        raise CorruptCheckpointError(f"{file} has no state for {missing} (it holds {sorted(states)}): written by another recipe?")
    for name, obj in extra.items():
        obj.load_state_dict(states[name])


def write_step_folder(
    root: str | Path, step: int, *, keep: int | None, is_main: bool, barrier: Callable[[], None], write_all: Callable[[Path], None],
    write_main: Callable[[Path], None], rank: int = 0, world: int = 1,
) -> Path:  # fmt: skip
    """Write ``root/step-<step>`` atomically (every process calls this; an existing one is never written over).
    ``write_all(tmp)`` runs on every process, which then hash their share of the files (``rank`` of ``world``); the
    main process runs ``write_main(tmp)``, writes the completeness record last, renames ``tmp-step-<step>``, points
    ``latest`` at it and keeps the newest ``keep``. A full disk raises :class:`DiskFullError`."""
    root, name = Path(root), step_dir_name(step)
    tmp, final = root / f"tmp-{name}", root / name
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; refusing to write over it (move it away, or resume from it)")
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        clean_partial(root)
    barrier()
    try:
        write_all(tmp)
        barrier()
        if world > 1:  # the reading is split; the main process hashes what write_main adds
            hash_share(tmp, rank, world)
            barrier()
        if is_main:
            write_main(tmp)
            write_manifest(tmp, step=step)  # last: the record is what marks the folder complete
            fsync_directory(tmp)
            os.replace(tmp, final)
            fsync_directory(root)
            atomic_write_text(root / "latest", name + "\n")
    except (OSError, RuntimeError) as e:
        if (full := disk_full(e, tmp, "checkpoint")) is not None:
            raise full from e
        raise
    if is_main and keep is not None:
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def check_output_writable(path: str | Path) -> None:
    """Fail fast (:class:`ConfigError`) when the run folder ``path`` or its ``checkpoints/`` cannot be written: creates
    ``path``, probes with a file, which also catches read-only mounts and ACLs ``os.access`` misses."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for folder in (path, path / "checkpoints"):
            if folder.is_dir():
                tempfile.TemporaryFile(prefix=".write-test-", dir=folder).close()
    except OSError as e:
        why = "the disk is full" if e.errno in DISK_FULL_ERRNOS else (e.strerror or str(e))
        raise ConfigError(
            f"train.output_dir={str(path)!r} is not writable ({why}: {e.filename or path}); make it writable or choose another"
        ) from None


def save_final_model(output_dir: Path, model: nn.Module) -> Path:
    """The trained model as ``output_dir/final`` (its ``save_pretrained``, else ``model.safetensors``), written whole
    or not at all: a crash or a full disk (:class:`DiskFullError`) leaves the previous ``final/`` or none."""
    out = output_dir / "final"
    try:
        save = getattr(model, "save_pretrained", None)
        if callable(save):
            save(str(out))  # the library's and diffusers' write through a temporary folder
        else:
            with atomic_directory(out) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    except (OSError, RuntimeError) as e:
        if (full := disk_full(e, out, "the final model")) is not None:
            raise full from e
        raise
    return out


def state_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's names and raw bytes (sorted): equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
