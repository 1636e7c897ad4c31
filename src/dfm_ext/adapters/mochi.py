"""Adapter for diffusers ``MochiTransformer3DModel`` (Mochi 1), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Videos are ``[B, C, T, H, W]`` in dfm_ext and Mochi alike. Mochi embeds every frame with the same
``Conv2d`` patch (``patch_embed.proj``); ``install`` first turns it into the equivalent ``Conv3d``
with a ``(1, p, p)`` patch (the same weights, one frame deep), then widens it like any other. It
also replaces ``time_embed.timestep_embedder`` (after its ``time_proj`` sinusoid; the attention-pooled
text that Mochi adds to the time embedding is kept, computed from the text alone) and ``proj_out``
(``(p, q, c)`` order, channels fastest: Mochi unpatchifies ``[B, T, H', W', p, q, C]``).

Time and sign: ``MochiPipeline`` runs ``FlowMatchEulerDiscreteScheduler`` with ``invert_sigmas=True``
(the pipeline says "Mochi uses reversed timesteps": its ``_current_timestep`` is ``1000 - t``):
the scheduler's sigmas become ``1 - sigma = t`` and its timesteps ``1000 t``, and its Euler step
``x + (t_next - t) v`` moves towards data with the model's output, so Mochi reads ``1000 t``
(``"x1000"``) and predicts ``x - noise`` (taken as is).

Positions: Mochi's RoPE with learned frequencies over frame index and centred, area-normalised
rows and columns: any grid.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (T5),
optional ``encoder_attention_mask [B, L]`` (1 = keep; default all ones), ``attention_kwargs``
(unused by the blocks, accepted for the pipeline's call).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, get_submodule_path, parse_conditioning, set_submodule_path
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["MochiAdapter", "MochiConditioning", "frame_conv3d", "ADAPTER"]


class MochiConditioning(NamedTuple):
    """The conditioning keywords :meth:`MochiAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


def frame_conv3d(conv: nn.Conv2d) -> nn.Conv3d:
    """The ``Conv3d`` with a ``(1, p, q)`` kernel that applies ``conv`` to every frame of ``[B, C, T, H, W]``.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(4, 8, 2, stride=2)
        >>> x = torch.randn(1, 4, 3, 4, 4)
        >>> ref = conv(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (1, 3)).transpose(1, 2)
        >>> torch.allclose(frame_conv3d(conv)(x), ref, atol=1e-6)
        True
    """
    if tuple(conv.kernel_size) != tuple(conv.stride) or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
        raise ValueError(f"expected a patch Conv2d (kernel == stride, no padding, no groups), got {conv}")
    out = nn.Conv3d(
        conv.in_channels, conv.out_channels, (1, *conv.kernel_size), stride=(1, *conv.stride), bias=conv.bias is not None,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(conv.weight.unsqueeze(2))
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


class MochiAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``MochiTransformer3DModel`` (conditioning: :class:`MochiConditioning`)."""

    spec = AdapterSpec(
        name="mochi", model_class="MochiTransformer3DModel", patch_embed="patch_embed.proj",
        time_proj="time_embed.time_proj", time_embedder="time_embed.timestep_embedder", head="proj_out",
        patch_order="pqc", time_convention="x1000", output_scale=1.0, positions="rope", grid_ndim=3,
        # Mochi 1 at 480 x 848, 163 frames: latents 28 x 60 x 106 (6x temporal, 8x spatial VAE).
        default_sample=(28, 60, 106), conditioning=MochiConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embed\.",),
                "mod": (r"(^|\.)norm1_context\.linear_1$",),
                "proj": (r"(^|\.)patch_embed\.proj$",),
            }
        ),
    )  # fmt: skip

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        p = int(model.config.patch_size)
        return (1, p, p)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        proj = get_submodule_path(model, self.spec.patch_embed)
        if isinstance(proj, nn.Conv2d):
            set_submodule_path(model, self.spec.patch_embed, frame_conv3d(proj))
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`MochiConditioning`."""
        c = parse_conditioning(model, MochiConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.text_embed_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5 embeddings [B, L, {width}])")
        mask = c.encoder_attention_mask
        if mask is None:
            mask = torch.ones(b, text.shape[1], device=text.device, dtype=torch.bool)
        check_tensor(mask, "encoder_attention_mask", (b, text.shape[1]), floating=False)
        x = self.tokens(model, packed)  # frame-major tokens, as Mochi flattens them
        te = model.time_embed
        temb = self.embed_time(model, t, stage).to(x.dtype) + te.pooler(text, mask)
        text = te.caption_proj(text)
        rope = model.rope(model.pos_frequencies, grid[0], grid[1], grid[2], device=x.device, dtype=torch.float32)
        for block in model.transformer_blocks:
            x, text = call_block(model, block, x, text, temb, mask, rope)
        x = model.norm_out(x, temb)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = MochiAdapter()
