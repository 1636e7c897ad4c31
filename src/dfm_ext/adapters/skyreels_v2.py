"""Adapter for diffusers ``SkyReelsV2Transformer3DModel`` (SkyReels-V2 text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

SkyReels-V2 is Wan 2.1's layout (see :mod:`dfm_ext.adapters.wan`): ``install`` changes
``patch_embedding`` (``Conv3d``), ``condition_embedder.time_embedder`` (after its
``timesteps_proj`` sinusoid) and ``proj_out`` (``(pt, p, q, c)`` order). Two additions: an fps
embedding added to the block modulation when ``inject_sample_info`` (pass ``fps``), and a
block-causal attention mask over frames when ``num_frame_per_block > 1``, rebuilt for the token grid.

Time and sign: the pipeline's flow UniPC scheduler passes ``1000 sigma`` (``"timestep"``) and
steps on ``noise - x`` (``output_scale=-1``). Not taken: diffusion forcing (per-frame times,
``enable_diffusion_forcing``; DFM gives one time per stage). Refused: image-to-video inputs
(``in_channels != out_channels``).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_dim]`` (UMT5),
``encoder_hidden_states_image`` (CLIP, models built with ``image_dim``), ``fps`` (required when
``inject_sample_info``: the model's frame-rate class, an int or ``[B]`` long, as the pipeline maps
it: 0 for 16 fps, 1 for any other rate).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning, shape_probe
from .spec import AdapterSpec
from .wan import WanAdapter

__all__ = ["SkyReelsV2Adapter", "SkyReelsV2Conditioning", "ADAPTER"]


class SkyReelsV2Conditioning(NamedTuple):
    """The conditioning keywords :meth:`SkyReelsV2Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_hidden_states_image: Tensor | None = None
    fps: int | Tensor | None = None


def block_causal_mask(grid: tuple[int, int, int], frames_per_block: int, device: torch.device) -> Tensor | None:
    """``[1, 1, N, N]`` bool: token ``i`` sees token ``j`` when ``j``'s frame block is not later (SkyReels-V2's mask)."""
    f, h, w = grid
    if frames_per_block <= 1:
        return None
    block = torch.arange(f // frames_per_block, device=device).repeat_interleave(frames_per_block)
    frame_ok = block[None, :] <= block[:, None]  # [F, F]
    return frame_ok.repeat_interleave(h * w, 0).repeat_interleave(h * w, 1)[None, None]


class SkyReelsV2Adapter(WanAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``SkyReelsV2Transformer3DModel`` (conditioning: :class:`SkyReelsV2Conditioning`)."""

    spec = AdapterSpec(
        **{
            **{f: getattr(WanAdapter.spec, f) for f in WanAdapter.spec.__dataclass_fields__},
            "name": "skyreels_v2", "model_class": "SkyReelsV2Transformer3DModel", "conditioning": SkyReelsV2Conditioning,
            "layer_groups": {**WanAdapter.spec.layer_groups, "cond": (*WanAdapter.spec.layer_groups["cond"], r"(^|\.)fps_(embedding|projection)$")},
        }
    )  # fmt: skip

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`SkyReelsV2Conditioning`."""
        c = parse_conditioning(model, SkyReelsV2Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, int(cfg.text_dim)), hint=f" (UMT5 embeddings [B, L, {cfg.text_dim}])")
        rope = model.rope(shape_probe(b, int(cfg.in_channels), grid, self.patch(model)))
        x = self.tokens(model, packed).contiguous()
        ce = model.condition_embedder
        temb = self.embed_time(model, t, stage).type_as(text)
        modulation = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
        text = ce.text_embedder(text)
        if c.encoder_hidden_states_image is not None:
            if ce.image_embedder is None:
                raise TypeError(f"this {type(model).__name__} has no image embedder (image_dim=None)")
            text = torch.cat([ce.image_embedder(c.encoder_hidden_states_image), text], dim=1)
        if cfg.inject_sample_info:
            if c.fps is None:
                raise TypeError(f"this {type(model).__name__} embeds the frame rate (inject_sample_info=True): pass fps=")
            fps = torch.as_tensor(c.fps, dtype=torch.long, device=x.device).expand(b)  # 0: 16 fps, 1: others
            modulation = modulation + model.fps_projection(model.fps_embedding(fps)).unflatten(1, (6, -1))
        mask = block_causal_mask(grid, int(cfg.num_frame_per_block), x.device)
        for block in model.blocks:
            x = call_block(model, block, x, text, modulation, rope, mask)
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = SkyReelsV2Adapter()
