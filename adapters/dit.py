"""Adapter for the original DiT family: facebookresearch DiT, SiT, LightningDiT and :class:`dfm_ext.DiT`.

It matches any model with the original attribute names: ``x_embedder.proj`` (a ``Conv2d`` with
kernel = stride), ``t_embedder``, ``y_embedder`` (with ``num_classes``), ``blocks`` and
``final_layer.linear``, with an optional fixed ``pos_embed`` ``[1, N, D]``.

``install`` swaps ``x_embedder`` for a :class:`~dfm_ext.embeddings.MultiScalePatchEmbed`
(its ``.proj`` is the widened ``nn.Linear``), ``t_embedder`` for a
:class:`~dfm_ext.embeddings.MultiScaleTimestepEmbed` (stage 0's embedder is the original,
``t_embedder.embedders[0]``) and ``final_layer.linear`` for a widened
:class:`~dfm_ext.embeddings.MultiScaleHead` (rows reordered from DiT's ``(p, q, c)`` unpatchify
order; with ``learn_sigma`` only the velocity half is kept). ``forward`` then runs the model's
own positions, label embedder, blocks and final layer.

Time conventions (``time_convention``): ``"x1000"`` (default; :class:`dfm_ext.DiT` and
LightningDiT-style embedders that see ``1000 t`` with ``t = 1`` data), ``"unit"`` (SiT: ``t``
itself), ``"discrete"`` (original DiT: ``999 (1 - t)``). ``output_scale=-1`` flips the sign for
models trained to predict ``noise - x``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.adapter import _TIME, multiscale_time_embed, widen_head, widen_patch_embed
from dfm_ext.embeddings import MultiScaleHead, MultiScalePatchEmbed
from dfm_ext.specialization import checkpoint

__all__ = ["DiTFamilyAdapter", "ADAPTER"]


class DiTFamilyAdapter:
    """:class:`dfm_ext.adapter.DiTAdapter` for models with DiT's module names.

    Args:
        time_convention: how the model's timestep embedder reads time (see module docstring).
        output_scale: multiplies the model output to give the paper's velocity ``x - noise``.

    Conditioning: ``y`` (long ``[B]`` class labels, required); optional ``force_drop_ids``
    (``[B]``, 1 = drop the label) or ``generator`` for reproducible label dropout in training.
    ``null_condition`` sets ``y`` to the null class ``num_classes``.
    """

    name = "dit"

    def __init__(self, time_convention: str = "x1000", output_scale: float = 1.0):
        if time_convention not in _TIME:
            raise ValueError(f"unknown time convention {time_convention!r}; choose one of {sorted(_TIME)}")
        self.time_convention = time_convention
        self.output_scale = float(output_scale)

    def config(self) -> dict[str, Any]:
        return {"time_convention": self.time_convention, "output_scale": self.output_scale}

    def matches(self, model: nn.Module) -> bool:
        proj = getattr(getattr(model, "x_embedder", None), "proj", None)
        final = getattr(getattr(model, "final_layer", None), "linear", None)
        return (
            isinstance(proj, nn.Conv2d)
            and isinstance(getattr(model, "t_embedder", None), nn.Module)
            and hasattr(getattr(model, "y_embedder", None), "num_classes")
            and isinstance(getattr(model, "blocks", None), nn.ModuleList)
            and isinstance(final, nn.Linear)
            and not isinstance(final, MultiScaleHead)
        )

    @staticmethod
    def _proj(model: nn.Module) -> nn.Conv2d:
        proj = getattr(model.x_embedder, "proj", None)
        if not isinstance(proj, nn.Conv2d):
            raise TypeError(f"{type(model).__name__}.x_embedder has no Conv2d .proj (already wrapped?)")
        return proj

    def _grid(self, model: nn.Module) -> tuple[int, int] | None:
        grid = getattr(model.x_embedder, "grid_size", None)
        if grid is not None:
            return (int(grid[0]), int(grid[1])) if not isinstance(grid, int) else (grid, grid)
        pos = getattr(model, "pos_embed", None)
        if isinstance(pos, Tensor):
            side = math.isqrt(pos.shape[-2])
            if side * side == pos.shape[-2]:
                return (side, side)
        return None

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        proj = self._proj(model)
        grid = self._grid(model)
        if grid is None:
            raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass sample_shape=(C, H, W)")
        p = proj.kernel_size
        return (proj.in_channels, grid[0] * p[0], grid[1] * p[1])

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(sample_shape) != 3:
            raise ValueError(f"DiT-family models take images; sample_shape must be (C, H, W), got {sample_shape}")
        grid = self._grid(model)
        if grid is None:  # e.g. RoPE models without a fixed grid: the model's patch at full resolution
            p = self._proj(model).kernel_size
            if sample_shape[1] % p[0] or sample_shape[2] % p[1]:
                raise ValueError(f"sample_shape {sample_shape} is not divisible by the model's patch {tuple(p)}")
            grid = (sample_shape[1] // p[0], sample_shape[2] // p[1])
        return grid

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        proj = self._proj(model)
        if len(packer.grid) != 2:
            raise ValueError(f"DiT-family models take images; got a token grid {packer.grid}")
        pos = getattr(model, "pos_embed", None)
        if isinstance(pos, Tensor) and pos.shape[-2] != packer.num_tokens:
            raise ValueError(
                f"the stages map onto a token grid {packer.grid} ({packer.num_tokens} tokens) but "
                f"{type(model).__name__} has fixed positions for {pos.shape[-2]} tokens"
            )
        channels = [s[0] for s in packer.stage_shapes]
        if init == "pretrained" and channels[0] != proj.in_channels:
            raise ValueError(f"stage 0 has {channels[0]} channels but the model takes {proj.in_channels}")
        hidden = proj.out_channels
        linear = model.final_layer.linear
        base_patch = tuple(proj.kernel_size)
        model.x_embedder = widen_patch_embed(proj, packer, init=init)
        model.t_embedder = multiscale_time_embed(
            model.t_embedder,
            hidden,
            packer.num_stages,
            init=init,
            stage_embedding=stage_embedding,
            time_transform=self.time_convention,
        )
        model.final_layer.linear = widen_head(linear, packer, base_patch=base_patch, order="pqc", init=init)

    def forward(
        self,
        model: nn.Module,
        packed: Tensor,
        t: Tensor,
        stage: Tensor,
        *,
        y: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond: Any,
    ) -> Tensor:
        if y is None:
            raise TypeError(f"{type(model).__name__} needs class labels: pass y=LongTensor[B]")
        if cond:
            raise TypeError(f"unexpected conditioning for a DiT-family model: {sorted(cond)}")
        if not isinstance(model.x_embedder, MultiScalePatchEmbed):
            raise RuntimeError("the model has not been installed by this adapter; use dfm_ext.wrap_dit")
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        if y.shape != (b,):
            raise ValueError(f"y must have shape [{b}], got {tuple(y.shape)}")
        x = model.x_embedder(packed)
        pos = getattr(model, "pos_embed", None)
        if isinstance(pos, Tensor):
            x = x + pos
        emb = model.y_embedder
        if force_drop_ids is None and generator is not None and model.training and emb.dropout_prob > 0:
            draw = torch.rand(b, generator=generator, device=generator.device)
            force_drop_ids = (draw < emb.dropout_prob).long().to(y.device)
        c = model.t_embedder(t, stage) + emb(y, model.training, force_drop_ids)
        rope_fn = getattr(model, "rope_for_grid", None)
        rope = rope_fn(grid, x.device, x.dtype) if callable(rope_fn) else None
        ckpt = getattr(model, "gradient_checkpointing", False) is True and torch.is_grad_enabled()
        for block in model.blocks:
            args = (x, c) if rope is None else (x, c, rope)
            x = checkpoint(block, *args) if ckpt else block(*args)
        out = MultiScaleHead.to_grid(model.final_layer(x, c), grid)
        return out if self.output_scale == 1.0 else out * self.output_scale

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        y = cond.get("y")
        if y is None:
            raise TypeError("null_condition needs the conditional labels y to know the batch size")
        emb = model.y_embedder
        table = getattr(emb, "embedding_table", None)
        if isinstance(table, nn.Embedding) and table.num_embeddings <= emb.num_classes:
            raise ValueError(f"{type(model).__name__} has no null class (built without label dropout)")
        out = dict(cond)
        out["y"] = torch.full_like(y, emb.num_classes)
        out.pop("force_drop_ids", None)
        return out


ADAPTER = DiTFamilyAdapter()
