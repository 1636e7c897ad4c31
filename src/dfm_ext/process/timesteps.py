"""The training distribution of per-stage flow times (paper section 3.3, Figure 2b).

For every sample a *current* stage ``k`` is drawn with probabilities ``p``; then

* ``t_k ~ logit-normal(current)`` (default ``loc 0, scale 1``): the stage being learned;
* ``t_j ~ logit-normal(earlier)`` for ``j < k`` (default ``loc 1.5, scale 1``): stages that
  sampling has already (mostly) generated, so they are less noisy on average;
* ``t_j = 0`` for ``j > k`` and those stages are masked (``mask[b, j] = False``): they are not
  generated yet, so their inputs are zeroed and their loss ignored.

``logit-normal(loc, scale)`` is ``sigmoid(loc + scale * n)`` with ``n ~ N(0, 1)``; it lies in
``(0, 1)``. Convention: ``t = 0`` is noise, ``t = 1`` is data.

Checks: :class:`StageTimesteps` checks shapes and dtypes always, and its values (``t`` finite and
in ``[0, 1]``, ``stage`` in range, ``mask`` equal to ``s <= stage[b]``) where they are already on
the host: CPU tensors in eager mode, which is how the sampler draws them by default. On an
accelerator or under ``torch.compile`` the value checks are ``torch._assert_async`` device-side
asserts, which neither sync nor break graphs (the rule of :mod:`dfm_ext.validation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from dfm_ext.process.allocation_protocol import PerSampleAllocation, StageAllocation
from dfm_ext.process.host_values import host_to_device, host_twin, with_host_twin
from dfm_ext.validation import check_value, float_sequence

__all__ = ["StageAllocation", "StageTimesteps", "StageTimestepSampler", "default_stage_probabilities"]

_MODES = ("dfm", "tied", "uniform")


@dataclass(frozen=True)
class StageTimesteps:
    """Per-sample, per-stage flow times of one training batch.

    Attributes:
        t: float ``[B, S]`` in ``[0, 1]``; ``t[b, s]`` is stage ``s``'s time for sample ``b``.
        stage: long ``[B]``; the stage being generated for sample ``b``.
        mask: bool ``[B, S]``; ``True`` where stage ``s`` is active, i.e. ``s <= stage[b]``.

    Raises:
        TypeError: a field has the wrong dtype.
        ValueError: the shapes disagree, ``stage`` is outside ``[0, S)``, ``t`` is not finite or
            outside ``[0, 1]``, or ``mask`` is not ``s <= stage[b]``. Value checks read the
            tensors only when they are on the CPU (eager); on an accelerator or under
            ``torch.compile`` they are device-side asserts that never sync (see
            :mod:`dfm_ext.validation`).

    Example:
        >>> import torch
        >>> ts = StageTimesteps(torch.tensor([[0.5, 0.0]]), torch.tensor([0]), torch.tensor([[True, False]]))
        >>> ts.batch_size, ts.num_stages
        (1, 2)
    """

    t: Tensor
    stage: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        t, stage, mask = self.t, self.stage, self.mask
        for name, value in (("t", t), ("stage", stage), ("mask", mask)):
            if not isinstance(value, Tensor):
                raise TypeError(f"StageTimesteps.{name} must be a tensor, got {type(value).__name__}")
        if not torch.is_floating_point(t):
            raise TypeError(f"StageTimesteps.t must be floating point, got {t.dtype}")
        if stage.dtype != torch.long:
            raise TypeError(f"StageTimesteps.stage must be torch.long, got {stage.dtype}")
        if mask.dtype != torch.bool:
            raise TypeError(f"StageTimesteps.mask must be torch.bool, got {mask.dtype}")
        if t.ndim != 2:
            raise ValueError(f"StageTimesteps.t must have shape [B, S], got {tuple(t.shape)}")
        if tuple(mask.shape) != tuple(t.shape):
            raise ValueError(f"StageTimesteps.mask has shape {tuple(mask.shape)}, t has shape {tuple(t.shape)}")
        if tuple(stage.shape) != (t.shape[0],):
            raise ValueError(f"StageTimesteps.stage must have shape [B] = [{t.shape[0]}], got {tuple(stage.shape)}")
        _check_timestep_values(t, stage, mask)

    @property
    def batch_size(self) -> int:
        return self.t.shape[0]

    @property
    def num_stages(self) -> int:
        return self.t.shape[1]

    def to(self, device: torch.device | str) -> StageTimesteps:
        """The same times on ``device`` (a host-drawn ``stage`` keeps its host values)."""
        return StageTimesteps(self.t.to(device), _moved(self.stage, device), self.mask.to(device))


def _moved(stage: Tensor, device: torch.device | str) -> Tensor:
    host, moved = host_twin(stage), stage.to(device)
    return moved if host is None or moved is stage else with_host_twin(moved, host)


def _check_timestep_values(t: Tensor, stage: Tensor, mask: Tensor) -> None:
    """Value checks of :class:`StageTimesteps` (rule: :mod:`dfm_ext.validation`).

    On CPU tensors in eager mode (how :class:`StageTimestepSampler` and data loading build them)
    they raise ``ValueError`` at once; on accelerator tensors or under ``torch.compile`` they are
    device-side asserts that do not sync.
    """
    s = t.shape[1]
    if not stage.numel():
        return
    check_value(
        ((stage >= 0) & (stage < s)).all(),
        f"StageTimesteps.stage must lie in [0, {s - 1}]",
        lambda: stage.tolist(),
    )
    check_value(torch.isfinite(t).all(), "StageTimesteps.t must be finite", lambda: t.tolist())
    check_value(((t >= 0) & (t <= 1)).all(), "StageTimesteps.t must lie in [0, 1]", lambda: t.tolist())
    expected = torch.arange(s, device=stage.device)[None, :] <= stage[:, None]
    check_value(
        (mask == expected.to(mask.device)).all(),
        "StageTimesteps.mask must be True exactly for stages s <= stage[b]",
        lambda: f"mask {mask.tolist()} for stage {stage.tolist()}",
    )


def default_stage_probabilities(num_stages: int) -> tuple[float, ...]:
    """Default stage probabilities: ``0.9`` for stage 0, the remaining ``0.1`` split evenly.

    The paper uses ``(0.9, 0.1)`` for two stages (Table 1a, A.5): the probability sets how much
    capacity goes to structure, and stage 0 carries the structure whatever the number of
    stages, so it keeps its 0.9 and the detail stages share the rest.

    Example:
        >>> default_stage_probabilities(1), default_stage_probabilities(2)
        ((1.0,), (0.9, 0.1))
        >>> default_stage_probabilities(3)
        (0.9, 0.05, 0.05)
    """
    _check_num_stages(num_stages)
    if num_stages == 1:
        return (1.0,)
    rest = 0.1 / (num_stages - 1)
    return (0.9, *([round(rest, 15)] * (num_stages - 1)))


def _check_num_stages(num_stages: object) -> int:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    return num_stages


def _check_logit_normal(value: object, name: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a (loc, scale) pair, got {value!r}")
    loc, scale = float_sequence(value, name, finite=False)
    if not (math.isfinite(loc) and math.isfinite(scale)) or scale <= 0:
        raise ValueError(f"{name} must be a finite loc and a positive scale, got {value!r}")
    return loc, scale


class StageTimestepSampler:
    """Draws :class:`StageTimesteps` for DFM training.

    Args:
        num_stages: number of stages ``S``.
        probabilities: ``S`` probabilities of each stage being the current one; default
            :func:`default_stage_probabilities` (``(0.9, 0.1)`` for two stages). Must be
            non-negative and sum to 1.
        current: ``(loc, scale)`` of the logit-normal for the current stage, or ``S`` such pairs:
            stage ``k``'s own when it is the current stage (a per-stage time shift, e.g.
            :func:`~dfm_ext.process.allocation.signal_level_locations`).
        earlier: ``(loc, scale)`` of the logit-normal for the stages before it.
        mode: ``"dfm"`` (the paper's method); ``"tied"``: every active stage shares the current
            stage's time (the ablation that fails, Table 1b); ``"uniform"``: the current stage's
            time is ``U(0, 1)`` instead of logit-normal (``current`` is then unused; earlier
            stages keep their logit-normal so only one factor changes).
        allocation: an object with ``probabilities(device) -> [S]`` and ``update(per_stage_loss)``
            (e.g. :class:`~dfm_ext.process.allocation.ProgressAllocation`) that sets the stage
            probabilities during training instead of ``probabilities`` (then its prior); feed it
            with :meth:`update`, save it with :meth:`state_dict`.

    Example:
        >>> import torch
        >>> sampler = StageTimestepSampler(2)
        >>> ts = sampler.sample(4, generator=torch.Generator().manual_seed(0))
        >>> ts.t.shape, ts.stage.shape, ts.mask.shape
        (torch.Size([4, 2]), torch.Size([4]), torch.Size([4, 2]))
        >>> bool((ts.t[~ts.mask] == 0).all())
        True
    """

    def __init__(
        self,
        num_stages: int = 2,
        probabilities: Sequence[float] | None = None,
        current: tuple[float, float] | Sequence[tuple[float, float]] = (0.0, 1.0),
        earlier: tuple[float, float] = (1.5, 1.0),
        mode: str = "dfm",
        allocation: StageAllocation | None = None,
    ) -> None:
        self.num_stages = _check_num_stages(num_stages)
        if probabilities is None:
            probabilities = default_stage_probabilities(num_stages)
        probabilities = float_sequence(probabilities, "probabilities", finite=False)
        if len(probabilities) != num_stages:
            raise ValueError(f"probabilities has {len(probabilities)} entries for {num_stages} stages: {probabilities}")
        if any(not math.isfinite(p) or p < 0 for p in probabilities):
            raise ValueError(f"probabilities must be finite and non-negative, got {probabilities}")
        if abs(sum(probabilities) - 1.0) > 1e-6:
            raise ValueError(f"probabilities must sum to 1, got {probabilities} (sum {sum(probabilities)})")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.probabilities = probabilities
        self.current: tuple[float, float] | tuple[tuple[float, float], ...]
        if isinstance(current, Sequence) and len(current) == num_stages and all(
            isinstance(c, Sequence) and not isinstance(c, (str, bytes)) for c in current
        ):
            self.current = tuple(_check_logit_normal(c, f"current[{i}]") for i, c in enumerate(current))
        else:
            self.current = _check_logit_normal(current, "current")
        if allocation is not None:
            if not (callable(getattr(allocation, "probabilities", None)) and callable(getattr(allocation, "update", None))):
                raise TypeError(f"allocation must have probabilities() and update(), got {type(allocation).__name__}")
            allocation_stages = getattr(allocation, "num_stages", num_stages)
            if allocation_stages != num_stages:
                raise ValueError(f"allocation has {allocation_stages} stages, the sampler {num_stages}")
        self.allocation = allocation
        self.earlier = _check_logit_normal(earlier, "earlier")
        self.mode = mode
        self._host_p: np.ndarray | None = None  # the allocation's probabilities, read at sync_host()

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        stage_generator: np.random.Generator | None = None,
    ) -> StageTimesteps:
        """Draw times for a batch.

        Random numbers are drawn on the generator's device (CPU when there is none) and the
        result is moved to ``device`` (default: that same device), so a CPU generator gives the
        same batch whatever ``device`` is.

        Args:
            batch_size: ``B``.
            generator: source of randomness; the result is a function of its state.
            device: where the returned tensors live.
            stage_generator: draw the current stages on the host from this NumPy generator instead
                (``generator`` then draws the times only): ``stage`` is copied to the device
                without a sync and keeps its host values (:mod:`~dfm_ext.process.host_values`), so a
                specialised model routes by stage without reading them back. An allocation's
                probabilities are then those read at the last :meth:`sync_host` (stale by up to that
                many steps; the current time's placement stays live, on the device).

        Returns:
            ``StageTimesteps`` with ``t`` float32 ``[B, S]``, ``stage`` long ``[B]``, ``mask`` bool ``[B, S]``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        draw = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
        out = torch.device(device) if device is not None else draw
        b, s = batch_size, self.num_stages

        if stage_generator is not None:
            host = stage_generator.choice(s, size=b, p=self._host_probabilities()).astype(np.int64)
            stage = host_to_device(host, draw)
        elif self.allocation is not None:
            stage = torch.multinomial(self.allocation.probabilities(draw).to(torch.float64), b, replacement=True, generator=generator)
        else:
            probs = torch.tensor(self.probabilities, dtype=torch.float64, device=draw)
            stage = torch.multinomial(probs, b, replacement=True, generator=generator)
        # Both draws are made for every sample whatever its stage, so the random stream (and so
        # the batch for a given seed) does not depend on which stages were drawn.
        normal = torch.randn(b, s, generator=generator, device=draw, dtype=torch.float32)
        uniform = torch.rand(b, generator=generator, device=draw, dtype=torch.float32)

        cur_loc: Tensor | float
        cur_scale: Tensor | float
        if isinstance(self.current[0], tuple):  # per-stage: stage k's own logit-normal when it is current
            loc_scale = torch.tensor(self.current, dtype=torch.float32, device=draw)[stage]
            cur_loc, cur_scale = loc_scale[:, 0], loc_scale[:, 1]
        else:
            cur_loc, cur_scale = self.current
        weights = self._time_weights(draw)
        if weights is None:
            t_current = uniform if self.mode == "uniform" else torch.sigmoid(cur_loc + cur_scale * normal[:, 0])
        else:  # the allocation places the current time: the same draws, warped bin by bin
            t_current = self._placed_times(weights[stage], normal[:, 0], uniform, cur_loc, cur_scale)
        earlier_loc, earlier_scale = self.earlier
        t_earlier = torch.sigmoid(earlier_loc + earlier_scale * normal)

        index = torch.arange(s, device=draw)
        mask = index[None, :] <= stage[:, None]
        is_current = index[None, :] == stage[:, None]
        if self.mode == "tied":
            t = t_current[:, None].expand(b, s)
        else:
            t = torch.where(is_current, t_current[:, None], t_earlier)
        t = torch.where(mask, t, torch.zeros((), device=draw))
        return StageTimesteps(t.contiguous().to(out), _moved(stage, out), mask.to(out))

    def _host_probabilities(self) -> np.ndarray:
        if self.allocation is None:
            return np.asarray(self.probabilities, dtype=np.float64)
        if self._host_p is None:
            self.sync_host()
        return cast(np.ndarray, self._host_p)

    def sync_host(self) -> None:
        """Read the allocation's stage probabilities to the host for draws with ``stage_generator``
        (one device read: call it where the loop reads back anyway; the engine does at log and
        checkpoint steps)."""
        if self.allocation is not None:
            p = self.allocation.probabilities().detach().to("cpu", torch.float64).numpy()
            self._host_p = p / p.sum()

    def _time_weights(self, device: torch.device) -> Tensor | None:
        """``[S, J]`` bin probabilities of the current time from the allocation, or None (the base distribution)."""
        a = self.allocation
        if a is None or not getattr(a, "needs_samples", False):
            return None
        placed = cast(PerSampleAllocation, a)
        return None if placed.num_time_bins <= 1 else placed.time_weights(device).to(torch.float64)

    def _placed_times(self, weights: Tensor, normal: Tensor, uniform: Tensor, loc: Tensor | float,
                      scale: Tensor | float) -> Tensor:  # fmt: skip
        r"""Current-stage times drawn with bin probabilities ``weights`` (``[B, J]``) over the
        equal-probability bins of the base distribution.

        ``u`` is the base quantile of the draw the sampler makes anyway (``Phi(n)`` for the
        logit-normal, the uniform itself in ``"uniform"`` mode); the inverse CDF of the
        piecewise-uniform density with bin masses ``w`` maps it to
        ``u' = (j + (u - c_j) / w_j) / J`` (``c_j`` the mass below bin ``j``), and
        ``t = sigmoid(loc + scale * Phi^{-1}(u'))`` (``t = u'`` in ``"uniform"`` mode). With
        ``w = 1/J`` everywhere this is the base distribution. Float64 throughout, no host read.
        """
        j = weights.shape[1]
        u = uniform.double() if self.mode == "uniform" else torch.special.ndtr(normal.double())
        upper = weights.cumsum(1)
        upper[:, -1] = 1.0  # the last bin ends at 1 exactly, whatever the float sum
        b = torch.searchsorted(upper, u[:, None], right=True).clamp_max(j - 1)
        mass = weights.gather(1, b)[:, 0]
        below = upper.gather(1, b)[:, 0] - mass
        tiny = torch.finfo(torch.float64).eps
        placed = ((b[:, 0].double() + ((u - below) / mass).clamp(0.0, 1.0)) / j).clamp(tiny, 1.0 - tiny)
        if self.mode == "uniform":
            return placed.float()
        return torch.sigmoid(loc + scale * torch.special.ndtri(placed)).float()

    def time_bins(self, timesteps: StageTimesteps, num_bins: int) -> Tensor:
        """``[B]`` long: the equal-probability bin (of ``num_bins``) of each sample's current-stage
        time under the base distribution, ``floor(J * u)`` with ``u = Phi((logit t_k - loc_k) / scale_k)``
        (``u = t_k`` in ``"uniform"`` mode). Tensor operations only.

        Example:
            >>> import torch
            >>> s = StageTimestepSampler(2, probabilities=(0.5, 0.5))
            >>> ts = StageTimesteps(torch.tensor([[0.5, 0.0], [0.9, 0.2]]), torch.tensor([0, 1]),
            ...                     torch.tensor([[True, False], [True, True]]))
            >>> s.time_bins(ts, 4).tolist()  # t = 0.5 is the median of logit-normal (0, 1); 0.2 lies below its first quartile
            [2, 0]
        """
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
        stage = timesteps.stage
        t = timesteps.t.gather(1, stage[:, None])[:, 0].double()
        if self.mode == "uniform":
            u = t
        else:
            if isinstance(self.current[0], tuple):
                loc_scale = torch.tensor(self.current, dtype=torch.float64, device=t.device)[stage]
                loc, scale = loc_scale[:, 0], loc_scale[:, 1]
            else:
                loc, scale = self.current  # type: ignore[assignment]
            u = torch.special.ndtr((torch.logit(t) - loc) / scale)
        return (u * num_bins).floor().long().clamp(0, num_bins - 1)

    def update(self, per_stage_loss: Tensor, *, timesteps: StageTimesteps | None = None,
               errors: Tensor | None = None) -> None:  # fmt: skip
        """Feed one step to the allocation, if any (a no-op for fixed probabilities).

        Args:
            per_stage_loss: ``[S]``, ``DFMLossOutput.per_stage`` (what ``ProgressAllocation`` reads).
            timesteps: this step's :class:`StageTimesteps`; needed by an allocation that reads
                per-sample losses (``needs_samples``, e.g.
                :class:`~dfm_ext.process.reducible.ReducibleAllocation`).
            errors: ``[B, S]`` per-sample per-stage losses
                (:func:`~dfm_ext.process.reducible.stage_errors` of the loss output); same condition.

        Tensor operations only (no host sync).

        Raises:
            TypeError: the allocation needs ``timesteps`` and ``errors`` and one is missing.
        """
        a = self.allocation
        if a is None:
            return
        if tuple(per_stage_loss.shape) != (self.num_stages,):  # shapes are host metadata: no sync
            raise ValueError(f"per_stage_loss must be [S] = [{self.num_stages}] (one loss per stage), got {tuple(per_stage_loss.shape)}")
        if not getattr(a, "needs_samples", False):
            a.update(per_stage_loss)
            return
        if timesteps is None or errors is None:
            raise TypeError(f"{type(a).__name__} reads per-sample losses: call update(per_stage, timesteps=ts, "
                            "errors=stage_errors(out))")  # fmt: skip
        b = timesteps.stage.shape[0]
        if errors.ndim != 2 or tuple(errors.shape) != (b, self.num_stages):
            raise ValueError(f"errors must be [B, S] = [{b}, {self.num_stages}], got {tuple(errors.shape)}")
        stage = timesteps.stage.to(errors.device)
        current = errors.gather(1, stage[:, None])[:, 0]
        placed = cast(PerSampleAllocation, a)
        placed.update(per_stage_loss, stage=stage, bins=self.time_bins(timesteps, placed.num_time_bins).to(errors.device),
                      errors=current)  # fmt: skip

    def state_dict(self) -> dict:
        """The allocation's state (empty for fixed probabilities), for checkpoints."""
        return {} if self.allocation is None else {"allocation": self.allocation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        if self.allocation is None:
            if state:
                raise ValueError("this sampler has fixed probabilities but the state holds an allocation")
            return
        if "allocation" not in state:
            raise ValueError("this sampler has an allocation but the state holds none")
        self.allocation.load_state_dict(state["allocation"])
        self._host_p = None  # read again at the next host draw

    def __repr__(self) -> str:
        return (
            f"StageTimestepSampler(num_stages={self.num_stages}, probabilities={self.probabilities}, "
            f"current={self.current}, earlier={self.earlier}, mode={self.mode!r}, allocation={self.allocation!r})"
        )
