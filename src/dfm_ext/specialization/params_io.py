"""The stage-parameter file: a specialised model's stage parameters alone, in safetensors.

Keys are the parameters' names in the model (``blocks.0.mlp.fc1.stage_params.1.lora_A``); the
metadata (``dfm_ext.kind``, ``num_stages``, ``stages``, and for LoRA ``rank`` and ``scaling``)
is checked on load, so a file never loads into a differently specialised model.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from dfm_ext.specialization.layers import StageParams
from dfm_ext.specialization.state import PARAMS_ATTR as _PARAMS_ATTR
from dfm_ext.specialization.state import stage_context as _context
from dfm_ext.specialization.state import stage_layers as _stage_layers

__all__ = ["save_stage_parameters", "load_stage_parameters"]

_META_PREFIX = "dfm_ext."


def _metadata(model: nn.Module) -> dict[str, str]:
    ctx = _context(model)
    layers = list(_stage_layers(model))
    first = layers[0][1]
    meta = {
        "kind": first._stage_kind,
        "num_stages": str(ctx.num_stages),
        "stages": ",".join(first.stage_params.keys()),
    }
    if first._stage_kind == "lora":
        p = cast(StageParams, next(iter(first.stage_params.values())))
        meta["rank"] = str(p.lora_A.shape[0])
        meta["scaling"] = repr(first._stage_scaling)
    return {_META_PREFIX + k: v for k, v in meta.items()}


def _stage_state(model: nn.Module) -> dict[str, Tensor]:
    _context(model)
    return {
        f"{name}.{_PARAMS_ATTR}.{k}": v
        for name, layer in _stage_layers(model)
        for k, v in layer.stage_params.state_dict().items()
    }


def save_stage_parameters(model: nn.Module, path: str | Path) -> None:
    """Write only the stage parameters of a specialised model to a safetensors file.

    Keys are the parameters' names in ``model`` (``blocks.0.mlp.fc1.stage_params.1.lora_A``);
    the kind, rank, scaling and stages are stored as metadata and checked on load.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in _stage_state(model).items()}
    save_file(state, str(path), metadata=_metadata(model))


def load_stage_parameters(model: nn.Module, path: str | Path) -> None:
    """Load stage parameters written by :func:`save_stage_parameters` into a specialised model.

    Raises:
        ValueError: the file's kind/rank/scaling/stages differ from the model's, or its names or
            shapes do not match the model's stage parameters (the differences are listed).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    expected_meta = _metadata(model)
    diff = {
        k[len(_META_PREFIX) :]: (meta.get(k), v) for k, v in expected_meta.items() if meta.get(k) != v
    }
    if diff:
        raise ValueError(f"{path}: stage specialisation differs from the model's (file, model): {diff}")
    loaded = load_file(str(path))
    state = _stage_state(model)
    missing = sorted(set(state) - set(loaded))
    unexpected = sorted(set(loaded) - set(state))
    shapes = {
        k: (tuple(loaded[k].shape), tuple(v.shape))
        for k, v in state.items()
        if k in loaded and loaded[k].shape != v.shape
    }
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the model's stage parameters: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatches (file, model) "
            f"{dict(list(shapes.items())[:5])} ({len(shapes)})"
        )
    with torch.no_grad():
        for name, layer in _stage_layers(model):
            prefix = f"{name}.{_PARAMS_ATTR}."
            for k, v in layer.stage_params.state_dict(keep_vars=True).items():
                v.copy_(loaded[prefix + k])

