"""Adapter for diffusers ``BriaFiboTransformer2DModel`` (Bria FIBO), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Bria's FLUX.1-style layout (double- then single-stream blocks, RoPE ids) whose text stream, before
every block, keeps the first half of its channels and takes the other half from that block's own
text-encoder layer (``caption_projection[i]``). ``BriaFiboPipeline`` tokenises the latent
``[B, C, H, W]`` per latent pixel by default (``do_patching=False``: ``patch_size=1``) or folded 2x2
in channel-major ``(c, p, q)`` order (``do_patching=True``: ``BriaFiboAdapter(patch_size=2)``); the
transformer's config cannot show which, so the adapter takes it, default 1 (the pipeline's default).
What ``install`` changes (blocks, RoPE, text projections untouched): ``x_embedder`` (``Linear``),
``time_embed.timestep_embedder`` (after its ``time_proj`` sinusoid, with the model's ``time_theta``)
and ``proj_out``.

Time and sign: the pipeline runs ``FlowMatchEulerDiscreteScheduler`` (it sets the resolution shift
``mu`` only that scheduler takes) and passes its ``timestep = 1000 sigma``: the adapter feeds
``1000 (1 - t)`` and returns ``-output`` (the Euler step reads ``noise - x``). Ids as the pipeline
builds them: zeros for the text, ``(0, row, column)`` for the image. Refused: ``guidance_embeds=True``
(the pipeline never passes a guidance value).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]``,
``text_encoder_layers [B, K, L, text_encoder_dim]`` (**batch first**: one text-encoder layer per
block, ``K = num_layers + num_single_layers``, the list the pipeline passes, stacked on axis 1),
optional ``encoder_attention_mask [B, L]`` (1 = keep; the pipeline's joint mask puts the image tokens
after it), ``joint_attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .flux import flux_image_ids
from .spec import AdapterSpec, SpecAdapter

__all__ = ["BriaFiboAdapter", "BriaFiboConditioning", "ADAPTER"]


class BriaFiboConditioning(NamedTuple):
    """The conditioning keywords :meth:`BriaFiboAdapter.forward` takes."""

    encoder_hidden_states: Tensor | None = None
    text_encoder_layers: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    joint_attention_kwargs: dict[str, Any] | None = None


class BriaFiboAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``BriaFiboTransformer2DModel`` (conditioning: :class:`BriaFiboConditioning`).

    Args:
        patch_size: the pipeline's latent fold: 1 (``do_patching=False``, its default) or 2 (``do_patching=True``).
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    spec = AdapterSpec(
        name="bria_fibo", model_class="BriaFiboTransformer2DModel", patch_embed="x_embedder",
        time_proj="time_embed.time_proj", time_embedder="time_embed.timestep_embedder", head="proj_out",
        patch_order="cpq", patch_in_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope",
        default_sample=(128, 128), conditioning=BriaFiboConditioning,
        null_keys=("encoder_hidden_states", "text_encoder_layers"),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embed\.", r"(^|\.)context_embedder$", r"(^|\.)caption_projection\.\d+\.linear$"),
                "mod": (r"(^|\.)norm1(_context)?\.linear$", r"(^|\.)norm\.linear$", r"(^|\.)norm_out\.linear$"),
                "mlp": (r"(^|\.)ff(_context)?\.", r"(^|\.)proj_mlp$"),
                "proj": (r"(^|\.)x_embedder(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def __init__(
        self, patch_size: int = 1, time_convention: Any = None, output_scale: float | None = None, time_scale: float | None = None
    ) -> None:
        if patch_size not in (1, 2) or isinstance(patch_size, bool):
            raise ValueError(f"patch_size must be 1 (do_patching=False) or 2 (do_patching=True), got {patch_size!r}")
        self.patch_size = int(patch_size)
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, **super().config()}

    def check_model(self, model: nn.Module) -> None:
        cfg, name = model.config, type(model).__name__
        if int(cfg.patch_size) != 1 or int(cfg.in_channels) % (self.patch_size**2):
            raise ValueError(
                f"{name} with patch_size={cfg.patch_size}, in_channels={cfg.in_channels} cannot take latents folded "
                f"{self.patch_size}x{self.patch_size} (BriaFiboAdapter(patch_size=) as the pipeline's do_patching)"
            )
        if cfg.guidance_embeds:
            raise ValueError(f"{name} with guidance_embeds=True (a guidance input its pipeline never passes) is not supported")

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (self.patch_size, self.patch_size)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels) // self.patch_size**2, *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`BriaFiboConditioning`."""
        c = parse_conditioning(model, BriaFiboConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        width = int(cfg.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        n_text, blocks = text.shape[1], [*model.transformer_blocks, *model.single_transformer_blocks]
        layers = check_tensor(
            c.text_encoder_layers, "text_encoder_layers", (b, len(blocks), n_text, int(cfg.text_encoder_dim)),
            hint=f" (one text-encoder layer per block, batch first [B, {len(blocks)}, L, {cfg.text_encoder_dim}])",
        )  # fmt: skip
        kwargs = dict(c.joint_attention_kwargs or {})
        if c.encoder_attention_mask is not None:
            keep = check_tensor(c.encoder_attention_mask, "encoder_attention_mask", (b, n_text), floating=False).bool()
            joint = torch.cat([keep, torch.ones(b, grid[0] * grid[1], dtype=torch.bool, device=keep.device)], dim=1)
            if not joint.all():  # as the pipeline: a mask only where a token is dropped
                kwargs["attention_mask"] = joint[:, None, None, :]
        x = self.tokens(model, packed)
        temb = self.embed_time(model, t, stage).to(x.dtype)
        text = model.context_embedder(text)
        rope = model.pos_embed(torch.cat([torch.zeros(n_text, 3, device=x.device), flux_image_ids(grid, x.device)]))
        half = model.inner_dim // 2
        for i, block in enumerate(blocks):
            text = torch.cat([text[:, :, :half], model.caption_projection[i](layers[:, i])], dim=-1)
            if i < len(model.transformer_blocks):
                text, x = call_block(model, block, x, text, temb, rope, kwargs)
            else:
                h = call_block(model, block, torch.cat([text, x], dim=1), temb, rope, kwargs)
                text, x = h[:, :n_text], h[:, n_text:]
        return self.velocity(model.proj_out(model.norm_out(x, temb)), grid)


ADAPTER = BriaFiboAdapter()
