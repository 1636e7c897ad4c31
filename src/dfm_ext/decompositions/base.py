"""The ``Decomposition`` protocol: split a sample into coarse-to-fine stages and back.

A decomposition maps a sample ``x`` (images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]``)
to ``S`` stage tensors ``[x_0, ..., x_{S-1}]``, coarsest first, each in the spatial domain,
with an exact linear inverse ``recompose``. Stage ``s`` may have its own resolution
(``stage_shapes``). ``preview(stages, upto)`` rebuilds the sample from stages ``0..upto``
only, at stage ``upto``'s resolution: the low-resolution preview DFM shows while sampling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from dfm_ext.validation import check_index

__all__ = ["Decomposition", "check_sample", "check_stages", "check_upto", "outside_autocast"]

F = TypeVar("F", bound=Callable[..., Any])


def outside_autocast(method: F) -> F:
    """Run a decomposition's ``method`` with autocast off: a decomposition is exact linear algebra
    (``recompose(decompose(x)) == x`` to float32 rounding), which bf16 autocast would break
    (db2 wavelets or DCT bands at 2e-2 instead of 2e-7) when it runs inside a mixed-precision step."""

    @functools.wraps(method)
    def run(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        first = data if isinstance(data, Tensor) else next((t for t in data if isinstance(t, Tensor)), None)
        if first is None or not torch.is_autocast_enabled(first.device.type):
            return method(self, data, *args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return method(self, data, *args, **kwargs)

    return run  # type: ignore[return-value]


@runtime_checkable
class Decomposition(Protocol):
    """Coarse-to-fine, exactly invertible, linear decomposition of a sample into stages."""

    @property
    def num_stages(self) -> int:
        """Number of stages ``S``."""
        ...

    def decompose(self, x: Tensor) -> list[Tensor]:
        """Split ``x`` ``[B, C, H, W]`` (or ``[B, C, T, H, W]``) into ``S`` stages, coarse to fine."""
        ...

    def recompose(self, stages: Sequence[Tensor]) -> Tensor:
        """Exact inverse of :meth:`decompose`."""
        ...

    def stage_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Shapes of the stages that :meth:`decompose` returns for an input of ``shape``."""
        ...

    def preview(self, stages: Sequence[Tensor], upto: int) -> Tensor:
        """The sample rebuilt from stages ``0..upto`` only, at stage ``upto``'s resolution."""
        ...


def check_sample(x: object, *, name: str = "x") -> Tensor:
    """Validate a sample tensor: floating point, rank 4 (image) or 5 (video).

    Raises:
        TypeError: ``x`` is not a tensor or not floating point.
        ValueError: ``x`` has the wrong rank.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim not in (4, 5):
        raise ValueError(
            f"{name} must be an image [B, C, H, W] or a video [B, C, T, H, W]; got shape {tuple(x.shape)}"
        )
    return x


def check_stages(stages: object, expected: Sequence[Sequence[int]] | None, num_stages: int) -> list[Tensor]:
    """Validate a list of stage tensors against the number of stages and (optionally) shapes.

    ``expected`` holds the stage shapes without the batch dimension; the batch size must agree
    across stages.
    """
    if isinstance(stages, Tensor) or not isinstance(stages, Sequence):
        raise TypeError(f"stages must be a list of {num_stages} tensors, got {type(stages).__name__}")
    stages = list(stages)
    if len(stages) != num_stages:
        raise ValueError(f"expected {num_stages} stages, got {len(stages)}")
    for i, s in enumerate(stages):
        check_sample(s, name=f"stages[{i}]")
    batch = stages[0].shape[0]
    for i, s in enumerate(stages):
        if s.shape[0] != batch:
            raise ValueError(f"stages[{i}] has batch {s.shape[0]}, stages[0] has batch {batch}")
        if expected is not None and tuple(s.shape[1:]) != tuple(expected[i]):
            raise ValueError(
                f"stages[{i}] has shape {tuple(s.shape)}, expected [B, {', '.join(map(str, expected[i]))}]"
            )
    return stages


def check_upto(upto: object, num_stages: int) -> int:
    """Validate a stage index for ``preview``."""
    return check_index(upto, num_stages, "upto")
