"""Pieces shared by the diffusers adapters (DiT, PixArt, SD3, Flux, CogVideoX).

Every diffusers DiT family keeps its timestep embedder as ``time_proj`` (a parameter-free
sinusoid, :class:`diffusers.models.embeddings.Timesteps`) followed by an MLP
(:class:`~diffusers.models.embeddings.TimestepEmbedding`). :class:`TimeMLP` bundles the two so
that :class:`~dfm_ext.embeddings.MultiScaleTimestepEmbed` can copy it per stage; the copies'
last linear layer (``linear_2``) is zeroed, so at a pretrained initialisation only stage 0
contributes.

Conventions (paper: ``t = 0`` noise, ``t = 1`` data, velocity ``x - noise``):

==========  ======================  ===========================  =========================
family      time the model reads    what the model predicts      wrapped output
==========  ======================  ===========================  =========================
DiT         ``999 (1 - t)`` (DDPM)  epsilon (+ learned sigma)     raw (re-parameterised)
PixArt      ``999 (1 - t)`` (DDPM)  epsilon (+ learned sigma)     raw (re-parameterised)
SD3         ``1000 (1 - t)``        ``noise - x``                 ``-1 x`` raw
Flux        ``1000 (1 - t)``        ``noise - x``                 ``-1 x`` raw
CogVideoX   ``999 (1 - t)`` (DDPM)  v-prediction                  raw (re-parameterised)
==========  ======================  ===========================  =========================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.adapter import _TIME

__all__ = [
    "TimeMLP",
    "check_time_convention",
    "check_tensor",
    "sincos_positions",
    "first_linear_dtype",
]


class TimeMLP(nn.Module):
    """``mlp(proj(timestep))``: a diffusers sinusoidal projection and its ``TimestepEmbedding``.

    ``proj`` has no parameters; the MLP's input is cast to the MLP's dtype, as the diffusers
    models cast it to the hidden dtype.

    Shapes:
        ``[B]`` timesteps (the model's convention) -> ``[B, D]``.
    """

    def __init__(self, proj: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.mlp = mlp

    def forward(self, timestep: Tensor) -> Tensor:
        return self.mlp(self.proj(timestep).to(first_linear_dtype(self.mlp)))


def first_linear_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def check_time_convention(name: str) -> str:
    if name not in _TIME:
        raise ValueError(f"unknown time convention {name!r}; choose one of {sorted(_TIME)}")
    return name


def check_tensor(
    value: Any, name: str, shape: tuple[int | None, ...], *, floating: bool = True, hint: str = ""
) -> Tensor:
    """Check a conditioning tensor's type, rank and sizes (``None`` = any size).

    Raises:
        TypeError: not a tensor, or not floating point when ``floating``.
        ValueError: the shape does not match.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor {_fmt(shape)}, got {type(value).__name__}{hint}")
    if floating and not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.ndim != len(shape) or any(s is not None and v != s for v, s in zip(value.shape, shape)):
        raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(value.shape)}{hint}")
    return value


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def sincos_positions(patch_embed: nn.Module, grid: tuple[int, int], device: torch.device) -> Tensor | None:
    """The positional embedding a diffusers ``PatchEmbed`` adds for a token grid ``(Gh, Gw)``.

    Same rules as ``PatchEmbed.forward``: SD3-style models crop a ``pos_embed_max_size``
    table around its centre; others use the stored table when the grid is the one they were
    built for and recompute the 2-D sincos table (with their ``base_size`` and
    ``interpolation_scale``) otherwise. Returns ``[1, Gh * Gw, D]`` or ``None`` (no positions).
    """
    from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: PLC0415

    table = getattr(patch_embed, "pos_embed", None)
    if table is None:
        return None
    gh, gw = grid
    if patch_embed.pos_embed_max_size:
        p = patch_embed.patch_size
        # cropped_pos_embed takes pixel sizes and raises a clear error past the table.
        return patch_embed.cropped_pos_embed(gh * p, gw * p)
    if (patch_embed.height, patch_embed.width) == (gh, gw):
        return table
    pos = get_2d_sincos_pos_embed(
        embed_dim=table.shape[-1],
        grid_size=(gh, gw),
        base_size=patch_embed.base_size,
        interpolation_scale=patch_embed.interpolation_scale,
        device=device,
        output_type="pt",
    )
    return pos.float().unsqueeze(0)
