"""``IdentityDecomposition``: one stage, the sample itself. Plain Flow Matching is DFM with it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dfm_ext.decompositions.base import check_sample, check_stages, check_upto

__all__ = ["IdentityDecomposition"]


class IdentityDecomposition:
    """A single stage equal to the input: the Flow Matching baseline.

    Example:
        >>> import torch
        >>> d = IdentityDecomposition()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(d.recompose(d.decompose(x)), x)
        True
    """

    num_stages = 1

    def decompose(self, x: Tensor) -> list[Tensor]:
        return [check_sample(x)]

    def recompose(self, stages: Sequence[Tensor]) -> Tensor:
        return check_stages(stages, None, 1)[0]

    def stage_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (4, 5):
            raise ValueError(f"shape must be [B, C, H, W] or [B, C, T, H, W], got {shape}")
        return [shape]

    def preview(self, stages: Sequence[Tensor], upto: int) -> Tensor:
        check_upto(upto, 1)
        return self.recompose(stages)

    def __repr__(self) -> str:
        return "IdentityDecomposition()"
