"""Adapter for diffusers ``Krea2Transformer2DModel`` (Krea 2 text-to-image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Krea 2 is a single-stream MMDiT on ``[text, image]`` tokens. Its pipeline folds the latent
``[B, C, H, W]`` into ``patch_size x patch_size`` patches (``Krea2Pipeline(patch_size=2)`` by
default; the transformer's config does not hold it, so the adapter takes it, default 2) in
channel-major ``(c, p, q)`` order, which is the :class:`~dfm_ext.wrapping.packing.ScalePacker`'s
space-to-depth. What ``install`` changes (blocks, RoPE, text fusion untouched): ``img_in``
(``Linear(C p p -> D)``), ``time_embed`` (sinusoid and MLP in one module, ``[B] -> [B, 1, D]``;
wrapped so it reads one argument) and ``final_layer.linear`` (channel-major).

Time and sign: ``Krea2Pipeline`` runs ``FlowMatchEulerDiscreteScheduler`` and passes
``timestep / 1000 = sigma``; the model's embedder multiplies it by 1000 itself. The adapter feeds
``1 - t`` (``"sigma"``) and returns ``-output`` (the Euler step reads ``noise - x``). Position ids as
``Krea2Pipeline.prepare_position_ids``: zeros for the text, ``(0, row, column)`` for the image.

Per-stage specialisation: the text fusion's ``layerwise_blocks`` attend across the tapped-layer axis
of every token, on a ``[B L, layers, D]`` batch whose rows are not samples, so they are in no layer
group (``dfm_ext.specialization`` routes rows of ``[B, ...]``); its ``refiner_blocks`` are.

Conditioning (diffusers names): ``encoder_hidden_states [B, L, num_text_layers, text_hidden_dim]``
(the tapped Qwen3-VL hidden states), optional ``encoder_attention_mask [B, L]`` (bool, True = keep;
default all valid), ``attention_kwargs``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, first_linear_dtype, parse_conditioning
from .flux import flux_image_ids
from .spec import AdapterSpec, SpecAdapter

__all__ = ["Krea2Adapter", "Krea2Conditioning", "Krea2TimeEmbed", "ADAPTER"]

#: rows of [B, ...] only: the layer-wise text fusion blocks (rows are tokens) are left out of every group
_NOT_LAYERWISE = r"^(?!.*layerwise_blocks\.)"


class Krea2Conditioning(NamedTuple):
    """The conditioning keywords :meth:`Krea2Adapter.forward` takes (diffusers names)."""

    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None


class Krea2TimeEmbed(nn.Module):
    """``Krea2TimestepEmbedding`` read with one argument: ``[B]`` sigma -> ``[B, 1, D]`` (in its own weights' dtype)."""

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, timestep: Tensor) -> Tensor:
        return self.embed(timestep, dtype=first_linear_dtype(self.embed))


class Krea2Adapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``Krea2Transformer2DModel`` (conditioning: :class:`Krea2Conditioning`).

    Args:
        patch_size: the pipeline's latent fold (``Krea2Pipeline(patch_size=)``, 2 by default).
        time_convention, output_scale, time_scale: as :class:`~dfm_ext.adapters.spec.SpecAdapter`.
    """

    spec = AdapterSpec(
        name="krea2", model_class="Krea2Transformer2DModel", patch_embed="img_in", time_embedder="time_embed",
        head="final_layer.linear", patch_order="cpq", patch_in_order="cpq", time_convention="sigma",
        output_scale=-1.0, positions="rope", default_sample=(128, 128), conditioning=Krea2Conditioning,
        null_keys=("encoder_hidden_states",),
        layer_groups={
            "cond": (r"(^|\.)time_embed\.", r"(^|\.)txt_in\."),
            "mod": (r"(^|\.)time_mod_proj$",),
            "attn": (_NOT_LAYERWISE + r".*(^|\.)attn\.",),
            "mlp": (_NOT_LAYERWISE + r".*(^|\.)ff\.",),
            "proj": (r"(^|\.)img_in(\.proj)?$", r"(^|\.)final_layer\.linear$"),
        },
    )  # fmt: skip

    def __init__(
        self, patch_size: int = 2, time_convention: Any = None, output_scale: float | None = None, time_scale: float | None = None
    ) -> None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int (the pipeline's latent fold), got {patch_size!r}")
        self.patch_size = patch_size
        super().__init__(time_convention, output_scale, time_scale)

    def config(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, **super().config()}

    def check_model(self, model: nn.Module) -> None:
        c = int(model.config.in_channels)
        if c % (self.patch_size**2):
            raise ValueError(
                f"{type(model).__name__} with in_channels={c} cannot take latents folded {self.patch_size}x{self.patch_size} "
                "(in_channels = latent channels x patch_size^2): pass Krea2Adapter(patch_size=) as its pipeline folds them"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (self.patch_size, self.patch_size)

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels) // math.prod(self.patch(model)), *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        if not isinstance(model.time_embed, Krea2TimeEmbed):
            model.time_embed = Krea2TimeEmbed(model.time_embed)
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`Krea2Conditioning`."""
        c = parse_conditioning(model, Krea2Conditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        cfg = model.config
        layers, width = int(cfg.num_text_layers), int(cfg.text_hidden_dim)
        text = check_tensor(
            c.encoder_hidden_states, "encoder_hidden_states", (b, None, layers, width),
            hint=f" (tapped text-encoder hidden states [B, L, {layers}, {width}])",
        )  # fmt: skip
        x = self.tokens(model, packed)
        n_text, n_img = text.shape[1], x.shape[1]
        temb = self.embed_time(model, t, stage).to(x.dtype)
        mod = model.time_mod_proj(nn.functional.gelu(temb, approximate="tanh"))
        text_mask = mask = None
        if c.encoder_attention_mask is not None:
            given = check_tensor(c.encoder_attention_mask, "encoder_attention_mask", (b, n_text), floating=False)
            text_mask = given[:, None, None, :]
            mask = torch.cat([given, given.new_ones((b, n_img))], dim=1)[:, None, None, :]
        text = model.txt_in(model.text_fusion(text, attention_mask=text_mask))
        ids = torch.cat([torch.zeros(n_text, 3, device=x.device), flux_image_ids(grid, x.device)])
        rope = model.rotary_emb(ids)
        h = torch.cat([text, x], dim=1)
        for block in model.transformer_blocks:
            h = call_block(model, block, h, mod, rope, mask)
        return self.velocity(model.final_layer(h[:, n_text:], temb), grid)


ADAPTER = Krea2Adapter()
