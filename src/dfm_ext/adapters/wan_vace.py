"""Adapter for diffusers ``WanVACETransformer3DModel`` (Wan VACE: controlled video generation), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Wan's layout (see :mod:`dfm_ext.adapters.wan`: ``install`` changes ``patch_embedding``, the time
embedder and ``proj_out``) plus VACE's control branch, untouched: ``vace_patch_embedding`` embeds
the control latents (``[B, vace_in_channels, T, H, W]``), the ``vace_blocks`` turn them, together
with the main tokens and the time modulation, into hints added after the blocks listed in
``vace_layers``. The control latents are conditioning, not part of the generated sample: give
them at the resolution of the token grid times the model's patch (stage 0's resolution when stage 0
uses the model's own patch), as the pipeline builds them for its latents.

Time and sign: as Wan (``"timestep"``, ``noise - x``). Refused as for Wan: ``in_channels !=
out_channels``.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_dim]``,
``control_hidden_states [B, vace_in_channels, T, H, W]`` (required), optional
``control_hidden_states_scale [len(vace_layers)]`` (default ones) and ``encoder_hidden_states_image``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning, shape_probe
from .spec import AdapterSpec
from .wan import WanAdapter

__all__ = ["WanVACEAdapter", "WanVACEConditioning", "ADAPTER"]


class WanVACEConditioning(NamedTuple):
    """The conditioning keywords :meth:`WanVACEAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    control_hidden_states: Tensor | None = None
    control_hidden_states_scale: Tensor | None = None
    encoder_hidden_states_image: Tensor | None = None


class WanVACEAdapter(WanAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``WanVACETransformer3DModel`` (conditioning: :class:`WanVACEConditioning`)."""

    spec = AdapterSpec(
        **{
            **{f: getattr(WanAdapter.spec, f) for f in WanAdapter.spec.__dataclass_fields__},
            "name": "wan_vace", "model_class": "WanVACETransformer3DModel", "conditioning": WanVACEConditioning,
            "layer_groups": {**WanAdapter.spec.layer_groups, "cond": (*WanAdapter.spec.layer_groups["cond"], r"(^|\.)vace_patch_embedding$")},
        }
    )  # fmt: skip

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`WanVACEConditioning`."""
        c = parse_conditioning(model, WanVACEConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        patch = self.patch(model)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, int(cfg.text_dim)), hint=f" (UMT5 embeddings [B, L, {cfg.text_dim}])")
        control_shape = (b, int(cfg.vace_in_channels), *(g * p for g, p in zip(grid, patch)))
        control = check_tensor(c.control_hidden_states, "control_hidden_states", control_shape, hint=" (VACE control latents at the token grid times the patch)")
        n_hints = len(cfg.vace_layers)
        scales = c.control_hidden_states_scale if c.control_hidden_states_scale is not None else control.new_ones(n_hints)
        check_tensor(scales, "control_hidden_states_scale", (n_hints,))
        rope = model.rope(shape_probe(b, int(cfg.in_channels), grid, patch))
        x = self.tokens(model, packed).contiguous()
        control = model.vace_patch_embedding(control).flatten(2).transpose(1, 2)
        ce = model.condition_embedder
        temb = self.embed_time(model, t, stage).type_as(text)
        modulation = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
        text = ce.text_embedder(text)
        if c.encoder_hidden_states_image is not None:
            if ce.image_embedder is None:
                raise TypeError(f"this {type(model).__name__} has no image embedder (image_dim=None)")
            text = torch.cat([ce.image_embedder(c.encoder_hidden_states_image), text], dim=1)
        hints = []
        for block, scale in zip(model.vace_blocks, scales.unbind()):
            hint, control = call_block(model, block, x, text, control, modulation, rope)
            hints.append((hint, scale))
        hints.reverse()
        for i, block in enumerate(model.blocks):
            x = call_block(model, block, x, text, modulation, rope)
            if i in cfg.vace_layers:
                hint, scale = hints.pop()
                x = x + hint * scale
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = WanVACEAdapter()
