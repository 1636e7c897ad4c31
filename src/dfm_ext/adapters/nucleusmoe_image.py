"""Adapter for diffusers ``NucleusMoEImageTransformer2DModel`` (Nucleus-MoE image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Like Qwen-Image, the model works on pre-packed tokens: ``NucleusMoEImagePipeline`` folds every
``p x p`` block of the latent ``[B, C, H, W]`` (``p = config.patch_size``) into one token of
``C p p`` channels in channel-major ``(c, p, q)`` order, the
:class:`~dfm_ext.wrapping.packing.ScalePacker`'s space-to-depth. What ``install`` changes (blocks,
mixture-of-experts layers, RoPE, text norm untouched): ``img_in`` (``Linear(C p p -> D)``),
``time_text_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and ``proj_out``
(channel-major, as the pipeline unpacks). The time path's ``RMSNorm`` stays shared: it normalises
the sum of the stages' embeddings (and the stage embedding), so stage 0 is the pretrained path.

Time and sign: the pipeline passes ``timestep / 1000 = sigma``; the model's sinusoid multiplies it
by 1000 (``Timesteps(scale=1000)``). The pipeline negates the output before its Euler step: the
model predicts ``x - noise``. The adapter feeds ``1 - t`` and returns the output as is.

Mixture of experts: expert-choice routing picks tokens within each sample (top-``C`` over its
sequence), so samples stay independent; the router reads the (per-stage) time embedding. The routed
experts are weight tensors, not layers, so they are not specialisable: ``mlp`` holds the router
``gate``, the shared expert and the dense MLPs.

Positions: RoPE over ``(frame, row, column)`` of the token grid, centred (``scale_rope``).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]``, optional
``encoder_hidden_states_mask [B, L]`` (1 = keep), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["NucleusMoEImageAdapter", "NucleusMoEImageConditioning", "ADAPTER"]


class NucleusMoEImageConditioning(NamedTuple):
    """The conditioning keywords :meth:`NucleusMoEImageAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_hidden_states_mask: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class NucleusMoEImageAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``NucleusMoEImageTransformer2DModel`` (conditioning: :class:`NucleusMoEImageConditioning`)."""

    spec = AdapterSpec(
        name="nucleusmoe_image", model_class="NucleusMoEImageTransformer2DModel", patch_embed="img_in",
        time_proj="time_text_embed.time_proj", time_embedder="time_text_embed.timestep_embedder",
        head="proj_out", patch_order="cpq", patch_in_order="cpq", time_convention="sigma", output_scale=1.0,
        positions="rope",
        # 1024 x 1024 px with a 8x VAE: 128 x 128 latents.
        default_sample=(128, 128), conditioning=NucleusMoEImageConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_text_embed\.", r"(^|\.)encoder_proj$"),
                "mod": (r"(^|\.)img_mod\.1$",),
                "mlp": (r"(^|\.)img_mlp\.",),
                "proj": (r"(^|\.)img_in(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        cfg, p = model.config, int(model.config.patch_size)
        if int(cfg.in_channels) != p * p * int(model.out_channels):
            raise ValueError(
                f"{type(model).__name__} with in_channels={cfg.in_channels}, out_channels={model.out_channels} is not "
                f"a text-to-image model of its family (in = patch_size^2 x out: {p}x{p}-packed latents)"
            )

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.out_channels), *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`NucleusMoEImageConditioning`."""
        from diffusers.models.transformers.transformer_nucleusmoe_image import (  # noqa: PLC0415
            _compute_text_seq_len_from_mask,
        )

        c = parse_conditioning(model, NucleusMoEImageConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        if c.encoder_hidden_states_mask is not None:
            check_tensor(c.encoder_hidden_states_mask, "encoder_hidden_states_mask", (b, text.shape[1]), floating=False)
        x = self.tokens(model, packed)
        text = model.txt_norm(text)
        text_len, _, text_mask = _compute_text_seq_len_from_mask(text, c.encoder_hidden_states_mask)
        temb = model.time_text_embed.norm(self.embed_time(model, t, stage).to(x.dtype))
        rope = model.pos_embed([(1, grid[0], grid[1])] * b, max_txt_seq_len=text_len, device=x.device)
        kwargs = dict(c.attention_kwargs or {})
        if text_mask is not None:
            kwargs["attention_mask"] = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), text_mask], dim=1)
        for block in model.transformer_blocks:
            x = call_block(model, block, x, text, temb, rope, kwargs)
        return self.velocity(model.proj_out(model.norm_out(x, temb)), grid)


ADAPTER = NucleusMoEImageAdapter()
