"""What :class:`~dfm_ext.process.timesteps.StageTimestepSampler` needs of a stage allocation (typing only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["PerSampleAllocation", "StageAllocation"]


class StageAllocation(Protocol):
    """What :class:`StageTimestepSampler` needs of a stage allocation (e.g.
    :class:`~dfm_ext.process.allocation.ProgressAllocation`); a ``num_stages`` attribute, when
    present, is checked against the sampler's."""

    def probabilities(self, device: torch.device | str | None = None) -> Tensor:
        """The stage probabilities ``[S]`` to draw the current stage from."""
        ...

    def update(self, per_stage_loss: Tensor) -> None:
        """Take one step's ``[S]`` per-stage losses."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        ...


class PerSampleAllocation(StageAllocation, Protocol):
    """An allocation that also reads each sample's loss and places the current stage's time by bins
    (:class:`~dfm_ext.process.reducible.ReducibleAllocation`): ``needs_samples`` is true."""

    needs_samples: bool
    num_time_bins: int

    def time_weights(self, device: torch.device | str | None = None) -> Tensor:
        """``[S, J]`` probabilities of the current time's bins, per stage."""
        ...

    def update(self, per_stage_loss: Tensor, *, stage: Tensor, bins: Tensor, errors: Tensor) -> None:  # type: ignore[override]
        """Take one step's per-stage losses and its samples' stages, time bins and losses ``[B]``."""
        ...
