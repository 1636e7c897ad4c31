"""Where a run continues: which checkpoint it resumes from, the config that checkpoint was written with, and the
run folder tidied before the first new step (partial folders removed, damaged ones moved aside, the log trimmed).

Every process calls :func:`choose_resume` on the same folder with a collective ``verify`` (:func:`shared_verify`):
the reading of a large checkpoint is split between them instead of keeping the others waiting on one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from dfm_ext.fileio import atomic_write_text, fsync_directory
from dfm_ext.recipes.engine.checkpoint import EXTRA_STATE, MANIFEST, CorruptCheckpointError, clean_partial, list_checkpoints, verify_manifest
from dfm_ext.recipes.engine.config import ConfigError

__all__ = ["ConfigRecord", "choose_resume", "shared_verify", "stored_config", "tidy_checkpoints", "trim_metrics"]


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
