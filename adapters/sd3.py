"""Adapter for diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5 MMDiT).

What ``install`` changes (joint blocks, context embedder, pooled-text embedder and positions
untouched):

* ``pos_embed.proj`` (patch ``Conv2d``) -> :class:`~dfm_ext.embeddings.MultiScalePatchEmbed`;
  the positions are still the centre crop of SD3's ``pos_embed_max_size`` sincos table for the
  token grid;
* ``time_text_embed.timestep_embedder`` -> :class:`~dfm_ext.embeddings.MultiScaleTimestepEmbed`
  (the pooled-text projection is still added);
* ``proj_out`` -> widened :class:`~dfm_ext.embeddings.MultiScaleHead` (``(p, q, c)`` order).

Time and sign: SD3 is a flow-matching model in diffusers' convention, ``sigma = 1 - t``,
``timestep = 1000 sigma``, and it predicts ``noise - x``. The adapter feeds
``1000 (1 - t)`` and returns ``-output``, the paper's velocity ``x - noise``, so the
prediction keeps its meaning (no re-parameterisation).

Conditioning (diffusers names): ``encoder_hidden_states`` ``[B, L, joint_attention_dim]`` and
``pooled_projections`` ``[B, pooled_projection_dim]``; optional ``joint_attention_kwargs``.
``null_condition`` zeroes both (SD3's pipeline uses empty-prompt embeddings: pass those as
``uncond=`` for real checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.adapter import multiscale_time_embed, widen_head, widen_patch_embed
from dfm_ext.embeddings import MultiScaleHead, MultiScalePatchEmbed

from ._diffusers_common import TimeMLP, check_tensor, check_time_convention, sincos_positions

__all__ = ["SD3Adapter", "ADAPTER"]


class SD3Adapter:
    """:class:`dfm_ext.adapter.DiTAdapter` for diffusers ``SD3Transformer2DModel``.

    Args:
        time_convention: how the timestep embedder reads time (default ``"timestep"``,
            ``1000 (1 - t)``).
        output_scale: multiplies the head output to give ``x - noise`` (default ``-1``).
    """

    name = "sd3"

    def __init__(self, time_convention: str = "timestep", output_scale: float = -1.0):
        self.time_convention = check_time_convention(time_convention)
        self.output_scale = float(output_scale)

    def config(self) -> dict[str, Any]:
        return {"time_convention": self.time_convention, "output_scale": self.output_scale}

    def __repr__(self) -> str:
        return f"SD3Adapter(time_convention={self.time_convention!r}, output_scale={self.output_scale!r})"

    def matches(self, model: nn.Module) -> bool:
        from diffusers import SD3Transformer2DModel  # noqa: PLC0415

        return isinstance(model, SD3Transformer2DModel)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        p = int(model.config.patch_size)
        if len(sample_shape) != 3:
            raise ValueError(f"{type(model).__name__} takes images; sample_shape must be (C, H, W), got {sample_shape}")
        if sample_shape[1] % p or sample_shape[2] % p:
            raise ValueError(f"sample_shape {sample_shape} is not divisible by the model's patch size {p}")
        return (sample_shape[1] // p, sample_shape[2] // p)

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        proj = model.pos_embed.proj
        if not isinstance(proj, nn.Conv2d):
            raise TypeError(f"{type(model).__name__}.pos_embed.proj is not a Conv2d (already wrapped?)")
        if len(packer.grid) != 2:
            raise ValueError(f"{type(model).__name__} takes images; got a token grid {packer.grid}")
        limit = model.pos_embed.pos_embed_max_size
        if limit and max(packer.grid) > limit:
            raise ValueError(
                f"the token grid {packer.grid} is larger than {type(model).__name__}'s position table "
                f"(pos_embed_max_size={limit})"
            )
        channels = [s[0] for s in packer.stage_shapes]
        if init == "pretrained" and channels[0] != proj.in_channels:
            raise ValueError(f"stage 0 has {channels[0]} channels but the model takes {proj.in_channels}")
        tte = model.time_text_embed
        model.pos_embed.proj = widen_patch_embed(proj, packer, init=init)
        tte.timestep_embedder = multiscale_time_embed(
            TimeMLP(tte.time_proj, tte.timestep_embedder),
            proj.out_channels,
            packer.num_stages,
            init=init,
            stage_embedding=stage_embedding,
            time_transform=self.time_convention,
        )
        model.proj_out = widen_head(
            model.proj_out,
            packer,
            base_patch=int(model.config.patch_size),
            base_channels=int(model.out_channels),
            order="pqc",
            init=init,
        )

    def forward(
        self,
        model: nn.Module,
        packed: Tensor,
        t: Tensor,
        stage: Tensor,
        *,
        encoder_hidden_states: Tensor | None = None,
        pooled_projections: Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        **cond: Any,
    ) -> Tensor:
        if cond:
            raise TypeError(f"unexpected conditioning for {type(model).__name__}: {sorted(cond)}")
        if not isinstance(model.pos_embed.proj, MultiScalePatchEmbed):
            raise RuntimeError("the model has not been installed by this adapter; use dfm_ext.wrap_dit")
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(
            encoder_hidden_states,
            "encoder_hidden_states",
            (b, None, int(cfg.joint_attention_dim)),
            hint=f" (text embeddings [B, L, {cfg.joint_attention_dim}])",
        )
        pooled = check_tensor(
            pooled_projections,
            "pooled_projections",
            (b, int(cfg.pooled_projection_dim)),
            hint=f" (pooled text embeddings [B, {cfg.pooled_projection_dim}])",
        )

        pe = model.pos_embed
        x = pe.proj(packed)
        if pe.layer_norm:
            x = pe.norm(x)
        pos = sincos_positions(pe, grid, x.device)
        if pos is not None:
            x = (x + pos).to(x.dtype)
        x = x.contiguous()

        tte = model.time_text_embed
        temb = tte.timestep_embedder(t, stage).to(pooled.dtype) + tte.text_embedder(pooled)
        text = model.context_embedder(text)
        for block in model.transformer_blocks:
            if torch.is_grad_enabled() and model.gradient_checkpointing:
                text, x = model._gradient_checkpointing_func(block, x, text, temb, joint_attention_kwargs)
            else:
                text, x = block(
                    hidden_states=x, encoder_hidden_states=text, temb=temb, joint_attention_kwargs=joint_attention_kwargs
                )
        x = model.norm_out(x, temb)
        out = MultiScaleHead.to_grid(model.proj_out(x), grid)
        return out if self.output_scale == 1.0 else out * self.output_scale

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """Text and pooled embeddings zeroed (a stand-in for SD3's empty-prompt embeddings)."""
        out = dict(cond)
        for key in ("encoder_hidden_states", "pooled_projections"):
            value = cond.get(key)
            if not isinstance(value, Tensor):
                raise TypeError(f"null_condition needs the conditional {key} to know its shape")
            out[key] = torch.zeros_like(value)
        return out


ADAPTER = SD3Adapter()
