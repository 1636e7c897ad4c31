"""Video recipe parts: class labels as tokens and rotary positions for text-conditioned video DiTs
(CogVideoX), and the sample videos with their stage previews side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfm_ext.recipes.engine.viz import make_grid

__all__ = ["CogVideoXRotary", "LabelTokens", "save_video_samples", "side_by_side"]


class LabelTokens(nn.Module):
    """Class labels as ``L`` text tokens ``[B, L, D]``: ``positions + table[y_b]``, one learned vector per class
    (null class included) broadcast over ``L`` learned positions (not ``L * D`` parameters per class).

    Example:
        >>> LabelTokens(10, 4, 8)(torch.tensor([0, 10])).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, num_classes: int, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        self.positions = nn.Parameter(torch.zeros(num_tokens, dim))
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.positions[None] + self.table(y)[:, None]


class CogVideoXRotary:
    """``(cos, sin)`` for a CogVideoX token grid, as ``CogVideoXPipeline`` computes them."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __call__(self, grid: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (tuple(grid), str(device))
        if key not in self._cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            c = self.config
            frames, gh, gw = grid
            base_w, base_h = c.sample_width // c.patch_size, c.sample_height // c.patch_size
            if c.patch_size_t is None:
                crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
                out = get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), frames, device=device)
            else:
                out = get_3d_rotary_pos_embed(
                    c.attention_head_dim, None, (gh, gw), frames, grid_type="slice", max_size=(base_h, base_w), device=device
                )
            self._cache[key] = out
        return self._cache[key]


def side_by_side(columns: Sequence[Tensor], *, scale: int = 1, padding: int = 2) -> np.ndarray:
    """Tile ``K`` videos ``[N, 3, T, H, W]`` in ``[-1, 1]`` into ``[T, H_grid, W_grid, 3]`` uint8 frames: row ``i`` holds
    ``columns[c][i]`` for every column ``c`` (e.g. stage previews, then the final).

    Example:
        >>> side_by_side([torch.zeros(2, 3, 4, 8, 8), torch.zeros(2, 3, 4, 8, 8)], padding=1).shape
        (4, 19, 19, 3)
    """
    shape = columns[0].shape
    for i, c in enumerate(columns):
        if c.shape != shape or c.ndim != 5:
            raise ValueError(f"columns[{i}] has shape {tuple(c.shape)}, expected {tuple(shape)} [N, 3, T, H, W]")
    tiles = torch.stack(list(columns), dim=1).flatten(0, 1)  # [N * K, 3, T, H, W], row-major by example
    return np.stack([make_grid(tiles[:, :, t], len(columns), padding=padding, scale=scale) for t in range(shape[2])])


def save_video_samples(previews: Sequence[Tensor], final: Tensor, stem: Path, *, fps: float, formats: Sequence[str]) -> None:
    """``stem.mp4`` / ``stem.gif`` (previews and final ``[N, 3, T, H, W]`` side by side), ``stem-frames.png`` (final frames)."""
    from dfm_ext.recipes.kinetics.video_io import save_frame_strip, write_gif, write_mp4  # PyAV: only when writing

    scale = 2 if final.shape[-1] < 128 else 1
    video = side_by_side([*previews, final], scale=scale)
    if "mp4" in formats:
        write_mp4(video, stem.with_suffix(".mp4"), fps=fps)
    if "gif" in formats:
        write_gif(video, stem.with_suffix(".gif"), fps=fps)
    if "png" in formats:
        save_frame_strip(list(final), stem.with_name(stem.name + "-frames.png"), scale=scale)
