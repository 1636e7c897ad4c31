"""Adapter for diffusers ``CosmosTransformer3DModel`` (NVIDIA Cosmos-Predict2 text-to-image and text-to-world).

Videos are ``[B, C, T, H, W]`` (an image is one frame). Cosmos patchifies the sample itself into
tokens of ``C pt p p`` values in ``(c, pt, p, q)`` order and embeds them with a bias-free ``Linear``
(``patch_embed.proj``); with ``concat_padding_mask`` the input has one more channel, a padding
mask the text-to-image and text-to-world pipelines always pass as zeros. The mask's weights then
multiply zeros: ``install`` drops them (no ``padding_mask`` keyword) and widens the latent part.
Cosmos's time embedding has two outputs from one sinusoid: ``temb`` (``t_embedder``, the adaLN-LoRA
term, ``3 D``) and ``embedded_timestep`` (``norm``, RMS-normalised sinusoid, ``D``). Per stage both
are one embedder ``[B] -> [B, 4 D]`` (``time_embed.t_embedder`` becomes a
:class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed` of them; the later stages' last
linear layer and RMS-norm weight start at zero, so only stage 0 contributes). The head ``proj_out``
unpatchifies ``(p, q, pt, c)``, which for Cosmos's ``pt = 1`` is ``(p, q, c)``.

Time and sign: the same class serves two parameterisations that only the pipeline shows, so the
adapter asks: ``CosmosAdapter(parameterization="flow")`` for Cosmos-Predict2 (``Cosmos2TextToImagePipeline``,
``Cosmos2VideoToWorldPipeline``): their EDM-style wrapper reduces to a flow model, input
``c_in x_sigma = (1 - s) x + s noise`` with ``s = sigma / (sigma + 1)``, ``timestep = s`` (``"sigma"``)
and output ``F`` with ``x = x_s - s F``: ``F = noise - x``, taken as ``-F``. Cosmos 1.0
(``CosmosTextToWorldPipeline``, ``EDMEulerScheduler``) reads ``0.25 log sigma`` of a
variance-exploding input scaled by ``1 / sqrt(sigma^2 + sigma_data^2)`` with an output
preconditioning that depends on sigma: ``parameterization="edm"`` is refused.

Positions: Cosmos's 3-D RoPE (frame positions scaled by ``fps``) and, when configured, its
learnable per-axis embedding, both built from the token grid: any grid up to ``max_size``.

Refused: ``patch_size[0] != 1`` (the head's ``(p, q, pt, c)`` order), ``in_channels != out_channels``
(condition latents or masks concatenated to the input), image-context models (``img_context_dim_in``).

Conditioning (diffusers names): ``encoder_hidden_states [B, L, D_text]`` (T5; ``crossattn_proj_in_channels``
wide for models with ``use_crossattn_projection``), optional ``attention_mask [B, L]`` (1 = keep; passed
to the model as bool, which its attention needs),
``fps`` (the pipeline's frame rate, for videos; ``None`` for images).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.embeddings import MultiScaleTimestepEmbed

from .common import call_block, check_tensor, parse_conditioning, shape_probe
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["CosmosAdapter", "CosmosConditioning", "CosmosTimeFeatures", "ADAPTER"]

PARAMETERIZATIONS = ("flow", "edm")


class CosmosConditioning(NamedTuple):
    """The conditioning keywords :meth:`CosmosAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    attention_mask: Tensor | None = None
    fps: float | None = None


class CosmosTimeFeatures(nn.Module):
    """``CosmosEmbedding`` as one embedder: ``[B]`` timesteps -> ``[B, 4 D]`` = ``temb [B, 3 D]`` ++ ``embedded_timestep [B, D]``."""

    def __init__(self, time_proj: nn.Module, t_embedder: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.time_proj = time_proj
        self.t_embedder = t_embedder
        self.norm = norm

    def forward(self, timestep: Tensor) -> Tensor:
        proj = self.time_proj(timestep).type_as(self.t_embedder.linear_1.weight)
        return torch.cat([self.t_embedder(proj), self.norm(proj)], dim=-1)


class CosmosAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``CosmosTransformer3DModel`` (conditioning: :class:`CosmosConditioning`).

    Args:
        parameterization: ``"flow"`` (Cosmos-Predict2) or ``"edm"`` (Cosmos 1.0, refused); required,
            the transformer cannot show it.
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    spec = AdapterSpec(
        name="cosmos", model_class="CosmosTransformer3DModel", patch_embed="patch_embed.proj",
        time_proj="time_embed.time_proj", time_embedder="time_embed.t_embedder", head="proj_out",
        patch_order="pqc", patch_in_order="cpq", time_convention="sigma", output_scale=-1.0, positions="rope",
        grid_ndim=3,
        # Cosmos-Predict2 text-to-world at 704 x 1280, 93 frames: latents 24 x 88 x 160 (4x temporal, 8x spatial).
        default_sample=(24, 88, 160), conditioning=CosmosConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embed\.", r"(^|\.)crossattn_proj\."),
                "mod": (r"(^|\.)norm(\d+|_out)\.linear_[12]$",),
                "proj": (r"(^|\.)patch_embed\.proj$",),
            }
        ),
    )  # fmt: skip

    def __init__(
        self,
        parameterization: str | None = None,
        time_convention: Any = None,
        output_scale: float | None = None,
        time_scale: float | None = None,
    ) -> None:
        if parameterization is not None and parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.parameterization = parameterization
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"parameterization": self.parameterization, **super().config()}

    def check_model(self, model: nn.Module) -> None:
        name, cfg = type(model).__name__, model.config
        if self.parameterization is None:
            raise ValueError(
                f"{name} serves two parameterisations only its pipeline shows; choose one: wrap_dit(model, decomposition, "
                "adapter=CosmosAdapter(parameterization='flow')) for Cosmos-Predict2 (timestep = flow sigma, predicts "
                "noise - x), or 'edm' for Cosmos 1.0 (not supported); from dfm_ext.adapters import CosmosAdapter"
            )
        if self.parameterization == "edm":
            raise ValueError(
                f"{name} with parameterization='edm' (Cosmos 1.0, EDMEulerScheduler) reads 0.25 log sigma of a "
                "variance-exploding input scaled by 1 / sqrt(sigma^2 + sigma_data^2), with a sigma-dependent output "
                "preconditioning: not supported"
            )
        if int(cfg.patch_size[0]) != 1:
            raise ValueError(f"{name} with patch_size={tuple(cfg.patch_size)}: its head order (p, q, pt, c) is supported for pt = 1 only")
        if int(cfg.in_channels) != int(cfg.out_channels):
            raise ValueError(
                f"{name} with in_channels={cfg.in_channels}, out_channels={cfg.out_channels} concatenates condition "
                "latents or masks to its input (video-to-world): not supported"
            )
        if cfg.img_context_dim_in:
            raise ValueError(f"{name} with img_context_dim_in={cfg.img_context_dim_in} is image-conditioned: not supported")

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(int(p) for p in model.config.patch_size)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        cfg, pe = model.config, model.patch_embed
        c, area = int(cfg.in_channels), math.prod(self.patch(model))
        if cfg.concat_padding_mask and isinstance(pe.proj, nn.Linear) and pe.proj.in_features == (c + 1) * area:
            # (c, pt, p, q) columns: the padding mask is the last channel, always zero in the pipelines.
            latent = nn.Linear(c * area, pe.proj.out_features, bias=False, device=pe.proj.weight.device, dtype=pe.proj.weight.dtype)
            with torch.no_grad():
                latent.weight.copy_(pe.proj.weight[:, : c * area])
            pe.proj = latent
        te = model.time_embed
        features = CosmosTimeFeatures(te.time_proj, te.t_embedder, te.norm)
        super().install(model, packer, init=init, stage_embedding=stage_embedding)
        hidden = te.norm.weight.shape[0]
        embed = MultiScaleTimestepEmbed.from_embedder(
            features, 4 * hidden, packer.num_stages, init=init, stage_embedding=stage_embedding,
            time_transform=self.time_function(model),
        )  # fmt: skip
        if init == "pretrained":
            with torch.no_grad():
                for copy in embed.embedders[1:]:
                    copy.norm.weight.zero_()
        te.t_embedder, te.norm = embed, nn.Identity()

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`CosmosConditioning`."""
        c = parse_conditioning(model, CosmosConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        width = int(cfg.crossattn_proj_in_channels if cfg.use_crossattn_projection else cfg.text_embed_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (T5 embeddings [B, L, {width}])")
        mask = c.attention_mask
        if mask is not None:
            mask = check_tensor(mask, "attention_mask", (b, text.shape[1]), floating=False).bool()[:, None, None, :]
        x = self.tokens(model, packed)
        # RoPE and the learnable positions read only the input's shape (and device): a zero-stride stand-in.
        probe = x.new_empty(1).expand(shape_probe(b, int(cfg.in_channels), grid, self.patch(model)).shape)
        rope = model.rope(probe, fps=c.fps)
        extra = model.learnable_pos_embed(probe) if cfg.extra_pos_embed_type else None
        e = self.embed_time(model, t, stage).to(x.dtype)
        hidden = x.shape[-1]
        temb, embedded = e[:, : 3 * hidden], e[:, 3 * hidden :]
        if cfg.use_crossattn_projection:
            text = model.crossattn_proj(text)
        for block in model.transformer_blocks:
            x = call_block(model, block, x, text, embedded, temb, rope, extra, mask, None)
        x = model.norm_out(x, embedded, temb)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = CosmosAdapter()
