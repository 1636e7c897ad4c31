"""The demo's model and sampler: a reference DiT on a fixed token grid, wrapped for any decomposition.

* :func:`model_config` -> :func:`build_model`: the JSON description a model is (re)built from.
* :func:`make_sampler`, :func:`generate`: the stage-wise sampler with classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.recipes.demo.config import MODEL_SIZES, DemoConfig, make_decomposition

__all__ = ["balanced_labels", "build_model", "generate", "make_sampler", "model_config", "null_label"]


def model_config(cfg: DemoConfig, image_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
    """The JSON description :func:`build_model` rebuilds a model from."""
    from dfm_ext.wrapping.packing import patch_sizes_for_grid

    from dfm_ext.decompositions.factory import decomposition_config

    decomposition = make_decomposition(cfg.decomposition)
    c, h, w = (int(v) for v in image_shape)
    grid = (h * cfg.tokens_per_side // cfg.image_size, w * cfg.tokens_per_side // cfg.image_size)
    patches = patch_sizes_for_grid([s[1:] for s in decomposition.stage_shapes((1, c, h, w))], grid)
    config: dict[str, Any] = {
        # What was built, every field (checkpoints before this held just the kind's name, which
        # make_decomposition still reads as that kind's defaults).
        "decomposition": decomposition_config(decomposition),
        "image_shape": [c, h, w],
        "num_classes": int(num_classes),
        "patch_sizes": [list(p) for p in patches],
        # Label dropout happens in the training loop (seeded), so the DiT's own is off.
        "dit": {"input_size": h, "in_channels": c, "num_classes": int(num_classes), "class_dropout_prob": 0.0,
                "patch_size": h // grid[0], **MODEL_SIZES[cfg.size]},
    }  # fmt: skip
    if cfg.specialize is not None:  # absent otherwise, so older checkpoints' configs stay as they were
        config["specialize"] = {"kind": cfg.specialize, "targets": list(cfg.specialize_targets), "rank": cfg.specialize_rank}
    return config


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build the wrapped DiT described by :func:`model_config` (weights freshly initialised)."""
    from dfm_ext.models.dit import DiT, DiTConfig
    from dfm_ext.wrapping.wrapper import wrap_dit

    dit = DiT(DiTConfig(**config["dit"]))
    decomposition = make_decomposition(config["decomposition"])
    patches = [tuple(p) for p in config["patch_sizes"]]
    model = wrap_dit(dit, decomposition, init="scratch", patch_sizes=patches)
    spec = config.get("specialize")
    if spec:
        from dfm_ext.specialization import specialize

        specialize(model, kind=spec["kind"], targets=list(spec["targets"]), rank=spec.get("rank"))
    return model


def null_label(model: nn.Module, num_classes: int) -> int:
    """The label index the model uses for "no class" (classifier-free guidance)."""
    return int(num_classes)


def make_sampler(
    decomposition: str | Mapping[str, Any], steps: Sequence[int], thresholds: Sequence[float], cfg_scale: float
):
    """A :class:`~dfm_ext.process.sampler.DFMSampler` (Euler) for a decomposition (kind name or config dict)."""
    from dfm_ext.process.sampler import DFMSampler
    from dfm_ext.process.schedule import StageScheduler

    decomposition_name = decomposition if isinstance(decomposition, str) else decomposition.get("kind")
    decomposition = make_decomposition(decomposition)
    s = decomposition.num_stages
    steps, thresholds = tuple(int(v) for v in steps), tuple(float(v) for v in thresholds)
    if s == 1:
        # Flow matching has one stage: the same total step budget in one segment.
        steps, thresholds = (sum(steps),), ()
    if len(steps) != s or len(thresholds) != s - 1:
        raise ValueError(
            f"the {decomposition_name} decomposition has {s} stages: give {s} step counts and {s - 1} "
            f"thresholds, got steps={steps} and thresholds={thresholds}"
        )
    return DFMSampler(decomposition, StageScheduler(steps=steps, thresholds=thresholds), guidance_scale=cfg_scale)


@torch.no_grad()
def generate(
    model: nn.Module,
    config: Mapping[str, Any],
    labels: Tensor,
    *,
    steps: Sequence[int] = (30, 10),
    thresholds: Sequence[float] = (0.9,),
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
):
    """Sample one image per label with the model's DFM sampler.

    Args:
        model: a wrapped model (see :func:`build_model`).
        config: its :func:`model_config`.
        labels: ``[N]`` class indices.
        steps, thresholds, cfg_scale: the inference schedule and guidance.
        generator: noise source (drawn on CPU, so results do not depend on ``device``).
        batch_size: images per sampler call.

    Returns:
        ``(images [N, C, H, W], previews)``, where ``previews[s]`` is ``[N, C, H_s, W_s]``, the
        image rebuilt from stages ``0..s``.
    """
    sampler = make_sampler(config["decomposition"], steps, thresholds, cfg_scale)
    model = model.eval().to(device)
    c, h, w = config["image_shape"]
    null = null_label(model, config["num_classes"])
    images: list[Tensor] = []
    previews: list[list[Tensor]] = []
    for chunk in labels.split(batch_size):
        y = chunk.to(device)
        uncond = {"y": torch.full_like(y, null)} if cfg_scale != 1.0 else None
        out = sampler.sample(model, (chunk.shape[0], c, h, w), generator=generator, device=device, uncond=uncond, y=y)
        images.append(out.x.float().cpu())
        previews.append([p.float().cpu() for p in out.previews])
    x = torch.cat(images)
    pv = [torch.cat([p[s] for p in previews]) for s in range(len(previews[0]))] if previews and previews[0] else []
    return x, pv


def balanced_labels(num: int, num_classes: int) -> Tensor:
    """``[num]`` labels cycling through the classes (so every class gets ``num // num_classes``)."""
    return torch.arange(num) % num_classes

