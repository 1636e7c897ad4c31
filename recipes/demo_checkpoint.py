"""A checkpoint folder: ``model.safetensors`` (weights) + ``config.json`` (how to rebuild the model).

Writing is atomic: the folder is built under a temporary name beside the target and renamed
into place, so a crash leaves either the old checkpoint or the new one, never half of one.
Loading never unpickles anything (safetensors + JSON), and says exactly what is wrong with a
missing or damaged folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "dfm_ext.recipes.demo_checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt."""


# One definition for the whole tree: the library's (it names the config fields a bad size comes from).
from dfm_ext.wrapping.io import describe_mismatch  # noqa: E402


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


def save_checkpoint(
    directory: str | os.PathLike[str],
    weights: torch.nn.Module | Mapping[str, Tensor],
    config: Mapping[str, Any],
) -> Path:
    """Write ``weights`` and ``config`` into ``directory`` atomically (replacing what was there).

    Args:
        directory: the checkpoint folder.
        weights: a module (its ``state_dict()``) or a name -> tensor mapping.
        config: JSON-serialisable description of the model (and anything else worth keeping).

    Returns:
        The folder.

    Raises:
        TypeError: ``config`` is not JSON-serialisable or a weight is not a tensor.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "ckpt"
        >>> _ = save_checkpoint(d, torch.nn.Linear(2, 3), {"in": 2, "out": 3})
        >>> ck = load_checkpoint(d)
        >>> ck.config, sorted(ck.state_dict)
        ({'in': 2, 'out': 3}, ['bias', 'weight'])
    """
    from safetensors.torch import save_file

    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"weight {k!r} is a {type(v).__name__}, not a tensor")
    # safetensors refuses shared storage and non-contiguous views: store independent copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    try:
        payload = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "config": dict(config)}, indent=2)
    except TypeError as e:
        raise TypeError(f"config is not JSON-serialisable: {e}") from e

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes the folder private (0700)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(payload + "\n")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_checkpoint(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a folder written by :func:`save_checkpoint`.

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
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{cfg_path} is not a dfm_ext checkpoint config (expected format {FORMAT!r})")
    if raw.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path} has format version {raw.get('version')!r}; this dfm_ext reads {FORMAT_VERSION}")
    try:
        state = load_file(str(w_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{w_path} is not a readable safetensors file: {e}") from e
    return Checkpoint(config=raw["config"], state_dict=state, path=path)
