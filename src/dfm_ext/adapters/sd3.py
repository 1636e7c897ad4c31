"""Adapter for diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5 MMDiT).

What ``install`` changes (joint blocks, context embedder, pooled-text embedder and positions
untouched):

* ``pos_embed.proj`` (patch ``Conv2d``) -> :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`;
  the positions are still the centre crop of SD3's ``pos_embed_max_size`` sincos table for the
  token grid;
* ``time_text_embed.timestep_embedder`` -> :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed`
  (the pooled-text projection is still added);
* ``proj_out`` -> widened :class:`~dfm_ext.wrapping.embeddings.MultiScaleHead` (``(p, q, c)`` order).

Time and sign: SD3 is a flow-matching model in diffusers' convention, ``sigma = 1 - t``,
``timestep = 1000 sigma``, and it predicts ``noise - x``. The adapter feeds
``1000 (1 - t)`` and returns ``-output``, the paper's velocity ``x - noise``, so the
prediction keeps its meaning (no re-parameterisation).

Conditioning (diffusers names): ``encoder_hidden_states`` ``[B, L, joint_attention_dim]`` and
``pooled_projections`` ``[B, pooled_projection_dim]``; optional ``joint_attention_kwargs``.
``null_condition`` zeroes both (SD3's pipeline uses empty-prompt embeddings: pass those as
``uncond=`` for real checkpoints).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from dfm_ext.wrapping.adapter import widen_patch_embed

from .diffusers_common import PatchEmbedAdapterBase, check_joint_text, diffusers_layer_groups
from .common import call_block, check_installed, parse_conditioning, zeroed_condition

__all__ = ["SD3Adapter", "SD3Conditioning", "ADAPTER"]


class SD3Conditioning(NamedTuple):
    """The conditioning keywords :meth:`SD3Adapter.forward` takes (diffusers names).

    ``encoder_hidden_states [B, L, joint_attention_dim]`` and ``pooled_projections
    [B, pooled_projection_dim]`` are required; ``joint_attention_kwargs`` goes to every block.
    """

    encoder_hidden_states: Tensor | None = None
    pooled_projections: Tensor | None = None
    joint_attention_kwargs: dict[str, Any] | None = None


class SD3Adapter(PatchEmbedAdapterBase):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``SD3Transformer2DModel``.

    SD3 reads ``1000 sigma`` and predicts ``noise - x``, hence the defaults
    ``time_convention="timestep"`` (``1000 (1 - t)``) and ``output_scale=-1`` (both explained on
    :class:`~dfm_ext.adapters.diffusers_common.DiffusersAdapterBase`).
    Conditioning: :class:`SD3Conditioning`.
    """

    name = "sd3"
    model_class = "SD3Transformer2DModel"
    #: ``dfm_ext.specialization`` layer groups: diffusers' shared names and ``time_text_embed``,
    #: ``context_embedder``
    layer_groups = diffusers_layer_groups({"cond": (r"(^|\.)time_text_embed\.", r"(^|\.)context_embedder$")})

    def __init__(self, time_convention: str = "timestep", output_scale: float = -1.0):
        super().__init__(time_convention, output_scale)

    def _check_grid(self, model: nn.Module, grid: tuple[int, ...]) -> None:
        super()._check_grid(model, grid)
        # SD3 crops its positions from a fixed table instead of recomputing them.
        limit = model.pos_embed.pos_embed_max_size
        if limit and max(grid) > limit:
            raise ValueError(
                f"the token grid {grid} is larger than {type(model).__name__}'s position table "
                f"(pos_embed_max_size={limit})"
            )

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        proj = self._patch_proj(model, packer, init)
        tte = model.time_text_embed
        model.pos_embed.proj = widen_patch_embed(proj, packer, init=init)
        tte.timestep_embedder = self._time_embed(
            tte.time_proj, tte.timestep_embedder, proj.out_channels, packer, init=init, stage_embedding=stage_embedding
        )
        model.proj_out = self._widen_head(model.proj_out, model, packer, init)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`SD3Conditioning`."""
        c = parse_conditioning(model, SD3Conditioning, cond)
        check_installed(model.pos_embed.proj)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        text, pooled = check_joint_text(model, b, c, text="text", pooled="pooled text")

        x = self._embed_patches(model, packed, grid).contiguous()

        tte = model.time_text_embed
        temb = tte.timestep_embedder(t, stage).to(pooled.dtype) + tte.text_embedder(pooled)
        text = model.context_embedder(text)
        for block in model.transformer_blocks:
            text, x = call_block(model, block, x, text, temb, c.joint_attention_kwargs)
        x = model.norm_out(x, temb)
        return self._velocity(model.proj_out(x), grid)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """Text and pooled embeddings zeroed (a stand-in for SD3's empty-prompt embeddings)."""
        return zeroed_condition(cond, ("encoder_hidden_states", "pooled_projections"))


ADAPTER = SD3Adapter()
