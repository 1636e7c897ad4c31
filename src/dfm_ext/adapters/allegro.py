"""Adapter for diffusers ``AllegroTransformer3DModel`` (Allegro text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Videos are ``[B, C, T, H, W]`` in dfm_ext and Allegro alike. Allegro embeds every frame with the
same ``Conv2d`` patch (``pos_embed.proj``, no position table); ``install`` turns it into the
equivalent ``(1, p, p)`` ``Conv3d`` (:func:`~dfm_ext.adapters.mochi.frame_conv3d`) and widens that.
It also replaces ``adaln_single.emb.timestep_embedder`` (after its ``time_proj`` sinusoid; the
adaLN-single ``adaln_single.linear`` and the final ``scale_shift_table`` are reused) and
``proj_out`` (``(p, q, c)`` order, channels fastest).

Time: ``AllegroPipeline`` runs one of diffusers' Karras schedulers (DDPM family, integer steps,
999 = noise): ``"discrete"`` (``999 (1 - t)``). What the model predicts (epsilon or v) is the
scheduler config's ``prediction_type``, which the transformer cannot show: the adapter asks for it,
``AllegroAdapter(prediction="epsilon")`` (taken as ``-epsilon``, the measured best start, see the
adapters guide) or ``AllegroAdapter(prediction="v_prediction")`` (taken raw); DFM finetuning
re-parameterises either into a flow velocity.

Positions: Allegro's 3-D RoPE, built from the token grid as the pipeline builds it
(``get_3d_rotary_pos_embed_allegro`` with the config's interpolation scales): any grid.

Refused: ``patch_size_t != 1`` (the per-frame patch embedding cannot fold frames).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, caption_channels]`` (T5), optional
``encoder_attention_mask [B, L]`` (1 = keep), ``image_rotary_emb`` (the pipeline's; default built
from the grid).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, get_submodule_path, parse_conditioning, set_submodule_path
from .diffusers_common import diffusers_layer_groups
from .mochi import frame_conv3d
from .spec import AdapterSpec, PredictionSpecAdapter

__all__ = ["AllegroAdapter", "AllegroConditioning", "allegro_rope", "ADAPTER"]

#: prediction type -> output scale (epsilon is taken as -epsilon: the measured best start)
PREDICTIONS = {"epsilon": -1.0, "v_prediction": 1.0}


class AllegroConditioning(NamedTuple):
    """The conditioning keywords :meth:`AllegroAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    image_rotary_emb: Any = None


def allegro_rope(model: nn.Module, grid: tuple[int, int, int], device: Any = None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``AllegroPipeline._prepare_rotary_positional_embeddings`` for a token grid ``(T, Gh, Gw)``."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro  # noqa: PLC0415

    cfg = model.config
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=int(cfg.attention_head_dim), crops_coords=((0, 0), (grid[1], grid[2])), grid_size=(grid[1], grid[2]),
        temporal_size=grid[0], interpolation_scale=(cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w),
        device=device,
    )  # fmt: skip
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)


class AllegroAdapter(PredictionSpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``AllegroTransformer3DModel`` (conditioning: :class:`AllegroConditioning`).

    Args:
        prediction: ``"epsilon"`` or ``"v_prediction"``, the pipeline scheduler's ``prediction_type``
            (required: the transformer cannot show it); sets ``output_scale`` unless that is given.
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    predictions = PREDICTIONS
    spec = AdapterSpec(
        name="allegro", model_class="AllegroTransformer3DModel", patch_embed="pos_embed.proj",
        time_proj="adaln_single.emb.time_proj", time_embedder="adaln_single.emb.timestep_embedder", head="proj_out",
        patch_order="pqc", time_convention="discrete", output_scale=1.0, positions="rope", grid_ndim=3,
        # Allegro at 720 x 1280, 88 frames: latents 22 x 90 x 160 (the config's sample_frames/height/width).
        conditioning=AllegroConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)adaln_single\.emb\.", r"(^|\.)caption_projection\."),
                "mod": (r"(^|\.)adaln_single\.linear$",),
            }
        ),
    )  # fmt: skip


    def check_model(self, model: nn.Module) -> None:
        if self.prediction is None:
            raise ValueError(
                f"{type(model).__name__} predicts what its pipeline's scheduler config says (prediction_type), "
                "which the transformer cannot show; choose one: wrap_dit(model, decomposition, "
                "adapter=AllegroAdapter(prediction='epsilon')) (taken as -epsilon) or "
                "adapter=AllegroAdapter(prediction='v_prediction') (taken raw); "
                "from dfm_ext.adapters import AllegroAdapter"
            )
        if int(model.config.patch_size_t) != 1:
            raise ValueError(f"{type(model).__name__} with patch_size_t={model.config.patch_size_t}: its per-frame patch embedding takes patch_size_t=1 only")

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        p = int(model.config.patch_size)
        return (1, p, p)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.in_channels), int(cfg.sample_frames), int(cfg.sample_height), int(cfg.sample_width))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        proj = get_submodule_path(model, self.spec.patch_embed)
        if isinstance(proj, nn.Conv2d):
            set_submodule_path(model, self.spec.patch_embed, frame_conv3d(proj))
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`AllegroConditioning`."""
        c = parse_conditioning(model, AllegroConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.caption_channels)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5 embeddings [B, L, {width}])")
        mask = c.encoder_attention_mask
        if mask is not None:
            check_tensor(mask, "encoder_attention_mask", (b, text.shape[1]), floating=False)
            mask = ((1 - mask.to(packed.dtype)) * -10000.0).unsqueeze(1)
        rope = c.image_rotary_emb if c.image_rotary_emb is not None else allegro_rope(model, grid, packed.device)
        x = self.tokens(model, packed)  # frame-major, as Allegro flattens its per-frame tokens
        embedded = self.embed_time(model, t, stage).to(x.dtype)
        ada = model.adaln_single
        temb = ada.linear(ada.silu(embedded))
        text = model.caption_projection(text).view(b, -1, x.shape[-1])
        for block in model.transformer_blocks:
            x = call_block(model, block, x, text, temb, None, mask, rope)
        shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        x = model.norm_out(x) * (1 + scale) + shift
        return self.velocity(model.proj_out(x), grid)


ADAPTER = AllegroAdapter()
