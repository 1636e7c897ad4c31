"""The layers of the reference DiT (:mod:`dfm_ext.models.dit`), with the original DiT's module names.

Positions (fixed 2-D sin-cos table, 2-D rotary embeddings), the patch/timestep/label embedders,
fused attention, the adaLN-Zero block and the final layer. :class:`~dfm_ext.models.dit.DiT`
and :class:`~dfm_ext.models.video_dit.VideoDiT` are built from them.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_ext.validation import check_value

__all__ = [
    "Attention", "DiTBlock", "FinalLayer", "LabelEmbedder", "Mlp", "PatchEmbed", "TimestepEmbedder", "apply_rope",
    "as_linear", "rope_2d", "sincos_pos_embed_2d",
]  # fmt: skip


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos positions ``[Gh * Gw, dim]`` (half the channels encode the column, half the row).

    Example:
        >>> sincos_pos_embed_2d(8, (2, 3)).shape
        torch.Size([6, 8])
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # The original DiT puts the column (w) coordinate first.
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def rope_2d(
    head_dim: int, grid: tuple[int, ...], *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Cosines and sines ``[N, head_dim]`` of axial 2-D RoPE: first half of each head rotates with the row, second with the column."""
    quarter = head_dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ang_r = rows.reshape(-1, 1).double() * freqs
    ang_c = cols.reshape(-1, 1).double() * freqs
    ang = torch.cat([ang_r, ang_r, ang_c, ang_c], dim=1)
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, heads, N, hd]`` by the angles of ``cos, sin [N, hd]`` (:func:`rope_2d`, ``rope_3d``):
    rotate-half within each of the two halves of the head."""
    q = x.shape[-1] // 4
    a, b, c, d = x.split(q, dim=-1)
    rotated = torch.cat([-b, a, -d, c], dim=-1)
    return x * cos + rotated * sin


class PatchEmbed(nn.Module):
    """Non-overlapping patches: ``Conv2d(kernel = stride = p)``, flattened to tokens ``[B, N, D]``."""

    def __init__(self, image_size: tuple[int, int], patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of a scalar time followed by an MLP: ``[B] -> [B, D]``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """``[cos(t w_k), sin(t w_k)]`` with ``w_k = max_period^(-k / (dim/2))``: ``[B] -> [B, dim]``."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(as_linear(self.mlp[0]).weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to ``[B, D]``, with label dropout to the null class ``num_classes`` for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # The null-class row always exists so that disabling dropout keeps the same state dict.
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(
        self, labels: Tensor, force_drop_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Replace dropped labels by the null class; ``force_drop_ids`` (0/1 or bool ``[B]``) decides if given."""
        if force_drop_ids is None:
            draw = generator.device if generator is not None else labels.device
            drop = (torch.rand(labels.shape[0], device=draw, generator=generator) < self.dropout_prob).to(labels.device)
        else:
            if force_drop_ids.shape != labels.shape:
                raise ValueError(f"force_drop_ids has shape {tuple(force_drop_ids.shape)}, labels {tuple(labels.shape)}")
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self,
        labels: Tensor,
        train: bool,
        force_drop_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if labels.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"class labels must be an integer tensor, got {labels.dtype}")
        # Read on the host only for CPU labels in eager mode; a device-side assert otherwise
        # (no sync, no graph break): dfm_ext.validation.
        n = self.num_classes
        if labels.numel():
            check_value(
                ((labels >= 0) & (labels <= n)).all(),
                f"class labels must lie in [0, {n - 1}] (or {n}, the null class)",
                labels.tolist,
            )
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and optional RoPE."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def as_linear(m: nn.Module) -> nn.Linear:
    """``m`` as the ``nn.Linear`` it is by construction (``nn.Sequential`` indexing is typed as any Module)."""
    return cast(nn.Linear, m)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``c`` modulates shift/scale/gate of attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_a.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sh_a, sc_a), rope)
        return x + g_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and the linear output projection to ``p * p * C_out`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))
