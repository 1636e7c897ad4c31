"""Adapter for diffusers ``Flux3Transformer2DModel`` (FLUX.3 text-to-image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

What the installed diffusers shows of FLUX.3 is its modular pipeline (``diffusers.modular_pipelines.flux3``):

* latents: the pipeline denoises the **packed** latents ``[B, in_channels, H / 16, W / 16]`` (the VAE's
  ``latent_channels x 4``, normalised by the VAE's batch-norm statistics) and packs them to tokens by
  flattening the grid (``Flux3PrepareLatentsStep``); the decoder unpacks the 2x2 sub-pixels. dfm_ext's
  sample is that packed latent, patch 1, so the sub-pixel channel order never enters here;
* time and sign: the transformer reads ``timestep = scheduler timestep / 1000 = sigma`` and multiplies
  it by 1000 itself; ``FlowMatchEulerDiscreteScheduler`` steps on its (guided) output as is:
  ``"timestep"`` (``1000 (1 - t)``) into its sinusoid, ``noise - x`` (flipped);
* positions: image ids ``(0, image_rope_scale i, image_rope_scale j, 0)`` with the pipeline's
  ``image_rope_scale=0.5`` ("the model was trained with the image H/W position ids scaled by this
  factor"), text ids ``(0, 0, 0, k)`` (``Flux3TextRoPEInputsStep``).

Per-token times: FLUX.3 modulates the image tokens with the flow time and the text tokens with time 0
(clean) through the same embedder. Made per-stage, the text reads every stage at data time (``t = 1``
in all stages, with the same stage index as its sample), which at ``init="pretrained"`` is the
model's own time-0 embedding exactly; the image tokens read the stages' times.

What ``install`` changes (mode and joint blocks, modulation heads, RoPE, text projection untouched):
``x_embedders.image`` (``Linear``), ``timestep_embedder`` (after its ``time_proj`` sinusoid) and
``proj_out``.

Refused: flow-map checkpoints (``flow_map=True``: a second time ``target_timestep``, the step's jump
target) and reference-image tokens (``image_cond_hidden_states``: not a keyword here; image-to-image
is not taken).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]`` (stacked Qwen3-VL
hidden states; no text mask in FLUX.3), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["Flux3Adapter", "Flux3Conditioning", "flux3_ids", "ADAPTER"]


class Flux3Conditioning(NamedTuple):
    """The conditioning keywords :meth:`Flux3Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


def flux3_ids(grid: tuple[int, int], text_len: int, image_rope_scale: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(image ids [N, 4], text ids [L, 4])`` as ``Flux3PrepareLatentsStep`` / ``Flux3TextRoPEInputsStep`` build them."""
    gh, gw = grid
    image = torch.zeros(gh * gw, 4, device=device)
    image[:, 1] = torch.arange(gh, device=device).repeat_interleave(gw) * image_rope_scale
    image[:, 2] = torch.arange(gw, device=device).repeat(gh) * image_rope_scale
    text = torch.zeros(text_len, 4, device=device)
    text[:, 3] = torch.arange(text_len, device=device)
    return image, text


class Flux3Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``Flux3Transformer2DModel`` (conditioning: :class:`Flux3Conditioning`).

    Args:
        image_rope_scale: the image position ids' scale (the modular pipeline's default, 0.5).
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    spec = AdapterSpec(
        name="flux3", model_class="Flux3Transformer2DModel", patch_embed="x_embedders.image", time_proj="time_proj",
        time_embedder="timestep_embedder", head="proj_out", patch_order="cpq", patch_in_order="cpq",
        time_convention="timestep", output_scale=-1.0, positions="rope",
        # 1024 x 1024 px: the pipeline's default, a 64 x 64 grid of packed latents.
        default_sample=(64, 64), conditioning=Flux3Conditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)context_embedder$",),
                "mod": (r"(^|\.)(early|single)_stream_modulations\.(image|txt)\.linear$",),
                "proj": (r"(^|\.)x_embedders\.image(\.proj)?$",),
            }
        ),
    )  # fmt: skip

    def __init__(
        self,
        image_rope_scale: float = 0.5,
        time_convention: Any = None,
        output_scale: float | None = None,
        time_scale: float | None = None,
    ) -> None:
        self.image_rope_scale = float(image_rope_scale)
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"image_rope_scale": self.image_rope_scale, **super().config()}

    def check_model(self, model: nn.Module) -> None:
        if model.config.flow_map:
            raise ValueError(
                f"{type(model).__name__} with flow_map=True (step-distilled) reads a second time target_timestep, the time "
                "each step jumps to: a flow map, not a velocity at one time per stage"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (1, 1)  # the pipeline's tokens are the packed latent's pixels

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`Flux3Conditioning`."""
        c = parse_conditioning(model, Flux3Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (Qwen3-VL states [B, L, {width}])")
        x = self.tokens(model, packed)
        # Per-token modulation inputs [B, 1, D]: the image at the stages' times, the text clean in every stage.
        image_temb = self.embed_time(model, t, stage).to(x.dtype)[:, None]
        text_temb = self.embed_time(model, torch.ones_like(t), stage).to(x.dtype)[:, None]
        image_act = F.silu(image_temb).expand(b, x.shape[1], -1)
        text_act = F.silu(text_temb).expand(b, text.shape[1], -1)
        early, single = model.early_stream_modulations, model.single_stream_modulations
        image_ids, text_ids = flux3_ids(grid, text.shape[1], self.image_rope_scale, x.device)
        image_rope, text_rope = model.pos_embed(image_ids), model.pos_embed(text_ids)
        txt = model.context_embedder(text)
        text_mod = early["txt"](text_act)
        for block in model.txt_mode_blocks:
            txt = call_block(model, block, txt, text_mod, text_rope)
        image_mod = early["image"](image_act)
        for block in model.mode_blocks["image"]:
            x = call_block(model, block, x, image_mod, image_rope)
        joint_rope = tuple(torch.cat([a, b_], dim=0) for a, b_ in zip(text_rope, image_rope))
        image_mod, text_mod = single["image"](image_act), single["txt"](text_act)
        for block in model.single_transformer_blocks:
            txt, x = call_block(model, block, x, txt, image_mod, text_mod, joint_rope)
        return self.velocity(model.proj_out(model.norm_out(x, image_temb.expand(b, x.shape[1], -1))), grid)


ADAPTER = Flux3Adapter()
