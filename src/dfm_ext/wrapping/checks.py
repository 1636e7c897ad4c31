"""Input checks of :func:`~dfm_ext.wrapping.wrapper.wrap_dit` and the wrapped forward, with messages that name the value.

Kept apart from the wrapper so that it reads as the model; every check here raises before any
compute. Values (not shapes) follow :mod:`dfm_ext.validation`: read on the host only for CPU
tensors in eager mode, device-side asserts otherwise (no sync, no graph break).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.validation import check_value
from dfm_ext.wrapping.packing import patch_sizes_for_grid

__all__ = ["check_decomposition", "check_stage_dtypes", "check_times", "native_grid_hint"]


def check_decomposition(decomposition: Any) -> None:
    """Refuse an object that does not follow :class:`dfm_ext.Decomposition` (naming what it lacks)."""
    for attr in ("num_stages", "decompose", "recompose", "stage_shapes"):
        if not hasattr(decomposition, attr):
            raise TypeError(f"decomposition must follow dfm_ext.Decomposition; {type(decomposition).__name__} lacks {attr}")


def check_stage_dtypes(stages: Sequence[Tensor], model: nn.Module) -> None:
    """Stages must have the model's floating dtype (outside autocast): float64 data meets a float32 model here.

    Raises:
        TypeError: ``"stages[i] is torch.float64 but the model's parameters are torch.float32; ..."``.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or torch.is_autocast_enabled(param.device.type):
        return
    for i, x in enumerate(stages):
        if x.dtype != param.dtype:
            raise TypeError(
                f"stages[{i}] is {x.dtype} but the model's parameters are {param.dtype}; convert the data "
                f"(e.g. x.to({param.dtype})) or the model (model.to({x.dtype}))"
            )


def check_times(t: Any, stage: Any, mask: Any, batch: int, num_stages: int, device: torch.device) -> Tensor:
    """Check ``t [B, S]``, ``stage [B]`` and ``mask [B, S] | None``; return the mask (default ``s <= stage[b]``).

    Raises:
        TypeError: wrong types or dtypes. ValueError: wrong shapes, ``stage`` out of range, ``t``
        not finite or outside ``[0, 1]``.
    """
    s = num_stages
    if not isinstance(t, Tensor) or not torch.is_floating_point(t):
        raise TypeError(f"t must be a floating-point tensor [B, S], got {type(t).__name__}")
    if t.shape != (batch, s):
        raise ValueError(f"t must have shape [B, S] = [{batch}, {s}], got {tuple(t.shape)}")
    if not isinstance(stage, Tensor) or stage.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"stage must be an integer tensor [B], got {getattr(stage, 'dtype', type(stage).__name__)}")
    if stage.shape != (batch,):
        raise ValueError(f"stage must have shape [B] = [{batch}], got {tuple(stage.shape)}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor [B, S], got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (batch, s):
            raise ValueError(f"mask must have shape [B, S] = [{batch}, {s}], got {tuple(mask.shape)}")
    # Values: read on the host only for CPU tensors in eager mode; otherwise device-side
    # asserts, so the step neither syncs nor breaks a torch.compile graph (dfm_ext.validation).
    if batch:
        check_value(((stage >= 0) & (stage < s)).all(), f"stage values must be in [0, {s - 1}]", stage.tolist)
        check_value(torch.isfinite(t).all(), "t must be finite", t.tolist)
        check_value(((t >= 0) & (t <= 1)).all(), "t must lie in [0, 1] (0 = noise, 1 = data)", t.tolist)
    if mask is None:
        return torch.arange(s, device=device)[None, :] <= stage.to(device)[:, None]
    return mask


def native_grid_hint(ad: Any, model: nn.Module, decomposition: Any, shape: tuple[int, ...]) -> str:
    """Where stage 0 cannot cover the token grid: the sample shapes (with patch sizes) that put it on the native grid.

    Stage 0 must cover the token grid every stage shares (a model with fixed positions keeps its
    native grid); so the full sample is the native grid times stage 0's downsampling factor, times
    stage 0's patch (1: stage 0 nearest-upsampled onto the grid, paper section E; or the model's own).
    """
    try:
        native = tuple(ad.default_sample_shape(model))
        grid = tuple(int(g) for g in ad.token_grid(model, native))
        factors = [d // s for d, s in zip(shape[1:], decomposition.stage_shapes((1, *shape))[0][2:])]
    except (ValueError, TypeError, AttributeError):
        return ""
    hints = []
    for patch in sorted({1, *(n // g for n, g in zip(native[1:], grid))}):
        cand = (shape[0], *(g * patch * f for g, f in zip(grid, factors)))
        try:
            stages = [tuple(s[1:]) for s in decomposition.stage_shapes((1, *cand))]
            sizes = patch_sizes_for_grid(stages, grid)
        except ValueError:
            continue
        hints.append(f"sample_shape={cand} with patch_sizes={[p[0] if len(set(p)) == 1 else list(p) for p in sizes]}")
    coarsest = decomposition.stage_shapes((1, *shape))[0][2:]
    patch = [d // c for d, c in zip(shape[1:], coarsest)]
    rebuild = (
        f" Or build the model on the token grid stage 0 allows, {tuple(coarsest)}: patch size {patch[0] if len(set(patch)) == 1 else patch}"
        f" for samples {tuple(shape[1:])} (what the recipes do; the paper's 1024 px setting)."
    )
    if not hints:
        return rebuild
    return (
        f" Stage 0 must cover the token grid: to keep {type(model).__name__}'s native grid {grid} (as a model "
        f"with fixed positions must) use {' or '.join(hints)}; this generates above the native size, "
        "see docs/guides/adapters.md ('Fixed positions')." + rebuild
    )
