"""The reference DiT extended to video (paper A.1): per-frame patches, 3-D RoPE.

:class:`VideoDiT` takes latent videos ``[B, C, T, H, W]``. Each latent frame is patchified on its
own (a ``Conv3d`` with kernel = stride = ``(1, p, p)``, so no weight ever mixes two frames) and
the frames' tokens are concatenated frame-major into one sequence of ``T * (H/p) * (W/p)``
tokens. Positions are 3-D rotary embeddings: the head's rotation pairs are shared out between
time, rows and columns. Everything else is :class:`dfm_ext.DiT`'s: the blocks, the
timestep/label embedders, adaLN-Zero, the final layer and the module names
(``x_embedder.proj``, ``t_embedder``, ``y_embedder``, ``blocks``, ``final_layer.linear``), so
:func:`dfm_ext.specialize` targets work unchanged and :func:`dfm_ext.wrap_dit` wraps it through
the ``video_dit`` adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.models.dit import DiT, DiTConfigBase

__all__ = ["VideoDiT", "VideoDiTConfig", "VideoPatchEmbed", "rope_3d"]


@dataclass(frozen=True)
class VideoDiTConfig(DiTConfigBase):
    """Configuration of :class:`VideoDiT`: the transformer fields of :class:`~dfm_ext.models.dit.DiTConfigBase`
    (``patch_size`` is spatial: frames are never merged, temporal patch 1) and

    Args:
        input_size: latent video size ``(T, H, W)``; the model accepts other sizes too (RoPE has
            no fixed grid), this one is the default ``sample_shape`` for :func:`dfm_ext.wrap_dit`.

    Example:
        >>> cfg = VideoDiTConfig.preset("B/2", input_size=(5, 64, 64), in_channels=16)
        >>> cfg.hidden_size, cfg.grid_size
        (768, (5, 32, 32))
    """

    input_size: tuple[int, int, int] = (5, 32, 32)
    in_channels: int = 16
    num_classes: int = 700

    def _normalised_input_size(self, size: Any) -> tuple[int, int, int]:
        if isinstance(size, (int, str)) or len(size) != 3:
            raise ValueError(f"input_size must be (T, H, W), got {size!r}")
        t, h, w = (int(s) for s in size)
        return (t, h, w)

    def _check_divisible(self) -> None:
        size = self.input_size
        if min(size) < 1 or size[1] % self.patch_size or size[2] % self.patch_size:
            raise ValueError(f"input_size {size} must be positive with H, W divisible by patch_size {self.patch_size}")

    def _check_head_dim(self, head_dim: int) -> None:
        if head_dim % 4 or head_dim < 12:
            raise ValueError(f"3-D RoPE needs a head dim divisible by 4 and >= 12, got {head_dim}")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        t, h, w = self.input_size
        return (t, h // self.patch_size, w // self.patch_size)

    @classmethod
    def _preset_fields(cls, name: str) -> dict[str, Any]:
        """The sizes of :meth:`dfm_ext.DiTConfig.preset`; ``"tiny"`` is ``(3, 8, 8)`` frames."""
        base = {k: v for k, v in super()._preset_fields(name).items() if k != "input_size"}
        if name == "tiny":
            base["input_size"] = (3, 8, 8)
        return base


def rope_3d(
    head_dim: int,
    grid: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Cosines and sines ``[T * Gh * Gw, head_dim]`` of axial 3-D RoPE, frame-major token order.

    The head has ``head_dim / 2`` rotation pairs laid out as :func:`dfm_ext.models.dit.rope_2d`'s
    (channel ``i`` pairs with ``i + head_dim / 4`` in each half). ``n = head_dim // 6`` pairs
    rotate with the row, ``n`` with the column and the rest with the frame index; each axis has
    its own frequencies ``10000^(-k / n_axis)``. The result plugs into the reference DiT's
    attention unchanged. Attention logits then depend only on the offsets between tokens.

    Example:
        >>> cos, sin = rope_3d(16, (2, 3, 4))
        >>> cos.shape, bool(torch.allclose(cos[0], torch.ones(16)))
        (torch.Size([24, 16]), True)
    """
    if head_dim % 4 or head_dim < 12:
        raise ValueError(f"3-D RoPE needs a head dim divisible by 4 and >= 12, got {head_dim}")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be (T, Gh, Gw) of positive ints, got {grid}")
    pairs = head_dim // 2
    n_hw = head_dim // 6
    sizes = (pairs - 2 * n_hw, n_hw, n_hw)  # (time, rows, columns)
    pos = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    angles = []
    for coord, n in zip(pos, sizes):
        freqs = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float64) / n)
        angles.append(coord.reshape(-1, 1) * freqs)
    ang = torch.cat(angles, dim=1)  # [N, pairs]
    q = head_dim // 4
    # Pair j < q rotates channels (j, j + q); pair q + j rotates (2q + j, 3q + j).
    full = torch.cat([ang[:, :q], ang[:, :q], ang[:, q:], ang[:, q:]], dim=1)
    return full.cos().to(device=device, dtype=dtype), full.sin().to(device=device, dtype=dtype)


class VideoPatchEmbed(nn.Module):
    """Per-frame patches: ``Conv3d(kernel = stride = (1, p, p))``, tokens ``[B, T * Gh * Gw, D]`` frame-major."""

    def __init__(self, input_size: tuple[int, int, int], patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        t, h, w = input_size
        self.patch_size = (1, patch_size, patch_size)
        self.grid_size = (t, h // patch_size, w // patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VideoDiT(DiT):
    """Class-conditional video DiT velocity predictor.

    ``forward(x [B, C, T, H, W], t [B] in [0, 1] (t = 1 data), y [B] long) -> v [B, C_out, T, H, W]``.
    Any ``T`` and any ``H, W`` divisible by the patch work (3-D RoPE, no fixed position table).

    Example:
        >>> model = VideoDiT(VideoDiTConfig.preset("tiny", num_classes=3))
        >>> x, t, y = torch.randn(2, 16, 3, 8, 8), torch.rand(2), torch.tensor([0, 2])
        >>> model(x, t, y).shape
        torch.Size([2, 16, 3, 8, 8])
    """

    config_class = VideoDiTConfig
    dfm_time_convention = "x1000"  # as DiT: the embedder sees 1000 t (t = 1 data); read by wrap_dit

    def _patch_embed(self, config: Any) -> nn.Module:
        return VideoPatchEmbed(config.input_size, config.patch_size, config.in_channels, config.hidden_size)

    def _fixed_pos_embed(self, config: Any) -> Tensor | None:
        return None  # 3-D RoPE only: any number of frames and any divisible size

    def _rope(self, head_dim: int, grid: tuple[int, ...], device: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_3d(head_dim, grid, device=device, dtype=dtype)

    def _token_grid(self, x: Tensor) -> tuple[int, ...]:
        """Check ``x`` against the config and return its token grid ``(T, Gh, Gw)``."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        if x.shape[3] % cfg.patch_size or x.shape[4] % cfg.patch_size:
            raise ValueError(f"x spatial size {tuple(x.shape[3:])} is not divisible by patch {cfg.patch_size}")
        return (x.shape[2], x.shape[3] // cfg.patch_size, x.shape[4] // cfg.patch_size)

    def unpatchify(self, x: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Tokens ``[B, N, p * p * C]`` in ``(p, q, c)`` order -> ``[B, C, T, Gh * p, Gw * p]``."""
        p, c = self.config.patch_size, self.config.out_channels
        t, gh, gw = grid
        x = x.reshape(x.shape[0], t, gh, gw, p, p, c)
        return torch.einsum("nthwpqc->ncthpwq", x).reshape(x.shape[0], c, t, gh * p, gw * p)
