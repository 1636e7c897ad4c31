"""The run folder and its checkpoints: atomic step folders, a completeness record, resume decisions.

A run folder holds ``config.yaml``, ``checkpoints/``, ``logs/``, ``samples/``, ``metrics.jsonl``,
``final/`` (the EMA weights) and ``summary.json``. Under ``checkpoints/``::

    step-000200/            the parallelism's files + extra_state.pt + complete.json
    corrupt-step-000600/    failed verification at resume: moved aside, never read
    latest                  names the newest checkpoint written (informational)

A checkpoint is written into ``tmp-step-<step>``; the main process writes ``complete.json`` (size
and SHA-256 of every file) last, then renames the folder. Only a folder whose record verifies
counts, so a crash or a full disk never leaves a checkpoint that looks complete. The folder must be
on a filesystem every process sees. ``extra_state.pt`` is read with ``weights_only=True``: resuming
from someone else's checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dfm_ext.fileio import atomic_write_text, fsync_directory
from dfm_ext.recipes.engine.config import ConfigError

__all__ = [
    "DISK_FULL_ERRNOS", "EXTRA_STATE", "MANIFEST", "CorruptCheckpointError", "DiskFullError", "Stateful", "check_output_writable",
    "choose_resume", "clean_partial", "list_checkpoints", "load_extra_state", "save_extra_state", "save_final_model",
    "state_digest", "step_dir_name", "tidy_checkpoints", "verify_manifest", "write_manifest", "write_step_folder",
]  # fmt: skip

#: The file of a checkpoint holding the states of the objects beyond model and optimiser.
EXTRA_STATE = "extra_state.pt"
#: The completeness record, written last into a checkpoint folder.
MANIFEST = "complete.json"
_CHUNK = 1 << 22  # 4 MiB reads while hashing
_STEP = re.compile(r"^step-(\d+)$")
#: The ``errno`` values of a full disk (or an exceeded quota).
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (schedulers, EMA counters, step counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> Any: ...


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or damaged; the message names the folder and the file."""


class DiskFullError(OSError):
    """``ENOSPC``/``EDQUOT`` while writing; ``str()`` says the disk is full and names the path."""


def step_dir_name(step: int) -> str:
    """``step-000123``: zero padded so that names sort by step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Step folders ``(step, path)`` under ``root``, oldest first (not verified)."""
    root = Path(root)
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()) if root.is_dir() else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: str | Path, *, step: int | None = None) -> dict[str, Any]:
    """Write ``path/complete.json``, size and SHA-256 of every file of ``path``: call it after every file is written."""
    path, files = Path(path), {}
    payload = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in sorted(p for p in payload if p.relative_to(path).as_posix() != MANIFEST and not p.name.startswith(f".{MANIFEST}.")):
        with open(f, "rb") as fh:  # the data must be on disk before the record says it is
            os.fsync(fh.fileno())
        files[f.relative_to(path).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    record = {"format": 1, "step": step, "files": files}
    atomic_write_text(path / MANIFEST, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def verify_manifest(path: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check ``path`` against its ``complete.json`` (sizes; with ``hashes`` every byte); else :class:`CorruptCheckpointError`."""
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
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"{path}: {rel} is missing")
        if (size := f.stat().st_size) != want["size"]:
            raise CorruptCheckpointError(f"{path}: {rel} has {size} bytes, {MANIFEST} says {want['size']} (truncated?)")
    for rel, want in sorted(files.items()) if hashes else ():
        if _sha256(path / rel) != want["sha256"]:
            raise CorruptCheckpointError(f"{path}: {rel} does not match its sha256 in {MANIFEST} (damaged)")
    return record


def clean_partial(root: str | Path) -> list[Path]:
    """Remove the ``tmp-*`` folders a crash or a full disk left under ``root``; returns them (main process, at start)."""
    root = Path(root)
    stale = sorted(p for p in root.glob("tmp-*") if p.is_dir()) if root.is_dir() else []
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
    missing = sorted(set(extra) - set(states))
    if missing:
        raise CorruptCheckpointError(f"{file} has no state for {missing} (it holds {sorted(states)}): written by another recipe?")
    for name, obj in extra.items():
        obj.load_state_dict(states[name])


def write_step_folder(
    root: str | Path, step: int, *, keep: int | None, is_main: bool, barrier: Callable[[], None], write_all: Callable[[Path], None],
    write_main: Callable[[Path], None],
) -> Path:  # fmt: skip
    """Write ``root/step-<step>`` atomically (every process calls this; an existing one is never written over).

    ``write_all(tmp)`` runs on every process, then the main process runs ``write_main(tmp)``, writes
    the completeness record last, renames ``tmp-step-<step>``, points ``latest`` at it and keeps the newest ``keep``.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(root)
    name = step_dir_name(step)
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
        if is_main:
            write_main(tmp)
            write_manifest(tmp, step=step)  # last: the record is what marks the folder complete
            fsync_directory(tmp)
            os.replace(tmp, final)
            fsync_directory(root)
            atomic_write_text(root / "latest", name + "\n")
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(
                e.errno, f"the disk is full (no space left) while writing checkpoint {tmp}: {e}; free space on that disk or point "
                "train.output_dir elsewhere, then run again (the partial folder is removed at the next start)",
            ) from e
        raise
    if is_main and keep is not None:
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def choose_resume(output_dir: Path, mode: str) -> Path | None:
    """The checkpoint ``train.resume=mode`` resumes from in ``output_dir`` (``None``: start), else a :class:`ConfigError`.

    ``auto``: the newest step folder that verifies, whatever ``latest`` says; ``never``: none, and a
    folder with checkpoints is refused; else a checkpoint folder, refused when damaged or older than
    checkpoints already in the run folder.
    """
    ckpts = output_dir / "checkpoints"
    existing = list_checkpoints(ckpts)
    if mode == "never":
        if existing:
            raise ConfigError(
                f"{output_dir} already holds checkpoints ({existing[-1][1].name}) and train.resume=never; "
                "choose another train.output_dir or set train.resume=auto"
            )
        return None
    if mode == "auto":
        rejected = 0
        for _, path in reversed(existing):
            try:
                verify_manifest(path)
                return path
            except CorruptCheckpointError as e:
                print(f"warning: checkpoint {path} is damaged, resuming from an older one: {e}", file=sys.stderr)
                rejected += 1
        if rejected:
            raise ConfigError(f"no usable checkpoint in {ckpts}: every step folder is damaged (see the warnings above); move them away to start again")
        return None
    path = Path(mode)
    if not path.is_dir():
        raise ConfigError(f"train.resume={mode!r}: not 'auto', 'never' or an existing checkpoint folder")
    try:
        verify_manifest(path)
    except CorruptCheckpointError as e:
        raise ConfigError(f"train.resume={mode!r} cannot be resumed from: {e}") from None
    m = path.name.removeprefix("step-")
    step = int(m) if m.isdigit() else -1
    newer = [p.name for s, p in existing if s > step and p.resolve() != path.resolve()]
    if newer:
        raise ConfigError(
            f"train.resume={mode!r} is older than checkpoints already in {ckpts} ({', '.join(newer)}), which "
            "the run would write over; move them away or choose another train.output_dir"
        )
    return path


def tidy_checkpoints(output_dir: Path, mode: str, resume: Path | None) -> None:
    """Main process, after :func:`choose_resume`: drop ``tmp-*`` leftovers and move damaged newer folders aside."""
    ckpts = output_dir / "checkpoints"
    for p in clean_partial(ckpts):
        print(f"removed the partial checkpoint {p} left by an interrupted save", file=sys.stderr)
    if mode != "auto":
        return
    step = -1 if resume is None or resume.parent != ckpts else int(resume.name.removeprefix("step-"))
    for s, p in list_checkpoints(ckpts):
        if s > step:  # only damaged ones are newer than the folder choose_resume chose: moved aside, never deleted
            target, n = p.with_name(f"corrupt-{p.name}"), 0
            while target.exists():
                n += 1
                target = p.with_name(f"corrupt-{p.name}-{n}")
            os.replace(p, target)
            fsync_directory(p.parent)
            print(f"moved {p} aside to {target.name}", file=sys.stderr)
    if resume is not None and resume.parent == ckpts:
        atomic_write_text(ckpts / "latest", resume.name + "\n")  # the marker follows what was chosen


def check_output_writable(path: str | Path) -> None:
    """Fail fast (:class:`ConfigError`) when the run folder ``path`` or its ``checkpoints/`` cannot be written.

    Creates ``path``; probes with a file, which also catches read-only mounts and ACLs ``os.access`` misses.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for folder in (path, path / "checkpoints"):
            if folder.is_dir():
                fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
                os.close(fd)
                os.unlink(probe)
    except OSError as e:
        why = "the disk is full" if e.errno in DISK_FULL_ERRNOS else (e.strerror or str(e))
        raise ConfigError(
            f"train.output_dir={str(path)!r} is not writable ({why}: {e.filename or path}); make it writable or choose another"
        ) from None


def save_final_model(output_dir: Path, model: nn.Module) -> Path:
    """The trained model as ``output_dir/final``: its ``save_pretrained``, else ``model.safetensors``."""
    out = output_dir / "final"
    save = getattr(model, "save_pretrained", None)
    if callable(save):
        save(str(out))
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return out


def state_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's names and raw bytes (sorted): equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
