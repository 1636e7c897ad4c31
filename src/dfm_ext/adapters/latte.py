"""Adapter for diffusers ``LatteTransformer3DModel`` (Latte text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Videos are ``[B, C, T, H, W]``. Latte embeds every frame with the same ``PatchEmbed`` conv;
``install`` turns it into the equal ``(1, p, p)`` ``Conv3d`` and widens that, and replaces
``adaln_single.emb.timestep_embedder`` (after its ``time_proj`` sinusoid) and ``proj_out`` (per frame
``(p, q, c)``, channels fastest; the learned-sigma half of its outputs is dropped).

Time and sign: ``LattePipeline`` runs a DDPM-family scheduler (``KarrasDiffusionSchedulers``) with
integer timesteps, 999 = noise (``"discrete"``). What the model predicts is the scheduler config's
``prediction_type``, which the transformer cannot show: the adapter asks,
``LatteAdapter(prediction="epsilon")`` (taken as ``-epsilon``, the measured best start) or
``"v_prediction"`` (taken raw).

Positions: the per-frame sin-cos table recomputed for the token grid (``PatchEmbed``'s rule), and
a fixed temporal sin-cos table of ``video_length`` frames: the frame count must be ``video_length``
(or 1).

Per-stage specialisation: Latte's spatial blocks run on ``[B T, N, D]`` and its temporal blocks on
``[B N, T, D]``, whose rows are frames or token positions, not samples; ``dfm_ext.specialization``
routes rows of ``[B, ...]`` only. So the layer groups are ``cond`` (time and caption embedders),
``mod`` (``adaln_single.linear``) and ``proj`` (patch embedding and head, run on ``[B, ...]`` here);
``attn`` and ``mlp`` are not declared, and a forward through blocks that hold per-stage layers (e.g.
forced with ``specialize(..., patterns=)``) is refused.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, caption_channels]`` (T5),
``enable_temporal_attentions`` (default True). Latte's forward passes ``encoder_attention_mask`` to
its frame-major blocks without repeating it per frame, and ``LattePipeline`` never passes one: not
taken.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.specialization.layers import StageLayer

from .allegro import PREDICTIONS
from .common import call_block, check_tensor, get_submodule_path, parse_conditioning, set_submodule_path, sincos_positions
from .mochi import frame_conv3d
from .spec import AdapterSpec, PredictionSpecAdapter

__all__ = ["LatteAdapter", "LatteConditioning", "ADAPTER"]


class LatteConditioning(NamedTuple):
    """The conditioning keywords :meth:`LatteAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    enable_temporal_attentions: bool = True


class LatteAdapter(PredictionSpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``LatteTransformer3DModel`` (conditioning: :class:`LatteConditioning`).

    Args:
        prediction: ``"epsilon"`` or ``"v_prediction"``, the pipeline scheduler's ``prediction_type``
            (required: the transformer cannot show it); sets ``output_scale`` unless that is given.
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    predictions = PREDICTIONS
    spec = AdapterSpec(
        name="latte", model_class="LatteTransformer3DModel", patch_embed="pos_embed.proj",
        time_proj="adaln_single.emb.time_proj", time_embedder="adaln_single.emb.timestep_embedder", head="proj_out",
        patch_order="pqc", time_convention="discrete", output_scale=1.0, positions="sincos", grid_ndim=3,
        conditioning=LatteConditioning, null_keys=("encoder_hidden_states",),
        layer_groups={
            "cond": (r"(^|\.)adaln_single\.emb\.", r"(^|\.)caption_projection\."),
            "mod": (r"(^|\.)adaln_single\.linear$",),
            "proj": (r"(^|\.)pos_embed\.proj$", r"(^|\.)proj_out$"),
        },
    )  # fmt: skip


    def check_model(self, model: nn.Module) -> None:
        name, cfg = type(model).__name__, model.config
        if self.prediction is None:
            raise ValueError(
                f"{name} predicts what its pipeline's scheduler config says (prediction_type), which the transformer "
                "cannot show; choose one: wrap_dit(model, decomposition, adapter=LatteAdapter(prediction='epsilon')) "
                "(taken as -epsilon) or adapter=LatteAdapter(prediction='v_prediction') (taken raw); "
                "from dfm_ext.adapters import LatteAdapter"
            )
        if cfg.norm_type != "ada_norm_single" or model.caption_projection is None:
            raise ValueError(f"{name} with norm_type={cfg.norm_type!r} is not Latte's text-to-video layout (adaLN-single, caption projection)")

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        p = int(model.config.patch_size)
        return (1, p, p)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.in_channels), int(cfg.video_length), int(cfg.sample_size), int(cfg.sample_size))

    def _check_grid(self, model: nn.Module, grid: tuple[int, ...]) -> None:
        super()._check_grid(model, grid)
        frames = int(model.config.video_length)
        if grid[0] not in (1, frames):
            raise ValueError(
                f"{type(model).__name__} adds a fixed temporal position table of video_length={frames} frames: "
                f"the sample must have {frames} frames (or 1), got {grid[0]}"
            )

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        proj = get_submodule_path(model, self.spec.patch_embed)
        if isinstance(proj, nn.Conv2d):
            set_submodule_path(model, self.spec.patch_embed, frame_conv3d(proj))
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`LatteConditioning`."""
        c = parse_conditioning(model, LatteConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        blocks = (model.transformer_blocks, model.temporal_transformer_blocks)
        if any(isinstance(m, StageLayer) for group in blocks for m in group.modules()):
            raise ValueError(
                f"{type(model).__name__}'s spatial and temporal blocks run on [B T, N, D] and [B N, T, D] batches (rows "
                "are frames or token positions, not samples): per-stage layers there would need routing that repeats "
                "each sample's stage over its rows, which dfm_ext.specialization does not do; specialise the groups "
                "the adapter declares (cond, mod, proj)"
            )
        width = int(model.config.caption_channels)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5 embeddings [B, L, {width}])")
        frames, n = grid[0], grid[1] * grid[2]
        x = self.tokens(model, packed)  # [B, T N, D], frame-major
        d = x.shape[-1]
        x = x.reshape(b * frames, n, d)
        pos = sincos_positions(model.pos_embed, (grid[1], grid[2]), x.device)
        if pos is not None:
            x = (x + pos).to(x.dtype)
        embedded = self.embed_time(model, t, stage).to(x.dtype)
        timestep = model.adaln_single.linear(model.adaln_single.silu(embedded))
        text = model.caption_projection(text)
        text_spatial = text.repeat_interleave(frames, dim=0)
        time_spatial, time_temporal = timestep.repeat_interleave(frames, dim=0), timestep.repeat_interleave(n, dim=0)
        for i, (spatial, temporal) in enumerate(zip(*blocks)):
            x = call_block(model, spatial, x, None, text_spatial, None, time_spatial, None, None)
            if c.enable_temporal_attentions:
                x = x.reshape(b, frames, n, d).permute(0, 2, 1, 3).reshape(b * n, frames, d)
                if i == 0 and frames > 1:
                    x = x + model.temp_pos_embed.to(x.dtype)
                x = call_block(model, temporal, x, None, None, None, time_temporal, None, None)
                x = x.reshape(b, n, frames, d).permute(0, 2, 1, 3).reshape(b * frames, n, d)
        shift, scale = (model.scale_shift_table[None] + embedded.repeat_interleave(frames, dim=0)[:, None]).chunk(2, dim=1)
        x = (model.norm_out(x) * (1 + scale) + shift).reshape(b, frames * n, d)  # batch-first for the head
        return self.velocity(model.proj_out(x), grid)


ADAPTER = LatteAdapter()
