"""Atomic, pruned checkpoints on top of ``accelerator.save_state``.

Layout under ``<run>/checkpoints``::

    step-000200/     complete checkpoints (accelerate state + ``extra_state.pt``)
    step-000400/
    latest           text file naming the newest complete checkpoint, e.g. "step-000400"

A checkpoint is written into ``tmp-<step>`` and renamed (``os.replace``, atomic on POSIX) to
``step-<step>`` only after every process finished writing; ``latest`` is then rewritten through
a temporary file and ``os.replace``. A crash at any moment therefore leaves either the previous
``latest`` or the new one, never a name pointing at a half-written folder. Leftover ``tmp-*``
folders are deleted at the next save. The output folder must be on a filesystem that every
process (and node) sees.

Objects beyond the model and optimiser (LR scheduler, EMA, step counters) are *not* handed to
``accelerator.register_for_checkpointing``: accelerate reloads those with a full pickle
(``torch.load(weights_only=False)``), which runs code from the file. They are written here into
``extra_state.pt`` and read back with ``weights_only=True``, so resuming from a checkpoint
someone else wrote cannot execute anything; accelerate itself loads the model from safetensors
and the optimiser and RNG states with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Protocol

__all__ = ["Stateful", "find_latest", "list_checkpoints", "load_checkpoint", "save_checkpoint", "step_dir_name"]

EXTRA_STATE = "extra_state.pt"


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (schedulers, EMA models, counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...

_STEP = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """``step-000123``: zero padded so that names sort by step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` under ``root``, oldest first."""
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
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(root)
    name = step_dir_name(step)
    tmp = root / f"tmp-{name}"
    final = root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra:
            import torch

            torch.save({k: v.state_dict() for k, v in extra.items()}, tmp / EXTRA_STATE)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", name + "\n")
        if keep is not None:
            for _, old in list_checkpoints(root)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | Path, *, extra: Mapping[str, Stateful] | None = None) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint`; nothing is unpickled.

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
    if not extra:
        return
    import torch

    file = path / EXTRA_STATE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; {path} was not written by save_checkpoint with extra state")
    states = torch.load(file, map_location="cpu", weights_only=True)
    missing = sorted(set(extra) - set(states))
    if missing:
        raise KeyError(f"{file} has no state for {missing}; it holds {sorted(states)}")
    for name, obj in extra.items():
        obj.load_state_dict(states[name])
