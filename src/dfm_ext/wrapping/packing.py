"""``ScalePacker``: put stages of different resolutions on one token grid, and back.

Summing per-stage patch embeddings equals one patch embedding over the stages packed side by
side: stage ``s`` of spatial size ``H_s x W_s`` with patch ``p_s`` is rearranged
space-to-depth onto the common grid ``(H_s / p_s, W_s / p_s)`` (channels ordered
``(c, i, j)``, exactly like a ``Conv2d`` weight ``[D, C, p, p]`` flattens, and like
``pixel_unshuffle``), and the stages' channels are concatenated. A linear layer over the packed
channels then computes ``sum_s Conv_s(x_s)``; a widened output projection unpacks the same way.

Videos ``[B, C, T, H, W]`` are packed per frame by default (temporal patch 1, as the paper
patchifies latent frames independently); a temporal patch can be given as ``(pt, ph, pw)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ScalePacker", "patch_sizes_for_grid"]

PatchSize = int | Sequence[int]  # p, (ph, pw) or (pt, ph, pw)


def _norm_patch(patch: PatchSize, spatial_rank: int) -> tuple[int, ...]:
    """Normalise a patch size to one entry per non-channel dim ((ph, pw) or (pt, ph, pw))."""
    if isinstance(patch, bool):
        raise TypeError(f"patch size must be an int or a tuple of ints, got {patch!r}")
    out: tuple[int, ...]
    if isinstance(patch, int):
        out = (patch, patch) if spatial_rank == 2 else (1, patch, patch)
    else:
        out = tuple(int(p) for p in patch)
        if spatial_rank == 3 and len(out) == 2:
            out = (1, *out)
    if len(out) != spatial_rank or any(p < 1 for p in out):
        raise ValueError(f"patch size {patch!r} is not valid for a sample with {spatial_rank} spatial dims")
    return out


def patch_sizes_for_grid(stage_shapes: Sequence[Sequence[int]], grid: Sequence[int]) -> list[tuple[int, ...]]:
    """Patch sizes that map every stage onto ``grid``.

    Args:
        stage_shapes: per-stage shapes without batch, ``(C, H, W)`` or ``(C, T, H, W)``.
        grid: the token grid ``(Gh, Gw)`` or ``(Gt, Gh, Gw)``.

    Raises:
        ValueError: a stage's size is not a positive multiple of the grid.

    Example:
        >>> patch_sizes_for_grid([(4, 16, 16), (4, 32, 32)], (16, 16))
        [(1, 1), (2, 2)]
    """
    grid = tuple(int(g) for g in grid)
    out = []
    for s, shape in enumerate(stage_shapes):
        dims = tuple(shape[1:])
        if len(dims) != len(grid):
            raise ValueError(f"stage {s} has spatial dims {dims}, the grid {grid} has {len(grid)} dims")
        patch = []
        for d, g in zip(dims, grid):
            if g < 1 or d % g != 0:
                raise ValueError(
                    f"stage {s} of size {dims} cannot be patchified onto the token grid {grid}: "
                    f"{d} is not a multiple of {g}"
                )
            patch.append(d // g)
        out.append(tuple(patch))
    return out


@dataclass(frozen=True)
class _StageLayout:
    channels: int
    patch: tuple[int, ...]

    @property
    def packed_channels(self) -> int:
        n = self.channels
        for p in self.patch:
            n *= p
        return n


class ScalePacker:
    """Packs stages onto a common token grid (space-to-depth + concat) and unpacks exactly.

    Args:
        stage_shapes: per-stage shapes without batch: ``(C_s, H_s, W_s)`` or ``(C_s, T_s, H_s, W_s)``.
        patch_sizes: per-stage patch size: an int (square spatial patch; temporal patch 1 for
            video), ``(ph, pw)``, or ``(pt, ph, pw)`` for video. Every stage must land on the
            same grid ``(H_s / ph_s, W_s / pw_s)``.

    Shapes:
        ``pack``: stages ``[B, C_s, H_s, W_s]`` -> ``[B, sum_s C_s*ph_s*pw_s, Gh, Gw]``.
        ``unpack``: the inverse.

    Example:
        >>> import torch
        >>> packer = ScalePacker([(4, 8, 8), (4, 16, 16)], [1, 2])
        >>> packer.grid, packer.packed_channels
        ((8, 8), 20)
        >>> stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16, 16)]
        >>> all(torch.equal(a, b) for a, b in zip(packer.unpack(packer.pack(stages)), stages))
        True
    """

    def __init__(self, stage_shapes: Sequence[Sequence[int]], patch_sizes: Sequence[PatchSize]):
        shapes = [tuple(int(d) for d in s) for s in stage_shapes]
        if not shapes:
            raise ValueError("stage_shapes must name at least one stage")
        if len(patch_sizes) != len(shapes):
            raise ValueError(f"got {len(patch_sizes)} patch sizes for {len(shapes)} stages")
        rank = len(shapes[0])
        if rank not in (3, 4) or any(len(s) != rank for s in shapes):
            raise ValueError(f"stage shapes must all be (C, H, W) or all (C, T, H, W), got {shapes}")
        spatial = rank - 1
        grid: tuple[int, ...] | None = None
        layouts = []
        for s, (shape, patch) in enumerate(zip(shapes, patch_sizes)):
            p = _norm_patch(patch, spatial)
            dims = shape[1:]
            if any(d % q for d, q in zip(dims, p)):
                raise ValueError(f"stage {s} of size {dims} is not divisible by its patch size {p}")
            g = tuple(d // q for d, q in zip(dims, p))
            if grid is None:
                grid = g
            elif g != grid:
                raise ValueError(
                    f"stage {s} of size {dims} with patch {p} gives the token grid {g}, "
                    f"but stage 0 gives {grid}; choose patch sizes that give one grid"
                )
            layouts.append(_StageLayout(shape[0], p))
        assert grid is not None  # shapes is non-empty, so the loop set it
        self.stage_shapes: list[tuple[int, ...]] = shapes
        self.patch_sizes: list[tuple[int, ...]] = [lay.patch for lay in layouts]
        self.grid: tuple[int, ...] = grid
        self._layouts = layouts

    @property
    def num_stages(self) -> int:
        return len(self._layouts)

    @property
    def stage_channels(self) -> list[int]:
        """Packed channels per stage, ``C_s * prod(patch_s)``."""
        return [lay.packed_channels for lay in self._layouts]

    @property
    def packed_channels(self) -> int:
        return sum(self.stage_channels)

    @property
    def num_tokens(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n

    def pack_stage(self, x: Tensor, s: int) -> Tensor:
        """Space-to-depth one stage: ``[B, C, *dims]`` -> ``[B, C * prod(patch), *grid]``."""
        lay = self._layouts[s]
        expected = self.stage_shapes[s]
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"stage {s} has shape {tuple(x.shape)}, expected [B, {', '.join(map(str, expected))}]")
        b = x.shape[0]
        split = [b, lay.channels]
        for g, p in zip(self.grid, lay.patch):
            split += [g, p]
        x = x.reshape(split)
        n = len(self.grid)
        # [B, C, g0, p0, g1, p1, ...] -> [B, C, p0, p1, ..., g0, g1, ...]
        perm = [0, 1] + [3 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)]
        return x.permute(perm).reshape(b, lay.packed_channels, *self.grid)

    def unpack_stage(self, y: Tensor, s: int) -> Tensor:
        """Inverse of :meth:`pack_stage`: ``[B, C * prod(patch), *grid]`` -> ``[B, C, *dims]``."""
        lay = self._layouts[s]
        b = y.shape[0]
        n = len(self.grid)
        y = y.reshape(b, lay.channels, *lay.patch, *self.grid)
        # [B, C, p0, p1, ..., g0, g1, ...] -> [B, C, g0, p0, g1, p1, ...]
        perm = [0, 1]
        for i in range(n):
            perm += [2 + n + i, 2 + i]
        return y.permute(perm).reshape(b, *self.stage_shapes[s])

    def pack(self, stages: Sequence[Tensor]) -> Tensor:
        """Pack all stages: list of ``[B, C_s, *dims_s]`` -> ``[B, packed_channels, *grid]``."""
        if isinstance(stages, Tensor) or len(stages) != self.num_stages:
            n = "a tensor" if isinstance(stages, Tensor) else len(stages)
            raise ValueError(f"expected a list of {self.num_stages} stages, got {n}")
        batch = {x.shape[0] for x in stages}
        if len(batch) != 1:
            raise ValueError(f"stages disagree on batch size: {[tuple(x.shape) for x in stages]}")
        return torch.cat([self.pack_stage(x, s) for s, x in enumerate(stages)], dim=1)

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """Unpack ``[B, packed_channels, *grid]`` into the list of stages."""
        if packed.ndim != 2 + len(self.grid) or tuple(packed.shape[1:]) != (self.packed_channels, *self.grid):
            raise ValueError(
                f"packed tensor has shape {tuple(packed.shape)}, expected [B, {self.packed_channels}, "
                f"{', '.join(map(str, self.grid))}]"
            )
        parts = torch.split(packed, self.stage_channels, dim=1)
        return [self.unpack_stage(p, s) for s, p in enumerate(parts)]

    def __repr__(self) -> str:
        return f"ScalePacker(stage_shapes={self.stage_shapes}, patch_sizes={self.patch_sizes}, grid={self.grid})"
