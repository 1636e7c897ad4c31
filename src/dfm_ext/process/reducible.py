"""The reducible allocation: stage probabilities and current-time placement from where the loss still falls.

:class:`ReducibleAllocation` (``dfm.allocation: reducible``) reads the per-sample losses of the
current stage (:func:`stage_errors`), per stage and per range of that stage's own time, measures
the loss decrease per sample over a fixed recent span, and moves both which stage is trained and
where its time is drawn towards what still improves (the rule is in the class docstring). Tensor
operations only: nothing is read back to the host in the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ReducibleAllocation", "stage_errors"]


def stage_errors(output: Any) -> Tensor:
    """``[B, S]`` per-sample, per-stage mean squared error of a :class:`~dfm_ext.process.objective.DFMLossOutput`.

    ``e[b, s] = mean_elements((prediction_s - target_s)^2)[b]``, detached, float32 or wider: the
    per-sample terms the objective sums (before stage weights). Entries of masked stages are
    computed too but mean nothing; :class:`ReducibleAllocation` reads only the current stage's.
    Tensor operations only (no host read).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> out = SimpleNamespace(prediction=[torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 4, 4)],
        ...                       target=[torch.zeros(2, 1, 2, 2), torch.full((2, 1, 4, 4), 2.0)])
        >>> stage_errors(out).tolist()
        [[1.0, 4.0], [1.0, 4.0]]
    """
    predictions, targets = output.prediction, output.target
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    with torch.no_grad():
        return torch.stack(
            [(p.detach().float() - v.detach().float()).pow(2).flatten(1).mean(1) for p, v in zip(predictions, targets)], 1
        )


def check_prior(prior: Sequence[float] | None, num_stages: int | None) -> tuple[float, ...]:
    """An allocation's ``[S]`` start probabilities: ``prior`` checked (positive, finite, summing to
    1, ``num_stages`` entries when both are given), or the sampler's defaults for ``num_stages``."""
    if prior is None:
        from .timesteps import default_stage_probabilities  # timesteps imports the allocations

        if num_stages is None:
            raise ValueError("give prior or num_stages")
        prior = default_stage_probabilities(num_stages)
    prior = tuple(float(p) for p in prior)
    if num_stages is not None and len(prior) != num_stages:
        raise ValueError(f"prior has {len(prior)} entries for {num_stages} stages: {prior}")
    if any(not math.isfinite(p) or p <= 0 for p in prior) or abs(sum(prior) - 1) > 1e-6:
        raise ValueError(f"prior must be positive probabilities summing to 1, got {prior}")
    return prior


def _project_floor(p: Tensor, floor: float) -> Tensor:
    """``p`` (``[..., N]``, positive, summing to 1 along the last axis) with every entry raised to
    at least ``floor`` and the others scaled down to keep the sum; entries already above the floor
    keep their ratios. ``N`` passes, tensor operations only."""
    pinned = torch.zeros_like(p, dtype=torch.bool)
    for _ in range(p.shape[-1]):  # the pinned set only grows, so N passes reach the fixed point
        pinned = pinned | (p < floor)
        n_pinned = pinned.sum(-1, keepdim=True).to(p.dtype)
        rest = torch.where(pinned, torch.zeros_like(p), p)
        rest_sum = rest.sum(-1, keepdim=True).clamp_min(1e-300)
        p = torch.where(pinned, torch.full_like(p, floor), rest * (1 - floor * n_pinned) / rest_sum)
    return p


class ReducibleAllocation:
    r"""Stage probabilities *and* current-stage time placement from where the loss still falls.

    What it reads: the per-sample loss of each sample's **current** stage ``k`` (the stage being
    generated, :func:`stage_errors`), sorted into cells ``(k, j)`` by the time bin ``j`` of
    ``t_k``. The ``J`` bins are equal-probability bins of the stage's *base* current-time
    distribution (the sampler's logit-normal ``(loc_k, scale_k)``: bin ``j`` holds the times whose
    base quantile ``u = Phi((logit t - loc_k) / scale_k)`` lies in ``[j / J, (j + 1) / J)``), so a
    cell's mean loss is that stage's loss over a fixed range of its time whatever this allocation
    does, and the stage's loss under its base distribution is ``L_k = (1/J) sum_j m_{k,j}``.

    After ``warmup`` updates (the first, steepest part of training says nothing about which
    stage is still learning), every ``window`` updates close a window; its per-cell sums and
    counts go into a ring of the last ``windows = K`` windows. Once the ring is full, each closed
    window refits, per cell, the least-squares slope of the loss against the window index, every
    sample weighing the same (a fixed recent span of ``K * window`` updates; nothing older is
    remembered), and turns it into a gain per sample:

    .. math::

        \delta_{k,j} = -\operatorname{slope}_{k,j}, \qquad
        \bar n_{k,j} = \tfrac{1}{K} \textstyle\sum_w n_{w,k,j}, \qquad
        g_{k,j} = \frac{\delta_{k,j}}{J \, \bar n_{k,j}}, \qquad
        G_k = \frac{\sum_j \delta_{k,j} / J}{\sum_j \bar n_{k,j}},

    ``delta`` the loss decrease per window, ``n-bar`` the samples the cell received per window,
    so ``g`` / ``G`` are the decrease of the stage's base-weighted loss **per sample given to
    that bin / stage**: what one more training sample there buys now. The targets are the prior
    ``pi`` reweighted by the gains (for the bins the prior is the base distribution, ``1/J``
    each), and ``p`` / ``w`` move a share ``lambda`` (``rate``) of the way to them at each window:

    .. math::

        p \leftarrow (1 - \lambda) p + \lambda \, \Pi_\phi\Big(\frac{\pi G^+}{\sum_i \pi_i G_i^+}\Big), \qquad
        w_k \leftarrow (1 - \lambda) w_k + \lambda \Big(\frac{\beta}{J} + (1 - \beta)
        \frac{g_k^+}{\sum_j g_{k,j}^+}\Big),

    ``Pi_phi`` renormalises with every stage at least ``phi`` (``floor``), ``beta`` (``time_floor``)
    is the share of the base distribution every bin keeps (so every time range the sampler will
    visit stays trained); where no gain is positive the target is the current value (no move).
    The current stage's time is then drawn with bin probabilities ``w_k`` (uniform inside a bin,
    in base quantile) instead of ``1/J`` each:
    :class:`~dfm_ext.process.timesteps.StageTimestepSampler` does this with the same random
    numbers it draws anyway.

    Why this rule (from the study of issue 16 on :class:`ProgressAllocation`, and the toy
    learners of ``tests/test_allocation_reducible.py``):

    * **A fixed recent span, started after warm-up**: ``ProgressAllocation``'s slow average still
      held the first losses at 500 steps, so every stage looked equally "in progress".
    * **Gain per sample**: a stage that gets more batches does not look better just for that (its
      decrease is divided by its samples), and with equal gains per sample the target is the
      prior itself: nothing moves ``p`` that the data did not say (``ProgressAllocation``'s
      ``pi / p`` target drifts to ``sqrt(prior)`` whatever the data).
    * **The prior as importance**: the loss of the coarse stage and of the fine stage are not
      worth the same to a sample (the fine stage is generated on top of the coarse one; the
      paper's 0.9 / 0.1 says so), so the gains reweight the prior rather than replace it. On the
      colour crops the fine stage's gain per sample was 6-12x the coarse stage's between steps
      300 and 450 (seed 0): gains alone (target ``G / sum G``) drove ``p0`` from 0.9 towards 0.15,
      far below anything the study measured as good; ``pi G`` puts it near 0.5-0.6 with such gains
      (the study's best fixed ``p0`` at short budgets) and back towards the prior as the fine
      stage's gain falls with training.
    * **Proportional, not multiplicative**: a multiplicative step ``p * (G / mean G)^eta``
      integrates the gain difference; the gains react to ``p`` only through the samples
      accumulated since, so it overshot and swung between the floors in the toy learners.
      A target that is a function of the current gains is a first-order feedback: a stage
      that is behind gets more until it catches up, then less.
    * **Time bins**: the study found that *where* the fine stage's time is drawn decides more
      than ``p0`` on some data (the fine-stage shift helped the held-out video frames and hurt
      Fashion-MNIST, where its untrained noisy end left salt-and-pepper speckle); the bins let
      the data say, and ``time_floor`` keeps that share of the base distribution everywhere.
    * **Noise**: the gains are slopes of noisy per-sample losses; the span (``K`` windows) and the
      small ``rate`` average it out. A threshold at a few standard errors was tried in the toy
      learners and made it worse (late in training every gain is within the noise, and whichever
      crossed the threshold took everything), so there is none: a stage whose loss is flat keeps
      only what the positive part of its noise earns, which is small while another stage still
      learns (``test_a_stage_whose_loss_stops_falling_loses_probability``).
    * The decrease is in the objective's own units (per-element MSE), where the step spends its
      gradient. A cell with fewer than two windows with samples in the span has gain 0.

    Everything is a tensor on the training device, updated with tensor operations only (no
    ``.item()``, no ``nonzero``, no data-dependent Python branch: the window clock is a host
    counter of :meth:`update` calls); sums use one-hot reductions, not atomics, so a GPU run is
    deterministic too. :meth:`state_dict` holds the ring, the clock and ``p`` / ``w``, so a resumed
    run continues exactly.

    Args:
        prior: ``[S]`` start probabilities (default
            :func:`~dfm_ext.process.timesteps.default_stage_probabilities`).
        num_stages: ``S`` when ``prior`` is not given (checked against it when both are).
        time_bins: ``J``; 1 moves only the stage probabilities.
        warmup: updates before the first window opens.
        window: updates per window.
        windows: ``K``, windows in the span the slope is fitted on (>= 2).
        rate: ``lambda`` in ``(0, 1]``, the share of the way to the target per window.
        floor: ``phi``, the least probability of a stage (``S * floor < 1``).
        time_floor: ``beta`` in ``(0, 1]``, the share of the base distribution every bin keeps
            (1: times are never moved).

    Example:
        >>> import torch
        >>> a = ReducibleAllocation((0.9, 0.1), time_bins=2, warmup=0, window=2, windows=2)
        >>> stage, bins = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
        >>> for i in range(8):  # stage 1's loss falls in its bin 1 only; stage 0's is flat
        ...     a.update(None, stage=stage, bins=bins, errors=torch.tensor([1.0, 1.0, 1.0, 1.0 - 0.1 * i]))
        >>> bool(a.probabilities()[1] > 0.1), bool(a.time_weights()[1, 1] > 0.5)
        (True, True)
    """

    kind = "reducible"
    #: :class:`~dfm_ext.process.timesteps.StageTimestepSampler` passes ``stage``, ``bins`` and
    #: ``errors`` (per-sample current-stage losses) to :meth:`update`, and draws times by :meth:`time_weights`.
    needs_samples = True

    def __init__(
        self,
        prior: Sequence[float] | None = None,
        *,
        num_stages: int | None = None,
        time_bins: int = 4,
        warmup: int = 100,
        window: int = 25,
        windows: int = 8,
        rate: float = 0.15,
        floor: float = 0.05,
        time_floor: float = 0.5,
    ) -> None:
        prior = check_prior(prior, num_stages)
        s = len(prior)
        for name, value, low in (("time_bins", time_bins, 1), ("warmup", warmup, 0), ("window", window, 1),
                                 ("windows", windows, 2)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        if not (0.0 <= floor and s * floor < 1.0):
            raise ValueError(f"floor must be >= 0 with num_stages * floor < 1, got floor={floor} for {s} stages")
        if any(p < floor for p in prior):
            raise ValueError(f"prior {prior} has a stage below floor={floor}")
        if not 0.0 < time_floor <= 1.0:
            raise ValueError(f"time_floor must be in (0, 1], got {time_floor}")
        self.num_stages, self.prior_values, self.num_time_bins = s, prior, time_bins
        self.warmup, self.window, self.windows = warmup, window, windows
        self.rate, self.floor, self.time_floor = float(rate), float(floor), float(time_floor)
        self.calls = 0  # host clock: updates so far (the window schedule depends on nothing else)
        f64 = torch.float64
        self._sums = torch.zeros(windows, s, time_bins, dtype=f64)
        self._counts = torch.zeros(windows, s, time_bins, dtype=f64)
        self._p = torch.tensor(prior, dtype=f64)
        self._w = torch.full((s, time_bins), 1.0 / time_bins, dtype=f64)
        self._gain = torch.zeros(s, dtype=f64)  # last G_k (for logging)
        self._bin_gain = torch.zeros(s, time_bins, dtype=f64)  # last g_{k,j} (for logging)

    def _to(self, device: torch.device) -> None:
        if self._p.device != device:
            for name in ("_sums", "_counts", "_p", "_w", "_gain", "_bin_gain"):
                setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(self, per_stage_loss: Tensor | None = None, *, stage: Tensor, bins: Tensor, errors: Tensor) -> None:
        """Fold one step in.

        Args:
            per_stage_loss: unused (the :class:`~dfm_ext.process.timesteps.StageAllocation`
                protocol's argument); the cells need the per-sample losses below.
            stage: ``[B]`` long, each sample's current stage.
            bins: ``[B]`` long in ``[0, J)``, the base-quantile bin of its current time
                (:meth:`~dfm_ext.process.timesteps.StageTimestepSampler.time_bins`).
            errors: ``[B]`` the current stage's per-sample loss (non-finite entries are skipped).

        Raises:
            ValueError: shapes that do not agree (checked on shapes only: no host read).
        """
        if stage.ndim != 1 or bins.shape != stage.shape or errors.shape != stage.shape:
            raise ValueError(f"stage, bins and errors must all be [B]; got {tuple(stage.shape)}, "
                             f"{tuple(bins.shape)}, {tuple(errors.shape)}")  # fmt: skip
        self.calls += 1
        step = self.calls - 1 - self.warmup  # updates since the first window opened
        if step < 0:
            return
        device = errors.device
        self._to(device)
        slot = (step // self.window) % self.windows
        if step % self.window == 0:  # a new window: its slot forgets the window K ago
            self._sums[slot] = 0.0
            self._counts[slot] = 0.0
        j = self.num_time_bins
        e = errors.detach().to(torch.float64)
        seen = torch.isfinite(e)
        cell = (stage.to(device) * j + bins.to(device).clamp(0, j - 1)).long()
        # one-hot sums, not index_add_/scatter_add_: those use atomics on a GPU (run-to-run float differences)
        onehot = (cell[:, None] == torch.arange(self.num_stages * j, device=device)[None, :]) & seen[:, None]
        onehot = onehot.to(torch.float64)
        value = torch.where(seen, e, 0.0)[:, None]
        self._sums[slot] += (onehot * value).sum(0).view(self.num_stages, j)
        self._counts[slot] += onehot.sum(0).view(self.num_stages, j)
        if (step + 1) % self.window == 0 and step + 1 >= self.window * self.windows:
            self._reallocate(slot)

    def _reallocate(self, newest: int) -> None:
        k, j = self.windows, self.num_time_bins
        order = [(newest + 1 + i) % k for i in range(k)]  # oldest first
        sums, counts = self._sums[order], self._counts[order]  # [K, S, J]
        x = torch.arange(k, dtype=torch.float64, device=sums.device)[:, None, None]
        n = counts.sum(0)
        mean = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
        x_bar = (counts * x).sum(0) / n.clamp_min(1)
        m_bar = sums.sum(0) / n.clamp_min(1)
        sxx = (counts * (x - x_bar) ** 2).sum(0)
        sxm = (counts * (x - x_bar) * (mean - m_bar)).sum(0)
        known = sxx > 1e-12  # at least two windows with samples
        delta = torch.where(known, -sxm / sxx.clamp_min(1e-12), 0.0)  # loss decrease per window
        per_window = n / k
        self._bin_gain = torch.where(known, delta / (j * per_window.clamp_min(1e-12)), 0.0)
        self._gain = delta.sum(1) / (j * per_window.sum(1).clamp_min(1e-12))
        prior = torch.tensor(self.prior_values, dtype=torch.float64, device=self._p.device)
        self._p = self._move(self._p, _project_floor(self._target(self._p, prior * self._gain), self.floor))
        if j > 1:
            target = self._target(self._w, self._bin_gain)
            self._w = self._move(self._w, self.time_floor / j + (1 - self.time_floor) * target)

    @staticmethod
    def _target(current: Tensor, gain: Tensor) -> Tensor:
        """``gain^+`` normalised along the last axis; ``current`` where no gain is positive."""
        g = gain.clamp_min(0.0)
        total = g.sum(-1, keepdim=True)
        return torch.where(total > 0, g / total.clamp_min(1e-300), current)

    def _move(self, current: Tensor, target: Tensor) -> Tensor:
        return (1 - self.rate) * current + self.rate * target

    def probabilities(self, device: torch.device | str | None = None) -> Tensor:
        """``[S]`` float64 stage probabilities for the next batch (on ``device``)."""
        if device is not None:
            self._to(torch.device(device))
        return self._p.clone()

    def time_weights(self, device: torch.device | str | None = None) -> Tensor:
        """``[S, J]`` float64: row ``k`` is the probability of each base-quantile bin of stage
        ``k``'s current time (uniform ``1/J`` until the first reallocation)."""
        if device is not None:
            self._to(torch.device(device))
        return self._w.clone()

    def summary(self) -> dict[str, Any]:
        """The state as plain numbers, for logs and plots: ``p``, ``time_weights``, the last
        ``stage_gain`` / ``bin_gain``, ``calls``. Reads the tensors on the host: call it when logging,
        not in every step."""
        return {"calls": self.calls, "p": [round(v, 5) for v in self._p.tolist()],
                "time_weights": [[round(v, 5) for v in row] for row in self._w.tolist()],
                "stage_gain": [float(f"{v:.4g}") for v in self._gain.tolist()],
                "bin_gain": [[float(f"{v:.4g}") for v in row] for row in self._bin_gain.tolist()]}  # fmt: skip

    def _settings(self) -> dict[str, Any]:
        return {"time_bins": self.num_time_bins, "warmup": self.warmup, "window": self.window, "windows": self.windows,
                "rate": self.rate, "floor": self.floor, "time_floor": self.time_floor}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Tensors, the clock and the settings; ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return {"kind": self.kind, "calls": self.calls, "sums": self._sums.cpu().clone(), "counts": self._counts.cpu().clone(),
                "p": self._p.cpu().clone(), "w": self._w.cpu().clone(), "gain": self._gain.cpu().clone(),
                "bin_gain": self._bin_gain.cpu().clone(), "prior": list(self.prior_values), "settings": self._settings()}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the kind, prior and settings must agree)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for allocation {state.get('kind')!r}, not {self.kind!r}")
        mine = self._settings()
        if dict(state["settings"]) != mine or list(state["prior"]) != list(self.prior_values):
            raise ValueError(f"allocation settings differ: saved {dict(state['settings'])} prior {state['prior']}, "
                             f"this one {mine} prior {list(self.prior_values)}")  # fmt: skip
        device = self._p.device
        self.calls = int(state["calls"])
        for name, key in (("_sums", "sums"), ("_counts", "counts"), ("_p", "p"), ("_w", "w"), ("_gain", "gain"),
                          ("_bin_gain", "bin_gain")):  # fmt: skip
            setattr(self, name, state[key].to(device, torch.float64).clone())

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self._settings().items())
        return f"ReducibleAllocation(prior={self.prior_values}, {settings})"
