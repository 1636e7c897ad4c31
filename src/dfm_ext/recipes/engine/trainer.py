"""The training loop every recipe runs: :class:`Trainer` drives a :class:`TrainTask` (what one step computes).

The data order and every random draw of a step are functions of ``(seed, step, micro-batch)``
(:class:`~dfm_ext.recipes.engine.data.BatchPlan`, :func:`step_generator`): a resumed run replays
itself. Losses and flags stay on the device until a log / checkpoint step (:func:`is_check_step`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfm_ext.fileio import atomic_write_text
from dfm_ext.recipes.engine.checkpoint import (
    ConfigRecord, Stateful, check_output_writable, choose_resume, save_final_model, shared_verify, stored_config, tidy_checkpoints,
)  # fmt: skip
from dfm_ext.recipes.engine.config import ConfigError, OptimConfig, TrainConfig, check_resume_config, config_to_dict, flatten_config, save_config
from dfm_ext.recipes.engine.data import BatchPlan, PlanBatchSampler, collate_items
from dfm_ext.recipes.engine.parallel import EMA, Parallelism, make_parallelism
from dfm_ext.recipes.engine.runlock import RunFolderBusy, RunLock, check_shared_folder, lock_record
from dfm_ext.recipes.engine.sections import RecipeConfig

if TYPE_CHECKING:  # accelerate is imported when a run starts, not when a recipe is imported
    from accelerate import Accelerator

__all__ = ["StepLoss", "TrainResult", "TrainTask", "Trainer", "adamw", "check_batch_fits", "is_check_step", "step_generator", "warmup_lambda"]


@dataclass(frozen=True)
class StepLoss:
    """One micro-batch's differentiable ``loss`` and detached scalars to log (averaged per step; NaN: absent)."""

    loss: Tensor
    logs: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    """What :meth:`Trainer.fit` returns (on every process)."""

    output_dir: Path
    step: int
    last_loss: float
    skipped_images: int
    unique_bad_images: int
    train_seconds: float = 0.0  # inside the training steps (no checkpoints, logs or evaluation)
    stopped_early: bool = False  # train.max_train_seconds was spent before train.steps


def adamw(model: nn.Module, cfg: OptimConfig, *, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on parameters of rank < 2 (biases, norms).

    ``fused`` (default: wherever torch has the fused kernel for the parameters, CUDA and CPU included): one kernel
    per step instead of a per-tensor loop; the same maths up to float32 rounding (another operation order).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
        fused = all(p.is_floating_point() and p.device.type in devices for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


class TrainTask(ABC):
    """What a recipe gives the :class:`Trainer`: the model and what one micro-batch computes (override what differs).
    ``find_unused_parameters`` (DDP) stays off for per-stage parameters: every stage's take part in every forward."""

    random_flip: bool = False
    find_unused_parameters: bool = False

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The trainable model (built identically on every process: the trainer seeds first)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        """The loss of one micro-batch; every random draw from ``generator``."""

    def build_optimizer(self, model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
        """The optimiser (warmup, clipping and EMA stay the trainer's)."""
        return adamw(model, optim)

    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        """Samples / metrics with the EMA weights (main process; every process under FSDP2); scalars to log."""
        return {}

    def state(self) -> dict[str, Stateful]:
        """Objects whose state is checkpointed with the run (e.g. an adaptive stage allocation)."""
        return {}

    def batch_plan(self, num_items: int, global_batch_size: int, **kwargs: Any) -> BatchPlan:
        """Which items each process reads at each step (``kwargs``: ``world_size``, ``accumulation``, ``seed``, ``rank``)."""
        return BatchPlan(num_items, global_batch_size, random_flip=self.random_flip, **kwargs)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_items(items)


def step_generator(seed: int, step: int, shard: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``(seed, step, shard)`` only (``shard = rank * accumulation + micro``)."""
    state = np.random.SeedSequence([int(seed), int(step), int(shard)]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 ^ int(state[1]))


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """``min(1, (step + 1) / warmup_steps)``: linear warmup, then constant."""
    return (lambda step: 1.0) if warmup_steps <= 0 else (lambda step: min(1.0, (step + 1) / warmup_steps))


def check_batch_fits(num_items: int, train: TrainConfig) -> None:
    """A :class:`ConfigError` when one step's ``train.global_batch_size`` is more than the ``num_items`` of the data."""
    if num_items < train.global_batch_size:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is larger than the dataset ({num_items} items); lower it or add data")


def is_check_step(step: int, train: TrainConfig, *, over_budget: bool, world: int) -> bool:
    """Whether the loop reads its device flags after ``step``: at log, checkpoint and last steps, and, in
    one process, once the time budget is spent (several processes decide at the steps where they reduce anyway)."""
    cadence = step % train.log_every == 0 or step % train.checkpoint_every == 0 or step == train.steps
    return cadence or (over_budget and world == 1)


def _sync_host(extra: Mapping[str, Any]) -> None:
    """``sync_host()`` of the checkpointed objects keeping host copies of device state (an adaptive allocation's
    stage probabilities): at start and at check steps only, so they lag by at most ``log_every`` steps."""
    for obj in extra.values():
        sync = getattr(obj, "sync_host", None)
        if callable(sync):
            sync()


class _Counters:
    """Step and data-skip counters, checkpointed in ``extra_state.pt``."""

    def __init__(self) -> None:
        self.step, self.skipped, self.bad = 0, 0, set[int]()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "bad": sorted(self.bad)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.skipped, self.bad = int(state["step"]), int(state["skipped"]), {int(i) for i in state["bad"]}


@dataclass
class _Run:
    """Everything one :meth:`Trainer.fit` holds between steps."""

    accelerator: Accelerator
    parallel: Parallelism
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    counters: _Counters
    extra: dict[str, Stateful]
    plan: BatchPlan
    batches: Iterator[dict[str, Any]] | None
    bar: tqdm
    nonfinite: Tensor
    window: dict[str, Tensor] = field(default_factory=dict)
    window_steps: int = 0
    t_window: float = field(default_factory=time.perf_counter)
    pending_skipped: int = 0
    checked_step: int = 0
    seconds: float = 0.0
    last_loss: float = float("nan")
    grad_norm: Tensor | None = None
    stopped_early: bool = False


class Trainer:
    """Drives ``task`` over ``dataset`` (keyed by ``(index, flip)``) with ``config.train`` and ``config.optim``;
    ``name`` fills ``{name}`` in ``train.output_dir`` and names the trackers' project."""

    def __init__(self, task: TrainTask, dataset: torch.utils.data.Dataset, config: RecipeConfig, *, name: str) -> None:
        self.task, self.dataset, self.config, self.name = task, dataset, config, name
        self.train, self.optim = config.train, config.optim
        self.output_dir = Path(self.train.output_dir.format(name=name)).expanduser()
        self.lock = RunLock(self.output_dir)  # held by the main process from start to finish

    def fit(self) -> TrainResult:
        """Train to ``train.steps`` (or the time budget), checkpointing, logging and evaluating on the way."""
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> TrainResult:
        run = self._start()
        t = self.train
        while run.counters.step < t.steps:
            started = time.perf_counter()
            self._step(run)
            run.counters.step += 1
            run.window_steps += 1
            run.seconds += time.perf_counter() - started
            run.bar.update(1)
            step = run.counters.step
            last = self._read_flags(run) or step == t.steps  # the flags first: always read at a check step
            if step % t.log_every == 0 or last:
                self._log(run)
            if step % t.checkpoint_every == 0 or last:
                run.parallel.save(self.output_dir / "checkpoints", step, run.model, run.optimizer, run.extra)
            if t.sample_every and (step % t.sample_every == 0 or last):
                self._evaluate(run)
            if run.stopped_early:
                break
        return self._finish(run)

    def _start(self) -> _Run:
        check_output_writable(self.output_dir)
        accelerator = self._accelerator()
        self._own_folder(accelerator)
        resume = self._resume_path(accelerator)
        check_resume_config(stored_config(self.output_dir, resume), self.config)
        parallel = make_parallelism(accelerator, self.train)
        if accelerator.is_main_process:
            tidy_checkpoints(self.output_dir, self.train.resume, resume)
            save_config(self.config, self.output_dir / "config.yaml")
        accelerator.wait_for_everyone()
        share_scan = getattr(self.dataset, "share_scan", None)  # one folder scan (the main process's) for every process
        if callable(share_scan) and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            share_scan(accelerator.is_main_process, broadcast_object_list)
        t = self.train
        check_batch_fits(len(self.dataset), t)  # type: ignore[arg-type]
        plan = self.task.batch_plan(len(self.dataset), t.global_batch_size, world_size=accelerator.num_processes,  # type: ignore[arg-type]
                                    accumulation=t.grad_accumulation, seed=t.seed, rank=accelerator.process_index)  # fmt: skip
        torch.manual_seed(t.seed)  # identical initial weights on every process
        schedulers: list[torch.optim.lr_scheduler.LambdaLR] = []

        def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
            # Before accelerate prepares it: a prepared scheduler would step once per process per step.
            optimizer = self.task.build_optimizer(model, self.optim)
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(self.optim.warmup_steps)))
            return optimizer

        model, optimizer, ema = parallel.prepare(self.task.build_model(), make_optimizer)
        counters = _Counters()
        extra: dict[str, Stateful] = {"scheduler": schedulers[0], "run": counters, **({"ema": ema} if ema else {}), **self.task.state(),
                                      "config": ConfigRecord(config_to_dict(self.config))}  # fmt: skip
        if resume is not None:
            parallel.load(resume, model, optimizer, extra)
            accelerator.print(f"resumed from {resume} at step {counters.step}")
        if accelerator.is_main_process and t.trackers:
            accelerator.init_trackers(self.name.replace("/", "_"), config=flatten_config(config_to_dict(self.config)))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=PlanBatchSampler(plan, counters.step, t.steps), num_workers=t.num_workers,
            collate_fn=self.task.collate, pin_memory=accelerator.device.type == "cuda",
        )  # fmt: skip
        bar = tqdm(total=t.steps, initial=counters.step, disable=not (accelerator.is_main_process and t.progress), desc=self.name, dynamic_ncols=True)
        model.train()
        _sync_host(extra)
        return _Run(accelerator, parallel, model, optimizer, schedulers[0], ema, counters, extra, plan, iter(loader), bar,
                    torch.zeros((), dtype=torch.bool, device=accelerator.device), checked_step=counters.step)  # fmt: skip

    def _accelerator(self) -> Accelerator:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

        mp = self.train.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and not self.train.cpu else "no"
        handlers: list[Any] = [InitProcessGroupKwargs(timeout=timedelta(minutes=self.train.timeout_minutes))]  # every collective's
        if self.task.find_unused_parameters:
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        trackers = [t for t in self.train.trackers if t != "none"] or None
        folders = ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs"))
        return Accelerator(mixed_precision=mp, cpu=self.train.cpu, kwargs_handlers=handlers, log_with=trackers, project_config=folders)

    def _own_folder(self, accelerator: Accelerator) -> None:
        """The main process takes the run folder's lock; every process raises :class:`RunFolderBusy` if it is held,
        and a ``ConfigError`` if some process does not see the lock's record (not one folder for every node)."""
        busy, record = None, ""
        if accelerator.is_main_process:
            try:
                if notice := self.lock.acquire():
                    print(notice, file=sys.stderr)
                record = lock_record(self.output_dir)
            except RunFolderBusy as e:
                busy = str(e)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list, gather_object

            busy, record = broadcast_object_list([busy, record])
            if not busy:
                mine = (accelerator.process_index, socket.gethostname(), lock_record(self.output_dir) == record)
                check_shared_folder(self.output_dir, gather_object([mine]))
        if busy:
            raise RunFolderBusy(busy)

    def _resume_path(self, accelerator: Accelerator) -> Path | None:
        """The checkpoint to resume from: every process reads the same folder and hashes its share of each candidate's files."""
        from accelerate.utils import gather_object

        world = accelerator.num_processes
        verify = shared_verify(accelerator.process_index, world, gather_object if world > 1 else list)
        warn = None if accelerator.is_main_process else (lambda line: None)
        return choose_resume(self.output_dir, self.train.resume, verify=verify, warn=warn)

    def _step(self, run: _Run) -> None:
        acc, step, device = self.train.grad_accumulation, run.counters.step, run.accelerator.device
        for micro in range(acc):
            assert run.batches is not None, "the run has finished"
            batch = next(run.batches)
            bad = batch.get("bad", [])
            run.pending_skipped += len(bad)
            run.counters.bad.update(int(i) for i in bad)
            generator = step_generator(self.train.seed, step, run.plan.shard_index(micro), device)
            with run.parallel.gradient_sync(run.model, micro == acc - 1), run.accelerator.autocast():
                out = self.task.loss(run.model, batch, generator=generator, device=device)
                run.nonfinite |= ~torch.isfinite(out.loss.detach())
                run.accelerator.backward(out.loss / acc)
            for k, v in {"loss": out.loss.detach(), **out.logs}.items():
                v = v.detach().float().to(device).reshape(())
                present = torch.isfinite(v)  # NaN marks "not present in this micro-batch" (a stage nobody drew)
                pair = torch.stack([torch.where(present, v, torch.zeros_like(v)), present.float()])
                run.window[k] = run.window[k] + pair if k in run.window else pair
        if self.optim.grad_clip is not None:
            run.grad_norm = run.parallel.clip(run.model, self.optim.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.model, step)

    def _read_flags(self, run: _Run) -> bool:
        """At check steps, one host read (and reduction) of the flags; whether the budget stops the run here."""
        step, budget, world = run.counters.step, self.train.max_train_seconds, run.accelerator.num_processes
        over = budget is not None and run.seconds >= budget
        if not is_check_step(step, self.train, over_budget=over, world=world):
            return False
        flags = torch.cat([run.nonfinite.float().reshape(1), torch.tensor([float(run.pending_skipped), float(over)], device=run.accelerator.device)])
        bad_loss, skipped, n_over = (run.accelerator.reduce(flags, "sum") if world > 1 else flags).tolist()
        if bad_loss:
            raise FloatingPointError(f"non-finite loss at a step in {run.checked_step + 1}..{step}; nothing after step {run.checked_step} was saved")
        run.counters.skipped += int(skipped)
        _sync_host(run.extra)
        run.nonfinite.zero_()
        run.pending_skipped, run.checked_step = 0, step
        run.stopped_early = n_over > 0 and step < self.train.steps
        if run.stopped_early:
            run.bar.write(f"stopping after {step} of {self.train.steps} steps: the {budget:g} s training budget is spent")
        return run.stopped_early

    def _log(self, run: _Run) -> None:
        acc, logs = run.accelerator, {}
        for k, pair in sorted(run.window.items()):
            total, count = (acc.reduce(pair, "sum") if acc.num_processes > 1 else pair).tolist()
            logs[k] = total / count if count else float("nan")
        logs["lr"] = run.scheduler.get_last_lr()[0]
        if run.grad_norm is not None:
            logs["grad_norm"] = float(run.grad_norm)
        logs["skipped_images"] = run.counters.skipped
        logs["steps_per_s"] = run.window_steps / max(1e-9, time.perf_counter() - run.t_window)
        run.last_loss = logs["loss"]
        self._write_scalars(run, logs)
        run.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        run.window, run.window_steps, run.t_window = {}, 0, time.perf_counter()

    def _write_scalars(self, run: _Run, scalars: Mapping[str, float]) -> None:
        if scalars and run.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": run.counters.step, **scalars}) + "\n")
        if scalars:
            run.accelerator.log(dict(scalars), step=run.counters.step)

    def _evaluate(self, run: _Run) -> None:
        """``task.evaluate`` on the EMA weights, on every process (each computes a share of every model call: the
        FSDP2 shards, DDP's split batches); the main process writes the files."""
        main = run.accelerator.is_main_process
        if main or run.parallel.samples_on_every_rank:
            with contextlib.ExitStack() as stack:
                target = stack.enter_context(run.ema.applied(run.model)) if run.ema is not None else run.accelerator.unwrap_model(run.model)
                out_dir = self.output_dir if main else Path(stack.enter_context(tempfile.TemporaryDirectory()))
                was_training = target.training
                target.eval()
                scalars = self.task.evaluate(run.parallel.sampling_model(target), step=run.counters.step, out_dir=out_dir,
                                             device=run.accelerator.device)  # fmt: skip
                target.train(was_training)
            self._write_scalars(run, scalars)
        run.accelerator.wait_for_everyone()

    def _finish(self, run: _Run) -> TrainResult:
        run.bar.close()
        run.batches = None  # ends the loader's worker processes
        acc, c = run.accelerator, run.counters
        digests = run.parallel.trained_digests(run.model)
        final = run.parallel.final_model(run.model, run.ema, self.task.build_model)
        if acc.is_main_process:
            save_final_model(self.output_dir, final)  # type: ignore[arg-type]
            summary = {
                "step": c.step, "steps_requested": self.train.steps, "stopped_early": run.stopped_early, "last_loss": run.last_loss,
                "skipped_images": c.skipped, "unique_bad_images": len(c.bad), "num_processes": acc.num_processes,
                "parallelism": type(run.parallel).__name__, "param_sha256_per_rank": digests,
            }  # fmt: skip
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
            if c.skipped:
                acc.print(f"skipped {c.skipped} unreadable image reads ({len(c.bad)} distinct files)")
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(self.output_dir, c.step, run.last_loss, c.skipped, len(c.bad), run.seconds, run.stopped_early)

