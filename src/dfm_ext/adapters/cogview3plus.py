"""Adapter for diffusers ``CogView3PlusTransformer2DModel`` (CogView3-Plus), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What ``install`` changes (blocks, text projection, positions and the size-condition embedder
untouched): ``patch_embed.proj`` (a ``Linear`` over patches flattened channel-major, ``(c, p, q)``),
``time_condition_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and ``proj_out``
(channel-major: CogView3-Plus unpatchifies ``[B, H', W', C, p, q]``).

Time and output: the pipeline runs CogVideoX's DDIM/DPM schedulers, DDPM models on integer
timesteps (999 = noise) predicting v: ``"discrete"`` (``999 (1 - t)``) and the raw output, which DFM
finetuning re-parameterises into a flow velocity (as for CogVideoX).

Positions: the top-left crop of a ``pos_embed_max_size`` sin-cos table, the same position for a
token at any grid size; the grid is bounded by the table.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (T5),
``original_size``, ``target_size``, ``crop_coords`` (``[B, 2]`` each, pixels).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["CogView3PlusAdapter", "CogView3PlusConditioning", "ADAPTER"]


class CogView3PlusConditioning(NamedTuple):
    """The conditioning keywords :meth:`CogView3PlusAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    original_size: Tensor | None = None
    target_size: Tensor | None = None
    crop_coords: Tensor | None = None


class CogView3PlusAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``CogView3PlusTransformer2DModel`` (conditioning: :class:`CogView3PlusConditioning`)."""

    spec = AdapterSpec(
        name="cogview3plus", model_class="CogView3PlusTransformer2DModel", patch_embed="patch_embed.proj",
        time_proj="time_condition_embed.time_proj", time_embedder="time_condition_embed.timestep_embedder",
        head="proj_out", patch_order="cpq", patch_in_order="cpq", time_convention="discrete", output_scale=1.0,
        positions="fixed", conditioning=CogView3PlusConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_condition_embed\.", r"(^|\.)patch_embed\.text_proj$"),
                "mod": (r"(^|\.)norm1\.linear$", r"(^|\.)norm_out\.linear$"),
                "proj": (r"(^|\.)patch_embed\.proj(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def position_grid(self, model: nn.Module) -> tuple[int, ...] | None:
        size = int(model.config.pos_embed_max_size)
        return (size, size)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`CogView3PlusConditioning`."""
        c = parse_conditioning(model, CogView3PlusConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.text_embed_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5 embeddings [B, L, {width}])")
        sizes = [
            check_tensor(v, name, (b, 2), hint=" (pixels, as the CogView3-Plus pipeline passes it)")
            for name, v in (("original_size", c.original_size), ("target_size", c.target_size), ("crop_coords", c.crop_coords))
        ]
        pe = model.patch_embed
        x = self.tokens(model, packed) + pe.pos_embed[: grid[0], : grid[1]].reshape(grid[0] * grid[1], -1)
        text = pe.text_proj(text)  # text tokens get zero positions
        tce = model.time_condition_embed
        emb = self.embed_time(model, t, stage).to(x.dtype)
        # CogView3's order: original size, crop coordinates, target size.
        size_proj = torch.cat([tce.condition_proj(v.flatten()).view(b, -1) for v in (sizes[0], sizes[2], sizes[1])], dim=1)
        emb = emb + tce.condition_embedder(size_proj.to(x.dtype))
        for block in model.transformer_blocks:
            x, text = call_block(model, block, x, text, emb)
        return self.velocity(model.proj_out(model.norm_out(x, emb)), grid)


ADAPTER = CogView3PlusAdapter()
