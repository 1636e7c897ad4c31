"""Adapter for diffusers ``BriaTransformer2DModel`` (Bria 3.x), a FLUX.1-style :class:`~dfm_ext.adapters.dual_stream.DualStreamAdapter`.

What ``install`` changes (blocks, RoPE, text embedder untouched): ``x_embedder`` (``Linear(4 C ->
D)`` over 2x2-folded latents, channel-major), ``time_embed.timestep_embedder`` (after its
``time_proj`` sinusoid, with the model's ``time_theta``) and ``proj_out`` (channel-major).

Time and sign: ``BriaPipeline`` with its flow-matching scheduler passes the scheduler's
``timestep = 1000 sigma`` as is: ``"timestep"``; the model predicts ``noise - x``
(``output_scale=-1``). The same pipeline also drives DDIM-style schedulers, where a checkpoint
would predict epsilon: for such a checkpoint pass ``time_convention`` / ``output_scale`` yourself.
Ids as FluxPipeline's. Refused: ``guidance_embeds=True`` (a distilled variant whose guidance input
this adapter does not take).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]`` (T5),
optional ``joint_attention_kwargs``.
"""

from __future__ import annotations

from torch import nn

from .diffusers_common import diffusers_layer_groups
from .dual_stream import DualStreamAdapter, TextConditioning
from .spec import AdapterSpec

__all__ = ["BriaAdapter", "ADAPTER"]


class BriaAdapter(DualStreamAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``BriaTransformer2DModel`` (conditioning: :class:`~dfm_ext.adapters.dual_stream.TextConditioning`)."""

    spec = AdapterSpec(
        name="bria", model_class="BriaTransformer2DModel", patch_embed="x_embedder",
        time_proj="time_embed.time_proj", time_embedder="time_embed.timestep_embedder", head="proj_out",
        patch_order="cpq", patch_in_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope",
        conditioning=TextConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embed\.", r"(^|\.)context_embedder$"),
                "mod": (r"(^|\.)norm1(_context)?\.linear$", r"(^|\.)norm\.linear$", r"(^|\.)norm_out\.linear$"),
                "mlp": (r"(^|\.)ff(_context)?\.", r"(^|\.)proj_mlp$"),
                "proj": (r"(^|\.)x_embedder(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if model.config.guidance_embeds:
            raise ValueError(f"{type(model).__name__} with guidance_embeds=True (a guidance-distilled variant) is not supported")


ADAPTER = BriaAdapter()
