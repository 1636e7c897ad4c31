"""Adapter for diffusers ``HunyuanVideo15Transformer3DModel`` (HunyuanVideo 1.5 text-to-video), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

HunyuanVideo's layout with one stream of dual-stream blocks, a time-reading text refiner, a ByT5
glyph-text projection and a SigLIP image projection. What ``install`` changes (blocks, RoPE, refiner
blocks, ByT5 and image projections untouched): ``x_embedder.proj`` (``Conv3d``, patch
``(patch_size_t, p, p)``), ``time_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and
``proj_out`` (channel-major: the model unpatchifies ``[B, T', H', W', C, pt, p, q]``); the text
refiner's ``context_embedder.time_text_embed.timestep_embedder`` is made per-stage as well (summed, no
stage embedding of its own), as in the ``hunyuan_video`` adapter.

Time and sign: ``HunyuanVideo15Pipeline`` runs ``FlowMatchEulerDiscreteScheduler``, feeds its
``timestep = 1000 sigma`` to both time paths and steps on the (guided) output as is: ``"timestep"``,
``noise - x``, flipped.

Input channels: the pipeline passes ``[latents, condition latents, mask]`` (``in_channels = 2 C + 1``
with ``C = out_channels``); in text-to-video both are zeros (``prepare_cond_latents_and_mask``), so
their kernel slices multiply zeros: ``install`` drops them. Text-to-video also passes zero SigLIP
``image_embeds``, which the model turns into fully masked tokens (``is_t2v``); masked tokens take no
part in any valid token's attention, so the adapter leaves them out. Image-to-video (the first frame
in the condition channels, real image embeddings) is not taken.

Text: the Qwen tokens (refined, plus ``cond_type_embed(0)``) and the ByT5 glyph tokens (projected,
plus ``cond_type_embed(1)``) are joined as the model joins them: valid ByT5, valid Qwen, then the
padding of each, zeroed. Without glyph text the pipeline passes an all-masked ByT5 block; leaving
``encoder_hidden_states_2`` out is the same.

Refused: ``use_meanflow=True`` (a second time ``timestep_r``: a flow map, not a velocity at one time
per stage); ``in_channels`` other than ``out_channels`` or ``2 out_channels + 1``.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, text_embed_dim]`` (Qwen2.5-VL),
optional ``encoder_attention_mask [B, L]`` (1 = keep; default all ones), optional
``encoder_hidden_states_2 [B, L2, text_embed_2_dim]`` with ``encoder_attention_mask_2 [B, L2]``
(ByT5 glyph text), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.adapter import multiscale_time_embed

from .common import TimeMLP, call_block, check_tensor, parse_conditioning, shape_probe
from .diffusers_common import diffusers_layer_groups
from .hunyuan_video import HunyuanVideoAdapter
from .spec import AdapterSpec, SpecAdapter

__all__ = ["HunyuanVideo15Adapter", "HunyuanVideo15Conditioning", "latent_channels_only", "ADAPTER"]


class HunyuanVideo15Conditioning(NamedTuple):
    """The conditioning keywords :meth:`HunyuanVideo15Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    encoder_hidden_states_2: Tensor | None = None
    encoder_attention_mask_2: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


def latent_channels_only(proj: nn.Conv3d, c: int) -> nn.Conv3d:
    """``proj`` reading only the first ``c`` input channels, when it reads ``[latents, condition, mask]`` (``2 c + 1``).

    The text-to-video pipelines of HunyuanVideo 1.5 and Motif-Video pass the condition latents and the mask as zeros,
    so the kernel's other slices multiply zeros; ``proj`` is returned as is when it reads ``c`` channels.
    """
    if proj.in_channels == c:
        return proj
    latent = nn.Conv3d(c, proj.out_channels, proj.kernel_size, stride=proj.stride, bias=proj.bias is not None,
                       device=proj.weight.device, dtype=proj.weight.dtype)  # fmt: skip
    with torch.no_grad():
        latent.weight.copy_(proj.weight[:, :c])
        if proj.bias is not None:
            latent.bias.copy_(proj.bias)
    return latent


class HunyuanVideo15Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``HunyuanVideo15Transformer3DModel`` (conditioning: :class:`HunyuanVideo15Conditioning`)."""

    spec = AdapterSpec(
        name="hunyuan_video15", model_class="HunyuanVideo15Transformer3DModel", patch_embed="x_embedder.proj",
        time_proj="time_embed.time_proj", time_embedder="time_embed.timestep_embedder", head="proj_out",
        patch_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope", grid_ndim=3,
        # HunyuanVideo15Pipeline's default: 121 frames at 480 x 848 px -> 31 x 30 x 53 latents (4x / 16x autoencoder).
        default_sample=(31, 30, 53), conditioning=HunyuanVideo15Conditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embed\.", r"(^|\.)context_embedder\.time_text_embed\.", r"(^|\.)context_embedder\.proj_in$"),
                "proj": (r"(^|\.)x_embedder\.proj$",),
            }
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        cfg, name = model.config, type(model).__name__
        if cfg.use_meanflow:
            raise ValueError(
                f"{name} with use_meanflow=True reads a second time timestep_r (the time the step jumps to): a flow map, "
                "not a velocity at one time per stage"
            )
        c_in, c_out = int(cfg.in_channels), int(cfg.out_channels or cfg.in_channels)
        if c_in not in (c_out, 2 * c_out + 1):
            raise ValueError(
                f"{name} with in_channels={c_in}, out_channels={c_out}: expected the latents alone ({c_out}) or "
                f"[latents, condition latents, mask] ({2 * c_out + 1}) as HunyuanVideo15Pipeline passes them"
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
        refiner = model.context_embedder.time_text_embed
        mlp = refiner.timestep_embedder
        refiner.timestep_embedder = multiscale_time_embed(
            TimeMLP(refiner.time_proj, mlp), mlp.linear_2.out_features, packer.num_stages, init=init,
            stage_embedding=False, time_transform=self.time_function(model),
        )  # fmt: skip

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`HunyuanVideo15Conditioning`."""
        c = parse_conditioning(model, HunyuanVideo15Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        width = int(cfg.text_embed_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (Qwen2.5-VL embeddings [B, L, {width}])")
        mask = c.encoder_attention_mask
        if mask is None:
            mask = torch.ones(b, text.shape[1], dtype=torch.bool, device=text.device)
        mask = check_tensor(mask, "encoder_attention_mask", (b, text.shape[1]), floating=False).bool()
        x = self.tokens(model, packed)
        # The RoPE module reads only the input's shape (and device): a zero-stride stand-in for it.
        probe = shape_probe(b, int(cfg.in_channels), grid, self.patch(model))
        rope = model.rope(x.new_empty(1).expand(probe.shape))
        temb = self.embed_time(model, t, stage).to(x.dtype)
        text = HunyuanVideoAdapter._refine(model, text, t, stage, mask)
        text = text + model.cond_type_embed(torch.zeros_like(mask, dtype=torch.long))
        text, mask = self._join_glyph_text(model, text, mask, c, b)
        for block in model.transformer_blocks:
            x, text = call_block(model, block, x, text, temb, mask, rope)
        return self.velocity(model.proj_out(model.norm_out(x, temb)), grid)

    @staticmethod
    def _join_glyph_text(model: nn.Module, text: Tensor, mask: Tensor, c: Any, b: int) -> tuple[Tensor, Tensor]:
        """``[valid ByT5, valid Qwen, ByT5 padding (zeros), Qwen padding (zeros)]`` per sample, and its mask."""
        glyph, mask_2 = c.encoder_hidden_states_2, c.encoder_attention_mask_2
        if glyph is None:
            if mask_2 is not None:
                raise ValueError("encoder_attention_mask_2 was given without encoder_hidden_states_2")
            glyph, mask_2 = text[:, :0, :0], mask[:, :0]
        else:
            width = int(model.config.text_embed_2_dim)
            check_tensor(glyph, "encoder_hidden_states_2", (b, None, width), hint=f" (ByT5 embeddings [B, L2, {width}])")
            if mask_2 is None:
                raise ValueError("encoder_hidden_states_2 needs encoder_attention_mask_2 [B, L2] (the pipeline's ByT5 mask)")
            mask_2 = check_tensor(mask_2, "encoder_attention_mask_2", (b, glyph.shape[1]), floating=False).bool()
            glyph = model.context_embedder_2(glyph.to(text.dtype))
            glyph = glyph + model.cond_type_embed(torch.ones_like(mask_2, dtype=torch.long))
        if glyph.shape[1] == 0:
            texts = [torch.cat([t1[m1], torch.zeros_like(t1[~m1])]) for t1, m1 in zip(text, mask)]
        else:
            texts = [
                torch.cat([t2[m2], t1[m1], torch.zeros_like(t2[~m2]), torch.zeros_like(t1[~m1])])
                for t1, m1, t2, m2 in zip(text, mask, glyph, mask_2)
            ]
        masks = [torch.cat([m2[m2], m1[m1], m2[~m2], m1[~m1]]) for m1, m2 in zip(mask, mask_2)]
        return torch.stack(texts), torch.stack(masks)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """Zero Qwen features, and no glyph text (the pipeline's all-masked ByT5 block) where glyph text is given."""
        out = super().null_condition(model, **cond)
        if isinstance(cond.get("encoder_hidden_states_2"), Tensor):
            out["encoder_hidden_states_2"] = torch.zeros_like(cond["encoder_hidden_states_2"])
            out["encoder_attention_mask_2"] = torch.zeros(cond["encoder_hidden_states_2"].shape[:2], dtype=torch.long,
                                                          device=cond["encoder_hidden_states_2"].device)  # fmt: skip
        return out


ADAPTER = HunyuanVideo15Adapter()
