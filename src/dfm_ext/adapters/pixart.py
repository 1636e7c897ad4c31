"""Adapter for diffusers ``PixArtTransformer2DModel`` (PixArt-alpha / PixArt-sigma).

What ``install`` changes (trunk, cross-attention, caption projection and positions untouched):

* ``pos_embed.proj`` (patch ``Conv2d``) -> :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`;
  the ``PatchEmbed`` sincos positions (with the model's ``interpolation_scale``) are still added;
* ``adaln_single.emb.timestep_embedder`` -> :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed`
  (per-stage embedders of the sinusoidal time, summed, plus a stage embedding); the shared
  adaLN-single projection, the resolution/aspect-ratio embedders (PixArt-alpha 1024) and the
  final ``scale_shift_table`` are reused as they are;
* ``proj_out`` -> widened :class:`~dfm_ext.wrapping.embeddings.MultiScaleHead` (``(p, q, c)`` order; the
  learned-sigma half of the output is dropped).

Time and output: PixArt checkpoints are DDPM models (999 = noise, epsilon prediction with
learned sigma). The embedder reads ``999 (1 - t)`` and the head output negated is the velocity
(``output_scale=-1``, ``-epsilon``; measured as for DiT in ``benchmarks/epsilon_init.py``): DFM
finetuning re-parameterises the model to velocity.

Conditioning (diffusers names): ``encoder_hidden_states`` ``[B, L, caption_channels]`` (T5
embeddings), optional ``encoder_attention_mask`` ``[B, L]`` (1 = keep) and
``added_cond_kwargs={"resolution": [B, 2], "aspect_ratio": [B, 1]}`` for models built with
additional conditions. ``null_condition`` zeroes ``encoder_hidden_states``; for real checkpoints
pass the empty-prompt T5 embeddings as ``uncond=`` to the sampler instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.adapter import widen_patch_embed

from .diffusers_common import PatchEmbedAdapterBase, diffusers_layer_groups
from .common import call_block, check_installed, check_tensor, parse_conditioning, zeroed_condition

__all__ = ["PixArtAdapter", "PixArtConditioning", "ADAPTER"]


class PixArtConditioning(NamedTuple):
    """The conditioning keywords :meth:`PixArtAdapter.forward` takes (diffusers names).

    ``encoder_hidden_states [B, L, caption_channels]`` (T5) is required; ``encoder_attention_mask
    [B, L]`` (1 = keep) is optional; ``added_cond_kwargs={"resolution": [B, 2], "aspect_ratio":
    [B, 1]}`` is needed by models built with additional conditions; ``cross_attention_kwargs`` goes
    to every block.
    """

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    added_cond_kwargs: dict[str, Tensor] | None = None
    cross_attention_kwargs: dict[str, Any] | None = None


class PixArtAdapter(PatchEmbedAdapterBase):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``PixArtTransformer2DModel``.

    Conditioning: :class:`PixArtConditioning`. Defaults for PixArt's DDPM epsilon checkpoints:
    ``time_convention="discrete"`` (``999 (1 - t)``), ``output_scale=-1`` (``-epsilon``; see
    :class:`~dfm_ext.adapters.diffusers_common.DiffusersAdapterBase`).
    """

    name = "pixart"
    model_class = "PixArtTransformer2DModel"
    #: ``dfm_ext.specialization`` layer groups: diffusers' shared names and ``adaln_single`` (its ``emb`` is
    #: conditioning, its ``linear`` modulation), ``caption_projection``
    layer_groups = diffusers_layer_groups(
        {
            "cond": (r"(^|\.)adaln_single\.emb\.", r"(^|\.)caption_projection\."),
            "mod": (r"(^|\.)adaln_single\.linear$",),
        }
    )

    def __init__(self, time_convention: Any = "discrete", output_scale: float = -1.0):
        super().__init__(time_convention, output_scale)

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        proj = self._patch_proj(model, packer, init)
        emb = model.adaln_single.emb
        model.pos_embed.proj = widen_patch_embed(proj, packer, init=init)
        emb.timestep_embedder = self._time_embed(
            emb.time_proj, emb.timestep_embedder, proj.out_channels, packer, init=init, stage_embedding=stage_embedding
        )
        model.proj_out = self._widen_head(model.proj_out, model, packer, init)

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

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`PixArtConditioning`."""
        c = parse_conditioning(model, PixArtConditioning, cond)
        check_installed(model.pos_embed.proj)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        text = self._text(model, b, c.encoder_hidden_states)
        encoder_attention_mask = c.encoder_attention_mask
        if encoder_attention_mask is not None:
            if encoder_attention_mask.ndim == 2:
                check_tensor(encoder_attention_mask, "encoder_attention_mask", (b, text.shape[1]), floating=False)
                # diffusers' convention: 1 = keep -> additive bias 0, 0 = drop -> -10000.
                encoder_attention_mask = ((1 - encoder_attention_mask.to(packed.dtype)) * -10000.0).unsqueeze(1)

        x = self._embed_patches(model, packed, grid)

        emb = model.adaln_single.emb
        embedded = emb.timestep_embedder(t, stage).to(x.dtype)
        added_cond_kwargs = c.added_cond_kwargs
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
            # BasicTransformerBlock(hidden, mask, text, text_mask, timestep, cross_attention_kwargs, class_labels)
            x = call_block(model, block, x, None, text, encoder_attention_mask, timestep, c.cross_attention_kwargs, None)
        shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        x = model.norm_out(x) * (1 + scale) + shift
        return self._velocity(model.proj_out(x), grid)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """``encoder_hidden_states`` zeroed (a stand-in; pass empty-prompt embeddings as ``uncond=`` for real models)."""
        return zeroed_condition(cond, ("encoder_hidden_states",), pronoun="their")


ADAPTER = PixArtAdapter()
