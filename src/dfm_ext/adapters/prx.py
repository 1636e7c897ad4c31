"""Adapter for diffusers ``PRXTransformer2DModel`` (PRX text-to-image, latent space), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

PRX's blocks cross-attend from the image tokens to the text (keys and values of both), with 2-D RoPE
ids ``(row, column)``. What ``install`` changes (blocks, RoPE, text projection untouched): ``img_in``
(a ``Linear`` over ``(c, p, q)`` patches, the model's ``img2seq``), ``time_in`` (its 256-wide sinusoid,
which multiplies the time by ``config.time_factor``, bundled with the MLP) and ``final_layer.linear``
(``(c, p, q)``, the model's ``seq2img``).

Time: ``PRXPipeline`` feeds ``t_cont = timestep / 1000 = sigma`` and the sinusoid multiplies it by
``time_factor``: ``"sigma"``.

Prediction: **must be given**; the same class serves two pipelines that read its output differently.
``PRXAdapter(prediction="velocity")`` is ``PRXPipeline``'s: the output is stepped on as is by
``FlowMatchEulerDiscreteScheduler``, ``noise - x`` (flipped). ``"sample"`` is ``PRXPixelPipeline``'s
x-prediction (the clean image, turned into a velocity ``(x_t - x0) / max(sigma, 0.05)`` per step, from
``2 randn`` noise): a time-dependent, clamped conversion, not an output sign, and refused. Refused too:
``bottleneck_size`` (a two-layer patch projection) and ``resolution_embeds`` (the latent's size added to
the time vector), the layout of that pixel-space PRX-7B.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, context_in_dim]`` and optional
``attention_mask [B, L]`` (True = a text token; the pipeline's ``cross_attn_mask``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from .common import TimeMLP, call_block, check_tensor, parse_conditioning
from .spec import AdapterSpec, PredictionSpecAdapter

__all__ = ["PRXAdapter", "PRXConditioning", "PRXTimeFeatures", "ADAPTER"]

PREDICTIONS = ("velocity", "sample")


class PRXConditioning(NamedTuple):
    """The conditioning keywords :meth:`PRXAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    attention_mask: Tensor | None = None


class PRXTimeFeatures(nn.Module):
    """PRX's parameter-free time features: the 256-wide sinusoid of ``time_factor * timestep`` (``[B] -> [B, 256]``)."""

    def __init__(self, time_factor: float, max_period: int) -> None:
        super().__init__()
        self.time_factor, self.max_period = float(time_factor), int(max_period)

    def forward(self, timestep: Tensor) -> Tensor:
        from diffusers.models.embeddings import get_timestep_embedding  # noqa: PLC0415

        return get_timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=self.time_factor,
                                      max_period=self.max_period)  # fmt: skip


class PRXAdapter(PredictionSpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``PRXTransformer2DModel`` (conditioning: :class:`PRXConditioning`).

    Args:
        prediction: ``"velocity"`` (``PRXPipeline``; required: the transformer cannot show it).
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    predictions = dict.fromkeys(PREDICTIONS)
    spec = AdapterSpec(
        name="prx", model_class="PRXTransformer2DModel", patch_embed="img_in", time_embedder="time_in",
        head="final_layer.linear", patch_order="cpq", patch_in_order="cpq", time_convention="sigma", output_scale=-1.0,
        positions="rope",
        # 1024 x 1024 px: a 8x autoencoder's 128 x 128 latents.
        default_sample=(128, 128), conditioning=PRXConditioning, null_keys=("encoder_hidden_states",),
        layer_groups={
            "cond": (r"(^|\.)time_in\.", r"(^|\.)txt_in$"),
            "mod": (r"(^|\.)modulation\.lin$", r"(^|\.)final_layer\.adaLN_modulation\.1$"),
            "attn": (r"(^|\.)attention\.(img_qkv_proj|txt_kv_proj|to_out\.0)$",),
            "mlp": (r"(^|\.)(gate_proj|up_proj|down_proj)$",),
            "proj": (r"(^|\.)img_in(\.proj)?$", r"(^|\.)final_layer\.linear$"),
        },
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        name, cfg = type(model).__name__, model.config
        if self.prediction is None:
            raise ValueError(
                f"{name} serves two pipelines that read its output differently, which the model cannot show; choose: "
                "wrap_dit(model, decomposition, adapter=PRXAdapter(prediction='velocity')) for PRXPipeline (latent space, "
                "noise - x), or prediction='sample' for PRXPixelPipeline (x0, not supported); from dfm_ext.adapters import PRXAdapter"
            )
        if self.prediction == "sample":
            raise ValueError(
                f"{name} with prediction='sample' (PRXPixelPipeline) predicts the clean image, turned into a velocity "
                "(x_t - x0) / max(sigma, 0.05) per step from 2 randn noise: a time-dependent clamped conversion, not supported"
            )
        if cfg.bottleneck_size is not None or cfg.resolution_embeds:
            raise ValueError(
                f"{name} with bottleneck_size={cfg.bottleneck_size}, resolution_embeds={cfg.resolution_embeds} has the "
                "pixel-space PRX-7B layout (a two-layer patch projection, the latent's size added to the time vector): "
                "not supported"
            )

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        # The sinusoid is a function call in PRX's forward: bundled with its MLP so each stage gets a copy.
        if not isinstance(model.time_in, TimeMLP):
            model.time_in = TimeMLP(PRXTimeFeatures(model.config.time_factor, model.config.time_max_period), model.time_in)
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`PRXConditioning`."""
        from diffusers.models.transformers.transformer_prx import get_image_ids  # noqa: PLC0415

        c = parse_conditioning(model, PRXConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.context_in_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        mask = c.attention_mask
        if mask is not None:
            mask = check_tensor(mask, "attention_mask", (b, text.shape[1]), floating=False).bool()
        x = self.tokens(model, packed)
        p = int(model.config.patch_size)
        rope = model.pe_embedder(get_image_ids(b, grid[0] * p, grid[1] * p, p, x.device))
        vec = self.embed_time(model, t, stage).to(x.dtype)
        txt = model.txt_in(text)
        for block in model.blocks:
            x = call_block(model, block, x, txt, vec, rope, mask)
        return self.velocity(model.final_layer(x, vec), grid)


ADAPTER = PRXAdapter()
