"""Adapter for diffusers ``Kandinsky5Transformer3DModel`` (Kandinsky 5 video and image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

The model works channels-last (``[B, T, H, W, C]``); the adapter takes dfm_ext's ``[B, C, T, H, W]``
(an image is one frame, as ``Kandinsky5T2IPipeline`` passes it). What ``install`` changes (text and
visual blocks, RoPE, text embeddings untouched): ``visual_embeddings.in_layer`` (a ``Linear`` over
``(pt, p, q, c)`` patches, channels fastest), ``time_embeddings`` (sinusoid and MLP in one module)
and ``out_layer.out_layer`` (channel-major ``(c, pt, p, q)``, as ``Kandinsky5OutLayer`` unpatchifies).

Time and sign: the pipelines pass ``FlowMatchEulerDiscreteScheduler``'s timestep (``1000 sigma``)
and step that scheduler on the model's output as is: ``"timestep"``, ``noise - x``, flipped.
The pooled CLIP embedding is added to the time embedding (``pooled_text_embeddings``); the text
blocks read that sum too, so they see every stage's time, as in Hunyuan Video's text refiner.

Visual conditioning (``visual_cond=True``): the input is ``[latents, condition latents, mask]``
(``2 C + 1`` channels); the text-to-video pipeline passes the condition and the mask as zeros, so
their weights multiply zeros: ``install`` drops them (text-to-video only; image-to-video, whose first
frame fills the condition, is not taken).

RoPE scale: ``scale_factor`` divides the RoPE angles per axis and comes from the pipeline, not the
model: ``Kandinsky5T2VPipeline`` / ``Kandinsky5I2VPipeline`` use ``(1, 2, 2)`` when the video's height
and width both lie in 480..854 px and ``(1, 3.16, 3.16)`` otherwise, ``Kandinsky5T2IPipeline`` and
``Kandinsky5I2IPipeline`` ``(1, 1, 1)``. It is a **required** keyword (the adapter cannot see pixels).

Refused: ``attention_type="nabla"`` (block-sparse Nabla attention over the pipeline's fractal token
order, flex attention; load the checkpoint with ``attention_type="regular"`` for dense attention).
The model attends to every text token (no text mask), as in its own forward.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, in_text_dim]`` (Qwen embeddings),
``pooled_projections [B, in_text_dim2]`` (CLIP), ``scale_factor`` (3 numbers, required).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .spec import AdapterSpec, SpecAdapter

__all__ = ["Kandinsky5Adapter", "Kandinsky5Conditioning", "ADAPTER"]

_SCALE_CHOICES = (
    "scale_factor=(1, 2, 2) (Kandinsky5T2VPipeline / I2VPipeline, height and width both in 480..854 px), "
    "(1, 3.16, 3.16) (those pipelines at other sizes) or (1, 1, 1) (Kandinsky5T2IPipeline / I2IPipeline)"
)


class Kandinsky5Conditioning(NamedTuple):
    """The conditioning keywords :meth:`Kandinsky5Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    pooled_projections: Tensor | None = None
    scale_factor: tuple[float, float, float] | None = None


def _check_scale(value: Any) -> tuple[float, float, float]:
    if value is None:
        raise ValueError(f"Kandinsky 5 needs the pipeline's RoPE scale, which the model cannot show: pass {_SCALE_CHOICES}")
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in value):
        raise ValueError(f"scale_factor must be 3 positive numbers, got {value!r}; the pipelines use {_SCALE_CHOICES}")
    return (float(value[0]), float(value[1]), float(value[2]))


class Kandinsky5Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``Kandinsky5Transformer3DModel`` (conditioning: :class:`Kandinsky5Conditioning`)."""

    spec = AdapterSpec(
        name="kandinsky5", model_class="Kandinsky5Transformer3DModel", patch_embed="visual_embeddings.in_layer",
        time_embedder="time_embeddings", head="out_layer.out_layer", patch_order="cpq", patch_in_order="pqc",
        time_convention="timestep", output_scale=-1.0, positions="rope", grid_ndim=3,
        # Kandinsky5T2VPipeline's default: 121 frames of 512 x 768 px -> 31 x 64 x 96 latents.
        default_sample=(31, 64, 96), conditioning=Kandinsky5Conditioning,
        null_keys=("encoder_hidden_states", "pooled_projections"),
        layer_groups={
            "cond": (r"(^|\.)time_embeddings\.", r"(^|\.)(pooled_)?text_embeddings\.in_layer$"),
            "mod": (r"(^|\.)(text_modulation|visual_modulation|modulation)\.out_layer$",),
            "attn": (r"(^|\.)(self_attention|cross_attention)\.(to_query|to_key|to_value|out_layer)$",),
            "mlp": (r"(^|\.)feed_forward\.(in_layer|out_layer)$",),
            "proj": (r"(^|\.)visual_embeddings\.in_layer(\.proj)?$", r"(^|\.)out_layer\.out_layer$"),
        },
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if cfg.attention_type != "regular":
            raise ValueError(
                f"{type(model).__name__} with attention_type={cfg.attention_type!r}: the block-sparse Nabla attention over the "
                "pipeline's fractal token order is not reproduced; load the checkpoint with attention_type='regular' (dense attention)"
            )
        if int(cfg.in_visual_dim) != int(cfg.out_visual_dim):
            raise ValueError(f"{type(model).__name__} with in_visual_dim={cfg.in_visual_dim} != out_visual_dim={cfg.out_visual_dim}")

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(int(p) for p in model.config.patch_size)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_visual_dim), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        c, area, proj = int(model.config.in_visual_dim), math.prod(self.patch(model)), model.visual_embeddings.in_layer
        if model.config.visual_cond and isinstance(proj, nn.Linear) and proj.in_features == (2 * c + 1) * area:
            # (pt, p, q, channel) columns over [latents, condition, mask]: the last C + 1 channels are zeros in text-to-video.
            latent = nn.Linear(c * area, proj.out_features, bias=proj.bias is not None, device=proj.weight.device, dtype=proj.weight.dtype)
            with torch.no_grad():
                latent.weight.copy_(proj.weight.view(proj.out_features, area, 2 * c + 1)[..., :c].reshape(proj.out_features, -1))
                if proj.bias is not None:
                    latent.bias.copy_(proj.bias)
            model.visual_embeddings.in_layer = latent
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`Kandinsky5Conditioning`."""
        c = parse_conditioning(model, Kandinsky5Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, int(cfg.in_text_dim)), hint=f" (Qwen embeddings [B, L, {cfg.in_text_dim}])")
        pooled = check_tensor(c.pooled_projections, "pooled_projections", (b, int(cfg.in_text_dim2)), hint=f" (CLIP embeddings [B, {cfg.in_text_dim2}])")
        scale = _check_scale(c.scale_factor)
        rope3d, rope1d = model.visual_rope_embeddings, model.text_rope_embeddings
        if any(g > m for g, m in zip(grid, rope3d.max_pos)) or text.shape[1] > rope1d.max_pos:
            raise ValueError(
                f"token grid {grid} / {text.shape[1]} text tokens exceed {type(model).__name__}'s RoPE tables "
                f"(grid at most {tuple(rope3d.max_pos)}, at most {rope1d.max_pos} text tokens)"
            )
        x = self.tokens(model, packed)  # [B, T H W, D], (t, h, w) row-major as the model flattens
        temb = self.embed_time(model, t, stage) + model.pooled_text_embeddings(pooled)
        text = model.text_embeddings(text)
        text_rope = model.text_rope_embeddings(torch.arange(text.shape[1], device=x.device)).unsqueeze(0)
        for block in model.text_transformer_blocks:
            text = call_block(model, block, text, temb, text_rope)
        positions = [torch.arange(g, device=x.device) for g in grid]
        rope = rope3d((b, *grid), positions, scale).flatten(1, 3)
        for block in model.visual_transformer_blocks:
            x = call_block(model, block, x, text, temb, rope, None)
        # Kandinsky5OutLayer's modulated norm, on the token rows (its unpatchify is the packer's job here).
        out = model.out_layer
        shift, scale_ = out.modulation(temb).unsqueeze(1).chunk(2, dim=-1)
        x = (out.norm(x.float()) * (scale_.float() + 1.0) + shift.float()).type_as(x)
        return self.velocity(out.out_layer(x), grid)


ADAPTER = Kandinsky5Adapter()
