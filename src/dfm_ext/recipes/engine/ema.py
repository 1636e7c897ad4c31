"""The exponential moving average of a model's weights that the engine keeps (replicated or sharded)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA", "tensors_of"]


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """Exponential moving average of a model's parameters and buffers (``DTensor`` s when it is sharded).

    :meth:`update` after optimiser step ``step`` does ``ema <- ema + (1 - d) (p - ema)`` with one
    ``_foreach_lerp_`` (no host read): ``d = decay`` (the first update copies), or with ``warmup``
    ``d = min(decay, (1 + step) / (10 + step))``, the initial weights being the first average.
    ``module``: keep the shadow as an eager copy of ``model`` (:attr:`module`) to sample from,
    instead of swapping it into ``model`` (:meth:`applied`).
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False, module: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 1 if warmup else 0
        self.module = copy.deepcopy(model).requires_grad_(False) if module else None
        with torch.no_grad():
            source = self.module if self.module is not None else model
            self.shadow = {n: t.detach() if self.module is not None else t.detach().clone() for n, t in tensors_of(source)}

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        tensors = tensors_of(model)
        if [n for n, _ in tensors] != list(self.shadow):
            raise ValueError("the model's parameters and buffers differ from the ones the EMA was built with")
        return [_local(self.shadow[n]) for n, _ in tensors], [_local(t.detach()) for _, t in tensors]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's current (local) weights into the average after optimiser step ``step``."""
        while isinstance(inner := getattr(model, "module", None), nn.Module):  # without DDP / accelerate wrappers
            model = inner
        ema, cur = self._pairs(model)
        if self.updates == 0:
            torch._foreach_copy_(ema, cur)
        else:
            d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
            fl = [i for i, t in enumerate(ema) if t.is_floating_point() or t.is_complex()]
            if fl:
                torch._foreach_lerp_([ema[i] for i in fl], [cur[i] for i in fl], 1.0 - d)
            for i in sorted(set(range(len(ema))) - set(fl)):  # integer buffers
                ema[i].copy_(cur[i] if self.warmup else ema[i] * d + cur[i] * (1.0 - d))
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The EMA weights to sample from: :attr:`module`, or swapped into ``model`` and back exactly."""
        if self.module is not None:
            yield self.module
            return
        ema, cur = self._pairs(model)
        with torch.no_grad():
            backup = [t.clone() for t in cur]
            torch._foreach_copy_(cur, ema)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(cur, backup)

    def state_dict(self) -> dict[str, Any]:
        """The counter, and the shadow when it is an eager module (sharded shadows go through DCP)."""
        state: dict[str, Any] = {"updates": self.updates}
        if self.module is not None:
            state["shadow"] = {n: t.cpu() for n, t in self.shadow.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])
        if self.module is not None:
            with torch.no_grad():
                for n, t in state["shadow"].items():
                    self.shadow[n].copy_(t)


def tensors_of(model: nn.Module) -> list[tuple[str, Tensor]]:
    # Parameters (trainable or not) and buffers, as torch's AveragedModel(use_buffers=True) averages them.
    return [*model.named_parameters(), *model.named_buffers()]


