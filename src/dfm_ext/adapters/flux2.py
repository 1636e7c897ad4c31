"""Adapter for diffusers ``Flux2Transformer2DModel`` (FLUX.2 dev / klein), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Stages are plain latents ``[B, C, H, W]`` (``C = in_channels / 4``: 32 for FLUX.2's autoencoder).
``Flux2Pipeline`` folds every 2x2 block into one token of ``4 C`` channels in channel-major
``(c, p, q)`` order (``_patchify_latents``), which is the
:class:`~dfm_ext.wrapping.packing.ScalePacker`'s space-to-depth; the pipeline's batch-norm latent
standardisation happens on that folded tensor, so feed latents standardised that way (and
unfolded). What ``install`` changes (double/single blocks, shared modulations, RoPE, text and
guidance embedders untouched): ``x_embedder`` (``Linear(4 C -> D)``),
``time_guidance_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and ``proj_out``.

Time and sign: the model multiplies ``sigma = 1 - t`` by 1000 inside its forward; the adapter feeds
``1000 (1 - t)`` to the embedder and returns ``-output`` (flow matching, the model predicts ``noise - x``).
Guidance-distilled models (``guidance_embeds=True``) get ``guidance`` (float or ``[B]``), by default
the adapter's (1.0, as the paper fixes FLUX guidance while finetuning).

Positions: 4-axis RoPE ids ``(t, row, column, layer)``: ``(0, i, j, 0)`` for the image tokens,
``(0, 0, 0, l)`` for text, as the pipeline builds them.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]`` (Mistral /
Qwen3 embeddings), optional ``guidance``, ``joint_attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["Flux2Adapter", "Flux2Conditioning", "flux2_ids", "ADAPTER"]


def flux2_ids(grid: tuple[int, int], text_len: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """RoPE ids of the image tokens ``[Gh * Gw, 4]`` and the text ``[L, 4]``, as ``Flux2Pipeline`` builds them.

    Example:
        >>> img, txt = flux2_ids((1, 2), 2)
        >>> img.tolist(), txt.tolist()
        ([[0, 0, 0, 0], [0, 0, 1, 0]], [[0, 0, 0, 0], [0, 0, 0, 1]])
    """
    one = torch.arange(1, device=device)
    img = torch.cartesian_prod(one, torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), one)
    txt = torch.cartesian_prod(one, one, one, torch.arange(text_len, device=device))
    return img, txt


class Flux2Conditioning(NamedTuple):
    """The conditioning keywords :meth:`Flux2Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    guidance: float | Tensor | None = None
    joint_attention_kwargs: dict[str, Any] | None = None


class Flux2Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``Flux2Transformer2DModel`` (conditioning: :class:`Flux2Conditioning`).

    Args:
        guidance: distilled-guidance value for ``guidance_embeds`` models when the caller passes none.
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    spec = AdapterSpec(
        name="flux2", model_class="Flux2Transformer2DModel", patch_embed="x_embedder",
        time_proj="time_guidance_embed.time_proj", time_embedder="time_guidance_embed.timestep_embedder",
        head="proj_out", patch_order="cpq", patch_in_order="cpq", time_convention="timestep", output_scale=-1.0,
        positions="rope",
        # 1024 x 1024 px with FLUX.2's 8x autoencoder.
        default_sample=(128, 128), conditioning=Flux2Conditioning, null_keys=("encoder_hidden_states",),
        # A single block's fused qkv+MLP projection (attn.to_qkv_mlp_proj, attn.to_out) counts as attn.
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_guidance_embed\.", r"(^|\.)context_embedder$"),
                "mod": (r"(^|\.)(double|single)_stream_modulation(_img|_txt)?\.linear$", r"(^|\.)norm_out\.linear$"),
                "proj": (r"(^|\.)x_embedder(\.proj)?$",),
            }
        ),
    )

    def __init__(
        self,
        guidance: float = 1.0,
        time_convention: str | None = None,
        output_scale: float | None = None,
        time_scale: float | None = None,
    ) -> None:
        self.guidance = float(guidance)
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"guidance": self.guidance, **super().config()}

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if int(cfg.patch_size) != 1 or int(cfg.in_channels) != int(model.out_channels) or int(cfg.in_channels) % 4:
            raise ValueError(
                f"{type(model).__name__} with patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
                f"out_channels={model.out_channels} is not a plain FLUX.2 (patch 1 over 2x2-folded latents, in = out)"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (2, 2)  # the pipeline's 2x2 fold; the model's own patch_size is 1

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels) // 4, *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`Flux2Conditioning`."""
        c = parse_conditioning(model, Flux2Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        x = self.tokens(model, packed)
        tge = model.time_guidance_embed
        temb = self.embed_time(model, t, stage).to(x.dtype)
        if tge.guidance_embedder is not None:
            g = self.guidance if c.guidance is None else c.guidance
            if isinstance(g, (int, float)) and not isinstance(g, bool):
                g = torch.full((b,), float(g), device=x.device, dtype=x.dtype)
            g = check_tensor(g, "guidance", (b,)).to(x.dtype)
            temb = temb + tge.guidance_embedder(tge.time_proj(g * 1000).to(x.dtype))
        elif c.guidance is not None:
            raise ValueError(f"this {type(model).__name__} has no guidance embedding (guidance_embeds=False)")
        mod_img = model.double_stream_modulation_img(temb)
        mod_txt = model.double_stream_modulation_txt(temb)
        mod_single = model.single_stream_modulation(temb)
        text = model.context_embedder(text)
        img_ids, txt_ids = flux2_ids(grid, text.shape[1], device=x.device)
        img_rope, txt_rope = model.pos_embed(img_ids), model.pos_embed(txt_ids)
        rope = (torch.cat([txt_rope[0], img_rope[0]]), torch.cat([txt_rope[1], img_rope[1]]))
        kwargs = c.joint_attention_kwargs
        for block in model.transformer_blocks:
            text, x = call_block(model, block, x, text, mod_img, mod_txt, rope, kwargs)
        n_text = text.shape[1]
        x = torch.cat([text, x], dim=1)
        for block in model.single_transformer_blocks:
            x = call_block(model, block, x, None, mod_single, rope, kwargs)
        x = model.norm_out(x[:, n_text:], temb)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = Flux2Adapter()
