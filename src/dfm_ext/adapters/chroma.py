"""Adapter for diffusers ``ChromaTransformer2DModel`` (Chroma, a pruned FLUX.1-schnell), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Like Flux, Chroma works on pre-packed tokens (the pipeline's 2x2 fold, channel-major ``(c, p, q)``,
which is the :class:`~dfm_ext.wrapping.packing.ScalePacker`'s space-to-depth). What ``install``
changes (blocks, RoPE and text embedder untouched): ``x_embedder`` (``Linear(4 C -> D)``), the
time path and ``proj_out`` (channel-major).

The time path is not a ``[B] -> [B, D]`` MLP: a parameter-free featuriser
(``time_text_embed``: the time sinusoid, a zero-guidance sinusoid and one index sinusoid per
modulation vector, ``[B, M, 64]`` for ``M = 3 L_single + 12 L_double + 2``) feeds the
"approximator" ``distilled_guidance_layer`` (``in_proj``, 5 residual MLP layers, ``out_proj``),
which outputs every modulation vector at once, ``[B, M, D]``. A copy per stage would cost the
approximator's ~280M parameters (hidden 5120) again for every extra stage. Instead the stages
share it and its input layer ``in_proj`` is widened to read every stage's features and the stage
index (:class:`~dfm_ext.wrapping.timestep_embed.StageInputTimeEmbed`): ``64 x 5120`` (0.33M)
parameters per extra stage, zero at first, so stage 0 is the pretrained model bit for bit.

Time and sign: the pipeline passes ``sigma = timestep / 1000`` and the model multiplies it by 1000
before the featuriser: the adapter feeds the featuriser ``1000 (1 - t)`` (``"timestep"``). The
model predicts ``noise - x``: ``output_scale=-1``.

Positions: Flux's RoPE over ids ``(0, row, column)`` of the token grid, zero ids for the text.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]`` (T5), optional
``attention_mask`` (``[B, L]`` over the text, 1 = keep, extended over the image tokens as
``ChromaPipeline`` does; or ``[B, L + N]``), ``joint_attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .flux import flux_image_ids
from .spec import AdapterSpec, SpecAdapter

__all__ = ["ChromaAdapter", "ChromaConditioning", "ADAPTER"]


class ChromaConditioning(NamedTuple):
    """The conditioning keywords :meth:`ChromaAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    attention_mask: Tensor | None = None
    joint_attention_kwargs: dict[str, Any] | None = None


class ChromaAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``ChromaTransformer2DModel`` (conditioning: :class:`ChromaConditioning`)."""

    spec = AdapterSpec(
        name="chroma", model_class="ChromaTransformer2DModel", patch_embed="x_embedder",
        time_proj="time_text_embed", time_embedder="distilled_guidance_layer", time_input_layer="in_proj",
        head="proj_out", patch_order="cpq", patch_in_order="cpq", time_convention="timestep", output_scale=-1.0,
        positions="rope", default_sample=(128, 128), conditioning=ChromaConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                # The approximator makes every modulation vector ("mod"); its widened input reads the times.
                "cond": (r"(^|\.)distilled_guidance_layer\.network\.in_proj\.", r"(^|\.)context_embedder$"),
                "mod": (r"(^|\.)distilled_guidance_layer\.network\.(layers|out_proj)",),
                "proj": (r"(^|\.)x_embedder(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if int(cfg.patch_size) != 1 or int(cfg.in_channels) != int(model.out_channels) or int(cfg.in_channels) % 4:
            raise ValueError(
                f"{type(model).__name__} with patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
                f"out_channels={model.out_channels} is not a plain Chroma (patch 1 over 2x2-folded latents, in = out)"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (2, 2)  # the pipeline's 2x2 fold; the model's own patch_size is 1

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels) // 4, *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`ChromaConditioning`."""
        c = parse_conditioning(model, ChromaConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5 embeddings [B, L, {width}])")
        x = self.tokens(model, packed)
        n_text, n_image = text.shape[1], grid[0] * grid[1]
        mask = c.attention_mask
        if mask is not None:
            check_tensor(mask, "attention_mask", (b, None), floating=False)
            if mask.shape[1] == n_text:  # ChromaPipeline._prepare_attention_mask: the image tokens are kept
                mask = torch.cat([mask.bool(), mask.new_ones(b, n_image, dtype=torch.bool)], dim=1)
            elif mask.shape[1] != n_text + n_image:
                raise ValueError(f"attention_mask must be [B, L] = [{b}, {n_text}] or [B, L + N] = [{b}, {n_text + n_image}], got {tuple(mask.shape)}")
        mods = self.embed_time(model, t, stage).to(x.dtype)  # [B, M, D], every modulation vector
        text = model.context_embedder(text)
        ids = torch.cat([torch.zeros(n_text, 3, device=x.device), flux_image_ids(grid, x.device)])
        rope = model.pos_embed(ids)
        kwargs = c.joint_attention_kwargs
        n_single, n_double = len(model.single_transformer_blocks), len(model.transformer_blocks)
        img_offset, txt_offset = 3 * n_single, 3 * n_single + 6 * n_double
        for i, block in enumerate(model.transformer_blocks):
            i_img, i_txt = img_offset + 6 * i, txt_offset + 6 * i
            temb = torch.cat([mods[:, i_img : i_img + 6], mods[:, i_txt : i_txt + 6]], dim=1)
            text, x = call_block(model, block, x, text, temb, rope, mask, kwargs)
        x = torch.cat([text, x], dim=1)
        for i, block in enumerate(model.single_transformer_blocks):
            x = call_block(model, block, x, mods[:, 3 * i : 3 * i + 3], rope, mask, kwargs)
        x = model.norm_out(x[:, n_text:], mods[:, -2:])
        return self.velocity(model.proj_out(x), grid)


ADAPTER = ChromaAdapter()
