"""The run folder: where a run writes, whether and from where it resumes.

* :func:`resolve_output_dir`, :func:`check_output_writable`: the folder, probed before anything is built.
* :func:`save_final_model` (``final/``) and :func:`state_digest` (the weights' fingerprint in ``summary.json``).
* :func:`choose_resume` (``train.resume``: ``auto``, ``never`` or a checkpoint folder),
  :func:`tidy_checkpoints` (partial and damaged folders out of the way) and
  :func:`check_resume_config` (a resumed run keeps its config, but for :data:`RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.fileio import atomic_write_text

from dfm_ext.recipes.engine.checkpoint import CorruptCheckpointError, check_checkpoint, clean_partial, find_resumable, list_checkpoints, quarantine
from dfm_ext.recipes.engine.config import ConfigError, config_to_dict
from dfm_ext.recipes.engine.train_config import RESUMABLE_CHANGES, TrainConfig

__all__ = [
    "check_output_writable", "check_resume_config", "choose_resume", "config_diff", "flatten_config",
    "resolve_output_dir", "save_final_model", "state_digest", "tidy_checkpoints", "warn",
]  # fmt: skip


def warn(message: str) -> None:
    """One line on stderr (``warnings.warn`` would add a second line with the source)."""
    print(f"warning: {message}", file=sys.stderr)


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; values other than numbers, strings and bools become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[str]:
    """The flattened keys (``section.key``) in which ``new`` differs from ``old``, except :data:`RESUMABLE_CHANGES`."""
    # A key added to the config dataclass after the run started is absent from its config.yaml;
    # it counts as its default, so such runs still resume when it is left at the default.
    a, b = {**flatten_config(defaults or {}), **flatten_config(old)}, flatten_config(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def resolve_output_dir(train: TrainConfig, name: str) -> Path:
    """``train.output_dir`` with ``{name}`` filled in."""
    return Path(train.output_dir.format(name=name)).expanduser()


def check_output_writable(path: str | Path) -> None:
    """Fail fast when the run folder ``path`` cannot be written (creating it if missing).

    Probes by creating and removing a file, which also catches read-only mounts and ACLs that
    ``os.access`` misses; called on every process before any model or data loader is built.

    Raises:
        ConfigError: naming the folder and the reason (one line).
    """
    import errno
    import tempfile

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
        ckpts = path / "checkpoints"
        if ckpts.is_dir():
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=ckpts)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ConfigError(
            f"train.output_dir={str(path)!r} is not writable ({why}: {e.filename or path}); "
            "make it writable or choose another train.output_dir"
        ) from None



def choose_resume(output_dir: Path, mode: str) -> Path | None:
    """The checkpoint ``train.resume=mode`` resumes from in the run folder ``output_dir`` (``None``: start).

    ``auto``: the newest step folder that verifies (damaged newer ones are named in a one-line
    warning each); ``never``: none, and a folder with checkpoints is refused; else a checkpoint
    folder, refused when it is damaged or older than checkpoints already in the run folder.

    Raises:
        ConfigError: naming the folder and what to do instead.
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
        found = find_resumable(ckpts)
        for path, reason in found.rejected:
            warn(f"checkpoint {path} is damaged, resuming from an older one: {reason}")
        if found.path is None and found.rejected:
            raise ConfigError(
                f"no usable checkpoint in {ckpts}: every step folder is damaged (see the warnings above); "
                "move them away to start the run again"
            )
        if found.legacy:
            warn(f"checkpoint {found.path} has no completeness record (written by an older version); validated by loading it")
        return found.path
    path = Path(mode)
    if not path.is_dir():
        raise ConfigError(f"train.resume={mode!r}: not 'auto', 'never' or an existing checkpoint folder")
    try:
        legacy = not check_checkpoint(path)
    except CorruptCheckpointError as e:
        raise ConfigError(f"train.resume={mode!r} cannot be resumed from: {e}") from None
    if legacy:
        warn(f"checkpoint {path} has no completeness record (written by an older version); validated by loading it")
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
    """Main process, after the config check: drop ``tmp-*`` leftovers, move damaged newer folders aside
    (``mode``: ``train.resume``; ``resume``: what :func:`choose_resume` chose)."""
    ckpts = output_dir / "checkpoints"
    for p in clean_partial(ckpts):
        print(f"removed the partial checkpoint {p} left by an interrupted save", file=sys.stderr)
    if mode != "auto":
        return
    step = -1 if resume is None or resume.parent != ckpts else int(resume.name.removeprefix("step-"))
    for s, p in list_checkpoints(ckpts):
        if s > step:  # only damaged ones are newer than the folder find_resumable chose
            moved = quarantine(p)
            print(f"moved {p} aside to {moved.name}", file=sys.stderr)
    if resume is not None and resume.parent == ckpts:
        atomic_write_text(ckpts / "latest", resume.name + "\n")  # the marker follows what was chosen

def check_resume_config(output_dir: Path, full_config: Any, resume: Path | None) -> None:
    """Refuse to resume ``output_dir`` when its ``config.yaml`` differs from ``full_config`` outside
    :data:`~dfm_ext.recipes.engine.train_config.RESUMABLE_CHANGES` (keys added since count as their defaults)."""
    stored = output_dir / "config.yaml"
    if resume is None or not stored.is_file():
        return
    import yaml

    old = yaml.safe_load(stored.read_text()) or {}
    try:
        defaults = config_to_dict(type(full_config)())
    except TypeError:  # a config class without defaults for every field
        defaults = {}
    diff = config_diff(old, config_to_dict(full_config), defaults)
    if diff:
        raise ConfigError(
            f"cannot resume {output_dir}: its config.yaml differs in {diff}; "
            "use another train.output_dir to start a new run"
        )


def save_final_model(output_dir: Path, model: nn.Module) -> None:
    """The trained model as ``output_dir/final``: its ``save_pretrained`` when it has one, else ``model.safetensors``."""
    out = output_dir / "final"
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(out))
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))


def state_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's names and raw bytes (sorted): equal digests mean bitwise-equal weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
