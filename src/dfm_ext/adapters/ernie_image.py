"""Adapter for diffusers ``ErnieImageTransformer2DModel`` (ERNIE-Image), written as an :class:`~dfm_ext.adapters.spec.AdapterSpec`.

Stages are plain latents ``[B, C, H, W]`` (``C = in_channels / 4``: 32 for ERNIE-Image's
autoencoder). ``ErnieImagePipeline`` diffuses in the 2x2-folded space (``_patchify_latents``:
``[B, C, H, W] -> [B, 4 C, H/2, W/2]`` in channel-major ``(c, p, q)`` order, the
:class:`~dfm_ext.wrapping.packing.ScalePacker`'s space-to-depth), and its batch-norm latent
standardisation happens on that folded tensor: feed latents standardised that way, then unfolded
(as for FLUX.2). The model's own patch is 1 over the folded latents; ``install`` turns its
``x_embedder.proj`` (``Conv2d(4 C, D, 1)``) into the equal ``Linear(4 C -> D)`` and widens it, and
replaces ``time_embedding`` (after its ``time_proj`` sinusoid) and ``final_linear`` (``4 C`` outputs
per token, channel-major).

Time and sign: the pipeline runs ``FlowMatchEulerDiscreteScheduler`` and passes its
``timestep = 1000 sigma``: the adapter feeds ``1000 (1 - t)`` and returns ``-output`` (the Euler
step reads ``noise - x``).

Positions: 3-axis RoPE ids as the model builds them: image ``(text_len, row, column)``, text
``(i, 0, 0)``. Image tokens come first, then the text, in one sequence.

Layout: the blocks run sequence-first (``[S, B, D]``); their attention transposes to batch-first,
their MLP does not. ``install`` wraps each block's ``mlp`` in :class:`BatchFirstMLP` (the same
values, batch-first inside) so that per-stage specialisation routes its rows by sample, and the
adapter runs the head batch-first.

Conditioning (diffusers names): ``text_bth [B, L, text_in_dim]`` (zero-padded text embeddings),
optional ``text_lens [B]`` (valid tokens per sample; default ``L``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .common import call_block, check_tensor, parse_conditioning
from .diffusers_common import diffusers_layer_groups
from .spec import AdapterSpec, SpecAdapter

__all__ = ["BatchFirstMLP", "ErnieImageAdapter", "ErnieImageConditioning", "ADAPTER"]


class ErnieImageConditioning(NamedTuple):
    """The conditioning keywords :meth:`ErnieImageAdapter.forward` takes (diffusers names)."""

    text_bth: Tensor | None = None
    text_lens: Tensor | None = None


class BatchFirstMLP(nn.Module):
    """``mlp`` on a sequence-first input ``[S, B, D]``, run batch-first inside (row-wise, so the same values)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.transpose(0, 1)).transpose(0, 1)


class ErnieImageAdapter(SpecAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``ErnieImageTransformer2DModel`` (conditioning: :class:`ErnieImageConditioning`)."""

    spec = AdapterSpec(
        name="ernie_image", model_class="ErnieImageTransformer2DModel", patch_embed="x_embedder.proj",
        time_proj="time_proj", time_embedder="time_embedding", head="final_linear", patch_order="cpq",
        patch_in_order="cpq", time_convention="timestep", output_scale=-1.0, positions="rope",
        # 1024 x 1024 px: latents 128 x 128 (16x VAE folded 2x2 by the pipeline: 64 x 64 tokens).
        default_sample=(128, 128), conditioning=ErnieImageConditioning, null_keys=("text_bth",),
        layer_groups=diffusers_layer_groups(
            {
                "cond": (r"(^|\.)time_embedding\.", r"(^|\.)text_proj$"),
                "mod": (r"(^|\.)adaLN_modulation\.\d+$", r"(^|\.)final_norm\.linear$"),
                "attn": (r"(^|\.)self_attention\.",),
                "mlp": (r"(^|\.)mlp\.",),
                "proj": (r"(^|\.)x_embedder\.proj$", r"(^|\.)final_linear$"),
            }
        ),
    )  # fmt: skip

    def check_model(self, model: nn.Module) -> None:
        cfg = model.config
        if int(cfg.patch_size) != 1 or int(cfg.in_channels) != int(cfg.out_channels) or int(cfg.in_channels) % 4:
            raise ValueError(
                f"{type(model).__name__} with patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
                f"out_channels={cfg.out_channels} is not ERNIE-Image's text-to-image layout (patch 1 over the "
                "pipeline's 2x2-folded latents, in = out)"
            )

    def patch(self, model: nn.Module) -> tuple[int, ...]:
        return (2, 2)  # the pipeline's 2x2 fold; the model's own patch_size is 1

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.in_channels) // 4, *(self.spec.default_sample or ()))

    def install(self, model: nn.Module, packer: Any, *, init: Any, stage_embedding: bool) -> None:
        self.check_model(model)
        conv = model.x_embedder.proj
        if isinstance(conv, nn.Conv2d):  # a 1x1 conv over the folded channels is a Linear over (c, p, q)
            linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
            linear.to(device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.flatten(1))
                if conv.bias is not None:
                    linear.bias.copy_(conv.bias)
            model.x_embedder.proj = linear
        for layer in model.layers:
            if not isinstance(layer.mlp, BatchFirstMLP):
                layer.mlp = BatchFirstMLP(layer.mlp)
        super().install(model, packer, init=init, stage_embedding=stage_embedding)

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`ErnieImageConditioning`."""
        c = parse_conditioning(model, ErnieImageConditioning, cond)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        width = int(model.config.text_in_dim)
        text = check_tensor(c.text_bth, "text_bth", (b, None, width), hint=f" (zero-padded text embeddings [B, L, {width}])")
        n_text = text.shape[1]
        lens = c.text_lens
        if lens is None:
            lens = torch.full((b,), n_text, dtype=torch.long, device=text.device)
        else:
            check_tensor(lens, "text_lens", (b,), floating=False)
        x = self.tokens(model, packed)
        device, n_img = x.device, x.shape[1]
        if model.text_proj is not None and text.numel() > 0:
            text = model.text_proj(text)
        h = torch.cat([x.transpose(0, 1), text.transpose(0, 1)], dim=0)
        # ErnieImageTransformer2DModel.forward's ids: image (text_len, row, column), text (i, 0, 0).
        text_ids = torch.cat(
            [torch.arange(n_text, device=device, dtype=torch.float32).view(1, n_text, 1).expand(b, -1, -1),
             torch.zeros((b, n_text, 2), device=device)], dim=-1,
        )  # fmt: skip
        rows, cols = torch.meshgrid(
            torch.arange(grid[0], device=device, dtype=torch.float32), torch.arange(grid[1], device=device, dtype=torch.float32), indexing="ij"
        )
        yx = torch.stack([rows, cols], dim=-1).reshape(1, n_img, 2).expand(b, -1, -1)
        image_ids = torch.cat([lens.float().view(b, 1, 1).expand(-1, n_img, -1), yx], dim=-1)
        rope = model.pos_embed(torch.cat([image_ids, text_ids], dim=1))
        valid = torch.arange(n_text, device=device).view(1, n_text) < lens.view(b, 1)
        mask = torch.cat([torch.ones((b, n_img), device=device, dtype=torch.bool), valid], dim=1)[:, None, None, :]
        temb = self.embed_time(model, t, stage).to(x.dtype)
        mods = [m.unsqueeze(0).expand(h.shape[0], -1, -1).contiguous() for m in model.adaLN_modulation(temb).chunk(6, dim=-1)]
        for layer in model.layers:
            h = call_block(model, layer, h, rope, list(mods), mask)
        h = model.final_norm(h, temb).type_as(h)[:n_img].transpose(0, 1)  # batch-first for the head
        return self.velocity(model.final_linear(h), grid)


ADAPTER = ErnieImageAdapter()
