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

The pieces live by job: :mod:`.train_config` (the ``train``/``optim`` sections, the task
protocol, re-exported here), :mod:`.optimizer` (AdamW, warmup, EMA), :mod:`.run_folder`
(output folder, resume decisions), :mod:`.checkpointing` and :mod:`.sharding`; this module is the loop.

One run is one folder: ``config.yaml`` (resolved config), ``checkpoints/``, ``logs/``
(trackers), ``samples/``, ``metrics.jsonl``, ``final/`` (EMA weights), ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfm_ext.recipes.engine import parallel as sharding
from dfm_ext.recipes.engine.checkpoint import load_checkpoint, save_checkpoint
from dfm_ext.recipes.engine.config import ConfigError, config_to_dict, save_config
from dfm_ext.recipes.engine.data import BatchPlan, PlanBatchSampler, collate_items
from dfm_ext.recipes.engine.optimizer import WarmupEMA, build_ema, build_optimizer, warmup_lambda
from dfm_ext.recipes.engine.run_folder import (
    check_output_writable,
    check_resume_config,
    choose_resume,
    flatten_config,
    resolve_output_dir,
    save_final_model,
    state_digest,
    tidy_checkpoints,
)
# The engine's contract lives in train_config; re-exported here, where recipes and users import it.
from dfm_ext.recipes.engine.train_config import OptimConfig, StepLoss, TrainConfig, TrainResult, TrainTask

__all__ = [
    "OptimConfig",
    "StepLoss",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "Trainer",
    "build_optimizer",
    "check_output_writable",
    "is_check_step",
    "resolve_output_dir",
    "step_generator",
    "warmup_lambda",
]


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


def _gather_objects(accelerator: Any, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return list(gather_object([obj]))


def _log_scalars(accelerator: Any, log_path: Path, step: int, scalars: Mapping[str, float]) -> None:
    """Append ``scalars`` (if any) to ``metrics.jsonl`` and the trackers (main process)."""
    if scalars:
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        accelerator.log(scalars, step=step)


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


def is_check_step(step: int, train: TrainConfig, *, over_budget: bool, world: int) -> bool:
    """Whether the loop reads its per-step flags on the host after ``step`` (steps done): at log and
    checkpoint steps, at the last step, and, in one process, as soon as the time budget is spent.

    Several processes decide on the budget (``train.max_train_seconds``) only at log and
    checkpoint steps, where they reduce their flags anyway: no collective and no device-to-host
    read per step. They may run past the budget by up to ``min(log_every, checkpoint_every) - 1`` steps.

    Example:
        >>> train = TrainConfig(steps=10, log_every=4, checkpoint_every=6)
        >>> [s for s in range(1, 11) if is_check_step(s, train, over_budget=s >= 5, world=2)]
        [4, 6, 8, 10]
        >>> [s for s in range(1, 11) if is_check_step(s, train, over_budget=s >= 5, world=1)][:3]
        [4, 5, 6]
    """
    cadence = step % train.log_every == 0 or step % train.checkpoint_every == 0 or step == train.steps
    return cadence or (over_budget and world == 1)


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
        mode = self.train.resume
        decision: list[Any] = [None]
        if accelerator.is_main_process:
            try:
                decision[0] = ("ok", choose_resume(self.output_dir, mode))
            except ConfigError as e:
                decision[0] = ("error", str(e))
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            decision = broadcast_object_list(decision)
        kind, value = decision[0]
        if kind == "error":
            raise ConfigError(value)
        return value

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        check_output_writable(self.output_dir)
        accelerator = self._accelerator()
        resume = self._resume_path(accelerator)
        check_resume_config(self.output_dir, self.full_config, resume)
        if accelerator.is_main_process:
            tidy_checkpoints(self.output_dir, self.train.resume, resume)
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
        fsdp = sharding.uses_fsdp2(self.train.sharding, accelerator)
        if fsdp:
            # Not accelerator.prepare: torch's fully_shard per block (accelerate's plugin is DDP on CPU).
            model = sharding.shard_model(model.to(accelerator.device), sharding.device_mesh(accelerator))
            if self.train.ema_decay is not None:
                ema = sharding.ShardedEMA(model, self.train.ema_decay)
        elif self.train.ema_decay is not None:
            ema = build_ema(model, self.train.ema_decay, warmup=self.train.ema_warmup)
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
            accelerator.init_trackers(self.name.replace("/", "_"), config=flatten_config(config_to_dict(self.full_config)))

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
                if isinstance(ema.multi_avg_fn, WarmupEMA):
                    ema.multi_avg_fn.updates = step
                ema.update_parameters(accelerator.unwrap_model(model))
            state.step += 1
            window_steps += 1
            bar.update(1)
            train_seconds += time.perf_counter() - t_step
            over_budget = budget is not None and train_seconds >= budget
            out_of_time = False
            if is_check_step(state.step, self.train, over_budget=over_budget, world=world):
                # One host read (and one reduction across processes) for the bad-loss flag, the
                # skipped-image count and the time budget, before anything is logged or saved.
                # Several processes agree on the budget only here, so all stop at the same step.
                flags = torch.tensor([float(pending_skipped), float(over_budget)], device=accelerator.device)
                flags = torch.cat([nonfinite.float().reshape(1), flags])
                bad_loss, skipped, n_over = (accelerator.reduce(flags, "sum") if world > 1 else flags).tolist()
                if bad_loss:
                    raise FloatingPointError(
                        f"non-finite loss at a step in {checked_step + 1}..{state.step}; nothing after step "
                        f"{checked_step} was saved"
                    )
                state.skipped += int(skipped)
                nonfinite.zero_()
                pending_skipped, checked_step = 0, state.step
                out_of_time = n_over > 0
            if out_of_time and state.step < self.train.steps:
                bar.write(f"stopping after {state.step} steps: the {budget:g} s training budget is spent")
            last = state.step == self.train.steps or out_of_time

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
                    _log_scalars(accelerator, log_path, state.step, scalars)
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
            digests = [state_digest(full_state)] if accelerator.is_main_process else []
        else:
            digests = _gather_objects(accelerator, state_digest(accelerator.unwrap_model(model).state_dict()))
        if accelerator.is_main_process:
            if ema is not None and not fsdp:
                final = ema.module
            elif full_state is not None:
                # The one model format: a freshly built (unsharded) model holding the full weights.
                final = self.task.build_model()
                final.load_state_dict(ema_state if ema_state is not None else full_state)
            else:
                final = accelerator.unwrap_model(model)
            save_final_model(self.output_dir, final)
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
        if accelerator.is_main_process:
            _log_scalars(accelerator, log_path, step, scalars)
        accelerator.wait_for_everyone()
