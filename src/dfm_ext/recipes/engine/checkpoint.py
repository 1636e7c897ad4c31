"""The run folder and its checkpoints: atomic step folders with a completeness record, ``final/``, digests, and
where a run continues (which checkpoint it resumes from, the config that checkpoint was written with, the folder
tidied before the first new step).

The layout and its promises: docs/recipes/index.md, "Outputs and resume". Only a folder whose ``complete.json``
(written last, before the rename of ``tmp-step-<step>``) verifies counts, so a crash or a full disk never leaves
a checkpoint that looks complete. ``extra_state.pt`` is read with ``weights_only=True``: resuming from someone
else's checkpoint cannot run code. Every process calls :func:`choose_resume` on the same folder with a collective
``verify`` (:func:`shared_verify`): the reading of a large checkpoint is split between them instead of keeping the
others waiting on one.
"""

from __future__ import annotations

import contextlib
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
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn

from dfm_ext.fileio import atomic_directory, atomic_write_text, fsync_directory
from dfm_ext.recipes.engine.config import ConfigError

__all__ = [
    "DISK_FULL_ERRNOS", "EXTRA_STATE", "MANIFEST", "ConfigRecord", "CorruptCheckpointError", "DiskFullError", "Stateful",
    "check_output_writable", "choose_resume", "clean_partial", "disk_full", "hash_share", "list_checkpoints", "load_extra_state",
    "save_extra_state", "save_final_model", "shared_verify", "state_digest", "step_dir_name", "stored_config", "tidy_checkpoints",
    "trim_metrics", "verify_manifest", "write_manifest", "write_step_folder",
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


def choose_resume(output_dir: Path, mode: str, *, verify: Callable[[Path], Any] = verify_manifest,
                  warn: Callable[[str], None] | None = None) -> Path | None:  # fmt: skip
    """The checkpoint ``train.resume=mode`` resumes from in ``output_dir`` (``None``: start), else a ConfigError
    (the rules: docs/recipes/index.md, "Outputs and resume"); ``warn`` (default: stderr) reports the damaged
    folders passed over."""
    warn = warn or (lambda line: print(line, file=sys.stderr))
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
        for _, path in reversed(existing):
            try:
                verify(path)
                return path
            except CorruptCheckpointError as e:
                warn(f"warning: checkpoint {path} is damaged, resuming from an older one: {e}")
        if existing:  # every one was damaged
            raise ConfigError(f"no usable checkpoint in {ckpts}: every step folder is damaged (see the warnings above); move them away to start again")
        return None
    path = Path(mode)
    if not path.is_dir():
        raise ConfigError(f"train.resume={mode!r}: not 'auto', 'never' or an existing checkpoint folder")
    try:
        verify(path)
    except CorruptCheckpointError as e:
        raise ConfigError(f"train.resume={mode!r} cannot be resumed from: {e}") from None
    m = path.name.removeprefix("step-")
    step = int(m) if m.isdigit() else -1
    if newer := [p.name for s, p in existing if s > step and p.resolve() != path.resolve()]:
        raise ConfigError(
            f"train.resume={mode!r} is older than checkpoints already in {ckpts} ({', '.join(newer)}), which "
            "the run would write over; move them away or choose another train.output_dir"
        )
    return path


def shared_verify(rank: int, world: int, gather: Callable[[list[Any]], list[Any]]) -> Callable[[Path], None]:
    """:func:`verify_manifest` split over ``world`` processes: each hashes its share, ``gather`` (an all-gather of
    Python lists, e.g. ``accelerate.utils.gather_object``) pools the verdicts; every process raises the same error."""

    def verify(path: Path) -> None:
        verdict = None
        try:
            verify_manifest(path, share=(rank, world))
        except CorruptCheckpointError as e:
            verdict = str(e)
        if errors := [v for v in (gather([verdict]) if world > 1 else [verdict]) if v]:
            raise CorruptCheckpointError(errors[0])

    return verify


class ConfigRecord:
    """The run's resolved config, saved in every checkpoint's ``extra_state.pt`` so that a resume is checked against
    the config that wrote it even when ``config.yaml`` was lost (:func:`stored_config`); loading it changes nothing."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        return {"yaml": yaml.safe_dump(dict(self.config), sort_keys=False)}

    def load_state_dict(self, state: Any) -> None:
        pass


def stored_config(output_dir: Path, resume: Path | None) -> tuple[dict[str, Any], Path] | None:
    """The config a resume continues and where it was read: the checkpoint's :class:`ConfigRecord`, else
    ``output_dir/config.yaml``; ``None`` when starting or when neither exists."""
    if resume is None:
        return None
    extra = resume / EXTRA_STATE
    if extra.is_file():
        record = torch.load(extra, map_location="cpu", weights_only=True).get("config")
        if isinstance(record, dict) and "yaml" in record:
            return yaml.safe_load(record["yaml"]) or {}, resume
    stored = output_dir / "config.yaml"
    return (yaml.safe_load(stored.read_text()) or {}, stored) if stored.is_file() else None


def tidy_checkpoints(output_dir: Path, mode: str, resume: Path | None) -> None:
    """Main process, after :func:`choose_resume`: drop ``tmp-*`` leftovers, move damaged newer folders aside and
    drop the ``metrics.jsonl`` lines the resumed run will log again."""
    ckpts = output_dir / "checkpoints"
    for p in clean_partial(ckpts):
        print(f"removed the partial folder {p} left by an interrupted save", file=sys.stderr)
    step = -1 if resume is None else _step_of(resume)
    trim_metrics(output_dir / "metrics.jsonl", max(step, 0))
    if mode != "auto":
        return
    step = -1 if resume is None or resume.parent != ckpts else step
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


def _step_of(checkpoint: Path) -> int:
    """The step a checkpoint folder holds: its completeness record's, else its name's."""
    with contextlib.suppress(OSError, ValueError):
        if isinstance(step := json.loads((checkpoint / MANIFEST).read_text()).get("step"), int):
            return step
    digits = checkpoint.name.removeprefix("step-")
    return int(digits) if digits.isdigit() else 0


def trim_metrics(path: Path, step: int) -> int:
    """Drop the lines of ``path`` (JSON lines with a ``step``) after ``step``: a resumed run replays and logs those steps
    again, so the log keeps one line per step. Returns how many went (the file is rewritten atomically)."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _logged_after(line, step)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
        print(f"{path.name}: dropped {len(lines) - len(kept)} line(s) after step {step}, which the resumed run logs again", file=sys.stderr)
    return len(lines) - len(kept)


def _logged_after(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return not line.endswith("\n")  # a line cut short by a crash goes; another unreadable line stays
    return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
