"""Adapter for diffusers ``MotifVideoTransformer3DModel`` (Motif-Video text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

HunyuanVideo's layout: dual-stream, then single-stream blocks (optionally with text cross-attention),
and optional "decoder" single-stream blocks that attend from fresh image tokens to the encoder's
output. What ``install`` changes (blocks, RoPE, text projection untouched): ``x_embedder.proj``
(``Conv3d``, patch ``(patch_size_t, p, p)``), ``time_text_embed.timestep_embedder`` (after its
``time_proj`` sinusoid) and ``proj_out`` (channel-major: the model unpatchifies
``[B, T', H', W', C, pt, p, q]``).

Input channels: ``MotifVideoPipeline`` passes ``[latents, condition latents, mask]`` (``2 C + 1``),
both zeros in text-to-video: their kernel slices are dropped, as for HunyuanVideo 1.5. Image-to-video
(a first-frame condition and SigLIP ``image_embeds``) is not taken.

Time and prediction: **must be given**. The pipeline types its scheduler as any ``SchedulerMixin``;
what it shows is a ``set_timesteps(sigmas=linspace(1, 1 / n, n), mu=...)`` call, which in diffusers
only the flow-matching schedulers accept (``FlowMatchEulerDiscreteScheduler``, ``UniPCMultistepScheduler``
with flow sigmas, ...); the model reads that scheduler's ``timestep`` and its output is stepped on
as is. The scheduler's config (its ``prediction_type``) is not in diffusers, so the adapter asks:
``MotifVideoAdapter(prediction="flow_prediction")`` reads ``timestep = 1000 sigma`` and takes the
output as ``noise - x`` (FlowMatchEuler, or a solver with ``prediction_type="flow_prediction"``); any
other prediction type is refused.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (T5Gemma),
optional ``encoder_attention_mask [B, L]`` (1 = keep), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning, shape_probe
from .diffusers_common import diffusers_layer_groups
from .hunyuan_video15 import latent_channels_only
from .spec import AdapterSpec, PredictionSpecAdapter

__all__ = ["MotifVideoAdapter", "MotifVideoConditioning", "ADAPTER"]

PREDICTIONS = ("flow_prediction", "epsilon", "v_prediction", "sample")


class MotifVideoConditioning(NamedTuple):
    """The conditioning keywords :meth:`MotifVideoAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class MotifVideoAdapter(PredictionSpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``MotifVideoTransformer3DModel`` (conditioning: :class:`MotifVideoConditioning`).

    Args:
        prediction: the pipeline scheduler's prediction, ``"flow_prediction"`` (required: neither the
            transformer nor the pipeline shows it).
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    predictions = dict.fromkeys(PREDICTIONS)
    spec = AdapterSpec(
        name="motif_video", model_class="MotifVideoTransformer3DModel", patch_embed="x_embedder.proj",
        time_proj="time_text_embed.time_proj", time_embedder="time_text_embed.timestep_embedder", head="proj_out",
        patch_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope", grid_ndim=3,
        # MotifVideoPipeline's default: 121 frames at 736 x 1280 px -> 31 x 92 x 160 latents (4x / 8x autoencoder).
        default_sample=(31, 92, 160), conditioning=MotifVideoConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_text_embed\.", r"(^|\.)context_embedder\.linear_[12]$"),
                "attn": (r"(^|\.)cross_attn\.(to_q|to_k|to_v|to_out\.0)$",),
                "mlp": (r"(^|\.)single_transformer_blocks\.\d+\.proj_(mlp|out)$",),
                "proj": (r"(^|\.)x_embedder\.proj$",),
            }
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        name, cfg = type(model).__name__, model.config
        if self.prediction is None:
            raise ValueError(
                f"{name}: MotifVideoPipeline takes any scheduler, and diffusers does not hold Motif-Video's scheduler config, "
                "so its prediction type cannot be shown; choose: wrap_dit(model, decomposition, "
                "adapter=MotifVideoAdapter(prediction='flow_prediction')) for a flow-matching scheduler (FlowMatchEulerDiscrete"
                "Scheduler, or a solver with prediction_type='flow_prediction': timestep 1000 sigma, noise - x); "
                "'epsilon', 'v_prediction' and 'sample' are not supported; from dfm_ext.adapters import MotifVideoAdapter"
            )
        if self.prediction != "flow_prediction":
            raise ValueError(f"{name} with prediction={self.prediction!r}: only 'flow_prediction' (noise - x) is supported")
        c_in, c_out = int(cfg.in_channels), int(cfg.out_channels or cfg.in_channels)
        if c_in not in (c_out, 2 * c_out + 1):
            raise ValueError(
                f"{name} with in_channels={c_in}, out_channels={c_out}: expected the latents alone ({c_out}) or "
                f"[latents, condition latents, mask] ({2 * c_out + 1}) as MotifVideoPipeline passes them"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.out_channels or cfg.in_channels), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        model.x_embedder.proj = latent_channels_only(model.x_embedder.proj, int(model.config.out_channels or model.config.in_channels))
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`MotifVideoConditioning`."""
        c = parse_conditioning(model, MotifVideoConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        width = int(cfg.text_embed_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5Gemma embeddings [B, L, {width}])")
        mask = c.encoder_attention_mask
        x = self.tokens(model, packed)
        attention_mask = None
        if mask is not None:
            mask = check_tensor(mask, "encoder_attention_mask", (b, text.shape[1]), floating=False)
            attention_mask = F.pad(mask.bool(), (x.shape[1], 0), value=True)[:, None, None, :]
        # The RoPE module reads only the input's shape (and device): a zero-stride stand-in for it.
        probe = shape_probe(b, int(cfg.in_channels), grid, self.patch(model))
        rope = model.rope(x.new_empty(1).expand(probe.shape))
        temb = self.embed_time(model, t, stage).to(x.dtype)
        text = model.context_embedder(text)
        singles = list(model.single_transformer_blocks)
        n_decoder = int(cfg.num_decoder_layers)
        encoder_blocks, decoder_blocks = singles[: len(singles) - n_decoder], singles[len(singles) - n_decoder :]
        first = x
        for block in [*model.transformer_blocks, *encoder_blocks]:
            x, text = call_block(model, block, x, text, temb, attention_mask, rope, 0)
        if decoder_blocks:  # fresh image tokens attend to the encoder's output, unmasked, as the model does
            memory, x = x, first
            for block in decoder_blocks:
                x, memory = call_block(model, block, x, memory, temb, None, rope)
        return self.velocity(model.proj_out(model.norm_out(x, temb)), grid)


ADAPTER = MotifVideoAdapter()
