"""Adapter for diffusers ``CogVideoXTransformer3DModel`` (CogVideoX 1.0; 1.5's temporal patch too).

Layouts: dfm_ext's video stages are ``[B, C, T, H, W]``; diffusers' CogVideoX takes
``[B, F, C, H, W]``. The packer patchifies every stage onto the token grid
``(T / pt, H / p, W / p)`` (``pt = 1`` for CogVideoX 1.0, whose patch embedding is a per-frame
``Conv2d``; ``pt = patch_size_t`` for 1.5), frame-major, which is CogVideoX's token order, so no
layout conversion is needed inside the model: only the user's tensors are ``[B, C, T, H, W]``.

What ``install`` changes (blocks, text projection, positions untouched):

* ``patch_embed.proj`` (``Conv2d`` in 1.0, ``Linear`` over ``(c, pt, p, q)`` in 1.5) ->
  :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`; the text tokens are still projected by
  ``patch_embed.text_proj`` and concatenated in front, and the 3-D sincos positions (1.0) are
  still added for the token grid;
* ``time_embedding`` -> :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed` around
  ``time_proj`` + the pretrained ``time_embedding``;
* ``proj_out`` -> widened :class:`~dfm_ext.wrapping.embeddings.MultiScaleHead` (channel-major
  ``(c, [pt,] p, q)`` order, as CogVideoX unpatchifies).

Time and output: CogVideoX checkpoints are DDPM v-prediction models (999 = noise). The embedder
reads ``999 (1 - t)`` and the raw output is the velocity (re-parameterised by finetuning). The
paper standardises CogVideoX latents per stage (``DFMObjective(scales=...)``).

Conditioning (diffusers names): ``encoder_hidden_states`` ``[B, L, text_embed_dim]`` (T5; with
sincos positions, 1.0, ``L`` must be ``max_text_seq_length``, 226 for real checkpoints);
``image_rotary_emb`` (the ``(cos, sin)`` pair the CogVideoX pipeline computes for the token grid;
required by RoPE models), ``ofs`` for models with an ofs embedding, ``attention_kwargs``.
``null_condition`` zeroes ``encoder_hidden_states`` (pass empty-prompt embeddings as ``uncond=``
for real checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.adapter import widen_head
from dfm_ext.wrapping.embeddings import MultiScalePatchEmbed

from .diffusers_common import DiffusersAdapterBase, diffusers_layer_groups
from .common import call_block, check_installed, check_stage0_channels, check_tensor, first_linear_dtype
from .common import parse_conditioning, zeroed_condition

__all__ = ["CogVideoXAdapter", "CogVideoXConditioning", "ADAPTER"]


class CogVideoXConditioning(NamedTuple):
    """The conditioning keywords :meth:`CogVideoXAdapter.forward` takes (diffusers names).

    ``encoder_hidden_states [B, L, text_embed_dim]`` (T5) is required; ``image_rotary_emb`` (the
    ``(cos, sin)`` pair for the token grid) by RoPE models, ``ofs`` by models with an ofs
    embedding; ``attention_kwargs`` goes to every block.
    """

    encoder_hidden_states: Tensor | None = None
    image_rotary_emb: tuple[Tensor, Tensor] | None = None
    ofs: float | Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class CogVideoXAdapter(DiffusersAdapterBase):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``CogVideoXTransformer3DModel``.

    CogVideoX checkpoints are DDPM v-prediction models, hence the defaults
    ``time_convention="discrete"`` (``999 (1 - t)``) and ``output_scale=1`` (the raw output,
    re-parameterised to the velocity by finetuning); both are explained on
    :class:`~dfm_ext.adapters.diffusers_common.DiffusersAdapterBase`.
    Conditioning: :class:`CogVideoXConditioning`.
    """

    name = "cogvideox"
    model_class = "CogVideoXTransformer3DModel"
    #: ``dfm_ext.specialization`` layer groups: diffusers' shared names and ``time_embedding``,
    #: ``patch_embed.text_proj``
    layer_groups = diffusers_layer_groups({"cond": (r"(^|\.)time_embedding\.", r"(^|\.)patch_embed\.text_proj$")})
    grid_ndim = 3

    def __init__(self, time_convention: str = "discrete", output_scale: float = 1.0):
        super().__init__(time_convention, output_scale)

    @staticmethod
    def _patch(model: nn.Module) -> tuple[int, int, int]:
        cfg = model.config
        pt = int(cfg.patch_size_t) if cfg.patch_size_t is not None else 1
        return (pt, int(cfg.patch_size), int(cfg.patch_size))

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        frames = (int(cfg.sample_frames) - 1) // int(cfg.temporal_compression_ratio) + 1
        pt = self._patch(model)[0]
        frames = -(-frames // pt) * pt  # CogVideoX 1.5 pads latent frames to a multiple of patch_size_t
        return (int(cfg.in_channels), frames, int(cfg.sample_height), int(cfg.sample_width))

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(sample_shape) != 4:
            raise ValueError(
                f"{type(model).__name__} takes videos; sample_shape must be (C, T, H, W), got {sample_shape}"
            )
        patch = self._patch(model)
        if any(d % p for d, p in zip(sample_shape[1:], patch)):
            raise ValueError(f"sample_shape {sample_shape} is not divisible by the model's patch (pt, p, p) = {patch}")
        return tuple(d // p for d, p in zip(sample_shape[1:], patch))

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        pe = model.patch_embed
        proj = pe.proj
        if isinstance(proj, MultiScalePatchEmbed):
            raise TypeError(f"{type(model).__name__}.patch_embed.proj is already multi-scale (already wrapped?)")
        self._check_grid(model, packer.grid)
        c = int(model.config.in_channels)
        check_stage0_channels(packer, init, c)
        channels = [s[0] for s in packer.stage_shapes]
        patch = self._patch(model)
        hidden = model.config.num_attention_heads * model.config.attention_head_dim
        # 1.0 patchifies each frame with a Conv2d [D, C, p, p]; 1.5 a Linear over (c, pt, p, q).
        # Either is a kernel [D, C, pt, p, p]; load_stage_kernel_ folds it to stage 0's patch.
        if isinstance(proj, nn.Conv2d):
            kernel = proj.weight[:, :, None]
        elif isinstance(proj, nn.Linear):
            kernel = proj.weight.view(hidden, c, *patch)
        else:
            raise TypeError(f"unexpected CogVideoX patch embedding {type(proj).__name__}")
        embed = MultiScalePatchEmbed(channels, packer.patch_sizes, hidden, bias=proj.bias is not None)
        embed.to(device=proj.weight.device, dtype=proj.weight.dtype)
        embed.reset_parameters_(init)
        if init == "pretrained":
            embed.load_stage_kernel_(0, kernel.detach())
            if proj.bias is not None:
                with torch.no_grad():
                    embed.proj.bias.copy_(proj.bias)
        pe.proj = embed
        model.time_embedding = self._time_embed(
            model.time_proj,
            model.time_embedding,
            int(model.config.time_embed_dim),
            packer,
            init=init,
            stage_embedding=stage_embedding,
        )
        model.proj_out = widen_head(
            model.proj_out,
            packer,
            base_patch=patch,
            base_channels=model.proj_out.out_features // math.prod(patch),
            order="cpq",
            init=init,
        )

    def _positions(self, model: nn.Module, grid: tuple[int, ...], device: torch.device) -> Tensor | None:
        pe = model.patch_embed
        if not (pe.use_positional_embeddings or pe.use_learned_positional_embeddings):
            return None
        frames, gh, gw = grid
        height, width = gh * pe.patch_size, gw * pe.patch_size
        if pe.use_learned_positional_embeddings and (height, width) != (pe.sample_height, pe.sample_width):
            raise ValueError(
                f"{type(model).__name__} has learned positions for {pe.sample_height}x{pe.sample_width} latents; "
                f"the token grid {grid} needs {height}x{width}"
            )
        pre = (frames - 1) * pe.temporal_compression_ratio + 1
        if (height, width, pre) == (pe.sample_height, pe.sample_width, pe.sample_frames):
            return pe.pos_embedding
        return pe._get_positional_embeddings(height, width, pre, device=device)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`CogVideoXConditioning`."""
        c = parse_conditioning(model, CogVideoXConditioning, cond)
        pe = model.patch_embed
        check_installed(pe.proj)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        uses_sincos = pe.use_positional_embeddings or pe.use_learned_positional_embeddings
        text_len = int(cfg.max_text_seq_length) if uses_sincos else None
        text = check_tensor(
            c.encoder_hidden_states,
            "encoder_hidden_states",
            (b, text_len, int(cfg.text_embed_dim)),
            hint=f" (T5 embeddings [B, {text_len or 'L'}, {cfg.text_embed_dim}])",
        )
        if cfg.use_rotary_positional_embeddings and c.image_rotary_emb is None:
            raise TypeError(
                f"this {type(model).__name__} uses rotary positions: pass image_rotary_emb=(cos, sin) for the "
                f"token grid {grid} (as CogVideoXPipeline._prepare_rotary_positional_embeddings computes it)"
            )

        dtype = first_linear_dtype(model.time_embedding)
        emb = model.time_embedding(t, stage).to(dtype)
        if model.ofs_embedding is not None:
            if c.ofs is None:
                raise TypeError(f"this {type(model).__name__} has an ofs embedding: pass ofs=")
            ofs_t = torch.as_tensor(c.ofs, device=packed.device, dtype=dtype).expand(b)
            emb = emb + model.ofs_embedding(model.ofs_proj(ofs_t).to(dtype))

        x = torch.cat([pe.text_proj(text), pe.proj(packed)], dim=1).contiguous()
        pos = self._positions(model, grid, x.device)
        if pos is not None:
            x = x + pos.to(x.dtype)
        x = model.embedding_dropout(x)
        n_text = text.shape[1]
        text, x = x[:, :n_text], x[:, n_text:]
        for block in model.transformer_blocks:
            x, text = call_block(model, block, x, text, emb, c.image_rotary_emb, c.attention_kwargs)
        x = model.norm_out(model.norm_final(x), temb=emb)
        return self._velocity(model.proj_out(x), grid)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """``encoder_hidden_states`` zeroed (a stand-in; pass empty-prompt embeddings as ``uncond=``)."""
        return zeroed_condition(cond, ("encoder_hidden_states",), pronoun="their")


ADAPTER = CogVideoXAdapter()
