"""Adapter for diffusers ``LuminaNextDiT2DModel`` (Lumina-Next-SFT), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Lumina-Next patchifies ``[B, C, H, W]`` itself into tokens of ``C p p`` values in ``(c, p, q)``
order and embeds them with a ``Linear`` (``patch_embedder.proj``); its head is the last layer of
the final norm (``norm_out.linear_2``), unpatchified in ``(p, q, c)`` order with ``2 C`` channels
(learned sigma; the first ``C`` are kept). ``install`` also replaces
``time_caption_embed.timestep_embedder`` (after its ``time_proj`` sinusoid; the pooled-caption
embedding added to it is kept).

Time and sign: ``LuminaPipeline`` feeds ``1 - sigma`` ("Lumina uses t=0 as the noise and t=1 as
the image"): the paper's ``t`` (``"unit"``); it keeps the first half of the output channels and
negates them before the scheduler, which steps with ``noise - x``: the model predicts ``x - noise``,
taken as is.

Positions: the model takes its RoPE from the caller. By default the adapter builds it as the
pipeline does (``get_2d_rotary_pos_embed_lumina`` for the token grid, cropped as the patch
embedder crops it) with the pipeline's resolution scaling ``linear_factor = sqrt(h w) / sample_size``
for a latent ``h x w`` (the pipeline's ``sqrt(width * height) / default_image_size`` in pixels):
the branch the pipeline takes for every time below its ``scaling_watershed`` (1.0 by default, so
every time but the clean end). Its time-aware switch to NTK scaling reads one time per batch, which
DFM's per-stage times do not have: pass ``image_rotary_emb`` (``[Gh, Gw, head_dim / 2]`` complex,
e.g. from :func:`lumina_next_rope` with ``ntk=True``) to choose it.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, cross_attention_dim]`` (Gemma),
optional ``encoder_mask [B, L]`` (1 = keep; default all ones), ``image_rotary_emb``,
``cross_attention_kwargs`` (the pipeline's proportional attention passes
``{"base_sequence_length": (default_image_size // 16) ** 2}``; default ``{}``, which the model needs).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["LuminaNextAdapter", "LuminaNextConditioning", "lumina_next_rope", "ADAPTER"]


class LuminaNextConditioning(NamedTuple):
    """The conditioning keywords :meth:`LuminaNextAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_mask: Tensor | None = None
    image_rotary_emb: Tensor | None = None
    cross_attention_kwargs: dict[str, Any] | None = None


def lumina_next_rope(model: nn.Module, grid: tuple[int, int], *, ntk: bool = False, device: Any = None) -> Tensor:
    """``LuminaPipeline``'s RoPE ``[Gh, Gw, head_dim / 2]`` (complex) for a token grid, scaled for its resolution.

    ``scale = sqrt(Gh Gw) p / sample_size`` (the latent's size against the model's native one); the
    pipeline uses it as ``linear_factor`` while the time is below ``scaling_watershed`` and as
    ``ntk_factor`` (``ntk=True``) after.
    """
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina  # noqa: PLC0415

    p = int(model.config.patch_size)
    scale = math.sqrt(grid[0] * p * grid[1] * p) / int(model.config.sample_size)
    factors = {"linear_factor": 1.0, "ntk_factor": scale} if ntk else {"linear_factor": scale, "ntk_factor": 1.0}
    rope = get_2d_rotary_pos_embed_lumina(model.head_dim, grid[0], grid[1], **factors)
    return rope if device is None else rope.to(device)


class LuminaNextAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``LuminaNextDiT2DModel`` (conditioning: :class:`LuminaNextConditioning`)."""

    spec = AdapterSpec(
        name="lumina_next", model_class="LuminaNextDiT2DModel", patch_embed="patch_embedder.proj",
        time_proj="time_caption_embed.time_proj", time_embedder="time_caption_embed.timestep_embedder",
        head="norm_out.linear_2", patch_order="pqc", patch_in_order="cpq", time_convention="unit", output_scale=1.0,
        positions="rope", conditioning=LuminaNextConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_caption_embed\.",),
                "mod": (r"(^|\.)norm_out\.linear_1$",),
                "mlp": (r"(^|\.)feed_forward\.",),
                "proj": (r"(^|\.)patch_embedder\.proj$", r"(^|\.)norm_out\.linear_2$"),
            }
        ),
    )  # fmt: skip

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`LuminaNextConditioning`."""
        c = parse_conditioning(model, LuminaNextConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.cross_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (Gemma embeddings [B, L, {width}])")
        mask = c.encoder_mask
        if mask is None:
            mask = torch.ones(b, text.shape[1], device=text.device, dtype=torch.long)
        check_tensor(mask, "encoder_mask", (b, text.shape[1]), floating=False)
        rope = c.image_rotary_emb
        if rope is None:
            rope = lumina_next_rope(model, grid, device=packed.device)
        elif rope.ndim != 3 or rope.shape[0] < grid[0] or rope.shape[1] < grid[1]:
            raise ValueError(f"image_rotary_emb must be [H, W, head_dim / 2] covering the token grid {grid}, got {tuple(rope.shape)}")
        rope = rope[: grid[0], : grid[1]].flatten(0, 1).unsqueeze(0).to(packed.device)
        x = self.tokens(model, packed)
        te = model.time_caption_embed
        m = mask.float().unsqueeze(-1)
        pooled = ((text * m).sum(dim=1) / m.sum(dim=1)).to(text)
        temb = self.embed_time(model, t, stage).to(text.dtype) + te.caption_embedder(pooled)
        token_mask = torch.ones(b, x.shape[1], dtype=torch.int32, device=x.device)
        text_mask = mask.bool()
        for block in model.layers:
            x = call_block(model, block, x, token_mask, rope, text, text_mask, temb, c.cross_attention_kwargs or {})
        return self.velocity(model.norm_out(x, temb), grid)


ADAPTER = LuminaNextAdapter()
