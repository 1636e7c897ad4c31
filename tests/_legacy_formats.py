"""Rewrite a folder saved by today's ``save_pretrained`` into the layouts older releases wrote.

By hand, from the old code (``git show 3c0d0fd:src/dfm_ext/wrapper.py``, ``specialization.py``,
``recipes/kinetics.py``), never through the new writer's own options:

* ``dfm_ext.wrapped/1``: ``dfm_config.json`` with the keys format, adapter, sample_shape,
  stage_shapes, patch_sizes, stage_embedding, decomposition, base; ``model.safetensors``;
* a specialisation beside it: ``stage_parameters.safetensors`` + ``stage_lora.json``
  (``{kind, rank, alpha, num_stages, stages, layers}``);
* Kinetics ``final/``: the scales in ``video_dfm.safetensors`` (``stage_scales`` and
  ``label_tokens.*``) and ``stage_scales.json`` (``{"scales": [...]}``), not in ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

V1_KEYS = ("format", "adapter", "sample_shape", "stage_shapes", "patch_sizes", "stage_embedding", "decomposition", "base")


def to_v1(directory: Path, *, label_tokens: dict[str, torch.Tensor] | None = None) -> dict:
    """Rewrite ``directory`` into the v1 layout in place; returns the old record."""
    record = json.loads((directory / "dfm_config.json").read_text())
    old = {k: record[k] for k in V1_KEYS}
    old["format"] = "dfm_ext.wrapped/1"
    spec = record.get("specialization")
    if spec is not None:
        (directory / "stage_lora.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "weights"}, indent=2))
    scales = record.get("stage_scales")
    if scales is not None:
        weights = load_file(str(directory / "model.safetensors"))
        del weights["stage_scales"]
        save_file(weights, str(directory / "model.safetensors"))
        extras = {"stage_scales": torch.tensor(scales, dtype=torch.float32)}
        extras.update({f"label_tokens.{k}": v for k, v in (label_tokens or {}).items()})
        save_file(extras, str(directory / "video_dfm.safetensors"))
        (directory / "stage_scales.json").write_text(json.dumps({"scales": scales}, indent=2))
    for name in record.get("extra_files") or []:
        (directory / name).unlink()
    (directory / "dfm_config.json").write_text(json.dumps(old, indent=2))
    return old
