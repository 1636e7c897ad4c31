"""The reader of checkpoints written by the demo before it ran on the recipes' engine.

That layout (format ``dfm_ext.recipes.demo.legacy`` version 1): ``model.safetensors``
(weights) + ``config.json`` (``{"format", "version", "config": {"kind": "dfm_ext.recipes.demo.run",
"model", "train", "data"}}``). The demo now writes ``DFMTransformer.save_pretrained`` folders
with a ``demo.json`` (:func:`dfm_ext.recipes.demo.run.save_demo_checkpoint`); this module only reads
the old ones. Loading never unpickles anything (safetensors + JSON), and says exactly what is
wrong with a missing or damaged folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "dfm_ext.recipes.demo.legacy"
# Released versions wrote "dfm_ext.recipes.demo.legacy" with kind "dfm_ext.recipes.demo.run" (before the library's
# subpackages); the step that moved the demo into recipes wrote the names above.
FORMATS = ("dfm_ext.recipes.demo.legacy", FORMAT)
FORMAT_VERSION = 1


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "Checkpoint", "CheckpointError", "describe_mismatch", "load_checkpoint",
           "load_legacy_demo_checkpoint"]

LEGACY_KINDS = ("dfm_ext.recipes.demo.run", "dfm_ext.recipes.demo.run")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt."""


# One definition for the whole tree: the library's (it names the config fields a bad size comes from).
from dfm_ext.wrapping.io import describe_mismatch, read_json_file  # noqa: E402


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        config: the JSON-serialisable config that was saved (without the format header).
        state_dict: parameter name -> tensor (on CPU).
        path: the folder it came from.
    """

    config: dict[str, Any]
    state_dict: dict[str, Tensor] = field(repr=False)
    path: Path


def load_checkpoint(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a folder in the old layout (``config.json`` + ``model.safetensors``).

    Raises:
        CheckpointError: (a ``ValueError``) the folder or a file is missing, the config is not
            valid JSON or not a dfm_ext checkpoint, or the weights file is unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist or is not a folder")
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {p.name} is missing")
    raw = read_json_file(cfg_path, CheckpointError)
    if not isinstance(raw, dict) or raw.get("format") not in FORMATS or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{cfg_path} is not a dfm_ext checkpoint config (expected format {FORMATS[0]!r})")
    if raw.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path} has format version {raw.get('version')!r}; this dfm_ext reads {FORMAT_VERSION}")
    try:
        state = load_file(str(w_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{w_path} is not a readable safetensors file: {e}") from e
    return Checkpoint(config=raw["config"], state_dict=state, path=path)


def load_legacy_demo_checkpoint(directory: str | os.PathLike[str], build_model: Callable[[dict[str, Any]], torch.nn.Module],
                                *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """Rebuild the model of an old demo checkpoint with ``build_model(config["model"])``.

    Returns:
        ``(model in eval mode on device, config)`` where ``config`` has ``kind``, ``model``,
        ``train`` and ``data``, as ``demo.json`` does.

    Raises:
        CheckpointError: missing or damaged folder, not a demo model, or weights that do not fit.
    """
    ck = load_checkpoint(directory)
    config = ck.config
    if config.get("kind") not in LEGACY_KINDS or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{directory} is a dfm_ext checkpoint but not a demo model (kind {config.get('kind')!r})")
    try:
        model = build_model(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}: the model config is incomplete or invalid: {e!r}") from e
    try:
        model.load_state_dict(ck.state_dict, strict=True)
    except RuntimeError as e:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in ck.state_dict.items()}
        detail = describe_mismatch(expected, found, {"model": config["model"]})
        raise CheckpointError(f"{Path(directory) / WEIGHTS_NAME}: the weights do not fit the model in config.json: {detail}") from e
    return model.to(device).eval(), config
