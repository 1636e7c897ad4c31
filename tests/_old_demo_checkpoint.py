"""Write a demo checkpoint in the layout released versions wrote (``git show 3c0d0fd:src/dfm_ext/checkpoint.py``
and ``demo.save_demo_checkpoint`` there), by hand: no current dfm_ext writer is used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_old_demo_checkpoint(directory: Path, model: torch.nn.Module, mconfig: dict[str, Any], train: dict[str, Any],
                              class_names: list[str], data_name: str = "toy") -> Path:  # fmt: skip
    """``model.safetensors`` + ``config.json`` = ``{"format": "dfm_ext.recipes.demo.legacy", "version": 1,
    "config": {"kind": "dfm_ext.recipes.demo.run", "model", "train", "data"}}``, as 3c0d0fd wrote them."""
    directory.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "dfm_ext.recipes.demo.legacy"})
    config = {"kind": "dfm_ext.recipes.demo.run", "model": mconfig, "train": train, "data": {"name": data_name, "class_names": class_names}}
    payload = {"format": "dfm_ext.recipes.demo.legacy", "version": 1, "config": config}
    (directory / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
    return directory


def write_raw_old_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Any ``config`` and weights in the old layout (to test refusals)."""
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"format": "dfm_ext.recipes.demo.legacy", "version": 1, "config": config}))
    return directory
