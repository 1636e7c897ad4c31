"""Adapter for diffusers ``AuraFlowTransformer2DModel`` (AuraFlow v0.1-0.3), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What ``install`` changes (joint and single blocks, register tokens, context embedder untouched):
``pos_embed.proj`` (a ``Linear`` over patches flattened channel-major, ``(c, p, q)``),
``time_step_proj`` (after the ``time_step_embed`` sinusoid) and ``proj_out`` (``(p, q, c)`` order).

Time and sign: ``AuraFlowPipeline`` passes ``sigma = timestep / 1000`` (1 = noise) and the model's
sinusoid multiplies it by 1000 itself; it predicts ``noise - x`` (flow matching, Euler). The
adapter feeds ``1 - t`` and returns ``-output``.

Positions: a learned table of ``pos_embed_max_size`` entries (a square grid, cropped around its
centre): a **fixed-position** model. Every stage shares one token grid, which must fit the table;
see ``docs/guides/adapters.md`` ("Fixed positions").

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]`` (UMT5
embeddings), optional ``attention_kwargs``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["AuraFlowAdapter", "AuraFlowConditioning", "ADAPTER"]


class AuraFlowConditioning(NamedTuple):
    """The conditioning keywords :meth:`AuraFlowAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class AuraFlowAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``AuraFlowTransformer2DModel`` (conditioning: :class:`AuraFlowConditioning`)."""

    spec = AdapterSpec(
        name="auraflow", model_class="AuraFlowTransformer2DModel", patch_embed="pos_embed.proj",
        time_proj="time_step_embed", time_embedder="time_step_proj", head="proj_out", patch_order="pqc",
        patch_in_order="cpq", time_convention="sigma", output_scale=-1.0, positions="fixed",
        conditioning=AuraFlowConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {"cond": (r"(^|\.)time_step_proj\.", r"(^|\.)context_embedder$"), "mod": (r"(^|\.)norm_out\.linear$",)}
        ),
    )

    def position_grid(self, model: nn.Module) -> tuple[int, ...] | None:
        side = math.isqrt(int(model.config.pos_embed_max_size))
        return (side, side)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`AuraFlowConditioning`."""
        c = parse_conditioning(model, AuraFlowConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        pe = model.pos_embed
        x = self.tokens(model, packed)
        # AuraFlowPatchEmbed selects its centre crop from pixel sizes.
        x = x + pe.pos_embed[:, pe.pe_selection_index_based_on_dim(grid[0] * pe.patch_size, grid[1] * pe.patch_size)]
        temb = self.embed_time(model, t, stage).to(x.dtype)
        text = model.context_embedder(text)
        registers = model.register_tokens.to(dtype=text.dtype).repeat(b, 1, 1)
        text = torch.cat((registers, text), dim=1)
        kwargs = c.attention_kwargs
        for block in model.joint_transformer_blocks:
            text, x = call_block(model, block, x, text, temb, kwargs)
        if len(model.single_transformer_blocks) > 0:
            n_text = text.shape[1]
            both = torch.cat((text, x), dim=1)
            for block in model.single_transformer_blocks:
                both = call_block(model, block, both, temb, kwargs)
            x = both[:, n_text:]
        x = model.norm_out(x, temb)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = AuraFlowAdapter()
