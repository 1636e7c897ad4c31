"""Adapter for diffusers ``HunyuanVideoTransformer3DModel`` (HunyuanVideo text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Videos are ``[B, C, T, H, W]`` in dfm_ext and HunyuanVideo alike. What ``install`` changes
(double- and single-stream blocks, RoPE, pooled-text and guidance embedders untouched):
``x_embedder.proj`` (``Conv3d``, patch ``(patch_size_t, p, p)``), ``time_text_embed.timestep_embedder``
(after its ``time_proj`` sinusoid) and ``proj_out`` (channel-major: HunyuanVideo unpatchifies
``[B, T', H', W', C, pt, p, q]``). The text refiner (``context_embedder``) reads the time too, through
its own ``time_text_embed.timestep_embedder``: that one is made per-stage as well (summed, no stage
embedding of its own), so the refined text sees every stage's time as the trunk does.

Time and sign: ``HunyuanVideoPipeline`` runs ``FlowMatchEulerDiscreteScheduler`` and feeds
``timestep = 1000 sigma`` to both time paths; the model predicts ``noise - x``. The adapter feeds
``1000 (1 - t)`` and returns ``-output``.

Positions: 3-D RoPE from the token grid (any grid).

Refused: ``image_condition_type`` ``"latent_concat"`` (image latents concatenated to the input
channels) and ``"token_replace"`` (the first frame's tokens read time 0 while the others read the
sampled time: a per-token time).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (Llama embeddings),
``pooled_projections [B, pooled_projection_dim]`` (CLIP), optional ``encoder_attention_mask [B, L]``
(1 = keep; default all ones), optional ``guidance`` (float or ``[B]``, the guidance scale the
pipeline multiplies by 1000; only for ``guidance_embeds`` models, default the adapter's, 1.0 as the
paper fixes FLUX's while finetuning), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.adapter import multiscale_time_embed

from .common import TimeMLP, call_block, check_tensor, get_submodule_path, parse_conditioning, shape_probe
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["HunyuanVideoAdapter", "HunyuanVideoConditioning", "guidance_input", "ADAPTER"]

_REFINER_TIME = "context_embedder.time_text_embed"


class HunyuanVideoConditioning(NamedTuple):
    """The conditioning keywords :meth:`HunyuanVideoAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    pooled_projections: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    guidance: float | Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


def guidance_input(model: nn.Module, embedder: nn.Module | None, guidance: Any, default: float, b: int, like: Tensor) -> Tensor | None:
    """The distilled-guidance value ``[B]`` for a ``guidance_embeds`` model (``None`` without a guidance embedder).

    ``guidance`` is a float or a ``[B]`` tensor (``None``: ``default``).

    Raises:
        ValueError: ``guidance`` given to a model without a guidance embedder.
    """
    if embedder is None:
        if guidance is not None:
            raise ValueError(f"this {type(model).__name__} has no guidance embedding (guidance_embeds=False)")
        return None
    g = default if guidance is None else guidance
    if isinstance(g, (int, float)) and not isinstance(g, bool):
        return torch.full((b,), float(g), device=like.device, dtype=like.dtype)
    return check_tensor(g, "guidance", (b,)).to(like.dtype)


class HunyuanVideoAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``HunyuanVideoTransformer3DModel`` (conditioning: :class:`HunyuanVideoConditioning`).

    Args:
        guidance: distilled-guidance scale for ``guidance_embeds`` models when the caller passes none.
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    spec = AdapterSpec(
        name="hunyuan_video", model_class="HunyuanVideoTransformer3DModel", patch_embed="x_embedder.proj",
        time_proj="time_text_embed.time_proj", time_embedder="time_text_embed.timestep_embedder", head="proj_out",
        patch_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope", grid_ndim=3,
        # HunyuanVideo at 720 x 1280, 129 frames: latents 33 x 90 x 160 (4x temporal, 8x spatial VAE).
        default_sample=(33, 90, 160), conditioning=HunyuanVideoConditioning,
        null_keys=("encoder_hidden_states", "pooled_projections"),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_text_embed\.", r"(^|\.)context_embedder\.proj_in$"),
                "mlp": (r"(^|\.)single_transformer_blocks\.\d+\.proj_(mlp|out)$",),
                "proj": (r"(^|\.)x_embedder\.proj$",),
            }
        ),
    )  # fmt: skip

    def __init__(
        self,
        guidance: float = 1.0,
        time_convention: Any = None,
        output_scale: float | None = None,
        time_scale: float | None = None,
    ) -> None:
        self.guidance = float(guidance)
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"guidance": self.guidance, **super().config()}

    def check_model(self, model: nn.Module) -> None:
        kind = model.config.image_condition_type
        if kind is not None:
            why = {
                "latent_concat": "the image latents are concatenated to the input channels",
                "token_replace": "the first frame's tokens read time 0 while the others read the sampled time (a per-token time)",
            }.get(kind, "an image-conditioned variant")
            raise ValueError(f"{type(model).__name__} with image_condition_type={kind!r} is image-to-video ({why}); not supported")

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        super().install(model, packer, init=init, stage_embedding=stage_embedding)
        refiner = get_submodule_path(model, _REFINER_TIME)
        mlp = refiner.timestep_embedder
        refiner.timestep_embedder = multiscale_time_embed(
            TimeMLP(refiner.time_proj, mlp), mlp.linear_2.out_features, packer.num_stages, init=init,
            stage_embedding=False, time_transform=self.time_function(model),
        )  # fmt: skip

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`HunyuanVideoConditioning`."""
        c = parse_conditioning(model, HunyuanVideoConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(
            c.encoder_hidden_states, "encoder_hidden_states", (b, None, int(cfg.text_embed_dim)),
            hint=f" (Llama embeddings [B, L, {cfg.text_embed_dim}])",
        )  # fmt: skip
        pooled = check_tensor(
            c.pooled_projections, "pooled_projections", (b, int(cfg.pooled_projection_dim)),
            hint=f" (pooled CLIP embeddings [B, {cfg.pooled_projection_dim}])",
        )  # fmt: skip
        given = c.encoder_attention_mask
        if given is not None:
            check_tensor(given, "encoder_attention_mask", (b, text.shape[1]), floating=False)
        x = self.tokens(model, packed)
        # The RoPE module reads only the input's shape, but builds its grid on the input's device:
        # a zero-stride view of one element on that device stands in for the unpatchified input.
        probe = shape_probe(b, int(cfg.in_channels), grid, self.patch(model))
        rope = model.rope(x.new_empty(1).expand(probe.shape))
        tte = model.time_text_embed
        temb = self.embed_time(model, t, stage).to(pooled.dtype) + tte.text_embedder(pooled)
        g = guidance_input(model, tte.guidance_embedder, c.guidance, self.guidance, b, pooled)
        if g is not None:
            temb = temb + tte.guidance_embedder(tte.time_proj(g * 1000.0).to(pooled.dtype))
        text = self._refine(model, text, t, stage, given)
        # HunyuanVideo's joint mask: every latent token, then the first sum(mask) text tokens.
        n_text = text.shape[1] if given is None else given.sum(dim=1, dtype=torch.int)
        keep = torch.arange(x.shape[1] + text.shape[1], device=x.device)[None] < (x.shape[1] + torch.as_tensor(n_text, device=x.device)).view(-1, 1)
        attention_mask = keep.expand(b, -1)[:, None, None, :]
        extra = (None, grid[1] * grid[2])  # token_replace_emb, first_frame_num_tokens (read by token_replace only)
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            x, text = call_block(model, block, x, text, temb, attention_mask, rope, *extra)
        x = model.norm_out(x, temb)
        return self.velocity(model.proj_out(x), grid)

    @staticmethod
    def _refine(model: nn.Module, text: Tensor, t: Tensor, stage: Tensor, mask: Tensor | None) -> Tensor:
        """``HunyuanVideoTokenRefiner.forward`` with the per-stage time embedding."""
        ce = model.context_embedder
        if mask is None:
            pooled = text.mean(dim=1)
        else:
            m = mask.float().unsqueeze(-1)
            pooled = ((text * m).sum(dim=1) / m.sum(dim=1)).to(text.dtype)
        temb = ce.time_text_embed.timestep_embedder(t, stage).to(text.dtype) + ce.time_text_embed.text_embedder(pooled)
        return ce.token_refiner(ce.proj_in(text), temb, mask)


ADAPTER = HunyuanVideoAdapter()
