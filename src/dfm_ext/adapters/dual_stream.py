"""What the FLUX.1-style families share: 2x2-folded latents, RoPE ids, double- then single-stream blocks.

Ovis-Image, LongCat-Image and Bria (and, with their own twists, Flux, Chroma and FLUX.2, which
keep their own adapters) take the latent ``[B, C, H, W]`` folded 2x2 into tokens of ``4 C``
channels in channel-major ``(c, p, q)`` order, which is the
:class:`~dfm_ext.wrapping.packing.ScalePacker`'s space-to-depth; their ``x_embedder`` is a
``Linear(4 C -> D)`` and ``proj_out`` unpacks channel-major. Positions are RoPE over 3-axis ids
(text, then image). Every block takes ``(hidden, text, temb, rope)`` and returns ``(text,
hidden)``, the double- and the single-stream ones alike.

:class:`DualStreamAdapter` is a :class:`~dfm_ext.adapters.spec.SpecAdapter` with that forward; a
family sets its spec and overrides :meth:`~DualStreamAdapter.ids` (what its pipeline passes as
``txt_ids`` / ``img_ids``) and :meth:`~DualStreamAdapter.text` (its text embedder).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .flux import flux_image_ids
from .spec import SpecAdapter

__all__ = ["DualStreamAdapter", "TextConditioning"]


class TextConditioning(NamedTuple):
    """The conditioning keywords of the plain text-to-image dual-stream families (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    joint_attention_kwargs: dict[str, Any] | None = None


class DualStreamAdapter(SpecAdapter):
    """A FLUX.1-style family (see the module docstring); subclasses set ``spec`` and may override the hooks."""

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if int(cfg.patch_size) != 1 or int(cfg.in_channels) != int(model.out_channels) or int(cfg.in_channels) % 4:
            raise ValueError(
                f"{type(model).__name__} with patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
                f"out_channels={model.out_channels} is not a plain text-to-image model of its family "
                "(patch 1 over 2x2-folded latents, in = out)"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (2, 2)  # the pipeline's 2x2 fold; the model's own patch_size is 1

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels) // 4, *(self.spec.default_sample or (128, 128)))

    # ------------------------------------------------------------------ hooks
    def ids(self, grid: tuple[int, ...], n_text: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(txt_ids [L, 3], img_ids [N, 3])`` as the family's pipeline builds them (FluxPipeline's by default)."""
        return torch.zeros(n_text, 3, device=device), flux_image_ids(grid, device)

    def text(self, model: nn.Module, text: Tensor) -> Tensor:
        """The text tokens ``[B, L, D]`` (``context_embedder`` by default)."""
        return model.context_embedder(text)

    # ------------------------------------------------------------------ forward
    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of the spec's ``conditioning`` (:class:`TextConditioning` by default)."""
        c = parse_conditioning(model, self.spec.conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        x = self.tokens(model, packed)
        temb = self.embed_time(model, t, stage, grid).to(x.dtype)
        text = self.text(model, text)
        txt_ids, img_ids = self.ids(grid, text.shape[1], x.device)
        rope = model.pos_embed(torch.cat([txt_ids, img_ids]))
        extra = () if getattr(c, "joint_attention_kwargs", None) is None else (c.joint_attention_kwargs,)
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            text, x = call_block(model, block, x, text, temb, rope, *extra)
        return self.velocity(model.proj_out(model.norm_out(x, temb)), grid)
