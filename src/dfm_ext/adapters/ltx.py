"""Adapter for diffusers ``LTXVideoTransformer3DModel`` (LTX-Video 0.9.x), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Videos are ``[B, C, T, H, W]`` in dfm_ext and LTX alike. ``LTXPipeline`` packs them into tokens
with the transformer's ``(patch_size_t, patch_size, patch_size)`` patch (``(1, 1, 1)`` for the
released models), channel-major ``(c, pt, p, q)``; the
:class:`~dfm_ext.wrapping.packing.ScalePacker` does the same. What ``install`` changes (blocks,
caption projection, RoPE untouched): ``proj_in`` (``Linear``), ``time_embed.emb.timestep_embedder``
(after its ``time_proj`` sinusoid; the adaLN-single ``time_embed.linear`` and the final
``scale_shift_table`` are reused) and ``proj_out`` (channel-major, as the pipeline unpacks).

Time and sign: ``LTXPipeline`` runs a flow-matching scheduler and feeds ``timestep = 1000 sigma``;
the model predicts ``noise - x``. The adapter feeds ``1000 (1 - t)`` and returns ``-output``.

Positions: RoPE over ``(frame, row, column)`` scaled by ``rope_interpolation_scale``, which the
pipeline derives from the *autoencoder* and the frame rate, ``(8 / frame_rate, 32, 32)`` for
LTX-Video's VAE: the transformer cannot prove it, so it is a required conditioning keyword.
With a patch of 1 the model's token grid is the sample itself: stage 0 must cover it, so pass
``patch_sizes`` (e.g. ``[(1, 1, 1), (1, 2, 2)]`` with ``sample_shape`` twice the stage-0 size).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, caption_channels]`` (T5),
``rope_interpolation_scale`` (three floats), optional ``encoder_attention_mask [B, L]`` (1 = keep).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["LTXVideoAdapter", "LTXVideoConditioning", "ADAPTER"]


class LTXVideoConditioning(NamedTuple):
    """The conditioning keywords :meth:`LTXVideoAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    rope_interpolation_scale: tuple[float, float, float] | Tensor | None = None
    encoder_attention_mask: Tensor | None = None


class LTXVideoAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``LTXVideoTransformer3DModel`` (conditioning: :class:`LTXVideoConditioning`)."""

    spec = AdapterSpec(
        name="ltx_video", model_class="LTXVideoTransformer3DModel", patch_embed="proj_in",
        time_proj="time_embed.emb.time_proj", time_embedder="time_embed.emb.timestep_embedder", head="proj_out",
        patch_order="cpq", patch_in_order="cpq", time_convention="timestep", output_scale=-1.0,
        positions="rope", grid_ndim=3,
        # 121 frames at 512 x 768 with LTX-Video's VAE (8x temporal, 32x spatial): 16 x 16 x 24 latents.
        default_sample=(16, 16, 24), conditioning=LTXVideoConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embed\.emb\.", r"(^|\.)caption_projection\."),
                "mod": (r"(^|\.)time_embed\.linear$",),
                "proj": (r"(^|\.)proj_in(\.proj)?$",),
            }
        ),
    )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`LTXVideoConditioning`."""
        c = parse_conditioning(model, LTXVideoConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.caption_channels)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5 embeddings [B, L, {width}])")
        if c.rope_interpolation_scale is None:
            raise TypeError(
                f"{type(model).__name__} needs rope_interpolation_scale=(temporal, spatial, spatial): LTXPipeline "
                "passes (vae_temporal_compression / frame_rate, vae_spatial_compression, vae_spatial_compression), "
                "(8 / 25, 32, 32) for LTX-Video's VAE at 25 fps"
            )
        mask = c.encoder_attention_mask
        if mask is not None:
            check_tensor(mask, "encoder_attention_mask", (b, text.shape[1]), floating=False)
            mask = ((1 - mask.to(packed.dtype)) * -10000.0).unsqueeze(1)
        x = self.tokens(model, packed)
        rope = model.rope(x, grid[0], grid[1], grid[2], c.rope_interpolation_scale, None)
        embedded = self.embed_time(model, t, stage).to(x.dtype)
        temb = model.time_embed.linear(model.time_embed.silu(embedded)).view(b, 1, -1)
        text = model.caption_projection(text).view(b, -1, x.shape[-1])
        for block in model.transformer_blocks:
            x = call_block(model, block, x, text, temb, rope, mask)
        shift, scale = (model.scale_shift_table[None, None] + embedded.view(b, 1, 1, -1)).unbind(2)
        x = model.norm_out(x) * (1 + scale) + shift
        return self.velocity(model.proj_out(x), grid)


ADAPTER = LTXVideoAdapter()
