"""Evaluation under DDP on every process: each model call's batch is split over the processes and gathered.

Every process runs the task's ``evaluate`` with the same inputs and weights, so the sampler's state is the same
everywhere; each takes ``1 / world`` of the model compute instead of one process sampling alone while the others wait
at a barrier (against the collective timeout). The main process writes the files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from dfm_ext.process.host_values import host_twin, with_host_twin

__all__ = ["BatchSplit"]


class BatchSplit(nn.Module):
    """``module`` called on rows ``[rank * n, (rank + 1) * n)`` of every per-sample input (``n = ceil(B / world)``),
    its outputs gathered over the process group: the same values as ``module`` on the whole batch. Per-sample inputs
    are the tensors (also inside lists and tuples, as the stages) whose first dimension is the batch of the first
    tensor argument, split with their host values (:mod:`dfm_ext.process.host_values`); everything else is passed
    whole. Attributes not found here are the module's (``stage_scales``, ``null_condition``, ...)."""

    def __init__(self, module: nn.Module, rank: int, world: int) -> None:
        super().__init__()
        self.inner, self.rank, self.world = module, rank, world

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.ndim >= 1]
        if not tensors:
            return self.inner(*args, **kwargs)
        batch = tensors[0].shape[0]
        per = -(-batch // self.world)
        lo, hi = min(batch, self.rank * per), min(batch, (self.rank + 1) * per)
        # more processes than samples: a process without rows runs one row (for the outputs' shapes) and sends none
        run_lo, run_hi = (lo, hi) if hi > lo else (0, 1)

        def take(v: Any) -> Any:
            if not (isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch):
                return v
            part, host = v[run_lo:run_hi], host_twin(v)
            return part if host is None else with_host_twin(part, host[run_lo:run_hi])

        a, k = tree_map(take, (args, kwargs))
        out = self.inner(*a, **k)
        return tree_map(lambda o: _gather(o[: hi - lo], batch, per, self.world) if isinstance(o, Tensor) else o, out)


def _gather(local: Tensor, batch: int, per: int, world: int) -> Tensor:
    """``[batch, ...]``: every process's rows (``per`` each, the last ones fewer) in rank order."""
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts)[:batch]
