"""Adapter for diffusers ``PixArtTransformer2DModel`` (PixArt-alpha / PixArt-sigma).

What ``install`` changes (trunk, cross-attention, caption projection and positions untouched):

* ``pos_embed.proj`` (patch ``Conv2d``) -> :class:`~dfm_ext.embeddings.MultiScalePatchEmbed`;
  the ``PatchEmbed`` sincos positions (with the model's ``interpolation_scale``) are still added;
* ``adaln_single.emb.timestep_embedder`` -> :class:`~dfm_ext.embeddings.MultiScaleTimestepEmbed`
  (per-stage embedders of the sinusoidal time, summed, plus a stage embedding); the shared
  adaLN-single projection, the resolution/aspect-ratio embedders (PixArt-alpha 1024) and the
  final ``scale_shift_table`` are reused as they are;
* ``proj_out`` -> widened :class:`~dfm_ext.embeddings.MultiScaleHead` (``(p, q, c)`` order; the
  learned-sigma half of the output is dropped).

Time and output: PixArt checkpoints are DDPM models (999 = noise, epsilon prediction with
learned sigma). The embedder reads ``999 (1 - t)`` and the raw head output is the velocity:
DFM finetuning re-parameterises the model to velocity, as for DiT.

Conditioning (diffusers names): ``encoder_hidden_states`` ``[B, L, caption_channels]`` (T5
embeddings), optional ``encoder_attention_mask`` ``[B, L]`` (1 = keep) and
``added_cond_kwargs={"resolution": [B, 2], "aspect_ratio": [B, 1]}`` for models built with
additional conditions. ``null_condition`` zeroes ``encoder_hidden_states``; for real checkpoints
pass the empty-prompt T5 embeddings as ``uncond=`` to the sampler instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.adapter import multiscale_time_embed, widen_head, widen_patch_embed
from dfm_ext.embeddings import MultiScaleHead, MultiScalePatchEmbed

from ._diffusers_common import TimeMLP, check_tensor, check_time_convention, sincos_positions

__all__ = ["PixArtAdapter", "ADAPTER"]


class PixArtAdapter:
    """:class:`dfm_ext.adapter.DiTAdapter` for diffusers ``PixArtTransformer2DModel``.

    Args:
        time_convention: how the timestep embedder reads time (default ``"discrete"``,
            ``999 (1 - t)``).
        output_scale: multiplies the head output.
    """

    name = "pixart"

    def __init__(self, time_convention: str = "discrete", output_scale: float = 1.0):
        self.time_convention = check_time_convention(time_convention)
        self.output_scale = float(output_scale)

    def config(self) -> dict[str, Any]:
        return {"time_convention": self.time_convention, "output_scale": self.output_scale}

    def __repr__(self) -> str:
        return f"PixArtAdapter(time_convention={self.time_convention!r}, output_scale={self.output_scale!r})"

    def matches(self, model: nn.Module) -> bool:
        from diffusers import PixArtTransformer2DModel  # noqa: PLC0415

        return isinstance(model, PixArtTransformer2DModel)

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
        channels = [s[0] for s in packer.stage_shapes]
        if init == "pretrained" and channels[0] != proj.in_channels:
            raise ValueError(f"stage 0 has {channels[0]} channels but the model takes {proj.in_channels}")
        emb = model.adaln_single.emb
        model.pos_embed.proj = widen_patch_embed(proj, packer, init=init)
        emb.timestep_embedder = multiscale_time_embed(
            TimeMLP(emb.time_proj, emb.timestep_embedder),
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

    def _text(self, model: nn.Module, b: int, encoder_hidden_states: Any) -> Tensor:
        width = (
            int(model.config.caption_channels)
            if model.caption_projection is not None
            else int(model.config.cross_attention_dim)
        )
        return check_tensor(
            encoder_hidden_states,
            "encoder_hidden_states",
            (b, None, width),
            hint=f" (text embeddings [B, L, {width}] for {type(model).__name__})",
        )

    def forward(
        self,
        model: nn.Module,
        packed: Tensor,
        t: Tensor,
        stage: Tensor,
        *,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        **cond: Any,
    ) -> Tensor:
        if cond:
            raise TypeError(f"unexpected conditioning for {type(model).__name__}: {sorted(cond)}")
        if not isinstance(model.pos_embed.proj, MultiScalePatchEmbed):
            raise RuntimeError("the model has not been installed by this adapter; use dfm_ext.wrap_dit")
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        text = self._text(model, b, encoder_hidden_states)
        if encoder_attention_mask is not None:
            if encoder_attention_mask.ndim == 2:
                check_tensor(encoder_attention_mask, "encoder_attention_mask", (b, text.shape[1]), floating=False)
                # diffusers' convention: 1 = keep -> additive bias 0, 0 = drop -> -10000.
                encoder_attention_mask = ((1 - encoder_attention_mask.to(packed.dtype)) * -10000.0).unsqueeze(1)

        pe = model.pos_embed
        x = pe.proj(packed)
        if pe.layer_norm:
            x = pe.norm(x)
        pos = sincos_positions(pe, grid, x.device)
        if pos is not None:
            x = (x + pos).to(x.dtype)

        emb = model.adaln_single.emb
        embedded = emb.timestep_embedder(t, stage).to(x.dtype)
        if emb.use_additional_conditions:
            if added_cond_kwargs is None or "resolution" not in added_cond_kwargs or "aspect_ratio" not in added_cond_kwargs:
                raise TypeError(
                    f"this {type(model).__name__} uses additional conditions: pass "
                    "added_cond_kwargs={'resolution': [B, 2], 'aspect_ratio': [B, 1]}"
                )
            res = emb.additional_condition_proj(added_cond_kwargs["resolution"].flatten()).to(x.dtype)
            res = emb.resolution_embedder(res).reshape(b, -1)
            ar = emb.additional_condition_proj(added_cond_kwargs["aspect_ratio"].flatten()).to(x.dtype)
            ar = emb.aspect_ratio_embedder(ar).reshape(b, -1)
            embedded = embedded + torch.cat([res, ar], dim=1)
        timestep = model.adaln_single.linear(model.adaln_single.silu(embedded))

        if model.caption_projection is not None:
            text = model.caption_projection(text).view(b, -1, x.shape[-1])
        for block in model.transformer_blocks:
            if torch.is_grad_enabled() and model.gradient_checkpointing:
                x = model._gradient_checkpointing_func(
                    block, x, None, text, encoder_attention_mask, timestep, cross_attention_kwargs, None
                )
            else:
                x = block(
                    x,
                    encoder_hidden_states=text,
                    encoder_attention_mask=encoder_attention_mask,
                    timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
        shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        x = model.norm_out(x) * (1 + scale) + shift
        out = MultiScaleHead.to_grid(model.proj_out(x), grid)
        return out if self.output_scale == 1.0 else out * self.output_scale

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """``encoder_hidden_states`` zeroed (a stand-in; pass empty-prompt embeddings as ``uncond=`` for real models)."""
        text = cond.get("encoder_hidden_states")
        if not isinstance(text, Tensor):
            raise TypeError("null_condition needs the conditional encoder_hidden_states to know their shape")
        out = dict(cond)
        out["encoder_hidden_states"] = torch.zeros_like(text)
        return out


ADAPTER = PixArtAdapter()
