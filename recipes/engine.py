"""The training engine every recipe shares: accelerate, AdamW + warmup, EMA, checkpoints, logs.

A recipe supplies a :class:`TrainTask` (build the model, compute one micro-batch's loss, and
optionally sample/evaluate) and a dataset; :class:`Trainer` does the rest:

* devices, DDP and mixed precision through ``accelerate`` (bf16 on GPU, fp32 on CPU
  with ``mixed_precision="auto"``); gradient accumulation with ``no_sync`` on all but the last
  micro-batch;
* or, with ``train.sharding=fsdp2`` (or an accelerate FSDP launch config), FSDP2 sharding through
  torch directly (:mod:`.sharding`): ``fully_shard`` per transformer block then the root, a
  sharded EMA, ``torch.distributed.checkpoint`` checkpoints, sampling on every rank;
* AdamW (the paper's Adam(0.9, 0.99), eps 1e-8, weight decay 0.01), linear warmup then a
  constant learning rate, gradient clipping;
* an EMA of the weights (``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn``), saved into each checkpoint's ``extra_state.pt``;
* atomic, verified, pruned checkpoints (:mod:`.checkpointing`) and exact resume: the data order
  and every random draw of a step are functions of ``(seed, step, micro-batch)``
  (:class:`BatchPlan`, :func:`step_generator`), so restarting at step ``k`` replays the same run.
  ``resume=auto`` takes the newest checkpoint that verifies (not what ``latest`` says), warns
  about and moves aside newer damaged ones, and never writes over an existing step folder;
  the output folder is checked for writability before anything is built;
* trackers through accelerate (``log_with``), a ``metrics.jsonl`` log, a tqdm bar on the main
  process, periodic ``task.evaluate`` (sample grids, metrics) on the EMA weights.

One run is one folder: ``config.yaml`` (resolved config), ``checkpoints/``, ``logs/``
(trackers), ``samples/``, ``metrics.jsonl``, ``final/`` (EMA weights), ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from dfm_ext.fileio import atomic_write_text

from .checkpointing import (
    CorruptCheckpointError,
    check_checkpoint,
    clean_partial,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    quarantine,
    save_checkpoint,
)
from .config import ConfigError, config_to_dict, save_config
from .data_images import BatchPlan, PlanBatchSampler, collate_items

__all__ = [
    "OptimConfig",
    "StepLoss",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "Trainer",
    "build_optimizer",
    "check_output_writable",
    "step_generator",
    "warmup_lambda",
]


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
    # this many seconds; the stopped step is the final one (logged, checkpointed, sampled).
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
    """What a recipe provides to :class:`Trainer`.

    A task whose model has parameters that some micro-batches do not use (per-stage LoRA or full
    specialisation: a batch may hold no sample of some stage) sets the attribute
    ``find_unused_parameters = True``; the engine then builds DDP with it, which lets ranks
    differ in what they used. Without it DDP's collectives fall out of step across ranks.
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
    # :func:`build_optimizer` (the warmup schedule, clipping and EMA stay the engine's).


@dataclass(frozen=True)
class TrainResult:
    """What :meth:`Trainer.fit` returns (on every process)."""

    output_dir: Path
    step: int
    last_loss: float
    skipped_images: int
    unique_bad_images: int
    train_seconds: float = 0.0  # time inside the training steps (no checkpoints, logs or evaluation)


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


def step_generator(seed: int, step: int, shard: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``(seed, step, shard)`` only: the randomness of one micro-batch.

    ``shard`` is the global micro-batch index (``rank * accumulation + micro``), so a run with
    W processes and accumulation A draws what one process with accumulation W*A draws.

    Example:
        >>> a = torch.rand(2, generator=step_generator(0, 5, 1))
        >>> torch.equal(a, torch.rand(2, generator=step_generator(0, 5, 1)))
        True
    """
    state = np.random.SeedSequence([int(seed), int(step), int(shard)]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


class _WarmupEMA:
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


def _param_digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state_digest(state: Mapping[str, Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather_objects(accelerator: Any, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return list(gather_object([obj]))


class _RunState:
    """Step counter and data-skip counters, checkpointed with ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.step = 0
        self.skipped = 0
        self.bad: set[int] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "bad": sorted(self.bad)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.bad = set(int(i) for i in state["bad"])


def _warn(message: str) -> None:
    """One line on stderr (``warnings.warn`` would add a second line with the source)."""
    print(f"warning: {message}", file=sys.stderr)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[str]:
    # A key added to the config dataclass after the run started is absent from its config.yaml;
    # it counts as its default, so such runs still resume when it is left at the default.
    a, b = {**_flatten(defaults or {}), **_flatten(old)}, _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def resolve_output_dir(train: TrainConfig, name: str) -> Path:
    return Path(train.output_dir.format(name=name)).expanduser()


def check_output_writable(path: str | Path) -> None:
    """Fail fast when the run folder ``path`` cannot be written (creating it if missing).

    Probes by creating and removing a file, which also catches read-only mounts and ACLs that
    ``os.access`` misses; called on every process before any model or data loader is built.

    Raises:
        ConfigError: naming the folder and the reason (one line).
    """
    import errno
    import tempfile

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
        ckpts = path / "checkpoints"
        if ckpts.is_dir():
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=ckpts)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ConfigError(
            f"train.output_dir={str(path)!r} is not writable ({why}: {e.filename or path}); "
            "make it writable or choose another train.output_dir"
        ) from None


class Trainer:
    """Drives a :class:`TrainTask` over a dataset with accelerate.

    Args:
        task: the recipe's model/loss/evaluation.
        dataset: map-style dataset keyed by ``(index, flip)`` (see ``BatchPlan``).
        train: run settings.
        optim: optimiser settings.
        full_config: the recipe's whole config dataclass (saved as ``config.yaml``, logged).
        name: the config name (fills ``{name}`` in ``train.output_dir``; tracker project name).
        random_flip: whether the plan mirrors half the items.
        collate: collate function for the data loader.
        plan_factory: builds the :class:`BatchPlan` (called with ``BatchPlan``'s arguments); a
            recipe whose batches must share a shape (aspect-ratio buckets) passes a subclass.
    """

    def __init__(
        self,
        task: TrainTask,
        dataset: torch.utils.data.Dataset,
        train: TrainConfig,
        optim: OptimConfig,
        *,
        full_config: Any,
        name: str,
        random_flip: bool = False,
        collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] = collate_items,
        plan_factory: Callable[..., BatchPlan] = BatchPlan,
    ) -> None:
        self.task, self.dataset, self.train, self.optim = task, dataset, train, optim
        self.plan_factory = plan_factory
        self.full_config, self.name, self.random_flip, self.collate = full_config, name, random_flip, collate
        self.output_dir = resolve_output_dir(train, name)

    # -- setup ---------------------------------------------------------------------------------

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        mp = self.train.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and not self.train.cpu else "no"
        trackers = [t for t in self.train.trackers if t != "none"]
        handlers = []
        if getattr(self.task, "find_unused_parameters", False):
            from accelerate.utils import DistributedDataParallelKwargs

            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        return Accelerator(
            mixed_precision=mp,
            cpu=self.train.cpu,
            kwargs_handlers=handlers or None,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )

    def _resume_path(self, accelerator: Any) -> Path | None:
        """The checkpoint to resume from (decided on the main process, shared with the others).

        ``auto``: the newest step folder that verifies; newer damaged ones are named in a
        one-line warning each and moved aside (``corrupt-step-*``), so the run can write those
        steps again without writing over anything. Checkpoints left by a version without
        ``complete.json`` are validated by loading and resumed with a warning.
        """
        ckpts = self.output_dir / "checkpoints"
        mode = self.train.resume
        decision: list[Any] = [None]
        if accelerator.is_main_process:
            try:
                decision[0] = ("ok", self._choose_resume(ckpts, mode))
            except ConfigError as e:
                decision[0] = ("error", str(e))
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            decision = broadcast_object_list(decision)
        kind, value = decision[0]
        if kind == "error":
            raise ConfigError(value)
        return value

    def _choose_resume(self, ckpts: Path, mode: str) -> Path | None:
        existing = list_checkpoints(ckpts)
        if mode == "never":
            if existing:
                raise ConfigError(
                    f"{self.output_dir} already holds checkpoints ({existing[-1][1].name}) and train.resume=never; "
                    "choose another train.output_dir or set train.resume=auto"
                )
            return None
        if mode == "auto":
            found = find_resumable(ckpts)
            for path, reason in found.rejected:
                _warn(f"checkpoint {path} is damaged, resuming from an older one: {reason}")
            if found.path is None and found.rejected:
                raise ConfigError(
                    f"no usable checkpoint in {ckpts}: every step folder is damaged (see the warnings above); "
                    "move them away to start the run again"
                )
            if found.legacy:
                _warn(f"checkpoint {found.path} has no completeness record (written by an older version); validated by loading it")
            return found.path
        path = Path(mode)
        if not path.is_dir():
            raise ConfigError(f"train.resume={mode!r}: not 'auto', 'never' or an existing checkpoint folder")
        try:
            legacy = not check_checkpoint(path)
        except CorruptCheckpointError as e:
            raise ConfigError(f"train.resume={mode!r} cannot be resumed from: {e}") from None
        if legacy:
            _warn(f"checkpoint {path} has no completeness record (written by an older version); validated by loading it")
        m = path.name.removeprefix("step-")
        step = int(m) if m.isdigit() else -1
        newer = [p.name for s, p in existing if s > step and p.resolve() != path.resolve()]
        if newer:
            raise ConfigError(
                f"train.resume={mode!r} is older than checkpoints already in {ckpts} ({', '.join(newer)}), which "
                "the run would write over; move them away or choose another train.output_dir"
            )
        return path

    def _tidy_checkpoints(self, resume: Path | None) -> None:
        """Main process, after the config check: drop ``tmp-*`` leftovers, move damaged newer folders aside."""
        ckpts = self.output_dir / "checkpoints"
        for p in clean_partial(ckpts):
            print(f"removed the partial checkpoint {p} left by an interrupted save", file=sys.stderr)
        if self.train.resume != "auto":
            return
        step = -1 if resume is None or resume.parent != ckpts else int(resume.name.removeprefix("step-"))
        for s, p in list_checkpoints(ckpts):
            if s > step:  # only damaged ones are newer than the folder find_resumable chose
                moved = quarantine(p)
                print(f"moved {p} aside to {moved.name}", file=sys.stderr)
        if resume is not None and resume.parent == ckpts:
            atomic_write_text(ckpts / "latest", resume.name + "\n")  # the marker follows what was chosen

    def _check_config(self, resume: Path | None) -> None:
        stored = self.output_dir / "config.yaml"
        if resume is None or not stored.is_file():
            return
        import yaml

        old = yaml.safe_load(stored.read_text()) or {}
        try:
            defaults = config_to_dict(type(self.full_config)())
        except TypeError:  # a config class without defaults for every field
            defaults = {}
        diff = _config_diff(old, config_to_dict(self.full_config), defaults)
        if diff:
            raise ConfigError(
                f"cannot resume {self.output_dir}: its config.yaml differs in {diff}; "
                "use another train.output_dir to start a new run"
            )

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        from tqdm.auto import tqdm

        check_output_writable(self.output_dir)
        accelerator = self._accelerator()
        resume = self._resume_path(accelerator)
        self._check_config(resume)
        if accelerator.is_main_process:
            self._tidy_checkpoints(resume)
        accelerator.wait_for_everyone()
        world = accelerator.num_processes
        plan = self.plan_factory(
            len(self.dataset),
            self.train.global_batch_size,
            world_size=world,
            accumulation=self.train.grad_accumulation,
            seed=self.train.seed,
            random_flip=self.random_flip,
            rank=accelerator.process_index,
        )
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.full_config, self.output_dir / "config.yaml")
        accelerator.wait_for_everyone()

        torch.manual_seed(self.train.seed)  # identical initial weights on every process
        model = self.task.build_model()
        ema: Any = None
        fsdp = self._sharded(accelerator)
        if fsdp:
            from . import sharding

            # Not accelerator.prepare: torch's fully_shard per block (accelerate's plugin is DDP on CPU).
            model = sharding.shard_model(model.to(accelerator.device), self._device_mesh(accelerator))
            if self.train.ema_decay is not None:
                ema = sharding.ShardedEMA(model, self.train.ema_decay)
        elif self.train.ema_decay is not None:
            warmup = _WarmupEMA(self.train.ema_decay) if self.train.ema_warmup else None
            ema = AveragedModel(model, multi_avg_fn=warmup or get_ema_multi_avg_fn(self.train.ema_decay), use_buffers=True)
            ema.requires_grad_(False)
            if warmup is not None:
                ema.n_averaged.fill_(1)  # the initial weights count as the first average (no copy on update 1)
        if fsdp and self.train.ema_warmup:
            raise ConfigError("train.ema_warmup is not supported with train.sharding=fsdp2")
        custom = getattr(self.task, "build_optimizer", None)
        optimizer = custom(model, self.optim) if custom is not None else build_optimizer(model, self.optim)
        # Not prepared: accelerate would step a prepared scheduler once per process per step.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(self.optim.warmup_steps))
        if self.train.compile:
            # After the EMA copied the model (its copy stays eager, for sampling and final/) and
            # after fully_shard (FSDP2's hooks run outside the graphs: dynamo skips them). In place,
            # so DDP wraps the compiled module and state-dict keys gain no "_orig_mod." prefix.
            model.compile(backend=self.train.compile_backend)
        if not fsdp:
            model, optimizer = accelerator.prepare(model, optimizer)
            if ema is not None:
                ema.to(accelerator.device)
        state = _RunState()
        # Saved by save_checkpoint, not register_for_checkpointing (which reloads with a full pickle).
        extra: dict[str, Any] = {"scheduler": scheduler, "run": state}
        if ema is not None:
            extra["ema"] = ema
        if getattr(getattr(self.task, "timesteps", None), "allocation", None) is not None:
            extra["timesteps"] = self.task.timesteps  # the stage allocation's state (dfm.allocation)
        if resume is not None:
            if fsdp:
                sharding.load_sharded_checkpoint(resume, model, optimizer, ema=ema, extra=extra)
            else:
                if (resume / "sharded.json").is_file():
                    raise ConfigError(f"{resume} is a sharded (FSDP2) checkpoint; resume it with train.sharding=fsdp2")
                load_checkpoint(accelerator, resume, extra=extra)
            accelerator.print(f"resumed from {resume} at step {state.step}")

        if accelerator.is_main_process and self.train.trackers:
            accelerator.init_trackers(self.name.replace("/", "_"), config=_flatten(config_to_dict(self.full_config)))

        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=PlanBatchSampler(plan, state.step, self.train.steps),
            num_workers=self.train.num_workers,
            collate_fn=self.collate,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=False,
        )
        batches = iter(loader)
        log_path = self.output_dir / "metrics.jsonl"
        bar = tqdm(
            total=self.train.steps,
            initial=state.step,
            disable=not (accelerator.is_main_process and self.train.progress),
            desc=self.name,
            dynamic_ncols=True,
        )
        acc = self.train.grad_accumulation
        window: dict[str, Tensor] = {}
        window_steps = 0
        last_loss = float("nan")
        t_window = time.perf_counter()
        train_seconds = 0.0
        budget = self.train.max_train_seconds
        model.train()
        # Per-step values the host does not need every step stay on the device (or on the host,
        # where they come from) and are read once per log/checkpoint step: no device sync per step.
        nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        pending_skipped, checked_step = 0, state.step
        while state.step < self.train.steps:
            step = state.step
            t_step = time.perf_counter()
            for micro in range(acc):
                batch = next(batches)
                pending_skipped += len(batch.get("bad", []))
                state.bad.update(int(i) for i in batch.get("bad", []))
                gen = step_generator(self.train.seed, step, plan.shard_index(micro), accelerator.device)
                if fsdp:  # reduce-scatter the gradients on the last micro-batch only
                    model.set_requires_gradient_sync(micro == acc - 1)
                    sync = contextlib.nullcontext()
                else:
                    sync = contextlib.nullcontext() if micro == acc - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    out = self.task.loss(model, batch, generator=gen, device=accelerator.device)
                    nonfinite = nonfinite | ~torch.isfinite(out.loss.detach())
                    accelerator.backward(out.loss / acc)
                for k, v in {"loss": out.loss.detach(), **out.logs}.items():
                    # NaN marks "not present in this micro-batch" (e.g. a stage nobody drew).
                    v = v.detach().float().to(accelerator.device).reshape(())
                    present = torch.isfinite(v)
                    pair = torch.stack([torch.where(present, v, torch.zeros_like(v)), present.float()])
                    window[k] = window[k] + pair if k in window else pair
            grad_norm = None
            if self.optim.grad_clip is not None:
                if fsdp:  # DTensor gradients: the norm is reduced over the shards
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.optim.grad_clip)
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                else:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if fsdp and ema is not None:
                ema.update(model)
            elif ema is not None:
                if isinstance(ema.multi_avg_fn, _WarmupEMA):
                    ema.multi_avg_fn.updates = step
                ema.update_parameters(accelerator.unwrap_model(model))
            state.step += 1
            window_steps += 1
            bar.update(1)
            train_seconds += time.perf_counter() - t_step
            out_of_time = budget is not None and train_seconds >= budget
            if budget is not None and world > 1:  # every process stops at the same step
                flag = torch.tensor(float(out_of_time), device=accelerator.device)
                out_of_time = bool(accelerator.reduce(flag, "max").item())
            if out_of_time and state.step < self.train.steps:
                bar.write(f"stopping after {state.step} steps: the {budget:g} s training budget is spent")
            last = state.step == self.train.steps or out_of_time
            if state.step % self.train.log_every == 0 or state.step % self.train.checkpoint_every == 0 or last:
                # One host read (and one reduction across processes) for the bad-loss flag and the
                # skipped-image count, before anything is logged or saved.
                flags = torch.stack([nonfinite.float(), torch.tensor(float(pending_skipped), device=accelerator.device)])
                bad_loss, skipped = (accelerator.reduce(flags, "sum") if world > 1 else flags).tolist()
                if bad_loss:
                    raise FloatingPointError(
                        f"non-finite loss at a step in {checked_step + 1}..{state.step}; nothing after step "
                        f"{checked_step} was saved"
                    )
                state.skipped += int(skipped)
                nonfinite.zero_()
                pending_skipped, checked_step = 0, state.step

            if state.step % self.train.log_every == 0 or last:
                logs = {}
                for k, pair in sorted(window.items()):
                    total, count = accelerator.reduce(pair, "sum").tolist() if world > 1 else pair.tolist()
                    logs[k] = total / count if count else float("nan")
                logs["lr"] = scheduler.get_last_lr()[0]
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                logs["skipped_images"] = state.skipped
                logs["steps_per_s"] = window_steps / max(1e-9, time.perf_counter() - t_window)
                last_loss = logs["loss"]
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": state.step, **logs}) + "\n")
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log(logs, step=state.step)
                window, window_steps, t_window = {}, 0, time.perf_counter()

            if state.step % self.train.checkpoint_every == 0 or last:
                if fsdp:
                    sharding.save_sharded_checkpoint(
                        self.output_dir / "checkpoints", state.step, model, optimizer, ema=ema, extra=extra,
                        keep=self.train.keep_checkpoints,
                    )  # fmt: skip
                else:
                    save_checkpoint(
                        accelerator, self.output_dir / "checkpoints", state.step, keep=self.train.keep_checkpoints, extra=extra
                    )

            if self.train.sample_every and (state.step % self.train.sample_every == 0 or last):
                if fsdp:
                    self._evaluate_sharded(model, ema, accelerator, state.step, log_path)
                elif accelerator.is_main_process:
                    target = ema.module if ema is not None else accelerator.unwrap_model(model)
                    was_training = target.training
                    target.eval()
                    scalars = self.task.evaluate(target, step=state.step, out_dir=self.output_dir, device=accelerator.device)
                    target.train(was_training)
                    if scalars:
                        with open(log_path, "a") as f:
                            f.write(json.dumps({"step": state.step, **scalars}) + "\n")
                        accelerator.log(scalars, step=state.step)
                accelerator.wait_for_everyone()
            if out_of_time:
                break
        bar.close()

        # Drain the loader so worker processes exit cleanly.
        del batches, loader
        # Under FSDP every process holds a shard: gather the full weights (collectives) first.
        full_state = ema_state = None
        if fsdp:
            full_state = sharding.gather_full_state(model)
            if ema is not None:
                with ema.applied(model):
                    ema_state = sharding.gather_full_state(model)
            digests = [_state_digest(full_state)] if accelerator.is_main_process else []
        else:
            digests = _gather_objects(accelerator, _param_digest(accelerator.unwrap_model(model)))
        if accelerator.is_main_process:
            if ema is not None and not fsdp:
                final = ema.module
            elif full_state is not None:
                # The one model format: a freshly built (unsharded) model holding the full weights.
                final = self.task.build_model()
                final.load_state_dict(ema_state if ema_state is not None else full_state)
            else:
                final = accelerator.unwrap_model(model)
            self._save_final(final, accelerator)
            summary = {
                "step": state.step,
                "last_loss": last_loss,
                "skipped_images": state.skipped,
                "unique_bad_images": len(state.bad),
                "num_processes": world,
                "sharding": "fsdp2" if fsdp else "none",
                # Bitwise digest of the trained weights on each process: they must all agree.
                # (FSDP2: one digest, of the gathered full weights.)
                "param_sha256_per_rank": digests,
            }
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if state.skipped:
                accelerator.print(f"skipped {state.skipped} unreadable image reads ({len(state.bad)} distinct files)")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(self.output_dir, state.step, last_loss, state.skipped, len(state.bad), train_seconds)

    def _sharded(self, accelerator: Any) -> bool:
        mode = self.train.sharding
        accelerate_fsdp = str(accelerator.distributed_type).endswith("FSDP")
        if mode == "none" and accelerate_fsdp:
            raise ConfigError("train.sharding=none but accelerate was launched with an FSDP config; use train.sharding=fsdp2 or auto")
        fsdp = mode == "fsdp2" or (mode == "auto" and accelerate_fsdp)
        if fsdp and accelerator.mixed_precision == "fp16":
            raise ConfigError("train.sharding=fsdp2 with mixed_precision=fp16 is not supported (no sharded grad scaler); use bf16")
        return fsdp

    def _device_mesh(self, accelerator: Any) -> Any:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():  # one process: a world of one, so the same code path runs
            backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return init_device_mesh(accelerator.device.type, (dist.get_world_size(),))

    def _evaluate_sharded(self, model: nn.Module, ema: Any, accelerator: Any, step: int, log_path: Path) -> None:
        """``task.evaluate`` on every rank (FSDP gathers each block's weights with collectives).

        Every rank samples with the same seeds, so all draw the same images; only the main
        process writes into the run folder, the others into a temporary one that is deleted.
        """
        import tempfile

        was_training = model.training
        model.eval()
        with contextlib.ExitStack() as stack:
            if ema is not None:
                stack.enter_context(ema.applied(model))
            out_dir = self.output_dir if accelerator.is_main_process else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            scalars = self.task.evaluate(model, step=step, out_dir=out_dir, device=accelerator.device)
        model.train(was_training)
        if scalars and accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            accelerator.log(scalars, step=step)
        accelerator.wait_for_everyone()

    def _save_final(self, model: nn.Module, accelerator: Any) -> None:
        out = self.output_dir / "final"
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(out))
        else:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
