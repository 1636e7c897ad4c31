r"""The DFM inference schedule: which stage moves when, as a pure function of its settings.

Sampling runs in ``S`` segments. Segment ``k`` has ``steps[k]`` steps; in it stages ``0..k``
are active and stage ``k`` (the *newest*) is the one being generated.

* Stage ``k`` moves from ``0`` to ``e_k``, where ``e_k = thresholds[k]`` for ``k < S - 1`` and
  ``e_{S-1} = 1``: with ``u = i / steps[k]`` the segment's progress at its step ``i``,
  ``t_k = e_k * w(u)``, where ``w`` is the identity or the time shift below.
* Every earlier stage ``j < k`` keeps its *remaining noise* ``1 - t_j`` proportional to the
  newest stage's remaining noise:

  .. math:: 1 - t_j(i) = (1 - a_j)\,(1 - t_k(i)),

  where ``a_j`` is stage ``j``'s time when segment ``k`` starts. In diffusers' terms, every
  active sigma is the newest stage's sigma times a constant. So earlier stages move monotonically,
  each at its own rate (linear in the step index when there is no shift), and reach exactly 1
  together with the last stage at the final step.
* Stage ``k + 1`` joins at ``t = 0`` in the row where stage ``k`` has just reached its threshold.

For two stages this is the paper's Figure 2a: stage 0 goes ``0 -> tau`` in ``steps[0]`` steps,
then stage 1 goes ``0 -> 1`` and stage 0 ``tau -> 1`` together in ``steps[1]`` steps. With one
stage it is the plain linear flow-matching schedule ``linspace(0, 1, N + 1)``.

Time shift (optional, SD3-style, ``shift > 0``): applied to each segment's progress ``u`` in the
*sigma* convention, ``sigma = 1 - u``, ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``,
``w(u) = 1 - sigma'``. ``shift > 1`` spends more steps near noise, as in SD3/Flux; the endpoints
``u = 0`` and ``u = 1`` are fixed, so thresholds are still hit exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from dfm_ext.validation import float_sequence

__all__ = ["StageScheduler", "shift_time"]


def shift_time(u: Tensor, shift: float) -> Tensor:
    """SD3-style time shift in flow time (``t = 0`` noise): ``1 - s*sigma / (1 + (s-1)*sigma)``, ``sigma = 1 - u``.

    Example:
        >>> import torch
        >>> shift_time(torch.tensor([0.0, 0.5, 1.0]), 3.0)
        tensor([0.0000, 0.2500, 1.0000])
    """
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    sigma = 1 - u
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


class StageScheduler:
    """Per-stage flow times for every sampling step.

    Args:
        steps: steps per segment, one entry per stage (``S = len(steps)``); each ``>= 1``.
        thresholds: ``S - 1`` times in ``(0, 1)``; ``thresholds[k]`` is the time stage ``k``
            reaches before stage ``k + 1`` joins. They need not increase: they belong to
            different stages.
        shift: optional SD3-style time shift applied to every segment (see the module docs).

    Example:
        >>> sched = StageScheduler(steps=(3, 2), thresholds=(0.9,))
        >>> sched.timesteps()
        tensor([[0.0000, 0.0000],
                [0.3000, 0.0000],
                [0.6000, 0.0000],
                [0.9000, 0.0000],
                [0.9500, 0.5000],
                [1.0000, 1.0000]])
        >>> sched.active_stage()
        tensor([0, 0, 0, 1, 1])
        >>> sched.boundaries
        (3, 5)
    """

    def __init__(
        self,
        steps: Sequence[int] = (30, 10),
        thresholds: Sequence[float] = (0.9,),
        shift: float | None = None,
    ) -> None:
        if isinstance(steps, int) and not isinstance(steps, bool):
            steps = (steps,)
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"steps must be an int or a sequence of ints, got {steps!r} ({type(steps).__name__})")
        steps = tuple(steps)
        if not steps:
            raise ValueError("steps must name at least one segment")
        for k, n in enumerate(steps):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"steps[{k}] must be an int >= 1, got {n!r} (steps={steps})")
        thresholds = float_sequence(thresholds, "thresholds", finite=False)
        if len(thresholds) != len(steps) - 1:
            raise ValueError(
                f"{len(steps)} stages need {len(steps) - 1} thresholds, got {len(thresholds)}: {thresholds}"
            )
        for k, tau in enumerate(thresholds):
            if not 0.0 < tau < 1.0:
                raise ValueError(f"thresholds[{k}] must lie strictly between 0 and 1, got {tau}")
        if shift is not None:
            if isinstance(shift, bool) or not isinstance(shift, numbers.Real):
                raise TypeError(f"shift must be a number or None, got {shift!r} ({type(shift).__name__})")
            shift = float(shift)
            if not (math.isfinite(shift) and shift > 0):
                raise ValueError(f"shift must be a positive finite number or None, got {shift!r}")
        self.steps: tuple[int, ...] = steps
        self.thresholds: tuple[float, ...] = thresholds
        self.shift: float | None = shift

    @classmethod
    def default(cls, num_stages: int) -> StageScheduler:
        """The paper's default: 30 steps for stage 0, 10 per later stage, thresholds 0.9 (40 steps for one stage).

        Example:
            >>> StageScheduler.default(2)
            StageScheduler(steps=(30, 10), thresholds=(0.9,), shift=None)
        """
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if num_stages == 1:
            return cls(steps=(40,), thresholds=())
        return cls(steps=(30,) + (10,) * (num_stages - 1), thresholds=(0.9,) * (num_stages - 1))

    @property
    def num_stages(self) -> int:
        return len(self.steps)

    @property
    def num_steps(self) -> int:
        """Total number of steps ``N``."""
        return sum(self.steps)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Row of :meth:`timesteps` where each segment ends (stage ``k`` at its threshold, or all at 1)."""
        out, total = [], 0
        for n in self.steps:
            total += n
            out.append(total)
        return tuple(out)

    def timesteps(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """Flow times ``[N + 1, S]``: row ``i`` holds every stage's time before step ``i`` (row ``N``: all 1).

        Computed in float64 and cast to ``dtype``; row 0 is all zeros and row ``N`` all ones, exactly.
        """
        s = self.num_stages
        rows = [torch.zeros(s, dtype=torch.float64)]
        start = torch.zeros(s, dtype=torch.float64)
        for k, n in enumerate(self.steps):
            end = self.thresholds[k] if k < s - 1 else 1.0
            u = torch.arange(1, n + 1, dtype=torch.float64) / n
            if self.shift is not None:
                u = shift_time(u, self.shift)
            newest = end * u  # [n]; exactly `end` at the last step since u == 1 there
            seg = torch.zeros(n, s, dtype=torch.float64)
            seg[:, k] = newest
            # Earlier stages: remaining noise proportional to the newest stage's.
            seg[:, :k] = 1 - (1 - start[:k])[None, :] * (1 - newest)[:, None]
            rows.extend(seg)
            start = seg[-1].clone()
        table = torch.stack(rows)
        return table.to(dtype=dtype, device=device)

    def active_stage(self, device: torch.device | str | None = None) -> Tensor:
        """The stage being generated at each step, long ``[N]``."""
        return torch.repeat_interleave(
            torch.arange(self.num_stages, device=device), torch.tensor(self.steps, device=device)
        )

    def __repr__(self) -> str:
        return f"StageScheduler(steps={self.steps}, thresholds={self.thresholds}, shift={self.shift})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StageScheduler):
            return NotImplemented
        return (self.steps, self.thresholds, self.shift) == (other.steps, other.thresholds, other.shift)

    def __hash__(self) -> int:
        return hash((self.steps, self.thresholds, self.shift))
