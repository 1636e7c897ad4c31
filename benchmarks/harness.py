"""A stepping view of the demo's training, so benchmarks can interleave several arms in one process.

The demo trains through the one engine (:mod:`dfm_ext.recipes.engine.trainer`, via
:func:`dfm_ext.recipes.demo.train`). Benchmarks need something the engine does not offer: several
runs advanced a chunk of steps at a time, round-robin, so that machine noise hits every arm alike
and wall time per step is comparable side by side. :class:`Trainer` is that: the same data order,
label dropout, stage times, noise, AdamW, clipping, LR warmup and warming-up EMA as the demo's
engine run, drawn from one generator in the same order. ``tests/test_benchmarks_harness.py``
checks that its weights equal the engine's bit for bit, so the benchmark numbers are the demo's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dfm_ext.process.objective import DFMObjective
from dfm_ext.process.timesteps import StageTimestepSampler
from dfm_ext.recipes.demo.run import DemoConfig, build_model, make_decomposition, model_config, null_label
from dfm_ext.recipes.demo.data import ImageDataset

__all__ = ["EMA", "Trainer", "timestep_sampler"]


class EMA:
    """EMA of a module's floating-point state; the decay warms up as ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        ema_state = self.module.state_dict()
        floats, sources = [], []
        for k, v in module.state_dict().items():
            e = ema_state[k]
            if e.is_floating_point():
                floats.append(e)
                sources.append(v.detach())
            else:
                e.copy_(v)
        if floats:
            torch._foreach_lerp_(floats, sources, 1 - d)


def timestep_sampler(cfg: DemoConfig, num_stages: int) -> StageTimestepSampler:
    """The demo's training distribution: ``p0`` for stage 0, the rest split evenly."""
    rest = (1.0 - cfg.p0) / max(1, num_stages - 1)
    probs = (1.0,) if num_stages == 1 else (cfg.p0,) + (rest,) * (num_stages - 1)
    return StageTimestepSampler(num_stages, probabilities=probs, mode=cfg.timestep_mode)


def _batches(data: ImageDataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled epochs without replacement, forever (the demo's data order)."""
    n = len(data)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} images)")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield data.images[idx], data.labels[idx]


class Trainer:
    """One demo training run, advanced a step at a time.

    Attributes:
        history: ``"loss"`` and ``"stage_<s>"`` per step (NaN where stage ``s`` was not active).
        seconds: wall time spent inside :meth:`step`.
        ema: the :class:`EMA` of the weights (sample from ``ema.module``).
    """

    def __init__(self, cfg: DemoConfig, data: ImageDataset, *, model: nn.Module | None = None) -> None:
        self.cfg, self.data = cfg, data
        self.device = torch.device(cfg.device)
        if model is None:
            torch.manual_seed(cfg.seed)  # parameter init; everything else draws from the generator
            model = build_model(model_config(cfg, data.image_shape, data.num_classes))
        self.model = model.to(self.device).train()
        own = getattr(self.model, "decomposition", None)
        self.decomposition = own if own is not None else make_decomposition(cfg.decomposition)
        self.num_stages = self.decomposition.num_stages
        self.sampler = timestep_sampler(cfg, self.num_stages)
        self.objective = DFMObjective(self.num_stages, masking=cfg.masking).to(self.device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=cfg.weight_decay, fused=True
        )
        warmup = max(1, min(cfg.warmup, cfg.steps // 5))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / warmup))
        self.ema = EMA(self.model, cfg.ema_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.null = null_label(self.model, data.num_classes)
        self.history: dict[str, list[float]] = {"loss": [], **{f"stage_{s}": [] for s in range(self.num_stages)}}
        self.seconds = 0.0
        self.steps_done = 0
        self._batches = _batches(data, cfg.batch_size, self.generator)

    def step(self) -> float:
        """One optimiser step; returns the loss. Raises ``FloatingPointError`` on a non-finite loss."""
        start = time.perf_counter()
        cfg, g = self.cfg, self.generator
        x, y = next(self._batches)
        drop = torch.rand(y.shape, generator=g) < cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null), y)
        x, y = x.to(self.device), y.to(self.device)
        ts = self.sampler.sample(x.shape[0], generator=g, device=self.device)
        out = self.objective(self.model, self.decomposition.decompose(x), ts, generator=g, y=y)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        self.opt.step()
        self.lr_schedule.step()
        self.ema.update(self.model)
        self.seconds += time.perf_counter() - start
        self.steps_done += 1
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at step {self.steps_done}")
        self.history["loss"].append(loss)
        for s, v in enumerate(out.per_stage.tolist()):
            self.history[f"stage_{s}"].append(v)
        return loss
