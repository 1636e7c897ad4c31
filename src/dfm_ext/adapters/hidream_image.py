"""Adapter for diffusers ``HiDreamImageTransformer2DModel`` (HiDream-I1), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

HiDream-I1 patchifies the latent ``[B, C, H, W]`` itself into tokens of ``p * p * C`` values in
``(p, q, c)`` order (channels fastest) and embeds them with a ``Linear`` (``x_embedder.proj``); its
head (``final_layer.linear``) unpatchifies in the same order. What ``install`` changes (the
mixture-of-experts blocks, the per-block Llama and T5 caption projections, the pooled-text embedder
and RoPE untouched): ``x_embedder.proj``, ``t_embedder.timestep_embedder`` (after its ``time_proj``
sinusoid) and ``final_layer.linear``.

Time and sign: ``HiDreamImagePipeline`` runs ``FlowMatchEulerDiscreteScheduler`` (or flow UniPC)
and feeds ``timesteps = 1000 sigma``; it negates the model's output before the scheduler, which
steps with ``noise - x``: the model predicts ``x - noise``. The adapter feeds ``1000 (1 - t)`` and
returns the output as is.

Positions: RoPE over ids ``(0, row, column)`` for the image tokens, zeros for the text, as the
model builds them. A non-square token grid is padded, as HiDream does, to ``max_resolution``'s
token count with tokens embedding zero patches; their keys are zeroed but they stay in the softmax
(HiDream's own behaviour, kept for stage-0 exactness), so the grid must fit ``max_resolution``.

Specialisation: the routed experts see tokens gathered across samples (no batch axis), so they
cannot be specialised per stage; ``mlp`` is the shared experts and the text stream's MLP.

Conditioning: ``encoder_hidden_states_t5 [B, L, caption_channels[0]]``,
``encoder_hidden_states_llama3 [B, N, L', caption_channels[1]]`` (**batch first**: the pipeline's
``prompt_embeds_llama3`` is ``[N, B, L', D]``, pass ``prompt_embeds_llama3.transpose(0, 1)``; the
model reads layers ``config.llama_layers`` of the ``N``), ``pooled_embeds [B, text_emb_dim]``,
``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfm_ext.specialization import combine_layer_groups

from .common import call_block, check_tensor, get_submodule_path, parse_conditioning
from .diffusers_common import DIFFUSERS_LAYER_GROUPS
from .spec import AdapterSpec, SpecAdapter

__all__ = ["HiDreamImageAdapter", "HiDreamImageConditioning", "ADAPTER"]


class HiDreamImageConditioning(NamedTuple):
    """The conditioning keywords :meth:`HiDreamImageAdapter.forward` takes (diffusers names; Llama layers batch first)."""

    encoder_hidden_states_t5: Tensor | None = None
    encoder_hidden_states_llama3: Tensor | None = None
    pooled_embeds: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class HiDreamImageAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``HiDreamImageTransformer2DModel`` (conditioning: :class:`HiDreamImageConditioning`)."""

    spec = AdapterSpec(
        name="hidream_image", model_class="HiDreamImageTransformer2DModel", patch_embed="x_embedder.proj",
        time_proj="t_embedder.time_proj", time_embedder="t_embedder.timestep_embedder", head="final_layer.linear",
        patch_order="pqc", patch_in_order="pqc", time_convention="timestep", output_scale=1.0, positions="rope",
        # HiDream-I1 at 1024 x 1024 with FLUX's 8x autoencoder.
        default_sample=(128, 128), conditioning=HiDreamImageConditioning,
        null_keys=("encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds"),
        layer_groups=combine_layer_groups(
            {k: v for k, v in DIFFUSERS_LAYER_GROUPS.items() if k not in ("mlp", "proj")},
            {
                "cond": (r"(^|\.)(t_embedder|p_embedder)\.", r"(^|\.)caption_projection\."),
                "mod": (r"(^|\.)adaLN_modulation\.1$",),
                "mlp": (r"(^|\.)ff_i\.shared_experts\.", r"(^|\.)ff_t\."),
                "proj": (r"(^|\.)x_embedder\.proj$", r"(^|\.)final_layer\.linear$"),
            },
        ),
    )  # fmt: skip

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels), *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`HiDreamImageConditioning`."""
        c = parse_conditioning(model, HiDreamImageConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        t5_dim, llama_dim = (int(v) for v in cfg.caption_channels)
        t5 = check_tensor(c.encoder_hidden_states_t5, "encoder_hidden_states_t5", (b, None, t5_dim), hint=f" (T5 embeddings [B, L, {t5_dim}])")
        llama = check_tensor(
            c.encoder_hidden_states_llama3, "encoder_hidden_states_llama3", (b, None, None, llama_dim),
            hint=f" (Llama layers, batch first [B, N, L, {llama_dim}]: the pipeline's prompt_embeds_llama3.transpose(0, 1))",
        )  # fmt: skip
        layers = [int(k) for k in cfg.llama_layers]
        if max(layers) >= llama.shape[1]:
            raise ValueError(f"encoder_hidden_states_llama3 has {llama.shape[1]} layers, the model reads layers {layers}")
        pooled = check_tensor(c.pooled_embeds, "pooled_embeds", (b, int(cfg.text_emb_dim)), hint=f" (pooled CLIP embeddings [B, {cfg.text_emb_dim}])")
        x = self.tokens(model, packed)
        n = x.shape[1]
        ids = torch.zeros(grid[0], grid[1], 3, device=x.device)
        ids[..., 1] += torch.arange(grid[0], device=x.device)[:, None]
        ids[..., 2] += torch.arange(grid[1], device=x.device)[None, :]
        ids = ids.reshape(n, 3)
        masks = None
        if grid[0] != grid[1]:  # HiDream pads a non-square grid to max_seq tokens of zero patches
            if n > model.max_seq:
                raise ValueError(f"the token grid {grid} has {n} tokens, more than {type(model).__name__}'s max_resolution allows ({model.max_seq})")
            embed = get_submodule_path(model, self.spec.patch_embed)
            x = torch.cat([x, embed.proj(x.new_zeros(b, model.max_seq - n, embed.in_features))], dim=1)
            ids = torch.cat([ids, ids.new_zeros(model.max_seq - n, 3)])
            masks = x.new_zeros(b, model.max_seq)
            masks[:, :n] = 1.0
        temb = self.embed_time(model, t, stage).to(x.dtype) + model.p_embedder(pooled)
        width = x.shape[-1]
        texts = [model.caption_projection[i](llama[:, k]).view(b, -1, width) for i, k in enumerate(layers)]
        texts.append(model.caption_projection[-1](t5).view(b, -1, width))
        n_text = texts[-1].shape[1] + texts[-2].shape[1] + texts[0].shape[1]
        rope = model.pe_embedder(torch.cat([ids, ids.new_zeros(n_text, 3)])[None].expand(b, -1, -1))
        initial = torch.cat([texts[-1], texts[-2]], dim=1)
        n_initial = initial.shape[1]
        block_id = 0
        for block in model.double_stream_blocks:
            x, initial = call_block(model, block, x, masks, torch.cat([initial, texts[block_id]], dim=1), temb, rope)
            initial = initial[:, :n_initial]
            block_id += 1
        n_image = x.shape[1]
        x = torch.cat([x, initial], dim=1)
        n_joint = x.shape[1]
        if masks is not None:
            masks = torch.cat([masks, masks.new_ones(b, n_initial + texts[block_id - 1].shape[1] if block_id else n_initial)], dim=1)
        for block in model.single_stream_blocks:
            x = torch.cat([x, texts[block_id]], dim=1)
            x = call_block(model, block, x, masks, None, temb, rope)[:, :n_joint]
            block_id += 1
        out = model.final_layer(x[:, :n_image][:, :n], temb)
        return self.velocity(out, grid)


ADAPTER = HiDreamImageAdapter()
