"""Helpers shared by the decompositions: shape checks, per-frame folding and resampling.

Private module: the public names live in ``laplacian``, ``wavelet`` and ``dct``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dfm_ext.decompositions.base import check_sample, check_stages, check_upto

__all__ = ["DOWN_MODES", "UP_MODES", "HALF_DTYPES", "check_shape", "check_divisible", "fold_frames", "unfold_frames", "resize_spatial", "resize_temporal", "full_shape_from_stage", "check_recompose_input", "same_float", "upcast"]

DOWN_MODES = ("area", "bilinear", "bicubic")
# Half-precision samples are decomposed in float32 and the stages cast back: bfloat16 has an
# 8-bit mantissa, so pooling sums, resampling kernels and DCT/DWT matrices applied in it would
# lose the exact inverse (recompose(decompose(x)) off by ~1e-2 relative).
HALF_DTYPES = (torch.float16, torch.bfloat16)
UP_MODES = ("nearest", "bilinear", "bicubic")


def check_shape(shape: object) -> tuple[int, ...]:
    """Validate a sample shape ``[B, C, H, W]`` or ``[B, C, T, H, W]`` given as a sequence of ints."""
    if isinstance(shape, Tensor) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of ints such as x.shape, got {type(shape).__name__}")
    try:
        if any(isinstance(d, bool) for d in shape):
            raise TypeError
        out = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must contain ints, got {tuple(shape)!r}") from None
    if len(out) not in (4, 5):
        raise ValueError(f"shape must be [B, C, H, W] or [B, C, T, H, W], got {out}")
    if any(d < 1 for d in out):
        raise ValueError(f"shape must have positive sizes, got {out}")
    return out


def check_divisible(shape: tuple[int, ...], dims: Sequence[int], factor: int, what: str) -> None:
    """Raise ``ValueError`` unless every size in ``dims`` is a positive multiple of ``factor``."""
    for d in dims:
        n = shape[d]
        if n < factor:
            raise ValueError(f"{what}: size {n} of the sample shape {shape} has fewer than {factor} pixels")
        if n % factor:
            raise ValueError(f"{what}: size {n} of the sample shape {shape} is not divisible by {factor}")


def fold_frames(x: Tensor) -> Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C*T, H, W]`` (a view when possible); images pass through.

    Every spatial operator used here acts on each channel independently, so folding time into
    channels applies it frame by frame without a permute.
    """
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        return x.reshape(b, c * t, h, w)
    return x


def unfold_frames(y: Tensor, like: Sequence[int]) -> Tensor:
    """Inverse of :func:`fold_frames`: restore ``[B, C, T, h, w]`` from ``[B, C*T, h, w]``."""
    if len(like) == 5:
        b, c, t = like[0], like[1], like[2]
        return y.reshape(b, c, t, *y.shape[-2:])
    return y


def resize_spatial(x: Tensor, size: tuple[int, int], mode: str, *, down: bool) -> Tensor:
    """Resample the last two dims of ``[N, C, H, W]`` to ``size`` (linear in ``x``).

    ``area`` with an integer factor is average pooling (the block mean); ``bilinear`` and
    ``bicubic`` downsampling use ``antialias=True`` so they low-pass before decimating.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if mode == "area":
        if h % size[0] == 0 and w % size[1] == 0:
            return F.avg_pool2d(x, (h // size[0], w // size[1]))
        return F.interpolate(x, size=size, mode="area")
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if down and size[1] == 1 and size[0] not in (1, h):
        # torch 2.13 (CPU) antialiased resize is wrong when the output width is 1 and the height
        # shrinks to more than 1 (every output row gets row 0's value, and gradcheck fails);
        # with H and W swapped it is right.
        y = F.interpolate(x.transpose(-1, -2), size=(1, size[0]), mode=mode, align_corners=False, antialias=True)
        return y.transpose(-1, -2)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=down)


def resize_temporal(x: Tensor, frames: int, mode: str, *, down: bool) -> Tensor:
    """Resample the time axis of a video ``[B, C, T, H, W]`` to ``frames`` frames.

    The video is viewed as a 2-D signal ``[B, C, T, H*W]`` and resampled along the first axis
    only (a 1-D resample with the same kernels as the spatial one; size along ``H*W`` unchanged,
    which is an exact identity for these kernels).
    """
    b, c, t, h, w = x.shape
    if t == frames:
        return x
    y = resize_spatial(x.reshape(b, c, t, h * w), (frames, h * w), mode, down=down)
    return y.reshape(b, c, frames, h, w)


def full_shape_from_stage(stage_shape: Sequence[int], num: Sequence[int], den: Sequence[int]) -> tuple[int, ...]:
    """Sample shape from one stage's shape, given that stage's size ratio ``num / den`` per dim.

    ``num`` and ``den`` cover the trailing dims (``(H, W)`` or ``(T, H, W)``).
    """
    shape = list(stage_shape)
    k = len(num)
    for i in range(k):
        d = len(shape) - k + i
        shape[d] = shape[d] * den[i] // num[i]
    return tuple(shape)


def check_recompose_input(
    stages: object,
    num_stages: int,
    stage_shapes_fn: Callable[[tuple[int, ...]], list[tuple[int, ...]]],
    ratio_fn: Callable[[int, int], tuple[Sequence[int], Sequence[int]]],
    *,
    upto: int | None = None,
) -> tuple[list[Tensor], tuple[int, ...]]:
    """Validate stages for ``recompose`` (all ``S``) or ``preview`` (``upto + 1`` to ``S``).

    Returns the stage list and the sample shape that stage 0's shape implies.
    """
    if isinstance(stages, Tensor) or not isinstance(stages, Sequence):
        raise TypeError(f"stages must be a list of {num_stages} tensors, got {type(stages).__name__}")
    n = len(stages)
    if upto is None:
        if n != num_stages:
            raise ValueError(f"expected {num_stages} stages, got {len(stages)}")
    else:
        check_upto(upto, num_stages)
        if not upto + 1 <= n <= num_stages:
            raise ValueError(
                f"preview(upto={upto}) needs stages 0..{upto} (a list of {upto + 1} to {num_stages} tensors), "
                f"got {n}"
            )
    first = check_sample(stages[0], name="stages[0]")
    num, den = ratio_fn(0, first.ndim)
    full = full_shape_from_stage(first.shape, num, den)
    expected = [s[1:] for s in stage_shapes_fn(full)][:n]
    stages = check_stages(stages, expected, n)
    for s in stages[1:]:
        same_float(s, stages[0])
    return stages, full


def same_float(x: Tensor, ref: Tensor) -> None:
    """Stages must share dtype and device (nothing is silently cast or moved)."""
    if x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(
            f"all stages must share dtype and device; got {x.dtype} on {x.device} and {ref.dtype} on {ref.device}"
        )


def upcast(stages: list[Tensor]) -> tuple[list[Tensor], torch.dtype | None]:
    """float16/bfloat16 stages -> float32 copies and the dtype to cast results back to (else ``None``)."""
    dtype = stages[0].dtype
    if dtype in HALF_DTYPES:
        return [s.float() for s in stages], dtype
    return stages, None
