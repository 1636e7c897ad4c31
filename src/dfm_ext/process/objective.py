r"""The DFM training objective: per-stage noising, input masking and the masked per-stage loss.

For stages ``x_s`` (from a decomposition), per-stage scales ``c_s`` (1 unless standardising),
times ``t [B, S]``, mask ``m [B, S]`` and noise ``n_s ~ N(0, I)``:

.. math::

    z_s = x_s / c_s, \qquad
    z_{s,t} = m_s \, (t_s z_s + (1 - t_s) n_s), \qquad
    v_s = z_s - n_s,

    e_{b,s} = \operatorname{mean}_{\text{elements}} (G_s(z_t, t, k, m) - v_s)^2_b, \qquad
    \mathcal{L} = \frac{1}{B} \sum_b \sum_s w_s \, m_{b,s} \, e_{b,s}.

Each stage's error is a *mean* over its own elements, so a stage with 4x the pixels does not get
4x the weight, and losses stay on the familiar per-element MSE scale; the paper's eq. 4 sums squared
norms, which differs from this by a per-stage constant (the element count) that ``stage_weights``
can restore. Masked (not yet generated) stages get zero input and no loss.

Masking is *selection* (``torch.where``), not multiplication by ``m``: the data, input and error
of a masked stage are replaced, so inf/NaN in a masked stage (say, a not-yet-decoded detail
band) cannot reach the loss or its gradient, which are exactly those with zeros there. The
objective adds no device-to-host sync: value checks happen when :class:`StageTimesteps` is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.validation import float_sequence
from dfm_ext.decompositions.base import Decomposition
from dfm_ext.process.timesteps import StageTimesteps

__all__ = ["DFMObjective", "DFMLossOutput", "dfm_loss", "estimate_stage_scales", "check_model_output", "model_stage_scales"]

_MASKING = (True, False, "loss")


@dataclass(frozen=True)
class DFMLossOutput:
    """What one DFM loss evaluation produced.

    Attributes:
        loss: scalar, differentiable; ``(1/B) sum_b sum_s w_s m_bs e_bs``.
        per_stage: ``[S]``, detached: stage ``s``'s mean squared error over its active samples
            (unweighted). ``NaN`` where no sample in the batch had stage ``s`` active; log it
            with ``nanmean`` or skip it.
        noisy: per-stage model inputs ``z_{s,t}`` (zeros where masked).
        target: per-stage velocity targets ``v_s`` (standardised units).
        prediction: per-stage model outputs.
    """

    loss: Tensor
    per_stage: Tensor
    noisy: list[Tensor]
    target: list[Tensor]
    prediction: list[Tensor]


def check_model_output(output: object, expected: Sequence[Tensor]) -> list[Tensor]:
    """Check that a model returned one tensor per stage, each shaped like its input stage.

    Raises:
        TypeError: ``output`` is not a list/tuple of tensors.
        ValueError: wrong number of stages or a wrong shape.
    """
    if isinstance(output, Tensor) or not isinstance(output, Sequence):
        raise TypeError(f"the model must return a list of {len(expected)} tensors, got {type(output).__name__}")
    if len(output) != len(expected):
        raise ValueError(f"the model returned {len(output)} stages, expected {len(expected)}")
    for s, (o, e) in enumerate(zip(output, expected)):
        if not isinstance(o, Tensor):
            raise TypeError(f"the model's output {s} is a {type(o).__name__}, expected a tensor")
        if o.shape != e.shape:
            raise ValueError(f"the model's output for stage {s} has shape {tuple(o.shape)}, expected {tuple(e.shape)}")
    return list(output)


def per_stage_vector(value: Sequence[float] | Tensor | None, num_stages: int, name: str, positive: bool) -> Tensor:
    if value is None:
        return torch.ones(num_stages)
    if not isinstance(value, Tensor):
        value = float_sequence(value, name, finite=False)
    elif value.ndim != 1:
        raise ValueError(f"{name} must have one entry per stage ({num_stages}), got shape {tuple(value.shape)}")
    v = torch.as_tensor(value, dtype=torch.float32).detach().clone().cpu()
    if v.shape != (num_stages,):
        raise ValueError(f"{name} must have one entry per stage ({num_stages}), got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()) or (bool((v <= 0).any()) if positive else bool((v < 0).any())):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be finite and {kind}, got {v.tolist()}")
    return v


def model_stage_scales(model: Any) -> Tensor | None:
    """The ``stage_scales`` ``[S]`` a model carries (``DFMTransformer.stage_scales``), else ``None``.

    Duck-typed (this layer does not know the wrapper): looks through ``.module`` (DDP) and
    ``._orig_mod`` (``torch.compile``) for a tensor attribute ``stage_scales``.
    """
    for _ in range(8):
        scales = getattr(model, "stage_scales", None)
        if isinstance(scales, Tensor):
            return scales
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if inner is None or inner is model:
            return None
        model = inner
    return None


def _broadcast(v: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` matching ``like``'s rank."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


class DFMObjective(nn.Module):
    """Noises the stages, masks, calls the model and returns the masked per-stage loss.

    An ``nn.Module`` only so that ``scales`` and ``stage_weights`` are buffers: they move with
    ``.to()`` and are saved in ``state_dict()`` next to the model they were trained with.

    Args:
        num_stages: ``S``.
        masking: ``True`` (the paper): masked stages get zero input and no loss, and the model
            receives the mask. ``"loss"``: masked stages keep their pure-noise input
            (``t = 0``) and the model receives an all-True mask, but they get no loss (Table
            1c's "no input masking" ablation). ``False``: no masking at all; every stage is
            noised, the model receives an all-True mask, and every stage contributes to the loss.
        stage_weights: ``[S]`` non-negative loss weights ``w_s`` (default ones).
        scales: ``[S]`` positive per-stage scales ``c_s``; stages are divided by them before
            noising (standardisation, paper A.1/A.5; see :func:`estimate_stage_scales`).
            Default: the model's own ``stage_scales`` when it carries them
            (:func:`dfm_ext.wrap_dit` ``stage_scales=``, :func:`model_stage_scales`), else ones
            (no standardisation). Pass the same scales to ``DFMSampler``.

    Example:
        >>> import torch
        >>> from dfm_ext.process.timesteps import StageTimestepSampler
        >>> model = lambda stages, t, stage, mask: [torch.zeros_like(x) for x in stages]
        >>> stages = [torch.randn(4, 3, 4, 4), torch.randn(4, 3, 8, 8)]
        >>> g = torch.Generator().manual_seed(0)
        >>> ts = StageTimestepSampler(2).sample(4, generator=g)
        >>> out = DFMObjective(2)(model, stages, ts, generator=g)
        >>> out.loss.shape, out.per_stage.shape
        (torch.Size([]), torch.Size([2]))
    """

    scales: Tensor
    stage_weights: Tensor

    def __init__(
        self,
        num_stages: int,
        *,
        masking: bool | str = True,
        stage_weights: Sequence[float] | Tensor | None = None,
        scales: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if not any(masking is m or (isinstance(m, str) and masking == m) for m in _MASKING):
            raise ValueError(f"masking must be True, False or 'loss', got {masking!r}")
        self.num_stages = num_stages
        self.masking = masking
        self.register_buffer("scales", per_stage_vector(scales, num_stages, "scales", positive=True))
        #: Whether ``scales`` were given; if not, the model's ``stage_scales`` win (when it has them).
        self.scales_given = scales is not None
        self.register_buffer("stage_weights", per_stage_vector(stage_weights, num_stages, "stage_weights", False))

    def extra_repr(self) -> str:
        return f"num_stages={self.num_stages}, masking={self.masking!r}"

    def forward(
        self,
        model: Callable[..., Sequence[Tensor]],
        stages: Sequence[Tensor],
        timesteps: StageTimesteps,
        *,
        noise: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        **cond: Any,
    ) -> DFMLossOutput:
        """Evaluate the loss on one batch.

        Args:
            model: ``model(stages, t [B, S], stage [B], mask [B, S], **cond) -> list[Tensor]``.
            stages: ``S`` clean stage tensors ``[B, C_s, ...]`` (from ``decomposition.decompose``).
            timesteps: from :class:`~dfm_ext.process.timesteps.StageTimestepSampler`.
            noise: optional per-stage noise, shaped like ``stages``; drawn from ``generator``
                (on its device, then moved) when omitted.
            generator: randomness for the noise.
            **cond: passed to the model unchanged (class labels, text embeddings, ...).

        Returns:
            :class:`DFMLossOutput`.
        """
        stages = self._check_stages(stages)
        if not isinstance(timesteps, StageTimesteps):
            raise TypeError(f"timesteps must be a StageTimesteps, got {type(timesteps).__name__}")
        b, s = stages[0].shape[0], self.num_stages
        if tuple(timesteps.t.shape) != (b, s):
            raise ValueError(f"timesteps.t has shape {tuple(timesteps.t.shape)}, expected [B, S] = [{b}, {s}]")
        device = stages[0].device
        t = timesteps.t.to(device)
        mask = timesteps.mask.to(device)
        stage = timesteps.stage.to(device)
        noise = self._noise(stages, noise, generator)

        # Only full masking tells the model which stages are off: with masking="loss" a model that
        # zeroes masked inputs itself would otherwise undo the ablation.
        everything = torch.ones_like(mask)
        model_mask = mask if self.masking is True else everything
        loss_mask = mask if self.masking is not False else everything

        # Masking selects (torch.where), never multiplies: 0 * NaN is NaN, so a not-yet-generated
        # stage holding inf/NaN data would otherwise poison the loss and every gradient.
        scales = self.scales if self.scales_given else model_stage_scales(model)
        scales = (self.scales if scales is None else scales).to(device)
        if scales.shape != (s,):
            raise ValueError(f"the model's stage_scales have shape {tuple(scales.shape)}, expected [S] = [{s}]")
        clean = [x / scales[i].to(x.dtype) for i, x in enumerate(stages)]
        noisy, target = [], []
        for i, (z, n) in enumerate(zip(clean, noise)):
            # The data of a stage without loss never reaches the model: it is replaced by zeros
            # (with masking="loss" the input is then the pure noise (1 - t) n, = n at t = 0).
            # The returned target keeps it; the loss selects it out below.
            seen = torch.where(_broadcast(loss_mask[:, i], z).bool(), z, 0.0)
            ti = _broadcast(t[:, i], z)
            zt = ti * seen + (1 - ti) * n
            if self.masking is True:
                zt = torch.where(_broadcast(mask[:, i], z).bool(), zt, 0.0)
            noisy.append(zt)
            target.append(z - n)

        prediction = check_model_output(model(noisy, t, stage, model_mask, **cond), noisy)

        # [B, S] per-sample, per-stage mean squared error, computed in float32 at least. Masked
        # entries are selected out before squaring, so their gradient is exactly zero.
        err = torch.stack(
            [
                torch.where(_broadcast(loss_mask[:, s], p).bool(), p.float() - v.float(), 0.0).pow(2).flatten(1).mean(1)
                for s, (p, v) in enumerate(zip(prediction, target))
            ],
            dim=1,
        )
        m = loss_mask.to(err.dtype)
        weights = self.stage_weights.to(device=device, dtype=err.dtype)
        loss = (err * weights).sum(1).mean()
        with torch.no_grad():
            count = m.sum(0)
            per_stage = torch.where(count > 0, err.sum(0) / count.clamp_min(1), torch.full_like(count, float("nan")))
        return DFMLossOutput(loss=loss, per_stage=per_stage.detach(), noisy=noisy, target=target, prediction=prediction)

    def _check_stages(self, stages: Sequence[Tensor]) -> list[Tensor]:
        if isinstance(stages, Tensor) or not isinstance(stages, Sequence):
            raise TypeError(f"stages must be a list of {self.num_stages} tensors, got {type(stages).__name__}")
        stages = list(stages)
        if len(stages) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stages, got {len(stages)}")
        for i, x in enumerate(stages):
            if not isinstance(x, Tensor) or not torch.is_floating_point(x):
                raise TypeError(f"stages[{i}] must be a floating-point tensor")
            if x.ndim < 2 or x.shape[0] != stages[0].shape[0]:
                raise ValueError(f"stages[{i}] has shape {tuple(x.shape)}; every stage needs the same batch dim first")
        return stages

    @staticmethod
    def _noise(stages: list[Tensor], noise: Sequence[Tensor] | None, generator: torch.Generator | None) -> list[Tensor]:
        if noise is None and generator is None:  # no generator argument: traceable with symbolic shapes (buckets)
            return [torch.randn_like(x) for x in stages]
        if noise is None:
            draw = generator.device if generator is not None else stages[0].device
            return [
                torch.randn(x.shape, generator=generator, device=draw, dtype=x.dtype).to(x.device) for x in stages
            ]
        if isinstance(noise, Tensor) or len(noise) != len(stages):
            raise ValueError(f"noise must be a list of {len(stages)} tensors")
        for i, (n, x) in enumerate(zip(noise, stages)):
            if n.shape != x.shape:
                raise ValueError(f"noise[{i}] has shape {tuple(n.shape)}, stages[{i}] has shape {tuple(x.shape)}")
        return [n.to(device=x.device, dtype=x.dtype) for n, x in zip(noise, stages)]


def dfm_loss(
    model: Callable[..., Sequence[Tensor]],
    stages: Sequence[Tensor],
    timesteps: StageTimesteps,
    *,
    masking: bool | str = True,
    stage_weights: Sequence[float] | Tensor | None = None,
    scales: Sequence[float] | Tensor | None = None,
    noise: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> DFMLossOutput:
    """Functional form of :class:`DFMObjective` (same arguments, same result).

    Example:
        >>> import torch
        >>> from dfm_ext.process.timesteps import StageTimesteps
        >>> model = lambda stages, t, stage, mask: [torch.zeros_like(x) for x in stages]
        >>> ts = StageTimesteps(torch.tensor([[1.0]]), torch.tensor([0]), torch.tensor([[True]]))
        >>> x = torch.full((1, 1, 2, 2), 2.0)
        >>> dfm_loss(model, [x], ts, noise=[torch.zeros_like(x)]).loss  # target x - 0, predicted 0
        tensor(4.)
    """
    objective = DFMObjective(len(stages), masking=masking, stage_weights=stage_weights, scales=scales)
    return objective(model, stages, timesteps, noise=noise, generator=generator, **cond)


def estimate_stage_scales(
    decomposition: Decomposition,
    samples: Tensor | Iterable[Any],
    *,
    max_batches: int | None = None,
) -> Tensor:
    """Per-stage standard deviation of the data, for standardisation (``scales=``).

    Statistics are accumulated in float64 over every element of every batch (population std
    around the stage's global mean).

    Args:
        decomposition: splits each batch into stages.
        samples: one batch ``[B, C, ...]`` or an iterable of batches; an item that is a tuple or
            list (e.g. ``(images, labels)`` from a DataLoader) contributes its first element.
        max_batches: stop after this many batches.

    Returns:
        float32 ``[S]`` on the CPU.

    Raises:
        ValueError: no data, or a stage with zero spread (it cannot be standardised).

    Example:
        >>> import torch
        >>> from dfm_ext.decompositions.identity import IdentityDecomposition
        >>> x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
        >>> estimate_stage_scales(IdentityDecomposition(), x).round(decimals=1)
        tensor([3.])
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
    batches: Iterable[Any] = [samples] if isinstance(samples, Tensor) else samples
    acc: tuple[Tensor, Tensor, Tensor] | None = None  # per-stage (sum, sum of squares, count)
    seen = 0
    with torch.no_grad():
        for item in batches:
            if max_batches is not None and seen >= max_batches:
                break
            x = item[0] if isinstance(item, (tuple, list)) else item
            stages = decomposition.decompose(x)
            s_sum = torch.stack([st.double().sum().cpu() for st in stages])
            s_sq = torch.stack([st.double().pow(2).sum().cpu() for st in stages])
            s_n = torch.tensor([st.numel() for st in stages], dtype=torch.float64)
            acc = (s_sum, s_sq, s_n) if acc is None else (acc[0] + s_sum, acc[1] + s_sq, acc[2] + s_n)
            seen += 1
    if acc is None:
        raise ValueError("estimate_stage_scales got no data")
    total, sq, count = acc
    mean = total / count
    var = (sq / count - mean**2).clamp_min(0)
    std = var.sqrt()
    if bool((std <= 0).any()):
        raise ValueError(f"stages {torch.nonzero(std <= 0).flatten().tolist()} have zero spread; cannot standardise")
    return std.float()
