"""What a training run is configured with and what a recipe gives the engine.

* :class:`OptimConfig` and :class:`TrainConfig`: the ``optim`` and ``train`` sections of every
  recipe's config (checked on construction); :data:`RESUMABLE_CHANGES`: the keys a run may change
  when it is resumed.
* :class:`TrainTask` (the protocol a recipe implements), :class:`StepLoss` (one micro-batch's
  loss) and :class:`TrainResult` (what :meth:`dfm_ext.recipes.engine.trainer.Trainer.fit` returns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

__all__ = ["OptimConfig", "RESUMABLE_CHANGES", "StepLoss", "TrainConfig", "TrainResult", "TrainTask"]


@dataclass
class OptimConfig:
    """AdamW with linear warmup (paper A.2 defaults)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 10_000
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class TrainConfig:
    """Run length, batch, precision, cadence of checkpoints/logs/samples, output folder.

    ``global_batch_size`` counts samples per optimiser step over all processes; every process
    reads ``global_batch_size / (num_processes * grad_accumulation)`` per micro-batch.
    ``output_dir`` may use ``{name}`` (the config name); it is not part of the run's identity,
    so a run folder that was moved or copied resumes from its new place. ``resume``: ``"auto"``
    (continue from the newest checkpoint in ``output_dir/checkpoints`` that verifies, whatever
    ``latest`` says), ``"never"`` (refuse a folder that has checkpoints) or a checkpoint path. ``sharding``: ``"none"`` (DDP),
    ``"fsdp2"`` (FSDP2, :mod:`.sharding`) or ``"auto"`` (fsdp2 under an accelerate FSDP launch config).
    ``compile``: ``torch.compile`` the model's forward with ``compile_backend`` (``"inductor"``;
    ``"aot_eager"`` traces without code generation); checkpoints stay interchangeable with
    uncompiled runs, so a run may be resumed with or without it.
    """

    steps: int = 1000
    global_batch_size: int = 256
    grad_accumulation: int = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    ema_decay: float | None = 0.9999
    output_dir: str = "runs/{name}"
    resume: str = "auto"
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_every: int = 10_000
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    num_workers: int = 8
    cpu: bool = False
    progress: bool = True
    # "fsdp2": shard with torch's fully_shard (recipes/sharding.py); "auto": fsdp2 when accelerate
    # was launched with an FSDP config, else none (DDP over the processes).
    sharding: Literal["auto", "none", "fsdp2"] = "auto"
    # torch.compile the model's forward in place (nn.Module.compile: state-dict keys unchanged, so
    # checkpoints load into uncompiled runs); the loss's backward runs AOTAutograd's compiled backward.
    compile: bool = False
    compile_backend: str = "inductor"
    # EMA decay min(ema_decay, (1 + n) / (10 + n)) after n updates, the initial weights being the
    # first average (so a short run's EMA is not stuck near the random init); off: constant decay.
    ema_warmup: bool = False
    # Stop after the step during which the training steps' own time (no checkpoint/eval) reaches
    # this many seconds; the stopped step is the final one (logged, checkpointed, sampled). Several
    # processes agree on it at the next log/checkpoint step (no per-step sync: engine.is_check_step).
    max_train_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "grad_accumulation", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_every < 0 or self.num_workers < 0:
            raise ValueError("train.sample_every and train.num_workers must be >= 0")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) or null, got {self.ema_decay}")
        if self.max_train_seconds is not None and not self.max_train_seconds > 0:
            raise ValueError(f"train.max_train_seconds must be > 0 or null, got {self.max_train_seconds}")
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise ValueError(f"train.compile_backend={self.compile_backend!r} is not a torch.compile backend; choose one of {backends}")


# Keys that may change between a run and its resumption (cadence, length, I/O), by prefix.
RESUMABLE_CHANGES = (
    "train.output_dir",  # a moved or copied run folder is the same run
    "train.steps",
    "train.resume",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.sample_every",
    "train.trackers",
    "train.num_workers",
    "train.progress",
    "train.compile",  # and train.compile_backend: compiling changes speed, not the maths
    "train.max_train_seconds",
    "eval.",
    "sampling.",
)


@dataclass(frozen=True)
class StepLoss:
    """One micro-batch's differentiable ``loss`` and detached scalars to log (averaged per step)."""

    loss: Tensor
    logs: Mapping[str, Tensor] = field(default_factory=dict)


class TrainTask(Protocol):
    """What a recipe provides to :class:`~dfm_ext.recipes.engine.trainer.Trainer`.

    A task whose model has parameters that some micro-batches do not use sets the attribute
    ``find_unused_parameters = True``; the engine then builds DDP with it, which lets ranks
    differ in what they used. Without it DDP's collectives fall out of step across ranks.
    :func:`dfm_ext.specialize`'s per-stage parameters do not need it: every stage's parameters
    take part in every forward with a ``[B]`` stage (a stage absent from the micro-batch gets
    zero gradients), so the recipes leave it off and DDP skips a graph traversal per step.
    """

    def build_model(self) -> nn.Module:
        """The trainable model (built identically on every process: same seed)."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        """The loss of one micro-batch; all randomness from ``generator``."""
        ...

    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        """Sample grids / metrics with the EMA weights on the main process; returns scalars to log."""
        ...

    # Optional: ``build_optimizer(model, optim) -> torch.optim.Optimizer`` replaces the engine's
    # :func:`dfm_ext.recipes.engine.optimizer.build_optimizer` (the warmup schedule, clipping and EMA stay the engine's).


@dataclass(frozen=True)
class TrainResult:
    """What :meth:`~dfm_ext.recipes.engine.trainer.Trainer.fit` returns (on every process)."""

    output_dir: Path
    step: int
    last_loss: float
    skipped_images: int
    unique_bad_images: int
    train_seconds: float = 0.0  # time inside the training steps (no checkpoints, logs or evaluation)

