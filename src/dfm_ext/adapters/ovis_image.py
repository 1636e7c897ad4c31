"""Adapter for diffusers ``OvisImageTransformer2DModel`` (Ovis-Image), a FLUX.1-style :class:`~dfm_ext.adapters.dual_stream.DualStreamAdapter`.

What ``install`` changes (blocks, RoPE, text norm and embedder untouched): ``x_embedder``
(``Linear(4 C -> D)`` over 2x2-folded latents, channel-major), ``timestep_embedder`` (after its
``time_proj`` sinusoid) and ``proj_out`` (channel-major).

Time and sign: ``OvisImagePipeline`` passes ``sigma = timestep / 1000`` and the model multiplies it
by 1000: the embedder reads ``1000 (1 - t)`` (``"timestep"``). Flow-matching Euler on the output:
the model predicts ``noise - x`` (``output_scale=-1``). Ids as FluxPipeline's: zeros for the text,
``(0, row, column)`` for the image.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]``, optional
``joint_attention_kwargs``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .diffusers_common import diffusers_layer_groups
from .dual_stream import DualStreamAdapter, TextConditioning
from .spec import AdapterSpec

__all__ = ["OvisImageAdapter", "ADAPTER"]


class OvisImageAdapter(DualStreamAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``OvisImageTransformer2DModel`` (conditioning: :class:`~dfm_ext.adapters.dual_stream.TextConditioning`)."""

    spec = AdapterSpec(
        name="ovis_image", model_class="OvisImageTransformer2DModel", patch_embed="x_embedder",
        time_proj="time_proj", time_embedder="timestep_embedder", head="proj_out", patch_order="cpq",
        patch_in_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope",
        conditioning=TextConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)timestep_embedder\.", r"(^|\.)context_embedder$"),
                "mod": (r"(^|\.)norm1(_context)?\.linear$", r"(^|\.)norm\.linear$", r"(^|\.)norm_out\.linear$"),
                "mlp": (r"(^|\.)ff(_context)?\.", r"(^|\.)proj_mlp$"),
                "proj": (r"(^|\.)x_embedder(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def text(self, model: nn.Module, text: Tensor) -> Tensor:
        return model.context_embedder(model.context_embedder_norm(text))


ADAPTER = OvisImageAdapter()
