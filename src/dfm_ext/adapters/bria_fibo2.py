"""Adapter for diffusers ``BriaFibo2Transformer2DModel`` (Bria FIBO 2 text-to-image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Z-Image's blocks over one stream ``[gist tokens, image tokens]``: a Perceiver turns the first text
bundle into gist tokens (their count from each prompt's length), injection blocks cross-attend to
their own text bundle. What ``install`` changes (blocks, Perceiver, RoPE untouched): ``x_embedder``
(a ``Linear`` over ``(c, p, q)`` patches, the model's ``_patchify``), ``t_embedder`` (sinusoid and MLP
in one module) and ``final_layer.linear`` (``(c, p, q)``, as the model unpatchifies).

Time and sign: ``BriaFibo2Pipeline`` feeds ``timestep = scheduler timestep / 1000 = sigma``, the model
multiplies it by ``config.t_scale``, and ``FlowMatchEulerDiscreteScheduler`` steps on the (guided)
output as is: ``"sigma"`` scaled by ``t_scale``, ``noise - x`` (flipped).

Per-token times: the image tokens are modulated by the flow time, the clean gist tokens by time 0
through the same embedder (``noise_mask``). Made per-stage, the gist reads every stage at data time
(``t = 1`` in all stages, with its sample's stage index), which at ``init="pretrained"`` is the model's
own time-0 embedding exactly, as for FLUX.3's text.

Not taken: ``context_latents`` (the images to edit, clean tokens in the stream); the pipeline's switch
between the prompt's text-image embeddings and ``base_prompt_embeds`` at noise levels above 0.9 is a
sampling schedule of the conditioning, not the transformer's: pass the embeddings you sample with.

Conditioning (diffusers names): ``encoder_hidden_states [B, 1 + len(injection_layer_ids), L, cap_feat_dim]``
(the Perceiver's bundle, then one per injection block), optional ``encoder_attention_mask [B, L]``
(True = a real token; the gist count of each sample comes from its length).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .spec import AdapterSpec, SpecAdapter

__all__ = ["BriaFibo2Adapter", "BriaFibo2Conditioning", "ADAPTER"]


class BriaFibo2Conditioning(NamedTuple):
    """The conditioning keywords :meth:`BriaFibo2Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None


class BriaFibo2Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``BriaFibo2Transformer2DModel`` (conditioning: :class:`BriaFibo2Conditioning`)."""

    spec = AdapterSpec(
        name="bria_fibo2", model_class="BriaFibo2Transformer2DModel", patch_embed="x_embedder", time_embedder="t_embedder",
        head="final_layer.linear", patch_order="cpq", patch_in_order="cpq", time_convention="sigma", time_scale="t_scale",
        output_scale=-1.0, positions="rope",
        # 1024 x 1024 px: a 16x autoencoder's 64 x 64 latents (32 x 32 tokens of 2x2 patches).
        default_sample=(64, 64), conditioning=BriaFibo2Conditioning, null_keys=("encoder_hidden_states",),
        layer_groups={
            "cond": (r"(^|\.)t_embedder\.",),
            "mod": (r"(^|\.)adaLN_modulation\.\d+$",),
            "attn": (r"(^|\.)(layers|noise_refiner)\.\d+\.(attention|cross_attention)\.(to_q|to_k|to_v|to_out\.0)$",),
            "mlp": (r"(^|\.)(layers|noise_refiner)\.\d+\.feed_forward\.w[123]$",),
            "proj": (r"(^|\.)x_embedder(\.proj)?$", r"(^|\.)final_layer\.linear$"),
        },
    )  # fmt: skip

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`BriaFibo2Conditioning`."""
        from diffusers.models.transformers.transformer_bria_fibo2 import compute_gist_count  # noqa: PLC0415

        c = parse_conditioning(model, BriaFibo2Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        bundles, width = 1 + len(cfg.injection_layer_ids), int(cfg.cap_feat_dim)
        text = check_tensor(
            c.encoder_hidden_states, "encoder_hidden_states", (b, bundles, None, width),
            hint=f" (text-encoder bundles [B, {bundles}, L, {width}]: the Perceiver's, then one per injection block)",
        )  # fmt: skip
        mask = c.encoder_attention_mask
        if mask is not None:
            mask = check_tensor(mask, "encoder_attention_mask", (b, text.shape[2]), floating=False).bool()
        device = packed.device
        x = self.tokens(model, packed)
        n = x.shape[1]
        noisy = self.embed_time(model, t, stage).to(x.dtype)
        clean = self.embed_time(model, torch.ones_like(t), stage).to(x.dtype)  # the gist: data time in every stage
        image_ids = model.create_coordinate_grid((1, *grid), (int(cfg.max_num_gist_tokens) + 1, 0, 0), device).flatten(0, 2)
        image_rope = model.rope_embedder(image_ids).unsqueeze(0)
        for block in model.noise_refiner:
            x = call_block(model, block, x, None, image_rope, noisy)
        lengths = [text.shape[2]] * b if mask is None else mask.sum(dim=1).tolist()  # a host read, as in the model
        counts = compute_gist_count(lengths, min_gist=cfg.min_num_gist_tokens, max_gist=cfg.max_num_gist_tokens, gist_step=cfg.gist_step,
                                    min_text_len=cfg.gist_min_text_len, max_text_len=cfg.gist_max_text_len)  # fmt: skip
        n_gist = max(counts)
        gist_mask = None if min(counts) == n_gist else torch.arange(n_gist, device=device) < torch.tensor(counts, device=device)[:, None]
        gist = model.perceiver(text[:, 0], n_gist, mask, gist_mask)
        gist_rope = model.rope_embedder(model.create_coordinate_grid((n_gist, 1, 1), (1, 0, 0), device).flatten(0, 2)).unsqueeze(0)
        # [gist, image] as trained; with padded gist tokens, [image, gist] so the padding ends every row (the model's order).
        image_first = gist_mask is not None
        h = torch.cat([x, gist] if image_first else [gist, x], dim=1)
        rope = torch.cat([image_rope, gist_rope] if image_first else [gist_rope, image_rope], dim=1)
        start = 0 if image_first else n_gist
        attention_mask = None if gist_mask is None else torch.cat([gist_mask.new_ones(b, n), gist_mask], dim=1)
        noise_mask = torch.zeros(b, h.shape[1], dtype=torch.long, device=device)
        noise_mask[:, start : start + n] = 1
        bundle = {layer_id: i + 1 for i, layer_id in enumerate(cfg.injection_layer_ids)}
        for layer_id, block in enumerate(model.layers):
            injected = text[:, bundle[layer_id]] if layer_id in bundle else None
            h = call_block(model, block, h, attention_mask, rope, None, noise_mask, noisy, clean, injected, mask)
        return self.velocity(model.final_layer(h[:, start : start + n], c=noisy), grid)


ADAPTER = BriaFibo2Adapter()
