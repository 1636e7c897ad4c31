"""Adapter for diffusers ``CogView4Transformer2DModel`` (CogView4-6B), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What ``install`` changes (blocks, RoPE, text projection and the size-condition embedder untouched):
``patch_embed.proj`` (a ``Linear`` over patches flattened channel-major, ``(c, p, q)``),
``time_condition_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and ``proj_out``
(channel-major, as CogView4 unpatchifies: ``[B, H', W', C, p, q]``).

Time and sign: CogView4's pipeline runs the flow-matching Euler scheduler with a resolution
shift (``time_shift_type="linear"``): the noise level is ``sigma = mu / (mu + 1/s - 1)`` with
``mu = 0.75 sqrt(tokens / 256) + 0.25``, while the model reads the *unshifted* ``1000 s``. In
paper time (``sigma = 1 - t``) that is ``1000 s`` with ``s = sigma / (sigma + mu (1 - sigma))``:
the time convention ``"shifted_timestep"`` (:class:`~dfm_ext.process.conventions.TimeConvention`),
which reads the token grid at every call, so stage 0 is exact at every resolution. The model
predicts ``noise - x``: ``output_scale=-1``.

Positions: 2-D RoPE interpolated onto any grid (``rope_axes_dim``); any sample shape works.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (GLM
embeddings), ``original_size``, ``target_size`` and ``crop_coords`` (``[B, 2]`` each, in pixels,
as ``CogView4Pipeline`` passes them: ``(height, width)``, ``(height, width)``, ``(0, 0)``),
optional ``attention_mask``, ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning, shape_probe
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["CogView4Adapter", "CogView4Conditioning", "ADAPTER"]


class CogView4Conditioning(NamedTuple):
    """The conditioning keywords :meth:`CogView4Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    original_size: Tensor | None = None
    target_size: Tensor | None = None
    crop_coords: Tensor | None = None
    attention_mask: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class CogView4Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``CogView4Transformer2DModel`` (conditioning: :class:`CogView4Conditioning`)."""

    spec = AdapterSpec(
        name="cogview4", model_class="CogView4Transformer2DModel", patch_embed="patch_embed.proj",
        time_proj="time_condition_embed.time_proj", time_embedder="time_condition_embed.timestep_embedder",
        head="proj_out", patch_order="cpq", patch_in_order="cpq", time_convention="shifted_timestep",
        output_scale=-1.0, positions="rope", conditioning=CogView4Conditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_condition_embed\.", r"(^|\.)patch_embed\.text_proj$"),
                "mod": (r"(^|\.)norm1\.linear$", r"(^|\.)norm_out\.linear$"),
                "proj": (r"(^|\.)patch_embed\.proj(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`CogView4Conditioning`."""
        c = parse_conditioning(model, CogView4Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.text_embed_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (GLM embeddings [B, L, {width}])")
        sizes = [
            check_tensor(v, name, (b, 2), hint=" (pixels, as CogView4Pipeline passes it)")
            for name, v in (("original_size", c.original_size), ("target_size", c.target_size), ("crop_coords", c.crop_coords))
        ]
        x = self.tokens(model, packed)
        text = model.patch_embed.text_proj(text)
        tce = model.time_condition_embed
        # The shifted-sigma time convention reads the token grid (mu grows with the token count).
        temb = self.embed_time(model, t, stage, grid).to(x.dtype)
        # CogView4's order: original size, crop coordinates, target size.
        size_proj = torch.cat([tce.condition_proj(v.flatten()).view(b, -1) for v in (sizes[0], sizes[2], sizes[1])], dim=1)
        temb = F.silu(temb + tce.condition_embedder(size_proj.to(x.dtype)))
        p = int(model.config.patch_size)
        rope = model.rope(shape_probe(b, int(model.config.in_channels), grid, (p, p)))
        for block in model.transformer_blocks:
            x, text = call_block(model, block, x, text, temb, rope, c.attention_mask, c.attention_kwargs)
        return self.velocity(model.proj_out(model.norm_out(x, temb)), grid)


ADAPTER = CogView4Adapter()
