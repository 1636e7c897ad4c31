r"""Sampling from a DFM model: Euler or Heun over a :class:`~dfm_ext.process.schedule.StageScheduler`.

At step ``i`` the schedule gives times ``t_i [S]`` and ``t_{i+1} [S]`` and the stage ``k`` being
generated. Stages ``0..k`` are active: they are fed at their current state with ``mask`` True;
later stages are fed as zeros with ``mask`` False, exactly as in training. With the model's
velocities ``v_s`` every stage moves by its own time step:

.. math:: z_s \leftarrow z_s + (t_{i+1,s} - t_{i,s})\, v_s

(Euler; Heun averages this slope with the one at the Euler prediction). Inactive stages have a
zero time step, so they stay at their initial noise until they join.

Classifier-free guidance: ``v_s = u_s + w_s (c_s - u_s)`` with one scale ``w`` for all stages or
one per stage; the conditional and unconditional passes are one batched call.

Previews: when stage ``k`` reaches its threshold (and at the end), the clean estimate of every
active stage ``\hat z_s = z_s + (1 - t_s) v_s`` is unstandardised and decoded with
``decomposition.preview(stages, k)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfm_ext.validation import float_sequence
from dfm_ext.decompositions.base import Decomposition
from dfm_ext.process.host_values import with_host_twin
from dfm_ext.process.objective import check_model_output, model_stage_scales, per_stage_vector
from dfm_ext.process.schedule import StageScheduler

__all__ = ["DFMSampler", "SampleOutput"]

_METHODS = ("euler", "heun")


@dataclass(frozen=True)
class SampleOutput:
    """Result of :meth:`DFMSampler.sample`.

    Attributes:
        x: the sample, ``decomposition.recompose(stages)``, e.g. ``[B, C, H, W]``.
        stages: the final per-stage tensors, unstandardised (data units).
        previews: ``S`` tensors; ``previews[k]`` is the sample rebuilt from stages ``0..k`` at
            stage ``k``'s resolution, decoded when stage ``k`` reached its threshold
            (``previews[-1]`` is the final sample).
    """

    x: Tensor
    stages: list[Tensor]
    previews: list[Tensor]


class DFMSampler:
    """Generates samples from a model that obeys the DFM model contract.

    Args:
        decomposition: the decomposition the model was trained with (gives stage shapes,
            recomposition and previews).
        scheduler: the step schedule; default :meth:`StageScheduler.default` (30 + 10 steps,
            threshold 0.9 for two stages).
        method: ``"euler"`` (the paper) or ``"heun"`` (two model calls per step).
        guidance_scale: classifier-free guidance scale, one float or one per stage. 1 everywhere
            means no guidance and no unconditional pass.
        scales: the per-stage scales used in training (``DFMObjective(scales=...)``); the model
            works in standardised units and the result is multiplied back. Default: the
            model's own ``stage_scales`` when it carries them (``DFMTransformer``), else ones.

    Example:
        >>> import torch
        >>> from dfm_ext.decompositions.identity import IdentityDecomposition
        >>> sampler = DFMSampler(IdentityDecomposition(), StageScheduler(steps=(4,), thresholds=()))
        >>> model = lambda stages, t, stage, mask: [-z for z in stages]  # pulls towards 0
        >>> out = sampler.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        >>> out.x.shape, len(out.previews)
        (torch.Size([2, 1, 4, 4]), 1)
    """

    def __init__(
        self,
        decomposition: Decomposition,
        scheduler: StageScheduler | None = None,
        *,
        method: str = "euler",
        guidance_scale: float | Sequence[float] = 1.0,
        scales: Sequence[float] | Tensor | None = None,
    ) -> None:
        s = int(decomposition.num_stages)
        if scheduler is None:
            scheduler = StageScheduler.default(s)
        if not isinstance(scheduler, StageScheduler):
            raise TypeError(f"scheduler must be a StageScheduler, got {type(scheduler).__name__}")
        if scheduler.num_stages != s:
            raise ValueError(f"the scheduler has {scheduler.num_stages} stages, the decomposition {s}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool):
            guidance = (float(guidance_scale),) * s
        else:
            guidance = float_sequence(guidance_scale, "guidance_scale", finite=False)
            if len(guidance) != s:
                raise ValueError(f"guidance_scale has {len(guidance)} entries for {s} stages: {guidance}")
        if not all(math.isfinite(w) for w in guidance):
            raise ValueError(f"guidance_scale must be finite, got {guidance}")
        self.decomposition = decomposition
        self.scheduler = scheduler
        self.method = method
        self.guidance_scale: tuple[float, ...] = guidance
        self.scales = per_stage_vector(scales, s, "scales", positive=True)
        self.scales_given = scales is not None

    @property
    def num_stages(self) -> int:
        return self.scheduler.num_stages

    @property
    def guided(self) -> bool:
        """Whether an unconditional pass is needed (some stage's scale differs from 1)."""
        return any(w != 1.0 for w in self.guidance_scale)

    def sample(
        self,
        model: Callable[..., Sequence[Tensor]],
        shape_or_noise: Sequence[int] | Sequence[Tensor],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        uncond: Mapping[str, Any] | None = None,
        callback: Callable[[int, Tensor, list[Tensor]], None] | None = None,
        **cond: Any,
    ) -> SampleOutput:
        """Run the sampler.

        Args:
            model: ``model(stages, t [B, S], stage [B], mask [B, S], **cond) -> list[Tensor]``.
            shape_or_noise: the full-resolution sample shape (e.g. ``(B, C, H, W)``); per-stage
                noise is then drawn from ``generator`` in stage order with
                ``decomposition.stage_shapes``. Or a list of ``S`` per-stage noise tensors.
            generator: randomness for the noise (drawn on its device, then moved to ``device``).
            device: where sampling runs (default: the noise's device, else CPU).
            dtype: dtype of the state and of the inputs the model receives.
            uncond: unconditional keyword arguments for guidance, same keys as ``cond``; default
                ``model.null_condition(**cond)`` when the model has it.
            callback: ``callback(step, t [S], stages)`` after each step, with the times reached
                and the (standardised) state.
            **cond: conditioning passed to the model (e.g. ``y=labels``).

        Returns:
            :class:`SampleOutput`.

        Runs under ``torch.no_grad()``; it does not switch the model to ``eval()`` (do that first,
        e.g. to stop label dropout).
        """
        noise = self._initial_noise(shape_or_noise, generator, device, dtype)
        b = noise[0].shape[0]
        dev = noise[0].device
        s = self.num_stages
        cond_in = self._guidance_inputs(model, cond, uncond, b)

        # The whole schedule moves to the device once, so no step reads a value back from it.
        # Time differences are taken in float64 before the cast, as in the schedule itself.
        table = self.scheduler.timesteps(dtype=torch.float64)
        exact = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
        times = table.to(device=dev, dtype=exact)
        remaining = (1 - table).to(device=dev, dtype=exact)
        active = [k for k, n in enumerate(self.scheduler.steps) for _ in range(n)]  # host ints, as the schedule
        ends = {e - 1: k for k, e in enumerate(self.scheduler.boundaries)}  # step index -> finished stage
        own = None if self.scales_given else model_stage_scales(model)
        scales = (self.scales if own is None else own).to(device=dev, dtype=dtype)
        if scales.shape != (s,):
            raise ValueError(f"the model's stage_scales have shape {tuple(scales.shape)}, expected [S] = [{s}]")

        state = list(noise)
        previews: list[Tensor] = []
        with torch.no_grad():
            for i, k in enumerate(active):
                state, v = self.step(model, state, times[i], times[i + 1], k, cond=cond, guided_cond=cond_in)
                if i in ends:
                    # z_{i+1} + (1 - t_{i+1}) v equals the clean estimate z_i + (1 - t_i) v.
                    clean = [
                        (state[j] + remaining[i + 1, j] * v[j]) * scales[j] if j <= k else torch.zeros_like(state[j])
                        for j in range(s)
                    ]
                    previews.append(self.decomposition.preview(clean, k))
                if callback is not None:
                    callback(i, table[i + 1].to(dtype=dtype), list(state))  # on the CPU, as the schedule
            stages = [z * scales[j] for j, z in enumerate(state)]
            x = self.decomposition.recompose(stages)
        return SampleOutput(x=x, stages=stages, previews=previews)

    def step(
        self,
        model: Callable[..., Sequence[Tensor]],
        state: Sequence[Tensor],
        t: Tensor,
        t_next: Tensor,
        stage: int,
        *,
        cond: Mapping[str, Any] | None = None,
        guided_cond: Mapping[str, Any] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One sampling step (Euler, or Heun with ``method="heun"``) from ``t`` to ``t_next``.

        The per-step function of :meth:`sample`, and the unit to ``torch.compile``: it makes no
        device-to-host sync and has no data-dependent Python branch (``stage`` is a Python int;
        a compiled step specialises on it, so there is one graph per stage).

        Args:
            model: the DFM model.
            state: ``S`` per-stage tensors ``[B, C_s, ...]`` in standardised units.
            t, t_next: ``[S]`` times before and after the step (a row of
                ``scheduler.timesteps()``, on the state's device); the state moves by
                ``t_next - t``, computed in their dtype (float64 keeps the schedule exact).
            stage: ``k``, the stage being generated; stages ``> k`` are fed as zeros with mask
                False and do not move.
            cond: conditioning for the model (e.g. ``{"y": labels}``); used without guidance.
            guided_cond: the batched ``cond ++ uncond`` for classifier-free guidance (then the
                model runs once on the doubled batch); ``None`` without guidance.

        Returns:
            ``(new_state, velocity)``: the stepped state and the velocity used for it (the
            average of both slopes for Heun), ``S`` tensors each.
        """
        s = self.num_stages
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < s:
            raise ValueError(f"stage must be an int in [0, {s - 1}], got {stage!r}")
        if len(state) != s:
            raise ValueError(f"state must hold {s} stage tensors, got {len(state)}")
        dt = t_next - t
        v = self._velocity(model, state, t, stage, cond or {}, guided_cond)
        if self.method == "heun":
            guess = [z + dt[j] * v[j] for j, z in enumerate(state)]
            v2 = self._velocity(model, guess, t_next, stage, cond or {}, guided_cond)
            v = [(a + c) / 2 for a, c in zip(v, v2)]
        new_state = [z + dt[j] * v[j] if j <= stage else z for j, z in enumerate(state)]
        return new_state, v

    def _velocity(
        self,
        model: Callable[..., Sequence[Tensor]],
        state: Sequence[Tensor],
        t_row: Tensor,
        k: int,
        cond: Mapping[str, Any],
        guided_cond: Mapping[str, Any] | None,
    ) -> list[Tensor]:
        """The model's (guided) velocity with stages ``> k`` zeroed and masked; no host sync."""
        s = self.num_stages
        b, dev, dtype = state[0].shape[0], state[0].device, state[0].dtype
        inputs = [z if i <= k else torch.zeros_like(z) for i, z in enumerate(state)]
        t = t_row.to(device=dev, dtype=dtype).expand(b, s)
        # k is a host value: the stage tensor carries it as its host twin, so a specialised model
        # routes every sample to stage k's parameters without reading the tensor back.
        n = b if guided_cond is None else 2 * b
        stage = with_host_twin(torch.full((n,), k, dtype=torch.long, device=dev), np.full(n, k, dtype=np.int64))
        mask = (torch.arange(s, device=dev) <= k).expand(n, s)
        if guided_cond is None:
            return check_model_output(model(inputs, t, stage, mask, **cond), inputs)
        doubled = [torch.cat([z, z]) for z in inputs]
        out = check_model_output(model(doubled, torch.cat([t, t]), stage, mask, **guided_cond), doubled)
        # Python floats: the guidance scales are host values, so they cost nothing per step.
        return [v[b:] + self.guidance_scale[i] * (v[:b] - v[b:]) for i, v in enumerate(out)]

    def _initial_noise(
        self,
        shape_or_noise: Sequence[int] | Sequence[Tensor],
        generator: torch.Generator | None,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> list[Tensor]:
        s = self.num_stages
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (the state is noise), got {dtype!r}")
        if device is not None and torch.device(device).type == "meta":
            raise ValueError("device='meta' holds no values to sample; pass a real device (cpu, cuda)")
        if isinstance(shape_or_noise, Tensor):
            raise TypeError(
                "shape_or_noise must be a shape tuple or a list of per-stage noise tensors, got one tensor"
            )
        items: list[int | Tensor] = list(shape_or_noise)
        noise = [n for n in items if isinstance(n, Tensor)]
        if items and len(noise) == len(items):
            if len(noise) != s:
                raise ValueError(f"got {len(noise)} noise tensors for {s} stages")
            batch = noise[0].shape[0]
            for j, n in enumerate(noise):
                if n.device.type == "meta":
                    raise ValueError(f"noise[{j}] is on the meta device (no values); pass noise on a real device")
                if n.ndim < 2 or n.shape[0] != batch:
                    raise ValueError(f"noise[{j}] has shape {tuple(n.shape)}; all stages need batch {batch}")
            dev = torch.device(device) if device is not None else noise[0].device
            return [n.to(device=dev, dtype=dtype) for n in noise]
        dims = [d for d in items if isinstance(d, int) and not isinstance(d, bool) and d >= 1]
        if not items or len(dims) != len(items):
            raise ValueError(f"shape_or_noise must be a shape of positive ints or a list of tensors, got {shape_or_noise!r}")
        shapes = self.decomposition.stage_shapes(tuple(dims))
        draw = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
        dev = torch.device(device) if device is not None else draw
        return [torch.randn(sh, generator=generator, device=draw, dtype=dtype).to(dev) for sh in shapes]

    def _guidance_inputs(
        self, model: Any, cond: dict[str, Any], uncond: Mapping[str, Any] | None, batch: int
    ) -> dict[str, Any] | None:
        """The batched ``cond ++ uncond`` keyword arguments, or ``None`` when guidance is off."""
        if not self.guided:
            return None
        if uncond is None:
            null = getattr(model, "null_condition", None)
            if null is None:
                raise ValueError(
                    f"guidance_scale={self.guidance_scale} needs unconditional inputs: pass uncond=... "
                    "or give the model a null_condition(**cond) method"
                )
            uncond = null(**cond)
        if set(uncond) != set(cond):
            raise ValueError(f"uncond has keys {sorted(uncond)}, cond has keys {sorted(cond)}; they must match")
        out: dict[str, Any] = {}
        for key, c in cond.items():
            u = uncond[key]
            if isinstance(c, Tensor) or isinstance(u, Tensor):
                if not (isinstance(c, Tensor) and isinstance(u, Tensor)):
                    raise TypeError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors")
                if c.shape != u.shape:
                    raise ValueError(
                        f"cond[{key!r}] has shape {tuple(c.shape)}, uncond[{key!r}] has shape {tuple(u.shape)}; "
                        "they must match to be batched together"
                    )
                if c.ndim == 0 or c.shape[0] != batch:
                    raise ValueError(f"cond[{key!r}] has shape {tuple(c.shape)}, expected batch {batch} first")
                out[key] = torch.cat([c, u.to(c.device)])
            else:
                if c is not u and c != u:
                    raise ValueError(f"non-tensor cond[{key!r}]={c!r} differs from uncond[{key!r}]={u!r}")
                out[key] = c
        return out

    def __repr__(self) -> str:
        return (
            f"DFMSampler({self.decomposition!r}, {self.scheduler!r}, method={self.method!r}, "
            f"guidance_scale={self.guidance_scale})"
        )
