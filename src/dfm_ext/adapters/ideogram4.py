"""Adapter for diffusers ``Ideogram4Transformer2DModel`` (Ideogram 4), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Ideogram 4 runs one packed sequence ``[left-padding][text][image]`` per sample, with per-token roles
(``indicator``), a block-diagonal mask (``segment_ids``) and 3-axis MRoPE ids. The adapter builds that
sequence as ``Ideogram4Pipeline._prepare_ids`` does, from the text features and their mask. The
pipeline folds the latent ``[B, C, H, W]`` 2x2 into tokens of ``4 C`` channels in ``(p, q, c)`` order
(channels fastest, as its decoder unpatches them); the batch-norm latent standardisation happens on
those folded channels (feed latents standardised that way, then unfolded, as for FLUX.2). What
``install`` changes (blocks, MRoPE, text projection untouched): ``input_proj`` (``Linear(4 C -> D)``),
``t_embedding`` (sinusoid and MLP in one module) and ``final_layer.linear``.

Time and sign: the pipeline converts its scheduler's sigma to model time ``t = 1 - sigma`` (0 = noise,
1 = data): ``"unit"``; the model's velocity is ``x - noise`` (the pipeline steps its Euler scheduler
on ``-v``), taken as is.

Unconditional input: the pipeline's negative branch runs the image tokens alone, without text (on its
``unconditional_transformer``); here :meth:`Ideogram4Adapter.null_condition` masks every text token
out, which gives the image tokens exactly that image-only attention on the wrapped model.

Conditioning (diffusers names where they exist): ``encoder_hidden_states [B, L, llm_features_dim]``
(the text features of ``Ideogram4Pipeline.encode_prompt``'s text region, left-padded), optional
``encoder_attention_mask [B, L]`` (True = a text token; default all; the pipeline's padding is on the
left, any mask is honoured: text positions count the kept tokens), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .spec import AdapterSpec, SpecAdapter

__all__ = ["Ideogram4Adapter", "Ideogram4Conditioning", "ideogram4_ids", "ADAPTER"]


class Ideogram4Conditioning(NamedTuple):
    """The conditioning keywords :meth:`Ideogram4Adapter.forward` takes."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


def ideogram4_ids(text_mask: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(position_ids [B, L + N, 3], segment_ids [B, L + N], indicator [B, L + N])`` as ``Ideogram4Pipeline._prepare_ids``.

    ``text_mask [B, L]`` marks the text tokens (left-padded in the pipeline): text token ``i`` (counting
    kept tokens) sits at ``(i, i, i)``, padding at 0 with role 0 and segment -1, the image at
    ``IMAGE_POSITION_OFFSET + (0, row, column)``.
    """
    from diffusers.models.transformers.transformer_ideogram4 import (  # noqa: PLC0415
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
        SEQUENCE_PADDING_INDICATOR,
    )

    b, device = text_mask.shape[0], text_mask.device
    keep = text_mask.bool()
    text_pos = torch.where(keep, keep.long().cumsum(dim=1) - 1, torch.zeros_like(keep, dtype=torch.long))
    gh, gw = grid
    h_idx = torch.arange(gh, device=device).view(-1, 1).expand(gh, gw).reshape(-1)
    w_idx = torch.arange(gw, device=device).view(1, -1).expand(gh, gw).reshape(-1)
    image_pos = torch.stack([torch.zeros_like(h_idx), h_idx, w_idx], dim=1) + IMAGE_POSITION_OFFSET
    position_ids = torch.cat([text_pos[..., None].expand(-1, -1, 3), image_pos[None].expand(b, -1, -1)], dim=1)
    n_img = gh * gw
    ones = torch.ones(b, n_img, dtype=torch.long, device=device)
    segment_ids = torch.cat([torch.where(keep, 1, SEQUENCE_PADDING_INDICATOR), ones], dim=1)
    indicator = torch.cat([torch.where(keep, LLM_TOKEN_INDICATOR, 0), ones * OUTPUT_IMAGE_INDICATOR], dim=1)
    return position_ids, segment_ids, indicator


class Ideogram4Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``Ideogram4Transformer2DModel`` (conditioning: :class:`Ideogram4Conditioning`)."""

    spec = AdapterSpec(
        name="ideogram4", model_class="Ideogram4Transformer2DModel", patch_embed="input_proj",
        time_embedder="t_embedding", head="final_layer.linear", patch_order="pqc", patch_in_order="pqc",
        time_convention="unit", output_scale=1.0, positions="rope",
        # 1024 x 1024 px: a 8x autoencoder's 128 x 128 latents (64 x 64 tokens after the 2x2 fold).
        default_sample=(128, 128), conditioning=Ideogram4Conditioning, null_keys=("encoder_hidden_states",),
        layer_groups={
            "cond": (r"(^|\.)t_embedding\.", r"(^|\.)adaln_proj$", r"(^|\.)llm_cond_proj$"),
            "mod": (r"(^|\.)adaln_modulation$",),
            "attn": (r"(^|\.)attention\.",),
            "mlp": (r"(^|\.)feed_forward\.",),
            "proj": (r"(^|\.)input_proj(\.proj)?$", r"(^|\.)final_layer\.linear$"),
        },
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        if int(model.config.in_channels) % 4:
            raise ValueError(f"{type(model).__name__} with in_channels={model.config.in_channels} cannot take 2x2-folded latents")

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (2, 2)  # Ideogram4Pipeline.patch_size

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels) // 4, *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`Ideogram4Conditioning`."""
        from diffusers.models.transformers.transformer_ideogram4 import LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR  # noqa: PLC0415

        c = parse_conditioning(model, Ideogram4Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.llm_features_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text features [B, L, {width}])")
        n_text = text.shape[1]
        mask = c.encoder_attention_mask
        if mask is None:
            mask = torch.ones(b, n_text, dtype=torch.bool, device=text.device)
        check_tensor(mask, "encoder_attention_mask", (b, n_text), floating=False)
        position_ids, segment_ids, indicator = ideogram4_ids(mask, grid)
        x = self.tokens(model, packed)
        llm = (indicator[:, :n_text] == LLM_TOKEN_INDICATOR).to(x.dtype).unsqueeze(-1)
        text = model.llm_cond_proj(model.llm_cond_norm(text * llm)) * llm
        h = torch.cat([text, x], dim=1)
        h = h + model.embed_image_indicator((indicator == OUTPUT_IMAGE_INDICATOR).to(torch.long))
        adaln = F.silu(model.adaln_proj(self.embed_time(model, t, stage).to(x.dtype).unsqueeze(1)))
        cos, sin = model.rotary_emb(position_ids)
        rope = (cos.to(h.dtype), sin.to(h.dtype))
        attention_mask = (segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)).unsqueeze(1)
        for block in model.layers:
            h = call_block(model, block, h, attention_mask, rope, adaln)
        return self.velocity(model.final_layer(h[:, n_text:], conditioning=adaln), grid)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """No text at all: zero features and every text token masked out (the pipeline's image-only negative branch)."""
        out = super().null_condition(model, **cond)
        text = out["encoder_hidden_states"]
        out["encoder_attention_mask"] = torch.zeros(text.shape[:2], dtype=torch.bool, device=text.device)
        return out


ADAPTER = Ideogram4Adapter()
