"""``LaplacianPyramid``: the paper's decomposition (section 3.2, equation 2).

Stage ``s`` lives at the resolution of the input divided by ``factors[s]``. With
``d_s = down(x, f_s)`` (computed from ``x`` directly, so ``d_{S-1} = x``)::

    x_0 = d_0
    x_s = d_s - up(d_{s-1})                 for s >= 1

and the inverse accumulates ``xbar_0 = x_0``, ``xbar_s = up(xbar_{s-1}) + x_s``, so
``xbar_s = d_s``: the preview after stage ``s`` is exactly the configured downsampling of ``x``
and ``xbar_{S-1} = x``. Both ``down`` and ``up`` are linear, so the decomposition is linear.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dfm_ext.decompositions.resample import (
    DOWN_MODES,
    HALF_DTYPES,
    UP_MODES,
    check_divisible,
    check_shape,
    fold_frames,
    resize_spatial,
    resize_temporal,
    unfold_frames,
)
from dfm_ext.decompositions.base import check_sample, outside_autocast
from dfm_ext.decompositions.pyramid import ResidualPyramid

__all__ = ["LaplacianPyramid"]


def _check_factors(value: object, name: str, *, strict: bool) -> tuple[int, ...]:
    if isinstance(value, int | str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints such as (2, 1), got {value!r}")
    if any(isinstance(f, bool) or not isinstance(f, int) for f in value):
        raise TypeError(f"{name} must contain ints, got {tuple(value)!r}")
    out = tuple(value)
    if not out:
        raise ValueError(f"{name} must name at least one stage, got {out}")
    if any(f < 1 for f in out):
        raise ValueError(f"{name} must be positive, got {out}")
    if out[-1] != 1:
        raise ValueError(f"the last stage must be the full resolution: {name}[-1] must be 1, got {out}")
    pairs = list(zip(out, out[1:]))
    if strict and any(a <= b for a, b in pairs):
        raise ValueError(f"{name} must be strictly decreasing (coarse to fine), got {out}")
    if not strict and any(a < b for a, b in pairs):
        raise ValueError(f"{name} must be non-increasing (coarse to fine), got {out}")
    return out


class LaplacianPyramid(ResidualPyramid):
    """Laplacian pyramid over images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]``.

    Args:
        factors: per-stage spatial downsampling factor relative to the input, coarse to fine,
            strictly decreasing, ending at 1. ``(2, 1)`` (default): stage 0 at half resolution;
            ``(4, 1)``: 256 px -> 1024 px; ``(4, 2, 1)``: three stages. Factors need not divide
            each other, but ``H`` and ``W`` must be divisible by every factor.
        down: downsampling: ``"area"`` (block mean, default), ``"bilinear"`` or ``"bicubic"``
            (both antialiased).
        up: upsampling between stages: ``"nearest"``, ``"bilinear"`` (default) or ``"bicubic"``.
        temporal_factors: optional per-stage temporal factors for videos (non-increasing, ending
            at 1, e.g. ``(2, 1)``); ``None`` (default) resamples each frame spatially only.

    Shapes:
        ``decompose``: ``[B, C, H, W]`` -> ``[[B, C, H/f_0, W/f_0], ..., [B, C, H, W]]``;
        videos keep ``T`` (or get ``T/tf_s`` with ``temporal_factors``).

    Example:
        >>> import torch
        >>> pyr = LaplacianPyramid(factors=(4, 2, 1))
        >>> x = torch.randn(2, 3, 16, 24)
        >>> [tuple(s.shape) for s in pyr.decompose(x)]
        [(2, 3, 4, 6), (2, 3, 8, 12), (2, 3, 16, 24)]
        >>> torch.allclose(pyr.recompose(pyr.decompose(x)), x, atol=1e-6)
        True
        >>> coarse = pyr.decompose(x)[0]  # the block mean of x, exactly
        >>> torch.allclose(coarse, torch.nn.functional.avg_pool2d(x, 4))
        True
    """

    def __init__(
        self,
        factors: Sequence[int] = (2, 1),
        *,
        down: str = "area",
        up: str = "bilinear",
        temporal_factors: Sequence[int] | None = None,
    ) -> None:
        self.factors: tuple[int, ...] = _check_factors(factors, "factors", strict=True)
        if down not in DOWN_MODES:
            raise ValueError(f"down must be one of {DOWN_MODES}, got {down!r}")
        if up not in UP_MODES:
            raise ValueError(f"up must be one of {UP_MODES}, got {up!r}")
        self.down = down
        self.up = up
        self.temporal_factors: tuple[int, ...] | None = None
        if temporal_factors is not None:
            tf = _check_factors(temporal_factors, "temporal_factors", strict=False)
            if len(tf) != len(self.factors):
                raise ValueError(
                    f"temporal_factors {tf} must have one entry per stage, like factors {self.factors}"
                )
            self.temporal_factors = tf

    @property
    def num_stages(self) -> int:
        return len(self.factors)

    def _check(self, shape: tuple[int, ...]) -> None:
        for f in self.factors:
            check_divisible(shape, (-2, -1), f, f"{self!r}")
        if self.temporal_factors is not None:
            if len(shape) != 5:
                raise ValueError(
                    f"{self!r} has temporal_factors and needs a video [B, C, T, H, W]; got shape {shape}"
                )
            for f in self.temporal_factors:
                check_divisible(shape, (2,), f, f"{self!r} (time)")

    def _ratio(self, s: int, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Stage ``s`` size / sample size for the trailing dims, as ``(num, den)``."""
        if ndim == 5 and self.temporal_factors is not None:
            return (1, 1, 1), (self.temporal_factors[s], self.factors[s], self.factors[s])
        return (1, 1), (self.factors[s], self.factors[s])

    def stage_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Full stage shapes (with batch) for a sample of ``shape``.

        Example:
            >>> LaplacianPyramid((4, 1)).stage_shapes((8, 4, 32, 32))
            [(8, 4, 8, 8), (8, 4, 32, 32)]
        """
        shape = check_shape(shape)
        self._check(shape)
        out = []
        for s in range(self.num_stages):
            _, den = self._ratio(s, len(shape))
            k = len(den)
            out.append(shape[:-k] + tuple(n // d for n, d in zip(shape[-k:], den)))
        return out

    def _resample(self, x: Tensor, target: tuple[int, ...], *, down: bool) -> Tensor:
        """Resample ``x`` to the trailing sizes of ``target`` (linear)."""
        mode = self.down if down else self.up
        if x.ndim == 5 and x.shape[2] != target[2]:
            if down:
                # Low-pass space first: the temporal pass then runs on fewer pixels.
                x = self._resample_space(x, target, mode, down)
                return resize_temporal(x, target[2], mode, down=True)
            x = resize_temporal(x, target[2], mode, down=False)
        return self._resample_space(x, target, mode, down)

    @staticmethod
    def _resample_space(x: Tensor, target: tuple[int, ...], mode: str, down: bool) -> Tensor:
        size = (target[-2], target[-1])
        if tuple(x.shape[-2:]) == size:
            return x
        y = resize_spatial(fold_frames(x), size, mode, down=down)
        return unfold_frames(y, x.shape)

    @outside_autocast
    def decompose(self, x: Tensor) -> list[Tensor]:
        """Split ``x`` into ``S`` stages, coarse to fine (see the module docstring)."""
        x = check_sample(x)
        if x.dtype in HALF_DTYPES:
            return [s.to(x.dtype) for s in self.decompose(x.float())]
        shapes = self.stage_shapes(x.shape)
        d = [self._resample(x, shp, down=True) for shp in shapes]
        return [d[0]] + [d[s] - self._resample(d[s - 1], shapes[s], down=False) for s in range(1, len(d))]

    @staticmethod
    def _fold(x: Tensor) -> Tensor:
        return x  # resampling handles [B, C, T, H, W] itself

    @staticmethod
    def _unfold(y: Tensor, like: tuple[int, ...]) -> Tensor:
        return y

    def _upsample(self, xbar: Tensor, s: int, full: tuple[int, ...]) -> Tensor:
        return self._resample(xbar, self.stage_shapes(full)[s], down=False)

    def __repr__(self) -> str:
        extra = "" if self.temporal_factors is None else f", temporal_factors={self.temporal_factors}"
        return f"LaplacianPyramid(factors={self.factors}, down={self.down!r}, up={self.up!r}{extra})"
