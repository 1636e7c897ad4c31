"""Adapter for diffusers ``HunyuanDiT2DModel`` (Hunyuan-DiT v1.x), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What ``install`` changes (blocks with their long skips, text embedders, pooler, size/style
embeddings untouched): ``pos_embed.proj`` (patch ``Conv2d``; Hunyuan adds no position table),
``time_extra_emb.timestep_embedder`` (after its ``time_proj`` sinusoid; the pooled-text, image-size
and style conditioning is still added) and ``proj_out`` (``(p, q, c)`` order; the learned-sigma
half of the output is dropped).

Time and output: Hunyuan-DiT checkpoints are DDPM models (``DDPMScheduler``, integer timesteps,
999 = noise, learned sigma). The embedder reads ``999 (1 - t)`` and the raw head output is the
velocity: DFM finetuning re-parameterises the model to velocity, as for DiT and PixArt.

Positions: 2-D RoPE, built per token grid as ``HunyuanDiTPipeline`` does (crop region of the grid
within a 512 px base, ``base_size = 512 // 8 // patch_size``), unless ``image_rotary_emb`` is passed.

Conditioning (diffusers names): ``encoder_hidden_states [B, text_len, cross_attention_dim]`` (CLIP/BERT),
``text_embedding_mask [B, text_len]``, ``encoder_hidden_states_t5 [B, text_len_t5, cross_attention_dim_t5]``,
``text_embedding_mask_t5 [B, text_len_t5]``; with ``use_style_cond_and_image_meta_size``:
``image_meta_size [B, 6]`` and ``style [B]``; optional ``image_rotary_emb``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["HunyuanDiTAdapter", "HunyuanDiTConditioning", "hunyuan_rope", "ADAPTER"]


class HunyuanDiTConditioning(NamedTuple):
    """The conditioning keywords :meth:`HunyuanDiTAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    text_embedding_mask: Tensor | None = None
    encoder_hidden_states_t5: Tensor | None = None
    text_embedding_mask_t5: Tensor | None = None
    image_meta_size: Tensor | None = None
    style: Tensor | None = None
    image_rotary_emb: tuple[Tensor, Tensor] | None = None


def hunyuan_rope(model: nn.Module, grid: tuple[int, int], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The RoPE ``(cos, sin)`` ``HunyuanDiTPipeline`` builds for a token grid ``(Gh, Gw)``."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed  # noqa: PLC0415
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid  # noqa: PLC0415

    base_size = 512 // 8 // int(model.config.patch_size)
    crops = get_resize_crop_region_for_grid(grid, base_size)
    return get_2d_rotary_pos_embed(model.inner_dim // model.num_heads, crops, grid, device=device, output_type="pt")


class HunyuanDiTAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``HunyuanDiT2DModel`` (conditioning: :class:`HunyuanDiTConditioning`)."""

    spec = AdapterSpec(
        name="hunyuandit", model_class="HunyuanDiT2DModel", patch_embed="pos_embed.proj",
        time_proj="time_extra_emb.time_proj", time_embedder="time_extra_emb.timestep_embedder", head="proj_out",
        patch_order="pqc", time_convention="discrete", output_scale=1.0, positions="rope",
        conditioning=HunyuanDiTConditioning, null_keys=("encoder_hidden_states", "encoder_hidden_states_t5"),
        # The T5 text_embedder and the attention pooler see reshaped batches (tokens as rows), so
        # they cannot be routed per sample: cond holds only the per-sample time/size/style embedders.
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_extra_emb\.(timestep_embedder|extra_embedder|style_embedder)\.",),
                "mod": (r"(^|\.)norm1\.linear$",),
            }
        ),
    )

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`HunyuanDiTConditioning`."""
        c = parse_conditioning(model, HunyuanDiTConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, int(cfg.text_len), int(cfg.cross_attention_dim)))
        t5 = check_tensor(
            c.encoder_hidden_states_t5, "encoder_hidden_states_t5", (b, int(cfg.text_len_t5), int(cfg.cross_attention_dim_t5))
        )
        mask = check_tensor(c.text_embedding_mask, "text_embedding_mask", (b, int(cfg.text_len)), floating=False)
        mask_t5 = check_tensor(c.text_embedding_mask_t5, "text_embedding_mask_t5", (b, int(cfg.text_len_t5)), floating=False)
        rope = c.image_rotary_emb if c.image_rotary_emb is not None else hunyuan_rope(model, grid, packed.device)
        x = self.tokens(model, packed)

        # HunyuanCombinedTimestepTextSizeStyleEmbedding with the multi-scale time embedder.
        te = model.time_extra_emb
        extra = [te.pooler(t5)]
        if te.use_style_cond_and_image_meta_size:
            if c.image_meta_size is None or c.style is None:
                raise TypeError(f"this {type(model).__name__} uses image size and style conditions: pass image_meta_size [B, 6] and style [B]")
            sizes = te.size_proj(check_tensor(c.image_meta_size, "image_meta_size", (b, 6)).view(-1)).to(x.dtype)
            extra += [sizes.view(-1, 6 * 256), te.style_embedder(c.style)]
        temb = self.embed_time(model, t, stage).to(x.dtype) + te.extra_embedder(torch.cat(extra, dim=1))

        t5 = model.text_embedder(t5.reshape(-1, t5.shape[-1])).view(b, t5.shape[1], -1)
        text = torch.cat([text, t5], dim=1)
        keep = torch.cat([mask, mask_t5], dim=-1).unsqueeze(2).bool()
        text = torch.where(keep, text, model.text_embedding_padding)
        skips = []
        half = int(cfg.num_layers) // 2
        for layer, block in enumerate(model.blocks):
            # HunyuanDiTBlock(hidden, text, temb, image_rotary_emb, skip): later half takes the long skips.
            x = call_block(model, block, x, text, temb, rope, skips.pop() if layer > half else None)
            if layer < half - 1:
                skips.append(x)
        x = model.norm_out(x, temb.to(torch.float32))
        return self.velocity(model.proj_out(x), grid)


ADAPTER = HunyuanDiTAdapter()
