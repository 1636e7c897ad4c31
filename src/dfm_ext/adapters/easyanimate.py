"""Adapter for diffusers ``EasyAnimateTransformer3DModel`` (EasyAnimate V5.1 text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Videos are ``[B, C, T, H, W]`` in dfm_ext and EasyAnimate alike. EasyAnimate embeds every frame
with the same ``Conv2d`` patch (``proj``); ``install`` turns it into the equivalent ``(1, p, p)``
``Conv3d`` (:func:`~dfm_ext.adapters.mochi.frame_conv3d`) and widens that. It also replaces
``time_embedding`` (after its ``time_proj`` sinusoid) and ``proj_out`` (channel-major: EasyAnimate
unpatchifies ``[B, T, H', W', C, p, q]``).

Time and sign: ``EasyAnimatePipeline`` runs ``FlowMatchEulerDiscreteScheduler`` and feeds
``timestep = 1000 sigma``; the model predicts ``noise - x``. The adapter feeds ``1000 (1 - t)`` and
returns ``-output``.

Positions: 3-D RoPE, built from the token grid as the model builds it (any grid).

Refused: inpaint and control variants (``in_channels != out_channels``: their masks and latents are
concatenated to the input).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (Qwen2-VL),
``encoder_hidden_states_t5 [B, L', text_embed_dim_t5]`` for models with a T5 stream.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, get_submodule_path, parse_conditioning, set_submodule_path, shape_probe
from .diffusers_common import diffusers_layer_groups
from .mochi import frame_conv3d
from .spec import AdapterSpec, SpecAdapter

__all__ = ["EasyAnimateAdapter", "EasyAnimateConditioning", "ADAPTER"]


class EasyAnimateConditioning(NamedTuple):
    """The conditioning keywords :meth:`EasyAnimateAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_hidden_states_t5: Tensor | None = None


class EasyAnimateAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``EasyAnimateTransformer3DModel`` (conditioning: :class:`EasyAnimateConditioning`)."""

    spec = AdapterSpec(
        name="easyanimate", model_class="EasyAnimateTransformer3DModel", patch_embed="proj", time_proj="time_proj",
        time_embedder="time_embedding", head="proj_out", patch_order="cpq", time_convention="timestep",
        output_scale=-1.0, positions="rope", grid_ndim=3,
        # EasyAnimate V5.1 at 512 x 512, 49 frames: latents 13 x 64 x 64 (4x temporal, 8x spatial VAE).
        default_sample=(13, 64, 64), conditioning=EasyAnimateConditioning,
        null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embedding\.", r"(^|\.)text_proj(_t5)?(\.|$)"),
                "mlp": (r"(^|\.)txt_ff\.",),
                "proj": (r"^proj$",),
            }
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if int(cfg.in_channels) != int(cfg.out_channels):
            raise ValueError(
                f"{type(model).__name__} with in_channels={cfg.in_channels}, out_channels={cfg.out_channels} is an "
                "inpaint or control variant (masks and latents concatenated to the input): not supported"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        p = int(model.config.patch_size)
        return (1, p, p)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        proj = get_submodule_path(model, self.spec.patch_embed)
        if isinstance(proj, nn.Conv2d):
            set_submodule_path(model, self.spec.patch_embed, frame_conv3d(proj))
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`EasyAnimateConditioning`."""
        c = parse_conditioning(model, EasyAnimateConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        width = int(cfg.text_embed_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        t5 = c.encoder_hidden_states_t5
        if t5 is not None:
            if model.text_proj_t5 is None:
                raise ValueError(f"this {type(model).__name__} has no T5 stream (text_embed_dim_t5=None)")
            t5 = check_tensor(t5, "encoder_hidden_states_t5", (b, None, int(cfg.text_embed_dim_t5)))
        x = self.tokens(model, packed)  # frame-major, as EasyAnimate flattens its per-frame tokens
        temb = self.embed_time(model, t, stage).to(x.dtype)
        # The RoPE module reads the input's shape and device only: a zero-stride stand-in.
        probe = shape_probe(b, int(cfg.in_channels), grid, self.patch(model))
        rope = model.rope_embedding(x.new_empty(1).expand(probe.shape))
        text = model.text_proj(text)
        if t5 is not None:
            text = torch.cat([text, model.text_proj_t5(t5)], dim=1).contiguous()
        for block in model.transformer_blocks:
            x, text = call_block(model, block, x, text, temb, rope)
        x = model.norm_out(model.norm_final(x), temb=temb)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = EasyAnimateAdapter()
