"""Adapter for diffusers ``QwenImageTransformer2DModel`` (Qwen-Image text-to-image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Like Flux, Qwen-Image works on pre-packed tokens: ``QwenImagePipeline`` folds every 2x2 block of
the latent ``[B, C, H, W]`` into one token of ``4 C`` channels in channel-major ``(c, p, q)``
order, which is exactly the :class:`~dfm_ext.wrapping.packing.ScalePacker`'s space-to-depth. What
``install`` changes (blocks, RoPE, text input untouched): ``img_in`` (``Linear(4 C -> D)``),
``time_text_embed.timestep_embedder`` (after its ``time_proj`` sinusoid) and ``proj_out``
(channel-major, as the pipeline unpacks).

Time and sign: the pipeline passes ``sigma = timestep / 1000`` (1 = noise); the model's sinusoid
multiplies it by 1000 itself; it predicts ``noise - x`` (flow matching). The adapter feeds
``1 - t`` and returns ``-output``.

Positions: RoPE over ``(frame, row, column)`` of the token grid, centred (``scale_rope``).

Refused: the edit and layered variants (``zero_cond_t``, ``use_additional_t_cond``,
``use_layer3d_rope``; their extra inputs are not taken here), and ``in_channels != 4 * out_channels``.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, joint_attention_dim]`` (Qwen2.5-VL
embeddings), optional ``encoder_hidden_states_mask [B, L]`` (1 = keep), ``attention_kwargs``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["QwenImageAdapter", "QwenImageConditioning", "ADAPTER"]


class QwenImageConditioning(NamedTuple):
    """The conditioning keywords :meth:`QwenImageAdapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_hidden_states_mask: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class QwenImageAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``QwenImageTransformer2DModel`` (conditioning: :class:`QwenImageConditioning`)."""

    spec = AdapterSpec(
        name="qwenimage", model_class="QwenImageTransformer2DModel", patch_embed="img_in",
        time_proj="time_text_embed.time_proj", time_embedder="time_text_embed.timestep_embedder",
        head="proj_out", patch_order="cpq", patch_in_order="cpq", time_convention="sigma", output_scale=-1.0,
        positions="rope",
        # 1328 x 1328 px (Qwen-Image's square bucket) with its 8x VAE: 166 x 166 latents.
        default_sample=(166, 166), conditioning=QwenImageConditioning, null_keys=("encoder_hidden_states",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_text_embed\.", r"(^|\.)txt_in$"),
                "mod": (r"(^|\.)(img|txt)_mod\.1$", r"(^|\.)norm_out\.linear$"),
                "mlp": (r"(^|\.)(img|txt)_mlp\.",),
                "proj": (r"(^|\.)img_in(\.proj)?$",),
            }
        ),
    )

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        for flag in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if getattr(cfg, flag, False):
                raise ValueError(f"{type(model).__name__} with {flag}=True (an edit/layered variant) is not supported")
        if int(cfg.in_channels) != 4 * int(model.out_channels):
            raise ValueError(
                f"{type(model).__name__} with in_channels={cfg.in_channels}, out_channels={model.out_channels} is not "
                "a plain text-to-image Qwen-Image (in = 4 x out: 2x2 packed latents)"
            )

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.out_channels), *(self.spec.default_sample or ()))

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`QwenImageConditioning`."""
        from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask  # noqa: PLC0415

        c = parse_conditioning(model, QwenImageConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.joint_attention_dim)
        text = check_tensor(c.encoder_hidden_states, "encoder_hidden_states", (b, None, width), hint=f" (text embeddings [B, L, {width}])")
        if c.encoder_hidden_states_mask is not None:
            check_tensor(c.encoder_hidden_states_mask, "encoder_hidden_states_mask", (b, text.shape[1]), floating=False)
        x = self.tokens(model, packed)
        text = model.txt_in(model.txt_norm(text))
        text_len, _, text_mask = compute_text_seq_len_from_mask(text, c.encoder_hidden_states_mask)
        temb = self.embed_time(model, t, stage).to(x.dtype)
        rope = model.pos_embed([[(1, grid[0], grid[1])]] * b, max_txt_seq_len=text_len, device=x.device)
        for block in model.transformer_blocks:
            text, x = call_block(model, block, x, text, text_mask, temb, rope, c.attention_kwargs, None)
        x = model.norm_out(x, temb)
        return self.velocity(model.proj_out(x), grid)


ADAPTER = QwenImageAdapter()
