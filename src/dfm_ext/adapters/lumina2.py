"""Adapter for diffusers ``Lumina2Transformer2DModel`` (Lumina-Image 2.0), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What ``install`` changes (refiners, main layers, RoPE and caption embedder untouched):
``x_embedder`` (a ``Linear`` over patches flattened channels fastest, ``(p, q, c)``),
``time_caption_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and the final
``norm_out.linear_2`` (the output projection inside ``LuminaLayerNormContinuous``, ``(p, q, c)`` order).

Time and sign: ``Lumina2Pipeline`` feeds ``1 - timestep / 1000``, i.e. the paper's ``t``
(1 = data), and negates the output before its flow-matching scheduler step: the model predicts
``x - noise`` directly. So ``time_convention="unit"``, ``output_scale=1``: no conversion at all.

Positions: 3-axis RoPE (caption index, row, column) from the token grid and the caption mask.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, cap_feat_dim]`` (Gemma-2
embeddings) and ``encoder_attention_mask [B, L]`` (1 = keep; default all ones).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["Lumina2Adapter", "Lumina2Conditioning", "ADAPTER"]


class Lumina2Conditioning(NamedTuple):
    """The conditioning keywords :meth:`Lumina2Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None


class Lumina2Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``Lumina2Transformer2DModel`` (conditioning: :class:`Lumina2Conditioning`)."""

    spec = AdapterSpec(
        name="lumina2", model_class="Lumina2Transformer2DModel", patch_embed="x_embedder",
        time_proj="time_caption_embed.time_proj", time_embedder="time_caption_embed.timestep_embedder",
        head="norm_out.linear_2", patch_order="pqc", patch_in_order="pqc", time_convention="unit",
        output_scale=1.0, positions="rope", conditioning=Lumina2Conditioning,
        null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_caption_embed\.",),
                "mod": (r"(^|\.)norm1\.linear$", r"(^|\.)norm_out\.linear_1$"),
                "attn": (r"(^|\.)attn\.",),
                "mlp": (r"(^|\.)feed_forward\.",),
                "proj": (r"(^|\.)x_embedder(\.proj)?$", r"(^|\.)norm_out\.linear_2$"),
            }
        ),
    )

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`Lumina2Conditioning`."""
        c = parse_conditioning(model, Lumina2Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(
            c.encoder_hidden_states, "encoder_hidden_states", (b, None, int(cfg.cap_feat_dim)), hint=f" (Gemma embeddings [B, L, {cfg.cap_feat_dim}])"
        )
        mask = c.encoder_attention_mask
        if mask is None:
            mask = torch.ones(b, text.shape[1], dtype=torch.long, device=text.device)
        check_tensor(mask, "encoder_attention_mask", (b, text.shape[1]), floating=False)
        p = int(cfg.patch_size)
        # The RoPE module patchifies its input and reads the caption lengths from the mask
        # (a host read of the mask, as in Lumina2's own forward); a one-channel stand-in gives the ids.
        _, text_rope, image_rope, rope, text_lengths, lengths = model.rope_embedder(packed.new_zeros(b, 1, grid[0] * p, grid[1] * p), mask)
        x = self.tokens(model, packed)
        temb = self.embed_time(model, t, stage).to(x.dtype)
        text = model.time_caption_embed.caption_embedder(text)
        for layer in model.context_refiner:
            text = layer(text, mask, text_rope)
        for layer in model.noise_refiner:
            x = layer(x, None, image_rope, temb)
        longest = max(lengths)
        joint_mask = x.new_zeros(b, longest, dtype=torch.bool)
        joint = x.new_zeros(b, longest, int(cfg.hidden_size))
        for i, (n_text, n) in enumerate(zip(text_lengths, lengths)):
            joint_mask[i, :n] = True
            joint[i, :n_text] = text[i, :n_text]
            joint[i, n_text:n] = x[i]
        masked = joint_mask if len(set(lengths)) > 1 else None
        for layer in model.layers:
            joint = call_block(model, layer, joint, masked, rope, temb)
        joint = model.norm_out(joint, temb)
        n_image = grid[0] * grid[1]
        x = torch.stack([joint[i, n_text : n_text + n_image] for i, n_text in enumerate(text_lengths)])
        return self.velocity(x, grid)


ADAPTER = Lumina2Adapter()
