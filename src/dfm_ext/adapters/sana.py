"""Adapter for diffusers ``SanaTransformer2DModel`` (Sana 600M / 1.6B / 4.8B), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What ``install`` changes (linear-attention blocks, caption projection/norm and positions untouched):
``patch_embed.proj`` (patch ``Conv2d``), ``time_embed.emb.timestep_embedder`` (after its
``time_proj`` sinusoid; the adaLN-single ``time_embed.linear`` and the final
``scale_shift_table`` are reused) and ``proj_out`` (``(p, q, c)`` order).

Time and sign: ``SanaPipeline`` runs a flow-matching scheduler (``flow_prediction``) and feeds
``timestep = 1000 sigma * config.timestep_scale``; the model predicts ``noise - x``. The adapter
feeds ``timestep_scale * 1000 (1 - t)`` and returns ``-output``.

Positions: none when ``interpolation_scale`` is ``None`` (the released checkpoints), else the
``PatchEmbed`` sin-cos table, recomputed for any grid: any sample shape works.

Refused: ``guidance_embeds=True`` (SANA-Sprint) reads a trigonometric consistency time
(``sin s / (sin s + cos s)``), none of the linear conventions, and embeds guidance in another module.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, caption_channels]`` (Gemma
embeddings), optional ``encoder_attention_mask [B, L]`` (1 = keep).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from dfm_ext.specialization import combine_layer_groups

from .common import call_block, check_tensor, parse_conditioning, sincos_positions
from .diffusers_common import DIFFUSERS_LAYER_GROUPS
from .spec import AdapterSpec, SpecAdapter

__all__ = ["SanaAdapter", "SanaConditioning", "bias_mask", "ADAPTER"]


class SanaConditioning(NamedTuple):
    """The conditioning keywords :meth:`SanaAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None


def bias_mask(mask: Tensor | None, dtype: Any) -> Tensor | None:
    """diffusers' mask convention: ``[B, L]`` with 1 = keep -> additive bias ``[B, 1, L]`` (0 / -10000)."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class SanaAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``SanaTransformer2DModel`` (conditioning: :class:`SanaConditioning`)."""

    spec = AdapterSpec(
        name="sana", model_class="SanaTransformer2DModel", patch_embed="patch_embed.proj",
        time_proj="time_embed.emb.time_proj", time_embedder="time_embed.emb.timestep_embedder", head="proj_out",
        patch_order="pqc", time_convention="timestep", time_scale="timestep_scale", output_scale=-1.0,
        positions="sincos", conditioning=SanaConditioning, null_keys=("encoder_hidden_states",),
        # The GLUMBConv MLP's depthwise conv_depth (grouped) cannot be specialised: mlp = its 1x1 convs.
        layer_groups=combine_layer_groups(
            {**DIFFUSERS_LAYER_GROUPS, "mlp": (r"(^|\.)ff\.conv_(inverted|point)$",)},
            {
                "cond": (r"(^|\.)time_embed\.emb\.", r"(^|\.)caption_projection\."),
                "mod": (r"(^|\.)time_embed\.linear$",),
            },
        ),
    )

    def check_model(self, model: nn.Module) -> None:
        if model.config.guidance_embeds:
            raise ValueError(
                f"{type(model).__name__} with guidance_embeds=True (SANA-Sprint) reads a trigonometric "
                "consistency time, which is none of the linear time conventions ('timestep', 'sigma', 'unit', "
                "'x1000', 'discrete'); it is not supported"
            )

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`SanaConditioning`."""
        c = parse_conditioning(model, SanaConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.caption_channels)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        x = self.tokens(model, packed)
        pos = sincos_positions(model.patch_embed, grid, x.device)
        if pos is not None:
            x = (x + pos).to(x.dtype)
        embedded = self.embed_time(model, t, stage).to(x.dtype)
        temb = model.time_embed.linear(model.time_embed.silu(embedded))
        text = model.caption_norm(model.caption_projection(text).view(b, -1, x.shape[-1]))
        text_mask = bias_mask(c.encoder_attention_mask, x.dtype)
        for block in model.transformer_blocks:
            # SanaTransformerBlock(hidden, attention_mask, text, text_mask, timestep, height, width)
            x = call_block(model, block, x, None, text, text_mask, temb, grid[0], grid[1])
        x = model.norm_out(x, embedded, model.scale_shift_table)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = SanaAdapter()
