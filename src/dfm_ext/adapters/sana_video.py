"""Adapter for diffusers ``SanaVideoTransformer3DModel`` (SANA-Video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What ``install`` changes (linear-attention blocks, RoPE, caption projection and norm untouched):
``patch_embedding`` (``Conv3d``), ``time_embed.emb.timestep_embedder`` (after its ``time_proj``
sinusoid; the adaLN-single ``time_embed.linear`` and the final ``scale_shift_table`` are reused) and
``proj_out`` (``(pt, p, q, c)`` order; a learned-sigma half, if any, is dropped).

Time and sign: ``SanaVideoPipeline``'s flow DPM-Solver feeds ``1000 sigma`` (``"timestep"``) and
steps on ``noise - x`` (``output_scale=-1``). Refused: ``guidance_embeds=True`` (a
guidance-distilled variant whose time path differs).

Positions: Wan's 3-D RoPE from the token grid. The config has no frame count: pass
``sample_shape=(C, T, H, W)``.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, caption_channels]``, optional
``encoder_attention_mask [B, L]`` (1 = keep).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dfm_ext.specialization import combine_layer_groups

from .common import call_block, check_tensor, parse_conditioning, shape_probe
from .diffusers_common import DIFFUSERS_LAYER_GROUPS
from .sana import SanaConditioning, bias_mask
from .spec import AdapterSpec, SpecAdapter

__all__ = ["SanaVideoAdapter", "ADAPTER"]


class SanaVideoAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``SanaVideoTransformer3DModel`` (conditioning: :class:`~dfm_ext.adapters.sana.SanaConditioning`)."""

    spec = AdapterSpec(
        name="sana_video", model_class="SanaVideoTransformer3DModel", patch_embed="patch_embedding",
        time_proj="time_embed.emb.time_proj", time_embedder="time_embed.emb.timestep_embedder", head="proj_out",
        patch_order="pqc", time_convention="timestep", output_scale=-1.0, positions="rope", grid_ndim=3,
        conditioning=SanaConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=combine_layer_groups(
            # GLUMBTempConv folds the frames into the batch for its spatial convs, which therefore cannot
            # be specialised per sample; its temporal conv sees the batch: mlp = conv_temp.
            {**DIFFUSERS_LAYER_GROUPS, "mlp": (r"(^|\.)ff\.conv_temp$",)},
            {
                "cond": (r"(^|\.)time_embed\.emb\.", r"(^|\.)caption_projection\."),
                "mod": (r"(^|\.)time_embed\.linear$",),
                "proj": (r"(^|\.)patch_embedding(\.proj)?$",),
            },
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        if model.config.guidance_embeds:
            raise ValueError(f"{type(model).__name__} with guidance_embeds=True (a guidance-distilled variant) is not supported")

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        raise ValueError(f"{type(model).__name__}'s config has no frame count; pass wrap_dit(..., sample_shape=(C, T, H, W))")

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`~dfm_ext.adapters.sana.SanaConditioning`."""
        c = parse_conditioning(model, SanaConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.caption_channels)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        rope = model.rope(shape_probe(b, int(model.config.in_channels), grid, self.patch(model)))
        x = self.tokens(model, packed)
        embedded = self.embed_time(model, t, stage).to(x.dtype)
        temb = model.time_embed.linear(model.time_embed.silu(embedded))
        temb, embedded = temb.view(b, -1, temb.shape[-1]), embedded.view(b, -1, embedded.shape[-1])
        text = model.caption_norm(model.caption_projection(text).view(b, -1, x.shape[-1]))
        text_mask = bias_mask(c.encoder_attention_mask, x.dtype)
        for block in model.transformer_blocks:
            # SanaVideoTransformerBlock(hidden, attention_mask, text, text_mask, timestep, frames, height, width, rope)
            x = call_block(model, block, x, None, text, text_mask, temb, grid[0], grid[1], grid[2], rope)
        x = model.norm_out(x, embedded, model.scale_shift_table)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = SanaVideoAdapter()
