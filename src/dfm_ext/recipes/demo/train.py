"""The demo's training: :func:`train` runs :class:`DemoTask` on the recipes' engine in one process.

The paper's recipe scaled down: stage probabilities ``(p0, rest)``, logit-normal stage times,
masking, label dropout, AdamW with warmup and clipping, an EMA with warmup, a time budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.validation import parse_device

from dfm_ext.recipes.engine.data import BatchPlan
from dfm_ext.recipes.demo.config import DemoConfig, make_decomposition
from dfm_ext.recipes.demo.data import ImageDataset
from dfm_ext.recipes.demo.files import load_wrapped_demo
from dfm_ext.recipes.demo.model import build_model, model_config, null_label

__all__ = ["DemoTask", "TrainResult", "engine_configs", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        ema: the EMA of the weights, read back from the run's ``final/`` (use this one to sample).
        history: per-step logs: ``"loss"`` and ``"stage_<s>"`` (NaN where stage ``s`` was not active).
        seconds: time inside the training steps (the engine's ``train_seconds``).
        steps: optimiser steps done.
        run_dir: the engine's run folder (deleted when :func:`train` made it temporary).
    """

    ema: nn.Module
    history: dict[str, list[float]] = field(repr=False)
    seconds: float
    steps: int
    run_dir: Path


class _Items(torch.utils.data.Dataset):
    """The engine's map-style view of in-memory images: key ``(index, flip)`` -> image and label."""

    def __init__(self, data: ImageDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, Tensor]:
        i = int(key[0])
        return {"image": self.data.images[i], "label": self.data.labels[i]}


class _DemoStream:
    """The demo's one random stream (``torch.Generator`` seeded by ``cfg.seed``), shared by the data
    order and every draw of a step, in the order the demo has always drawn them: a permutation per
    epoch, then per step label dropout, stage times, noise. Keeping it makes a fixed seed give the
    same run, bit for bit, as the demo before it moved onto the engine.

    The engine's own per-step generators (``step_generator(seed, step, shard)``) exist for exact
    resumption; a demo run is never resumed (its run folder is a temp folder), so it does not need them.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)


class _DemoPlan(BatchPlan):
    """Shuffled epochs without replacement drawn lazily from the demo's stream (last partial batch dropped).

    One process, no accumulation: the DataLoader (``num_workers=0``) asks for each step's batch
    just before that step's loss, so the draws interleave as in the demo's own loop.
    """

    stream: _DemoStream | None = None

    def sampler(self, start_step: int, end_step: int) -> Iterator[list[tuple[int, bool]]]:
        if self.world_size != 1 or self.accumulation != 1 or start_step != 0:
            raise ValueError("the demo trains in one process, without accumulation or resumption")
        n, b = self.num_items, self.global_batch_size
        step = 0
        while step < end_step:
            perm = torch.randperm(n, generator=self.stream.generator).tolist()
            for i in range(0, n - b + 1, b):
                if step >= end_step:
                    return
                yield [(j, False) for j in perm[i : i + b]]
                step += 1


class DemoTask:
    """The demo as a :class:`~dfm_ext.recipes.engine.trainer.TrainTask`: the paper's DFM loss on class labels.

    Label dropout (``cfg.label_dropout``, to the null class), stage times from
    :class:`~dfm_ext.process.timesteps.StageTimestepSampler` and noise all come from the demo's
    stream (:class:`_DemoStream`), not the engine's per-step generator.
    """

    def __init__(self, cfg: DemoConfig, mconfig: Mapping[str, Any], stream: _DemoStream) -> None:
        from dfm_ext.process.objective import DFMObjective

        self.cfg, self.mconfig, self.stream = cfg, dict(mconfig), stream
        self.decomposition = make_decomposition(mconfig["decomposition"])
        self.num_stages = self.decomposition.num_stages
        self.sampler = _timestep_sampler(cfg, self.num_stages)
        self.objective = DFMObjective(self.num_stages, masking=cfg.masking)
        self.null = null_label(None, int(mconfig["num_classes"]))
        # Per-stage parameters take part in every forward (zero gradients when a stage is absent).
        self.find_unused_parameters = False

    def build_model(self) -> nn.Module:
        return build_model(self.mconfig)

    def build_optimizer(self, model: nn.Module, optim: Any) -> torch.optim.Optimizer:
        # The demo's optimiser: weight decay on every parameter, and fused (one kernel per step
        # instead of ~10 small ops per parameter, which dominate on CPU for a model this small).
        return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 weight_decay=optim.weight_decay, fused=True)  # fmt: skip

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> Any:
        from dfm_ext.recipes.engine.trainer import StepLoss

        g = self.stream.generator  # see _DemoStream for why not ``generator``
        x, y = batch["image"], batch["label"]
        drop = torch.rand(y.shape, generator=g) < self.cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null), y)
        x, y = x.to(device), y.to(device)
        ts = self.sampler.sample(x.shape[0], generator=g, device=device)
        self.objective.to(device)
        out = self.objective(model, self.decomposition.decompose(x), ts, generator=g, y=y)
        return StepLoss(out.loss, {f"stage_{s}": out.per_stage[s] for s in range(self.num_stages)})

    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        return {}  # the demo samples and scores once, after training (run_demo)


def _timestep_sampler(cfg: DemoConfig, num_stages: int):
    from dfm_ext.process.timesteps import StageTimestepSampler

    if num_stages == 1:
        probs = (1.0,)
    else:
        rest = (1.0 - cfg.p0) / (num_stages - 1)
        probs = (cfg.p0,) + (rest,) * (num_stages - 1)
    return StageTimestepSampler(num_stages, probabilities=probs, mode=cfg.timestep_mode)


def engine_configs(cfg: DemoConfig, run_dir: Path, *, progress: bool) -> tuple[Any, Any]:
    """The engine's ``(TrainConfig, OptimConfig)`` for the demo: one process, no trackers, a log line
    per step (the loss curves), one checkpoint at the end, EMA with warmup, the time budget."""
    from dfm_ext.recipes.engine.trainer import OptimConfig, TrainConfig

    train = TrainConfig(
        steps=cfg.steps, global_batch_size=cfg.batch_size, mixed_precision="no", seed=cfg.seed,
        ema_decay=cfg.ema_decay, ema_warmup=True, output_dir=str(run_dir).replace("{", "{{").replace("}", "}}"),
        resume="never", checkpoint_every=cfg.steps, keep_checkpoints=1, log_every=1, sample_every=0, trackers=[],
        num_workers=0, cpu=parse_device(cfg.device).type == "cpu", progress=progress, sharding="none",
        compile=cfg.compile, compile_backend=cfg.compile_backend, max_train_seconds=cfg.max_train_seconds,
    )  # fmt: skip
    optim = OptimConfig(lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, weight_decay=cfg.weight_decay,
                        warmup_steps=max(1, min(cfg.warmup, cfg.steps // 5)),
                        grad_clip=cfg.grad_clip if cfg.grad_clip > 0 else None)  # fmt: skip
    return train, optim


def train(cfg: DemoConfig, data: ImageDataset, *, run_dir: str | os.PathLike[str] | None = None,
          progress: bool = True) -> TrainResult:  # fmt: skip
    """Train a wrapped DiT with the DFM objective on ``data`` with the engine (:class:`DemoTask`).

    Args:
        cfg: the recipe (``cfg.steps`` steps at most, ``cfg.max_train_seconds`` of training time).
        data: training images ``[N, C, H, W]`` in ``[-1, 1]`` and labels.
        run_dir: the engine's run folder (``config.yaml``, ``checkpoints/``, ``metrics.jsonl``,
            ``final/``); a temporary folder, deleted afterwards, when omitted.
        progress: the engine's tqdm bar.

    Returns:
        :class:`TrainResult` with the EMA model read back from the run's ``final/``.
    """
    from dfm_ext.recipes.engine.trainer import Trainer

    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dfm-demo-run-"))
        run_dir = Path(run_dir)
        mconfig = model_config(cfg, data.image_shape, data.num_classes)
        stream = _DemoStream(cfg.seed)
        train_cfg, optim = engine_configs(cfg, run_dir, progress=progress)

        def plan(*args: Any, **kwargs: Any) -> _DemoPlan:
            p = _DemoPlan(*args, **kwargs)
            object.__setattr__(p, "stream", stream)  # BatchPlan is a frozen dataclass
            return p

        device = parse_device(cfg.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # one process: accelerate trains on the current CUDA device
        if cfg.batch_size > len(data):
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(data)} images)")
        result = Trainer(DemoTask(cfg, mconfig, stream), _Items(data), train_cfg, optim, full_config=cfg,
                         name="train", plan_factory=plan).fit()  # fmt: skip
        history: dict[str, list[float]] = {"loss": [], **{f"stage_{s}": [] for s in range(len(mconfig["patch_sizes"]))}}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            for k in history:
                history[k].append(float(row[k]))
        ema = load_wrapped_demo(run_dir / "final")
    return TrainResult(ema=ema, history=history, seconds=result.train_seconds, steps=result.step, run_dir=run_dir)

