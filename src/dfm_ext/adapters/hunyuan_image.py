"""Adapter for diffusers ``HunyuanImageTransformer2DModel`` (HunyuanImage 2.1 text-to-image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

HunyuanVideo's layout for images: double- then single-stream blocks, a text refiner that reads the
time too, 2-D RoPE. What ``install`` changes (blocks, RoPE, ByT5 projection, guidance embedder
untouched): ``x_embedder.proj`` (``Conv2d``, patch ``config.patch_size``: 1 for HunyuanImage 2.1's
32x autoencoder), ``time_guidance_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and
``proj_out`` (channel-major: the model unpatchifies ``[B, H', W', C, p, q]``); the text refiner's
``context_embedder.time_text_embed.timestep_embedder`` is made per-stage as well (summed, no stage
embedding of its own), as in the ``hunyuan_video`` adapter.

Time and sign: ``HunyuanImagePipeline`` runs ``FlowMatchEulerDiscreteScheduler`` and feeds
``timestep = 1000 sigma`` to both time paths; the model predicts ``noise - x``. The adapter feeds
``1000 (1 - t)`` and returns ``-output``.

Refused: ``use_meanflow=True`` (the distilled variant reads a second time ``timestep_r``, the time the
step jumps to: a flow map, not a velocity at one time per stage) and 3-D patch sizes.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (Qwen2.5-VL),
optional ``encoder_attention_mask [B, L]`` (1 = keep; default all ones), ``encoder_hidden_states_2
[B, L2, text_embed_2_dim]`` and ``encoder_attention_mask_2 [B, L2]`` (ByT5 glyph text, for models
built with ``text_embed_2_dim``; the valid tokens of both are moved to the front as the model
does), ``guidance`` (guidance-distilled models: the scale, default the adapter's 1.0; the pipeline
multiplies it by 1000), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.adapter import multiscale_time_embed

from .common import TimeMLP, call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .hunyuan_video import HunyuanVideoAdapter, guidance_input
from .spec import AdapterSpec, SpecAdapter

__all__ = ["HunyuanImageAdapter", "HunyuanImageConditioning", "ADAPTER"]


class HunyuanImageConditioning(NamedTuple):
    """The conditioning keywords :meth:`HunyuanImageAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    encoder_hidden_states_2: Tensor | None = None
    encoder_attention_mask_2: Tensor | None = None
    guidance: float | Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class HunyuanImageAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``HunyuanImageTransformer2DModel`` (conditioning: :class:`HunyuanImageConditioning`).

    Args:
        guidance: distilled-guidance scale for ``guidance_embeds`` models when the caller passes none.
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    spec = AdapterSpec(
        name="hunyuan_image", model_class="HunyuanImageTransformer2DModel", patch_embed="x_embedder.proj",
        time_proj="time_guidance_embed.time_proj", time_embedder="time_guidance_embed.timestep_embedder",
        head="proj_out", patch_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope",
        # 2048 x 2048 px with HunyuanImage 2.1's 32x autoencoder: 64 x 64 latents.
        default_sample=(64, 64), conditioning=HunyuanImageConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_guidance_embed\.", r"(^|\.)time_text_embed\.", r"(^|\.)context_embedder\.proj_in$",
                         r"(^|\.)context_embedder_2\.linear_\d$"),
                "mlp": (r"(^|\.)single_transformer_blocks\.\d+\.proj_(mlp|out)$",),
                "proj": (r"(^|\.)x_embedder\.proj$",),
            }
        ),
    )  # fmt: skip

    def __init__(
        self, guidance: float = 1.0, time_convention: Any = None, output_scale: float | None = None, time_scale: float | None = None
    ) -> None:
        self.guidance = float(guidance)
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"guidance": self.guidance, **super().config()}

    def check_model(self, model: nn.Module) -> None:
        cfg, name = model.config, type(model).__name__
        if cfg.use_meanflow:
            raise ValueError(
                f"{name} with use_meanflow=True (the distilled HunyuanImage 2.1) reads a second time timestep_r, the "
                "time its step jumps to: a flow map, not a velocity at one time per stage; not supported"
            )
        if len(cfg.patch_size) != 2 or int(cfg.in_channels) != int(cfg.out_channels):
            raise ValueError(
                f"{name} with patch_size={tuple(cfg.patch_size)}, in_channels={cfg.in_channels}, out_channels="
                f"{cfg.out_channels} is not the text-to-image layout (2-D patches, in = out)"
            )

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        super().install(model, packer, init=init, stage_embedding=stage_embedding)
        refiner = model.context_embedder.time_text_embed
        mlp = refiner.timestep_embedder
        refiner.timestep_embedder = multiscale_time_embed(
            TimeMLP(refiner.time_proj, mlp), mlp.linear_2.out_features, packer.num_stages, init=init,
            stage_embedding=False, time_transform=self.time_function(model),
        )  # fmt: skip

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`HunyuanImageConditioning`."""
        c = parse_conditioning(model, HunyuanImageConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(
            c.encoder_hidden_states, "encoder_hidden_states", (b, None, int(cfg.text_embed_dim)),
            hint=f" (Qwen2.5-VL embeddings [B, L, {cfg.text_embed_dim}])",
        )  # fmt: skip
        mask = c.encoder_attention_mask
        if mask is None:
            mask = torch.ones(b, text.shape[1], dtype=torch.bool, device=text.device)
        mask = check_tensor(mask, "encoder_attention_mask", (b, text.shape[1]), floating=False).bool()
        x = self.tokens(model, packed)
        # The RoPE module reads only the input's shape (and device): a zero-stride stand-in for it.
        patch = self.patch(model)
        rope = model.rope(x.new_empty(1).expand(b, int(cfg.in_channels), *(g * p for g, p in zip(grid, patch))))
        tge = model.time_guidance_embed
        temb = self.embed_time(model, t, stage).to(x.dtype)
        g = guidance_input(model, tge.guidance_embedder, c.guidance, self.guidance, b, temb)
        if g is not None:
            temb = temb + tge.guidance_embedder(tge.time_proj(g * 1000.0).to(temb.dtype))
        text = HunyuanVideoAdapter._refine(model, text, t, stage, mask)
        if c.encoder_hidden_states_2 is not None:
            text, mask = self._glyph_text(model, text, mask, c, b)
        attention_mask = nn.functional.pad(mask, (x.shape[1], 0), value=True)[:, None, None, :]
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            x, text = call_block(model, block, x, text, temb, attention_mask, rope)
        return self.velocity(model.proj_out(model.norm_out(x, temb)), grid)

    @staticmethod
    def _glyph_text(model: nn.Module, text: Tensor, mask: Tensor, c: Any, b: int) -> tuple[Tensor, Tensor]:
        """The ByT5 stream joined as the model joins it: valid ByT5, valid main, then the padding of each."""
        if model.context_embedder_2 is None:
            raise ValueError(f"this {type(model).__name__} has no second text encoder (text_embed_2_dim=None)")
        width = int(model.config.text_embed_2_dim)
        glyph = check_tensor(c.encoder_hidden_states_2, "encoder_hidden_states_2", (b, None, width), hint=f" (ByT5 embeddings [B, L2, {width}])")
        mask_2 = c.encoder_attention_mask_2
        if mask_2 is None:
            raise ValueError("encoder_hidden_states_2 needs encoder_attention_mask_2 [B, L2]")
        mask_2 = check_tensor(mask_2, "encoder_attention_mask_2", (b, glyph.shape[1]), floating=False).bool()
        glyph = model.context_embedder_2(glyph)
        texts, masks = [], []
        for t1, m1, t2, m2 in zip(text, mask, glyph, mask_2):
            texts.append(torch.cat([t2[m2], t1[m1], t2[~m2], t1[~m1]], dim=0))
            masks.append(torch.cat([m2[m2], m1[m1], m2[~m2], m1[~m1]], dim=0))
        return torch.stack(texts), torch.stack(masks)


ADAPTER = HunyuanImageAdapter()
