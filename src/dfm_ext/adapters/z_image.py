"""Adapter for diffusers ``ZImageTransformer2DModel`` (Z-Image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

The model takes per-sample lists (latents ``[C, 1, H, W]``, captions ``[L_i, cap_feat_dim]`` of their
own lengths); the adapter takes one batch tensor and builds, per sample, the sequence the model
builds from those lists, so that per-stage layers see batch-first rows ``[B, N, D]``:

* image tokens: the ``(p, q, c)``-flattened 2x2 patches (``ZImagePipeline`` calls the model with its
  default ``patch_size=2, f_patch_size=1``: the ``all_x_embedder["2-1"]`` / ``all_final_layer["2-1"]``
  pair), padded to a multiple of 32 with ``x_pad_token`` (position ids ``(0, 0, 0)``; the pad tokens
  are attended, as in the model);
* caption tokens: the kept tokens of ``encoder_attention_mask`` (the pipeline's
  ``prompt_embeds[i][prompt_masks[i]]``), embedded and padded to a multiple of 32 with
  ``cap_pad_token``; positions ``(1 + j, 0, 0)`` over the padded length ``L'_i``, the image's
  ``(L'_i + 1, row, column)``;
* the noise refiner runs on the image tokens, the context refiner on the caption, the main layers on
  ``[image, caption]`` per sample (batch padding masked where the captions' padded lengths differ).

What ``install`` changes (refiners, layers, RoPE, caption embedder untouched):
``all_x_embedder.2-1`` (a ``Linear`` over ``(p, q, c)`` patches), ``t_embedder`` (sinusoid and MLP in
one module) and ``all_final_layer.2-1.linear``.

Time and sign: ``ZImagePipeline`` feeds ``(1000 - timestep) / 1000 = 1 - sigma``, the paper's ``t``
(1 = data), and the model multiplies it by ``config.t_scale`` (1000): ``"unit"`` scaled by
``t_scale``. The pipeline negates the output before its Euler step on ``noise - x``: the model
predicts ``x - noise``, taken as is.

Refused: Z-Image Omni (``siglip_feat_dim`` set; its pipeline runs the omni path, ``[caption, image,
siglip]`` with clean reference tokens at time 1, which this adapter does not build).

Conditioning: ``encoder_hidden_states [B, L, cap_feat_dim]`` (the pipeline's per-sample
``prompt_embeds`` list, padded into one tensor) and ``encoder_attention_mask [B, L]`` (True = a token;
default all; any mask is honoured, each sample keeps at least one token).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .spec import AdapterSpec, SpecAdapter

__all__ = ["ZImageAdapter", "ZImageConditioning", "z_image_positions", "ADAPTER"]

#: ZImageTransformer2DModel pads every image and caption to a multiple of this many tokens
_SEQ_MULTIPLE = 32


class ZImageConditioning(NamedTuple):
    """The conditioning keywords :meth:`ZImageAdapter.forward` takes."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None


def _padded(n: int) -> int:
    return n + (-n) % _SEQ_MULTIPLE


def z_image_positions(caption_len: int, grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(caption ids [L', 3], image ids [N', 3])`` as the model's ``patchify_and_embed`` makes them.

    ``L'`` and ``N'`` are the caption length and ``grid[0] * grid[1]`` padded to a multiple of 32;
    the caption's padding continues its positions, the image's padding sits at ``(0, 0, 0)``.
    """
    lp, (gh, gw) = _padded(caption_len), grid
    caption = torch.zeros(lp, 3, dtype=torch.long, device=device)
    caption[:, 0] = torch.arange(1, lp + 1, device=device)
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    image = torch.zeros(_padded(gh * gw), 3, dtype=torch.long, device=device)
    image[: gh * gw] = torch.stack([torch.full_like(rows, lp + 1), rows, cols], dim=1)
    return caption, image


class ZImageAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``ZImageTransformer2DModel`` (conditioning: :class:`ZImageConditioning`)."""

    spec = AdapterSpec(
        name="z_image", model_class="ZImageTransformer2DModel", patch_embed="all_x_embedder.2-1",
        time_embedder="t_embedder", head="all_final_layer.2-1.linear", patch_order="pqc", patch_in_order="pqc",
        time_convention="unit", time_scale="t_scale", output_scale=1.0, positions="rope",
        # 1024 x 1024 px: a 8x autoencoder's 128 x 128 latents (64 x 64 tokens of 2x2 patches).
        default_sample=(128, 128), conditioning=ZImageConditioning, null_keys=("encoder_hidden_states",),
        layer_groups={
            "cond": (r"(^|\.)t_embedder\.", r"(^|\.)cap_embedder\."),
            "mod": (r"(^|\.)adaLN_modulation\.\d+$",),
            "attn": (r"(^|\.)attention\.(to_q|to_k|to_v|to_out\.0)$",),
            "mlp": (r"(^|\.)feed_forward\.w[123]$",),
            "proj": (r"(^|\.)all_x_embedder\.2-1(\.proj)?$", r"(^|\.)all_final_layer\.2-1\.linear$"),
        },
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if getattr(cfg, "siglip_feat_dim", None) is not None:
            raise ValueError(
                f"{type(model).__name__} with siglip_feat_dim={cfg.siglip_feat_dim} is Z-Image Omni: its pipeline runs the omni "
                "path ([caption, image, SigLIP] sequences, reference tokens at time 1), which the z_image adapter does not build"
            )
        if "2-1" not in model.all_x_embedder:
            raise ValueError(
                f"{type(model).__name__} has no 2x2 patch embedder (all_patch_size={tuple(cfg.all_patch_size)}, "
                f"all_f_patch_size={tuple(cfg.all_f_patch_size)}); ZImagePipeline calls it with patch_size=2, f_patch_size=1"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (2, 2)  # the pipeline's call: patch_size=2

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`ZImageConditioning`."""
        c = parse_conditioning(model, ZImageConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.cap_feat_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (caption features [B, L, {width}])")
        keep = c.encoder_attention_mask
        if keep is None:
            lengths = [text.shape[1]] * b  # no host read when every token is kept
        else:
            keep = check_tensor(keep, "encoder_attention_mask", (b, text.shape[1]), floating=False).bool()
            lengths = keep.sum(1).tolist()  # a host read, as the pipeline's per-sample lists are made on the host
            if min(lengths) < 1:
                raise ValueError(f"encoder_attention_mask keeps no caption token in a sample (kept per sample: {lengths})")
        x = self.tokens(model, packed)  # [B, N, D]
        adaln = self.embed_time(model, t, stage).to(x.dtype)
        n, dim, device = x.shape[1], x.shape[2], x.device
        ids = [z_image_positions(n_i, grid, device) for n_i in lengths]
        # Image: pad tokens appended (every sample has the same grid, so no batch mask).
        x = torch.cat([x, model.x_pad_token.to(x.dtype).expand(b, _padded(n) - n, dim)], dim=1)
        x_rope = model.rope_embedder(torch.cat([image for _, image in ids])).view(b, x.shape[1], -1)
        for layer in model.noise_refiner:
            x = call_block(model, layer, x, None, x_rope, adaln)
        # Caption: embedded, padded per sample with cap_pad_token, then to the batch's longest with zeros.
        longest = max(_padded(n_i) for n_i in lengths)
        cap = x.new_zeros(b, longest, dim)
        cap_rope = x_rope.new_zeros(b, longest, x_rope.shape[-1])
        embedded = model.cap_embedder(text.to(x.dtype))  # per token, on [B, L, F] so per-stage layers see samples as rows
        for i, (n_i, (cap_ids, _)) in enumerate(zip(lengths, ids)):
            cap[i, :n_i] = embedded[i] if keep is None else embedded[i][keep[i]]
            cap[i, n_i : len(cap_ids)] = model.cap_pad_token.to(x.dtype)
            cap_rope[i, : len(cap_ids)] = model.rope_embedder(cap_ids)
        cap_lengths = [len(cap_ids) for cap_ids, _ in ids]
        cap_mask = None
        if len(set(cap_lengths)) > 1:
            cap_mask = torch.arange(longest, device=device)[None] < torch.tensor(cap_lengths, device=device)[:, None]
        for layer in model.context_refiner:
            cap = call_block(model, layer, cap, cap_mask, cap_rope)
        # Main layers on [image, caption] per sample; the image rows come first, so every sample's are at [:N].
        h, rope = torch.cat([x, cap], dim=1), torch.cat([x_rope, cap_rope], dim=1)
        mask = None if cap_mask is None else torch.cat([cap_mask.new_ones(b, x.shape[1]), cap_mask], dim=1)
        for layer in model.layers:
            h = call_block(model, layer, h, mask, rope, adaln)
        return self.velocity(model.all_final_layer["2-1"](h[:, :n], c=adaln), grid)


ADAPTER = ZImageAdapter()
