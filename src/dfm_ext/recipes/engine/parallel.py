"""How a run spreads its model over the processes and checkpoints it: one :class:`Parallelism` per strategy,
:class:`DDP` (accelerate's) or :class:`FSDP2` (torch's ``fully_shard``; accelerate's FSDP plugin silently becomes
DDP on CPU). Both write through :func:`~dfm_ext.recipes.engine.checkpoint.write_step_folder`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dfm_ext.fileio import atomic_write_text
from dfm_ext.recipes.engine.batch_split import BatchSplit
from dfm_ext.recipes.engine.checkpoint import (
    CorruptCheckpointError, Stateful, load_extra_state, save_extra_state, state_digest, write_step_folder,
)  # fmt: skip
from dfm_ext.recipes.engine.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["BLOCK_LIST_NAMES", "DDP", "EMA", "FSDP2", "RECOMPILE_LIMIT", "Parallelism", "compile_model", "full_state", "load_full_state",
           "make_parallelism", "shard_model", "transformer_blocks", "unwrap"]  # fmt: skip

#: ``ModuleList`` attribute names that hold the repeated transformer blocks, per model family.
BLOCK_LIST_NAMES = ("blocks", "transformer_blocks", "single_transformer_blocks")
_SHARDED = "sharded.json"  # written into a sharded checkpoint: its format and world size


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


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without its DDP / accelerate wrappers (and the evaluation's :class:`BatchSplit`)."""
    while isinstance(inner := model.inner if isinstance(model, BatchSplit) else getattr(model, "module", None), nn.Module):
        model = inner
    return model


class Parallelism(ABC):
    """One way of running a model over the processes: set up, step, checkpoint, export (the loop never asks which)."""

    #: Whether every process takes part in sampling: FSDP2 (collectives inside the forward), and DDP, whose
    #: processes each compute a share of every model call's batch (:meth:`sampling_model`).
    samples_on_every_rank = True

    def __init__(self, accelerator: Accelerator, train: TrainConfig) -> None:
        self.accelerator, self.train = accelerator, train

    @abstractmethod
    def prepare(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer, EMA | None]:
        """The model to train (wrapped, on its device, compiled if asked), its optimiser and EMA."""

    @abstractmethod
    def gradient_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
        """Around one micro-batch's backward: gradients are reduced across processes only when ``last``."""

    @abstractmethod
    def clip(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip the gradients' global norm in place; returns the norm (a device tensor, not read)."""

    @abstractmethod
    def save(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> Path:
        """Write checkpoint ``root/step-<step>`` (every process calls this)."""

    @abstractmethod
    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> None:
        """Restore a checkpoint written by :meth:`save` (verified before)."""

    @abstractmethod
    def final_model(self, model: nn.Module, ema: EMA | None, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The model to export with the full (EMA when there is one) weights on the main process, ``None``
        elsewhere (``build`` makes a fresh unsharded model); a collective."""

    @abstractmethod
    def trained_digests(self, model: nn.Module) -> list[str]:
        """SHA-256 of the trained weights (each process's replica, or the gathered shards); a collective."""

    def sampling_model(self, model: nn.Module) -> nn.Module:
        """The model ``task.evaluate`` samples with (every process calls it with the same inputs)."""
        return model

    def _compile(self, model: nn.Module, *, per_block: bool = False) -> None:
        # In place, so DDP wraps the compiled module and state-dict keys gain no "_orig_mod." prefix;
        # after the EMA copied the model, whose copy stays eager for sampling and final/.
        if self.train.compile:
            compile_model(model, self.train.compile_backend, per_block=per_block)

    def _ema(self, model: nn.Module, *, module: bool) -> EMA | None:
        return None if self.train.ema_decay is None else EMA(model, self.train.ema_decay, warmup=self.train.ema_warmup, module=module)


class DDP(Parallelism):
    """Replicated weights: accelerate's DistributedDataParallel (one process: the plain model)."""

    def prepare(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer, EMA | None]:
        ema = self._ema(model, module=True)
        optimizer = make_optimizer(model)
        self._compile(model)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if ema is not None:
            ema.module.to(self.accelerator.device)  # type: ignore[union-attr]
            ema.shadow = {n: t.detach() for n, t in tensors_of(ema.module)}  # type: ignore[arg-type]
        return model, optimizer, ema

    def gradient_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def sampling_model(self, model: nn.Module) -> nn.Module:
        """Several processes: each model call's batch split over them and the outputs gathered (:class:`BatchSplit`)."""
        acc = self.accelerator
        return model if acc.num_processes == 1 else BatchSplit(model, acc.process_index, acc.num_processes)

    def clip(self, model: nn.Module, max_norm: float) -> Tensor:
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def save(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> Path:
        acc = self.accelerator
        return write_step_folder(
            root, step, keep=self.train.keep_checkpoints, is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
            write_all=lambda tmp: acc.save_state(str(tmp)), write_main=lambda tmp: save_extra_state(tmp, extra),
            rank=acc.process_index, world=acc.num_processes,
        )  # fmt: skip

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> None:
        if (path / _SHARDED).is_file():
            raise ConfigError(f"{path} is a sharded (FSDP2) checkpoint; resume it with train.sharding=fsdp2")
        try:
            self.accelerator.load_state(str(path))
        except RuntimeError as e:  # another model's checkpoint: a missing or unexpected key, a shape
            if "state_dict" not in str(e):
                raise
            raise ConfigError(f"cannot resume from {path}: it holds another model's weights ({str(e).splitlines()[0][:300]})") from None
        load_extra_state(path, extra)

    def final_model(self, model: nn.Module, ema: EMA | None, build: Callable[[], nn.Module]) -> nn.Module | None:
        if not self.accelerator.is_main_process:
            return None
        return ema.module if ema is not None else unwrap(model)

    def trained_digests(self, model: nn.Module) -> list[str]:
        digest = state_digest(unwrap(model).state_dict())
        if self.accelerator.num_processes == 1:
            return [digest]
        from accelerate.utils import gather_object

        return list(gather_object([digest]))


#: torch's recompile limit while a run compiles (default 8): one graph per input shape, and FLUX's 14 aspect-ratio
#: buckets would otherwise send the 9th bucket's steps silently to eager.
RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module, backend: str, *, per_block: bool = False) -> nn.Module:
    """``torch.compile`` ``model`` in place (its state-dict keys unchanged) and raise the recompile limits.
    ``per_block``: each transformer block's ``forward`` alone, so FSDP2's hooks run between the graphs (no break)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    if per_block:
        for block in transformer_blocks(model):
            block.forward = torch.compile(block.forward, backend=backend)
    else:
        model.compile(backend=backend)
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (elements of a ``ModuleList`` named in :data:`BLOCK_LIST_NAMES`)."""
    blocks: list[nn.Module] = []
    for _, module in model.named_modules():
        for attr in BLOCK_LIST_NAMES:
            lst = module._modules.get(attr)
            if isinstance(lst, nn.ModuleList):
                blocks += [b for b in lst if all(b is not o for o in blocks)]
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}  # a list inside a block is its block's unit
    blocks = [b for b in blocks if id(b) not in inner]
    if not blocks:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(
            f"{type(model).__name__} has no transformer block list named one of {list(BLOCK_LIST_NAMES)}; "
            f"its ModuleLists are {lists or 'none'}: FSDP2 needs to know which modules are the blocks"
        )
    return blocks


def shard_model(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True, mp_policy: Any = None) -> nn.Module:
    """``fully_shard`` every transformer block, then the root; returns ``model`` (sharded in place).

    ``mesh``: 1-D (FSDP) or 2-D ``(replicate, shard)`` (HSDP). ``mp_policy`` (bf16 compute) applies to the blocks;
    the root keeps float32 parameters and its inputs as given, so the times ``t`` stay float32. Unused parameters
    (a stage's LoRA no local sample drew) get zero gradients, so the ranks' collectives stay in step.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    # diffusers DiTTransformer2DModel (and its DFM adapter) calls transformer_blocks[0].norm1.emb once
    # more after the loop, outside the block's forward: its own unit gathers it whenever it runs.
    emb = getattr(getattr(blocks[0], "norm1", None), "emb", None)
    units = [emb] if isinstance(emb, nn.Module) and any(True for _ in emb.parameters()) else []
    block, root = dict[str, Any](), dict[str, Any]()
    if mp_policy is not None:
        block = {"mp_policy": dataclasses.replace(mp_policy, output_dtype=mp_policy.output_dtype or torch.float32)}
        root = {"mp_policy": dataclasses.replace(mp_policy, param_dtype=None, cast_forward_inputs=False)}
    for unit in units:  # the time embedder inside block 0 (its own unit, first): it takes t, as the root
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, **root)
    for unit in blocks:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, **block)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **root)
    model.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    return model


class FSDP2(Parallelism):
    """Sharded weights, gradients, optimiser state and EMA (``torch.distributed.fsdp.fully_shard``); HSDP: a 2-D mesh."""

    def mesh(self, device: torch.device) -> DeviceMesh:
        """The device mesh: ``(world,)``, or ``(world / shard, shard)`` named ``("replicate", "shard")`` for HSDP."""
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if self.train.sharding != "hsdp":
            return init_device_mesh(device.type, (world,))
        shard = self.train.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if shard > world or world % shard:
            raise ConfigError(f"train.hsdp_shard_size={shard} must divide the {world} processes (the processes per node by default)")
        return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))

    def mp_policy(self) -> Any:
        """bf16 compute with ``train.fsdp_reduce_dtype`` reductions under ``mixed_precision=bf16``; else ``None`` (float32)."""
        if self.accelerator.mixed_precision != "bf16":
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, self.train.fsdp_reduce_dtype))

    def prepare(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer, EMA | None]:
        device = self.accelerator.device
        if not dist.is_initialized():  # one process: a world of one, so the same code path runs
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        model = shard_model(model.to(device), self.mesh(device), mp_policy=self.mp_policy())
        self.ema = ema = self._ema(model, module=False)
        optimizer = make_optimizer(model)
        self._compile(model, per_block=True)  # after fully_shard, each block's forward: FSDP2's hooks run outside the graphs
        return model, optimizer, ema

    def gradient_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
        # reduce_scatter (the default): every micro-batch's gradients are reduce-scattered and summed into the
        # sharded ones, so no full-size gradient outlives its backward; unsharded: held until the last.
        model.set_requires_gradient_sync(last or self.train.fsdp_accumulation == "reduce_scatter")  # type: ignore[operator]
        return contextlib.nullcontext()

    def clip(self, model: nn.Module, max_norm: float) -> Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # reduced over the shards
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _states(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, **({"ema": self.ema.shadow} if self.ema is not None else {})}

    def save(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> Path:
        import torch.distributed.checkpoint as dcp

        def write_main(tmp: Path) -> None:
            save_extra_state(tmp, extra)
            atomic_write_text(tmp / _SHARDED, json.dumps({"format": "torch.distributed.checkpoint", "world_size": dist.get_world_size(), "step": step}) + "\n")

        return write_step_folder(
            root, step, keep=self.train.keep_checkpoints, is_main=dist.get_rank() == 0, barrier=dist.barrier,
            write_all=lambda tmp: dcp.save(self._states(model, optimizer), checkpoint_id=str(tmp)), write_main=write_main,
            rank=dist.get_rank(), world=dist.get_world_size(),
        )  # fmt: skip

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> None:
        """The world size may differ from the one that wrote it (DCP reshards on load)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (path / _SHARDED).is_file():
            raise ConfigError(f"{path} is not a sharded checkpoint (written without train.sharding=fsdp2); resume it with train.sharding=none")
        state = self._states(model, optimizer)
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if self.ema is not None and not any(k.startswith("ema.") for k in keys):
            raise CorruptCheckpointError(f"{path} holds no EMA weights but the run has train.ema_decay set")
        try:
            dcp.load(state, checkpoint_id=str(path))  # in place, into the local shards
        except (RuntimeError, ValueError) as e:  # a key or shape of another model
            raise ConfigError(f"cannot resume from {path}: it holds another model's weights ({str(e).splitlines()[0][:300]})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        load_extra_state(path, extra)

    def final_model(self, model: nn.Module, ema: EMA | None, build: Callable[[], nn.Module]) -> nn.Module | None:
        with ema.applied(model) if ema is not None else contextlib.nullcontext(model) as averaged:
            state = full_state(averaged)
        if not self.accelerator.is_main_process:
            return None
        final = build()  # the one model format: a freshly built (unsharded) model holding the full weights
        final.load_state_dict(state)
        return final

    def trained_digests(self, model: nn.Module) -> list[str]:
        state = full_state(model)
        return [state_digest(state)] if self.accelerator.is_main_process else []


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The full ``state_dict`` of a sharded model on rank 0 (CPU tensors; ``{}`` on the others); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # type: ignore[return-value]


def load_full_state(path: str | Path, template: Mapping[str, Tensor], *, key: str = "model") -> dict[str, Tensor]:
    """Full tensors of one part (``"model"`` or ``"ema"``) of an FSDP2 checkpoint, in one process (no process group);
    ``template``: name -> tensor of the full shape and dtype (e.g. a fresh model's ``state_dict()``)."""
    import torch.distributed.checkpoint as dcp

    if not (Path(path) / _SHARDED).is_file():
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no {_SHARDED})")
    out = {k: torch.empty_like(v, device="cpu") for k, v in template.items()}
    dcp.load({key: out}, checkpoint_id=str(path), no_dist=True)
    return out


def make_parallelism(accelerator: Accelerator, train: TrainConfig) -> Parallelism:
    """:class:`FSDP2` for ``train.sharding=fsdp2`` or ``hsdp`` (or ``auto`` under an accelerate FSDP launch config), else :class:`DDP`."""
    accelerate_fsdp = str(accelerator.distributed_type).endswith("FSDP")
    if train.sharding == "none" and accelerate_fsdp:
        raise ConfigError("train.sharding=none but accelerate was launched with an FSDP config; use train.sharding=fsdp2 or auto")
    if not (train.sharding in ("fsdp2", "hsdp") or (train.sharding == "auto" and accelerate_fsdp)):
        return DDP(accelerator, train)
    if accelerator.mixed_precision == "fp16":
        raise ConfigError(f"train.sharding={train.sharding} with mixed_precision=fp16 is not supported (no sharded grad scaler); use bf16")
    return FSDP2(accelerator, train)
