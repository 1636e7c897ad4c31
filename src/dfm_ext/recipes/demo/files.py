"""The demo's files: JSON, atomic writes, and its checkpoint (a ``save_pretrained`` folder + ``demo.json``).

:func:`load_demo_checkpoint` also reads the pre-engine layout
(:func:`~dfm_ext.recipes.demo.legacy.load_legacy_demo_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfm_ext.recipes.demo.config import DemoConfig
from dfm_ext.recipes.demo.data import ImageDataset
from dfm_ext.recipes.demo.model import build_model
from dfm_ext.recipes.engine.viz import umask

CHECKPOINT_KIND = "dfm_ext.recipes.demo.run"
CHECKPOINT_VERSION = 2  # 1: config.json + model.safetensors (demo_checkpoint); 2: save_pretrained + demo.json
DEMO_RECORD = "demo.json"

__all__ = [
    "CHECKPOINT_KIND", "CHECKPOINT_VERSION", "DEMO_RECORD", "dump_json", "load_demo_checkpoint", "load_wrapped_demo",
    "replace_dir", "save_demo_checkpoint", "staging", "write_record", "write_text_atomic",
]  # fmt: skip


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (plus a final newline) to ``path`` through :func:`staging` (temp file, then rename)."""
    path = Path(path)
    with staging(path.parent) as tmp:
        (tmp / path.name).write_text(text if text.endswith("\n") else text + "\n")
        os.chmod(tmp / path.name, 0o666 & ~umask())
        os.replace(tmp / path.name, path)
    return path


def _config_dict(cfg: DemoConfig) -> dict[str, Any]:
    return json.loads(dump_json(asdict(cfg)))


def _demo_record(mconfig: Mapping[str, Any], cfg: DemoConfig, data: ImageDataset) -> dict[str, Any]:
    """``demo.json``: what ``dfm-ext sample``/``eval`` need beside the model (guidance, steps, data)."""
    return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": dict(mconfig), "train": _config_dict(cfg),
            "data": {"name": data.name, "class_names": list(data.class_names)}}  # fmt: skip


def save_demo_checkpoint(directory: str | os.PathLike[str], model: nn.Module, mconfig: Mapping[str, Any],
                         cfg: DemoConfig, data: ImageDataset) -> Path:  # fmt: skip
    """Save the (EMA) model as ``DFMTransformer.save_pretrained`` does (``dfm_config.json`` +
    ``model.safetensors``; :func:`~dfm_ext.wrapping.io.load_wrapped` alone rebuilds it) plus
    ``demo.json``; atomically (built in a temp folder beside ``directory``, then renamed)."""
    directory = Path(directory)
    with staging(directory.parent) as tmp:
        model.save_pretrained(tmp / "checkpoint")
        write_record(tmp / "checkpoint", mconfig, cfg, data)
        replace_dir(tmp / "checkpoint", directory)
    return directory


def write_record(directory: Path, mconfig: Mapping[str, Any], cfg: DemoConfig, data: ImageDataset) -> None:
    (directory / DEMO_RECORD).write_text(dump_json(_demo_record(mconfig, cfg, data)) + "\n")
    for f in directory.iterdir():  # safetensors writes 0600: give the files the usual umask modes
        os.chmod(f, 0o666 & ~umask())


def replace_dir(src: Path, target: Path) -> None:
    """Move the folder ``src`` to ``target``, replacing a folder there (the old one is removed after)."""
    import shutil

    if target.is_dir():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)


def load_wrapped_demo(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The model of a ``save_pretrained`` folder: :func:`load_wrapped`, then its stage parameters if specialised."""
    from dfm_ext.specialization import load_specialization
    from dfm_ext.wrapping.io import load_wrapped

    model = load_wrapped(directory, device=device)
    load_specialization(model, directory)
    return model


def load_demo_checkpoint(directory: str | os.PathLike[str], device: str | torch.device = "cpu"):
    """Rebuild a demo checkpoint's model. Returns ``(model, config)`` (``config``: ``demo.json``).

    Reads both layouts: ``demo.json`` + a ``save_pretrained`` folder (this version), and the
    pre-engine ``config.json`` + ``model.safetensors``
    (:func:`~dfm_ext.recipes.demo.legacy.load_legacy_demo_checkpoint`).

    Raises:
        CheckpointError: (``ValueError``) missing or damaged folder, or weights that do not fit.
    """
    from dfm_ext.recipes.demo.legacy import CheckpointError, load_legacy_demo_checkpoint
    from dfm_ext.wrapping.io import read_json_file

    path = Path(directory)
    if not (path / DEMO_RECORD).is_file():
        return load_legacy_demo_checkpoint(path, build_model, device=device)
    config = read_json_file(path / DEMO_RECORD, CheckpointError)
    if not isinstance(config, dict) or config.get("kind") != CHECKPOINT_KIND or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path / DEMO_RECORD} is not a demo record (kind {config.get('kind') if isinstance(config, dict) else None!r})")
    try:
        model = load_wrapped_demo(path, device=device)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    return model.eval(), config


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temp folder inside ``out``; what the block moves out of it is kept, the rest deleted."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


