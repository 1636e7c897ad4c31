"""Adapter for diffusers ``LongCatImageTransformer2DModel`` (LongCat-Image), a FLUX.1-style :class:`~dfm_ext.adapters.dual_stream.DualStreamAdapter`.

What ``install`` changes (blocks, RoPE, text embedder untouched): ``x_embedder`` (``Linear(4 C ->
D)`` over 2x2-folded latents, channel-major), ``time_embed.timestep_embedder`` (after its
``time_proj`` sinusoid) and ``proj_out`` (channel-major).

Time and sign: ``LongCatImagePipeline`` passes ``sigma = timestep / 1000``, the model multiplies it
by 1000: the embedder reads ``1000 (1 - t)`` (``"timestep"``); the model predicts ``noise - x``
(``output_scale=-1``). Ids as the pipeline's ``prepare_pos_ids``: text ``(0, i, i)``, image
``(1, 512 + row, 512 + column)`` (512: the pipeline's ``tokenizer_max_length``).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .diffusers_common import diffusers_layer_groups
from .dual_stream import DualStreamAdapter
from .spec import AdapterSpec

__all__ = ["LongCatImageAdapter", "LongCatImageConditioning", "ADAPTER"]

#: LongCatImagePipeline.tokenizer_max_length: where the image ids start on both position axes
TEXT_SPAN = 512


class LongCatImageConditioning(NamedTuple):
    """The conditioning keywords :meth:`LongCatImageAdapter.forward` takes (its blocks take no attention kwargs)."""

    encoder_hidden_states: Tensor | None = None


class LongCatImageAdapter(DualStreamAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``LongCatImageTransformer2DModel`` (conditioning: :class:`LongCatImageConditioning`)."""

    spec = AdapterSpec(
        name="longcat_image", model_class="LongCatImageTransformer2DModel", patch_embed="x_embedder",
        time_proj="time_embed.time_proj", time_embedder="time_embed.timestep_embedder", head="proj_out",
        patch_order="cpq", patch_in_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope",
        conditioning=LongCatImageConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embed\.", r"(^|\.)context_embedder$"),
                "mod": (r"(^|\.)norm1(_context)?\.linear$", r"(^|\.)norm\.linear$", r"(^|\.)norm_out\.linear$"),
                "mlp": (r"(^|\.)ff(_context)?\.", r"(^|\.)proj_mlp$"),
                "proj": (r"(^|\.)x_embedder(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def ids(self, grid: tuple[int, ...], n_text: int, device: torch.device) -> tuple[Tensor, Tensor]:
        i = torch.arange(n_text, device=device, dtype=torch.float32)
        txt = torch.stack([torch.zeros_like(i), i, i], -1)
        gh, gw = grid
        img = torch.zeros(gh, gw, 3, device=device)
        img[..., 0] = 1
        img[..., 1] = torch.arange(gh, device=device)[:, None] + TEXT_SPAN
        img[..., 2] = torch.arange(gw, device=device)[None, :] + TEXT_SPAN
        return txt, img.reshape(gh * gw, 3)


ADAPTER = LongCatImageAdapter()
