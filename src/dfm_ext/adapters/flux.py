"""Adapter for diffusers ``FluxTransformer2DModel`` (FLUX.1 dev / schnell), as in paper section E.

Flux works on pre-packed tokens: its pipeline folds every 2x2 block of the latent
``[B, C, H, W]`` into one token of ``4 C`` channels in ``(c, p, q)`` order (channel-major) and
passes RoPE ids per token. Here the stages are plain latents ``[B, C, H_s, W_s]``; the
:class:`~dfm_ext.wrapping.packing.ScalePacker` does that folding (its ``(c, i, j)`` space-to-depth *is*
Flux's packing for a 2x2 patch), and the adapter builds ``img_ids`` for the token grid
``(H / 2, W / 2)`` and zero ``txt_ids``, as ``FluxPipeline`` does.

What ``install`` changes (double/single blocks, RoPE, context and guidance embedders untouched):

* ``x_embedder`` (``Linear(4 C -> D)``) -> :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`
  over the packed stages; stage 0 keeps Flux's kernel (summed over 2x2 sub-blocks when stage 0
  uses a 1x1 patch, i.e. stage 0 nearest-upsampled by 2, paper section E);
* ``time_text_embed.timestep_embedder`` -> :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed`;
* ``proj_out`` -> widened :class:`~dfm_ext.wrapping.embeddings.MultiScaleHead` (channel-major
  ``(c, p, q)`` order, as Flux's unpacking).

Time and sign: Flux multiplies ``sigma = 1 - t`` by 1000 inside its forward; the adapter feeds
the embedders ``1000 (1 - t)`` directly and returns ``-output`` (Flux predicts ``noise - x``).

Conditioning (diffusers names): ``encoder_hidden_states`` ``[B, L, joint_attention_dim]`` (T5),
``pooled_projections`` ``[B, pooled_projection_dim]`` (CLIP); optional ``guidance`` (float or
``[B]``; default the adapter's ``guidance``, 1.0 as in the paper's FLUX-dev finetuning, only
for ``guidance_embeds=True`` models), ``txt_ids`` ``[L, 3]``, ``img_ids`` ``[N, 3]``,
``joint_attention_kwargs``. ``null_condition`` zeroes the text embeddings (FLUX-dev is
guidance-distilled; pass empty-prompt embeddings as ``uncond=`` for true CFG).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.adapter import widen_head, widen_patch_embed
from dfm_ext.wrapping.embeddings import MultiScalePatchEmbed

from .diffusers_common import DiffusersAdapterBase, check_joint_text, diffusers_layer_groups
from .common import call_block, check_installed, check_stage0_channels, check_tensor, first_linear_dtype
from .common import parse_conditioning, zeroed_condition

__all__ = ["FluxAdapter", "FluxConditioning", "flux_image_ids", "ADAPTER"]

_PACK = 2  # FluxPipeline folds 2x2 latent pixels into one token


def flux_image_ids(grid: tuple[int, int], device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """RoPE ids ``[Gh * Gw, 3]`` of a token grid, as ``FluxPipeline._prepare_latent_image_ids``: ``(0, row, col)``.

    Example:
        >>> flux_image_ids((2, 3))[:, 1:].tolist()
        [[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]
    """
    gh, gw = grid
    ids = torch.zeros(gh, gw, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=dtype)[None, :]
    return ids.reshape(gh * gw, 3)


class FluxConditioning(NamedTuple):
    """The conditioning keywords :meth:`FluxAdapter.forward` takes (diffusers names).

    ``encoder_hidden_states [B, L, joint_attention_dim]`` (T5) and ``pooled_projections
    [B, pooled_projection_dim]`` (CLIP) are required. ``guidance`` (float or ``[B]``, only for
    ``guidance_embeds`` models) defaults to the adapter's; ``txt_ids [L, 3]`` and
    ``img_ids [N, 3]`` default to ``FluxPipeline``'s; ``joint_attention_kwargs`` goes to every block.
    """

    encoder_hidden_states: Tensor | None = None
    pooled_projections: Tensor | None = None
    guidance: float | Tensor | None = None
    txt_ids: Tensor | None = None
    img_ids: Tensor | None = None
    joint_attention_kwargs: dict[str, Any] | None = None


class FluxAdapter(DiffusersAdapterBase):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``FluxTransformer2DModel``.

    Args:
        guidance: distilled-guidance value fed to ``guidance_embeds`` models when the caller
            passes none (paper E: fixed at 1.0 during finetuning).
        default_latent_size: latent side for ``default_sample_shape`` (Flux has no fixed size;
            128 = 1024 px with Flux's 8x autoencoder).
        time_convention: default ``"timestep"`` (``1000 (1 - t)``, what Flux's embedder sees).
        output_scale: default ``-1`` (Flux predicts ``noise - x``).
    """

    name = "flux"
    model_class = "FluxTransformer2DModel"
    #: ``dfm_ext.specialization`` layer groups: diffusers' shared names and ``time_text_embed``,
    #: ``context_embedder``, ``x_embedder``; a single block's ``proj_out`` fuses the attention
    #: output with the MLP and counts as ``mlp`` together with ``proj_mlp``
    layer_groups = diffusers_layer_groups(
        {
            "cond": (r"(^|\.)time_text_embed\.", r"(^|\.)context_embedder$"),
            "mlp": (r"(^|\.)single_transformer_blocks\.\d+\.proj_(mlp|out)$",),
            "proj": (r"(^|\.)x_embedder(\.|$)",),
        }
    )

    def __init__(
        self,
        guidance: float = 1.0,
        default_latent_size: int = 128,
        time_convention: str = "timestep",
        output_scale: float = -1.0,
    ):
        self.guidance = float(guidance)
        if int(default_latent_size) < _PACK or int(default_latent_size) % _PACK:
            raise ValueError(f"default_latent_size must be a positive multiple of 2, got {default_latent_size!r}")
        self.default_latent_size = int(default_latent_size)
        super().__init__(time_convention, output_scale)

    def config(self) -> dict[str, Any]:
        return {"guidance": self.guidance, "default_latent_size": self.default_latent_size, **super().config()}

    @staticmethod
    def latent_channels(model: nn.Module) -> int:
        """Latent channels ``C``: Flux's token width ``4 C`` over its 2x2 packing."""
        cfg = model.config
        if int(cfg.patch_size) != 1:
            raise ValueError(f"only Flux models with patch_size=1 (2x2 packing by the pipeline) are supported, got {cfg.patch_size}")
        cin, cout = int(cfg.in_channels), int(model.out_channels)
        if cin != cout or cin % (_PACK * _PACK):
            raise ValueError(
                f"{type(model).__name__} with in_channels={cin}, out_channels={cout} is not a plain text-to-image "
                "Flux (in = out = 4 x latent channels); Fill/Kontext-style inputs are not supported"
            )
        return cin // (_PACK * _PACK)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        n = self.default_latent_size
        return (self.latent_channels(model), n, n)

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(sample_shape) != 3:
            raise ValueError(f"{type(model).__name__} takes image latents; sample_shape must be (C, H, W), got {sample_shape}")
        if sample_shape[1] % _PACK or sample_shape[2] % _PACK:
            raise ValueError(f"Flux latents must have even height and width, got sample_shape {sample_shape}")
        return (sample_shape[1] // _PACK, sample_shape[2] // _PACK)

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        if not isinstance(model.x_embedder, nn.Linear) or isinstance(model.x_embedder, MultiScalePatchEmbed):
            raise TypeError(f"{type(model).__name__}.x_embedder is not a Linear (already wrapped?)")
        self._check_grid(model, packer.grid)
        c = self.latent_channels(model)
        check_stage0_channels(packer, init, c, "the model's latents have")
        hidden = model.x_embedder.out_features
        tte = model.time_text_embed
        model.x_embedder = widen_patch_embed(model.x_embedder, packer, init=init, in_order="cpq")
        tte.timestep_embedder = self._time_embed(
            tte.time_proj, tte.timestep_embedder, hidden, packer, init=init, stage_embedding=stage_embedding
        )
        model.proj_out = widen_head(
            model.proj_out, packer, base_patch=(_PACK, _PACK), base_channels=c, order="cpq", init=init
        )

    def _guidance(self, model: nn.Module, guidance: Any, b: int, like: Tensor) -> Tensor | None:
        if not model.config.guidance_embeds:
            if guidance is not None:
                raise ValueError(f"this {type(model).__name__} has no guidance embedding (guidance_embeds=False)")
            return None
        if guidance is None:
            guidance = self.guidance
        if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
            return torch.full((b,), float(guidance), device=like.device, dtype=like.dtype)
        return check_tensor(guidance, "guidance", (b,)).to(like.dtype)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`FluxConditioning`."""
        c = parse_conditioning(model, FluxConditioning, cond)
        check_installed(model.x_embedder)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        text, pooled = check_joint_text(model, b, c, text="T5", pooled="pooled CLIP")
        n = grid[0] * grid[1]
        img_ids = c.img_ids
        if img_ids is None:
            img_ids = flux_image_ids(grid, device=packed.device, dtype=packed.dtype)
        check_tensor(img_ids, "img_ids", (n, 3))
        txt_ids = c.txt_ids
        if txt_ids is None:
            txt_ids = torch.zeros(text.shape[1], 3, device=packed.device, dtype=packed.dtype)
        check_tensor(txt_ids, "txt_ids", (text.shape[1], 3))

        x = model.x_embedder(packed)
        dtype = first_linear_dtype(model.time_text_embed)
        tte = model.time_text_embed
        temb = tte.timestep_embedder(t, stage).to(dtype)
        g = self._guidance(model, c.guidance, b, x)
        if g is not None:
            temb = temb + tte.guidance_embedder(tte.time_proj(g * 1000).to(dtype))
        temb = temb + tte.text_embedder(pooled)
        text = model.context_embedder(text)
        rope = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            text, x = call_block(model, block, x, text, temb, rope, c.joint_attention_kwargs)
        x = model.norm_out(x, temb)
        return self._velocity(model.proj_out(x), grid)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """Text and pooled embeddings zeroed (a stand-in; pass empty-prompt embeddings as ``uncond=``)."""
        return zeroed_condition(cond, ("encoder_hidden_states", "pooled_projections"))


ADAPTER = FluxAdapter()
