"""``ResidualPyramid``: the recompose/preview that Laplacian, wavelet and DCT decompositions share.

All three split a sample into residuals ``x_0 = d_0``, ``x_s = d_s - up_s(d_{s-1})`` of
band-limited versions ``d_s`` at stage ``s``'s resolution, so all three invert the same way::

    xbar_0 = x_0,    xbar_s = up_s(xbar_{s-1}) + x_s,    recompose = xbar_{S-1}

and ``preview(stages, upto)`` is ``xbar_upto``. A subclass says what ``up_s`` is
(:meth:`ResidualPyramid._upsample`, on ``[N, C, H, W]`` frames unless it overrides
:meth:`ResidualPyramid._fold` / :meth:`ResidualPyramid._unfold`), how its stage shapes relate
to the sample's (``_ratio``, for :func:`check_recompose_input`) and ``stage_shapes``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dfm_ext.decompositions.base import outside_autocast
from dfm_ext.decompositions.resample import check_recompose_input, fold_frames, unfold_frames, upcast

__all__ = ["ResidualPyramid"]


class ResidualPyramid:
    """Base of the residual decompositions: ``recompose`` and ``preview`` from one ``_upsample``."""

    @property
    def num_stages(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def stage_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ratio(self, s: int, ndim: int) -> tuple[Sequence[int], Sequence[int]]:  # pragma: no cover - abstract
        """``(num, den)``: stage ``s``'s trailing dims are the sample's times ``num / den``."""
        raise NotImplementedError

    def _upsample(self, xbar: Tensor, s: int, full: tuple[int, ...]) -> Tensor:  # pragma: no cover - abstract
        """``up_s``: ``xbar_{s-1}`` (folded, see :meth:`_fold`) to stage ``s``'s resolution."""
        raise NotImplementedError

    @staticmethod
    def _fold(x: Tensor) -> Tensor:
        """Stage tensor -> the layout :meth:`_upsample` works on (default ``[N, C, H, W]`` frames)."""
        return fold_frames(x)

    @staticmethod
    def _unfold(y: Tensor, like: tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`_fold` (``like``: the sample shape)."""
        return unfold_frames(y, like)

    def _accumulate(self, stages: list[Tensor], full: tuple[int, ...]) -> Tensor:
        # Half precision: accumulate in float32, return the stages' dtype (see HALF_DTYPES).
        stages, back = upcast(stages)
        xbar = self._fold(stages[0])
        for s in range(1, len(stages)):
            xbar = self._upsample(xbar, s, full) + self._fold(stages[s])
        out = self._unfold(xbar, full)
        return out if back is None else out.to(back)

    @outside_autocast
    def recompose(self, stages: Sequence[Tensor]) -> Tensor:
        """Exact inverse of ``decompose``: ``xbar_s = up(xbar_{s-1}) + x_s``; returns ``xbar_{S-1}``."""
        stages, full = check_recompose_input(stages, self.num_stages, self.stage_shapes, self._ratio)
        return self._accumulate(stages, full)

    @outside_autocast
    def preview(self, stages: Sequence[Tensor], upto: int) -> Tensor:
        """``xbar_upto``: the sample from stages ``0..upto``, at stage ``upto``'s resolution.

        ``stages`` may be the full list or just its first ``upto + 1`` entries.
        """
        stages, full = check_recompose_input(stages, self.num_stages, self.stage_shapes, self._ratio, upto=upto)
        return self._accumulate(stages[: upto + 1], full)
