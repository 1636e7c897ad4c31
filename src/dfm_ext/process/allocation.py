r"""Automatic stage allocation: stage probabilities set during training, without a hand-tuned ``p0``.

The paper trains stage ``k`` as the current stage with fixed probabilities (``(0.9, 0.1)`` for
two stages) and says in its limitations that this split must be tuned; at small budgets a lower
``p0`` wins, at large ones a higher one. :class:`ProgressAllocation` moves the probabilities
towards the stages where one more training sample buys the most loss decrease, measured from the
per-stage losses the training step already computes (no extra forward pass):

.. math::

    f_s \leftarrow \beta_f f_s + (1 - \beta_f) \ell_s, \qquad
    g_s \leftarrow \beta_g g_s + (1 - \beta_g) \ell_s \qquad (\text{only when stage } s \text{ was active}),

    r_s = \max(0, (g_s - f_s) / g_s), \qquad
    q_s = \phi + (1 - S \phi) \, \frac{\pi_s (r_s + \epsilon) / p_s}{\sum_j \pi_j (r_j + \epsilon) / p_j},
    \qquad p_s \leftarrow (1 - \lambda) p_s + \lambda q_s,

where ``l_s`` is stage ``s``'s mean loss on the batch, ``f`` / ``g`` a fast and a slow moving
average (``r_s`` is the recent relative loss decrease, "learning progress"), ``pi`` the prior
(the paper's default probabilities), ``phi`` a floor so no stage is ever starved, ``lambda`` a
small rate. Dividing by the current ``p_s`` makes it progress *per sample given to the stage*:
without it a stage that gets more batches would progress faster and take even more (a
rich-get-richer loop). Without the floor the fixed point is ``p_s ~ sqrt(pi_s (r_s + eps))``.
Until every stage has been seen ``warmup`` times ``p`` stays at the prior.

Everything is a tensor on the training device, updated with tensor operations only: no
``.item()`` or host sync is added to the step. The state is a few ``[S]`` tensors
(:meth:`ProgressAllocation.state_dict`), so a resumed run continues exactly.

:func:`signal_level_locations` is the "no tuning" rule for per-stage time locations: stage ``s``'s
signal ``t sigma_s`` equals the unit noise ``1 - t`` at ``t_s = 1 / (1 + sigma_s)``; placing each
stage's current-stage logit-normal so that its median sits at the same *relative* position gives
``loc_s = loc_0 + ln(sigma_0 / sigma_s)``.

:class:`~dfm_ext.process.reducible.ReducibleAllocation` (``"reducible"``) reads where the loss is
still falling, per stage *and* per range of each stage's own time (:mod:`dfm_ext.process.reducible`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dfm_ext.process.reducible import ReducibleAllocation, check_prior

__all__ = ["ALLOCATIONS", "ProgressAllocation", "make_allocation", "signal_level_locations"]

#: The allocation kinds :func:`make_allocation` builds (besides ``"fixed"``: none).
ALLOCATIONS = ("progress", "reducible")


def signal_level_locations(scales: Sequence[float] | Tensor, base: float = 0.0) -> tuple[float, ...]:
    """Per-stage logit-normal locations from measured stage signal levels ``sigma_s``.

    ``loc_s = base + ln(sigma_0 / sigma_s)``: the time at which a stage's signal equals unit noise
    is ``1 / (1 + sigma_s)``, whose logit is ``-ln(sigma_s)``; stage 0 keeps ``base``.

    Args:
        scales: ``[S]`` positive per-stage standard deviations (``estimate_stage_scales``).
        base: stage 0's location (the paper's current-stage location is 0).

    Raises:
        ValueError: a scale that is not finite and positive.

    Example:
        >>> [round(v, 3) for v in signal_level_locations([0.57, 0.085])]
        [0.0, 1.903]
    """
    values = [float(v) for v in (scales.tolist() if isinstance(scales, Tensor) else scales)]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"scales must be finite and positive, got {values}")
    return tuple(base + math.log(values[0] / v) for v in values)


class ProgressAllocation:
    """Stage probabilities from each stage's recent learning progress (see the module docstring).

    Args:
        prior: ``[S]`` probabilities used during warm-up and as the prior ``pi`` (default
            :func:`~dfm_ext.process.timesteps.default_stage_probabilities`).
        fast / slow: decays ``beta_f < beta_g`` of the two moving averages of each stage's loss.
        floor: minimum probability ``phi`` of each stage (``S * floor < 1``).
        warmup: updates with the stage active before the prior is left.
        eps: added to every progress value (so a plateau of all stages falls back to the prior).
        rate: ``lambda``, how far ``p`` moves towards the target per update.

    Example:
        >>> import torch
        >>> a = ProgressAllocation((0.9, 0.1), warmup=1)
        >>> a.probabilities().tolist()
        [0.9, 0.1]
        >>> for loss in (1.0, 0.5, 0.25):
        ...     a.update(torch.tensor([loss, float("nan")]))  # stage 1 never active: keeps learning nothing
        >>> round(float(a.probabilities().sum()), 6)
        1.0
    """

    kind = "progress"

    def __init__(
        self,
        prior: Sequence[float] | None = None,
        *,
        num_stages: int | None = None,
        fast: float = 0.98,
        slow: float = 0.998,
        floor: float = 0.05,
        warmup: int = 200,
        eps: float = 1e-3,
        rate: float = 0.01,
    ) -> None:
        prior = check_prior(prior, num_stages)
        if not 0.0 <= fast < slow < 1.0:
            raise ValueError(f"need 0 <= fast < slow < 1, got fast={fast}, slow={slow}")
        s = len(prior)
        if not 0.0 <= floor or s * floor >= 1.0:
            raise ValueError(f"floor must be >= 0 with num_stages * floor < 1, got floor={floor} for {s} stages")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be finite and positive, got {eps}")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.rate = float(rate)
        self.num_stages = s
        self.prior_values = prior
        self.fast, self.slow, self.floor, self.warmup, self.eps = float(fast), float(slow), float(floor), warmup, float(eps)
        self._fast = torch.zeros(s, dtype=torch.float64)
        self._slow = torch.zeros(s, dtype=torch.float64)
        self._count = torch.zeros(s, dtype=torch.float64)
        self._prior = torch.tensor(prior, dtype=torch.float64)
        self._p = self._prior.clone()

    def _to(self, device: torch.device) -> None:
        if self._fast.device != device:
            self._fast, self._slow = self._fast.to(device), self._slow.to(device)
            self._count, self._prior, self._p = self._count.to(device), self._prior.to(device), self._p.to(device)

    @torch.no_grad()
    def update(self, per_stage_loss: Tensor) -> None:
        """Fold one step's ``[S]`` per-stage losses in (``NaN`` = stage not active: no change)."""
        loss = per_stage_loss.detach().to(torch.float64)
        self._to(loss.device)
        seen = torch.isfinite(loss)
        value = torch.where(seen, loss, torch.zeros_like(loss))
        first = seen & (self._count == 0)
        # The first observation initialises both averages, so progress starts at 0 rather than at 1.
        fast = torch.where(first, value, self.fast * self._fast + (1 - self.fast) * value)
        slow = torch.where(first, value, self.slow * self._slow + (1 - self.slow) * value)
        self._fast = torch.where(seen, fast, self._fast)
        self._slow = torch.where(seen, slow, self._slow)
        self._count = self._count + seen.to(torch.float64)
        weight = self._prior * (self.progress() + self.eps) / self._p
        target = self.floor + (1 - self.num_stages * self.floor) * weight / weight.sum()
        ready = (self._count >= self.warmup).all()
        self._p = torch.where(ready, (1 - self.rate) * self._p + self.rate * target, self._p)

    def progress(self) -> Tensor:
        """``[S]`` recent relative loss decrease ``r_s`` (float64)."""
        return ((self._slow - self._fast) / self._slow.clamp_min(1e-12)).clamp_min(0.0)

    def probabilities(self, device: torch.device | str | None = None) -> Tensor:
        """``[S]`` float64 stage probabilities for the next batch (on ``device``)."""
        if device is not None:
            self._to(torch.device(device))
        return self._p.clone()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings; ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return {"kind": self.kind, "fast_avg": self._fast.cpu().clone(), "slow_avg": self._slow.cpu().clone(),
                "count": self._count.cpu().clone(), "p": self._p.cpu().clone(), "prior": list(self.prior_values),
                "settings": {"fast": self.fast, "slow": self.slow, "floor": self.floor, "warmup": self.warmup,
                             "eps": self.eps, "rate": self.rate}}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the settings must agree)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for allocation {state.get('kind')!r}, not {self.kind!r}")
        mine = self.state_dict()["settings"]
        if dict(state["settings"]) != mine or list(state["prior"]) != list(self.prior_values):
            raise ValueError(f"allocation settings differ: saved {dict(state['settings'])} prior {state['prior']}, "
                             f"this one {mine} prior {list(self.prior_values)}")  # fmt: skip
        device = self._fast.device
        self._fast = state["fast_avg"].to(device, torch.float64).clone()
        self._slow = state["slow_avg"].to(device, torch.float64).clone()
        self._count = state["count"].to(device, torch.float64).clone()
        self._p = state["p"].to(device, torch.float64).clone()

    def __repr__(self) -> str:
        return (f"ProgressAllocation(prior={self.prior_values}, fast={self.fast}, slow={self.slow}, "
                f"floor={self.floor}, warmup={self.warmup}, rate={self.rate})")  # fmt: skip


def make_allocation(
    spec: str | Mapping[str, Any] | None, num_stages: int, prior: Sequence[float] | None = None
) -> ProgressAllocation | ReducibleAllocation | None:
    """Build an allocation from a config value: ``None``/``"fixed"`` (none), ``"progress"``,
    ``"reducible"``, or ``{"kind": ..., ...options}``.

    Raises:
        ValueError: an unknown kind, naming it and the choices.
    """
    if spec is None or spec == "fixed":
        return None
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        spec = options.pop("kind", None)
    if spec not in ALLOCATIONS:
        raise ValueError(f"unknown stage allocation {spec!r}; choose one of {('fixed', *ALLOCATIONS)}")
    cls = ReducibleAllocation if spec == "reducible" else ProgressAllocation
    return cls(prior, num_stages=num_stages, **options)
