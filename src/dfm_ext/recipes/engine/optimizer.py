"""The engine's optimiser, learning-rate schedule and EMA of the weights.

* :func:`build_optimizer`: AdamW (the paper's Adam(0.9, 0.99), eps 1e-8, weight decay 0.01 on
  matrices only); :func:`warmup_lambda`: linear warmup then a constant learning rate.
* :func:`build_ema`: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (or
  :class:`WarmupEMA`, whose decay grows with the number of updates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.recipes.engine.train_config import OptimConfig

__all__ = ["WarmupEMA", "build_ema", "build_optimizer", "warmup_lambda"]


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """``min(1, (step + 1) / warmup_steps)``: linear warmup, then constant.

    Example:
        >>> f = warmup_lambda(4)
        >>> [f(s) for s in range(6)]
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """
    if warmup_steps <= 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / warmup_steps)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases, norms and embeddings tables of rank < 2."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class WarmupEMA:
    """``multi_avg_fn`` of ``AveragedModel``: lerp by ``1 - min(decay, (1 + n) / (10 + n))``.

    ``n`` (updates done) is set from the host-side step counter before each update, so the decay
    costs no device-to-host sync.
    """

    def __init__(self, decay: float) -> None:
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def __call__(self, ema: list[Tensor], current: list[Tensor], _num_averaged: Tensor) -> None:
        n = self.updates
        d = min(self.decay, (1 + n) / (10 + n))
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1 - d)
        else:  # integer buffers follow the model
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)


def build_ema(model: nn.Module, decay: float, *, warmup: bool) -> Any:
    """An ``AveragedModel`` EMA of ``model`` (no gradients); ``warmup``: :class:`WarmupEMA`'s decay.

    With warmup the initial weights count as the first average, so update 1 is no copy.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = WarmupEMA(decay) if warmup else None
    ema = AveragedModel(model, multi_avg_fn=avg or get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    if avg is not None:
        ema.n_averaged.fill_(1)  # the initial weights count as the first average (no copy on update 1)
    return ema
