"""Adapter for diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Videos are ``[B, C, T, H, W]`` in dfm_ext and in Wan alike. What ``install`` changes (blocks,
RoPE, text/image embedders untouched): ``patch_embedding`` (``Conv3d``, patch ``(1, 2, 2)``),
``condition_embedder.time_embedder`` (after its ``timesteps_proj`` sinusoid; the 6-way
``time_proj`` modulation and the final ``scale_shift_table`` are reused) and ``proj_out``
(``(pt, p, q, c)`` order, channels fastest).

Time and sign: ``WanPipeline`` runs a flow-matching scheduler (``flow_prediction``) and feeds
``timestep = 1000 sigma``; the model predicts ``noise - x``. The adapter feeds ``1000 (1 - t)``
and returns ``-output``.

Positions: 3-D RoPE from the token grid (any grid up to ``rope_max_seq_len`` per axis).

Refused: image-to-video variants whose input has more channels than the output (the first-frame
latents are concatenated to the input); per-token timesteps (Wan 2.2 TI2V) are not taken.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_dim]`` (UMT5 embeddings),
optional ``encoder_hidden_states_image [B, L', image_dim]`` (CLIP image embeddings, for models
built with ``image_dim``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning, shape_probe
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["WanAdapter", "WanConditioning", "ADAPTER"]


class WanConditioning(NamedTuple):
    """The conditioning keywords :meth:`WanAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_hidden_states_image: Tensor | None = None


class WanAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``WanTransformer3DModel`` (conditioning: :class:`WanConditioning`)."""

    spec = AdapterSpec(
        name="wan", model_class="WanTransformer3DModel", patch_embed="patch_embedding",
        time_proj="condition_embedder.timesteps_proj", time_embedder="condition_embedder.time_embedder",
        head="proj_out", patch_order="pqc", time_convention="timestep", output_scale=-1.0, positions="rope",
        grid_ndim=3,
        # Wan 2.1 at 480x832, 81 frames: latents 21 x 60 x 104 (4x temporal, 8x spatial VAE).
        default_sample=(21, 60, 104), conditioning=WanConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)condition_embedder\.(time_embedder|text_embedder|image_embedder)\.",),
                "mod": (r"(^|\.)condition_embedder\.time_proj$",),
                "mlp": (r"(^|\.)ffn\.",),
                "proj": (r"(^|\.)patch_embedding(\.proj)?$",),
            }
        ),
    )

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if int(cfg.in_channels) != int(cfg.out_channels):
            raise ValueError(
                f"{type(model).__name__} with in_channels={cfg.in_channels}, out_channels={cfg.out_channels} is an "
                "image-to-video variant (conditioning latents concatenated to the input); not supported"
            )

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`WanConditioning`."""
        c = parse_conditioning(model, WanConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(
            c.encoder_hidden_states, "encoder_hidden_states", (b, None, int(cfg.text_dim)), hint=f" (UMT5 embeddings [B, L, {cfg.text_dim}])"
        )
        # The RoPE module reads only the input's shape: the unpatchified size of the token grid.
        rope = model.rope(shape_probe(b, int(cfg.in_channels), grid, self.patch(model)))
        x = self.tokens(model, packed).contiguous()
        ce = model.condition_embedder
        temb = self.embed_time(model, t, stage).type_as(text)
        modulation = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
        text = ce.text_embedder(text)
        if c.encoder_hidden_states_image is not None:
            if ce.image_embedder is None:
                raise TypeError(f"this {type(model).__name__} has no image embedder (image_dim=None)")
            text = torch.cat([ce.image_embedder(c.encoder_hidden_states_image), text], dim=1)
        for block in model.blocks:
            x = call_block(model, block, x, text, modulation, rope)
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = WanAdapter()
