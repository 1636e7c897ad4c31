"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): wrap policy, EMA, checkpoints.

The engine (:class:`dfm_ext.recipes.engine.trainer.Trainer`, ``train.sharding=fsdp2``) uses this module;
it works on any device type torch's ``DeviceMesh`` supports (``cuda`` with NCCL, ``cpu`` with
gloo, which is how the tests run two ranks on one machine). accelerate's own FSDP plugin is not
used: on CPU it silently becomes DDP, so the sharded path is built on torch's API directly and
is the same code on every device.

* :func:`transformer_blocks` / :func:`shard_model`: ``fully_shard`` per transformer block, then
  the root. A "block" is an element of a ``ModuleList`` named ``blocks`` (reference DiT,
  VideoDiT), ``transformer_blocks`` (diffusers DiT, PixArt, SD3, CogVideoX, Flux) or
  ``single_transformer_blocks`` (Flux). Per-stage parameters of :func:`dfm_ext.specialize` live
  inside the layers they specialise, so they are sharded with their block.
* :class:`ShardedEMA`: the EMA's shadow tensors are ``DTensor`` s with the parameters'
  placements; one update is a ``torch._foreach_lerp_`` over the local shards (no gather, no
  communication), the same arithmetic as ``AveragedModel`` with ``get_ema_multi_avg_fn``.
  :meth:`ShardedEMA.applied` swaps the EMA into the sharded model (for sampling and ``final/``).
* :func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint`: model, optimiser and EMA
  through ``torch.distributed.checkpoint`` (each rank writes its own shards) into ``tmp-<step>``,
  then ``extra_state.pt`` (scheduler, step counters, EMA counter), :data:`SHARDED_MARKER` and, last,
  the completeness record ``complete.json`` (sizes and SHA-256 of every file), then an atomic
  rename to ``step-<step>`` and ``latest``: the same rules as the unsharded checkpoints
  (:mod:`.checkpointing`), so ``resume=auto`` verifies and picks them the same way.
* :func:`load_full_state`: read a sharded checkpoint into full tensors in one process (no
  process group), e.g. to export or inspect it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.fileio import atomic_write_text

from dfm_ext.recipes.engine.checkpoint import (
    EXTRA_STATE,
    Stateful,
    load_extra_state,
    write_checkpoint_atomically,
)
from dfm_ext.recipes.engine.config import ConfigError

__all__ = [
    "BLOCK_LIST_NAMES",
    "SHARDED_MARKER",
    "ShardedEMA",
    "device_mesh",
    "gather_full_state",
    "is_sharded_checkpoint",
    "load_full_state",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
    "shard_model",
    "transformer_blocks",
    "uses_fsdp2",
]

# ModuleList attribute names that hold the repeated transformer blocks, per model family.
BLOCK_LIST_NAMES = ("blocks", "transformer_blocks", "single_transformer_blocks")
# Written last into a sharded checkpoint folder (before the atomic rename): format and world size.
SHARDED_MARKER = "sharded.json"


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (any depth of nesting), in module order.

    Raises:
        ValueError: no ``ModuleList`` named one of :data:`BLOCK_LIST_NAMES` is found; the
            message lists the model's ``ModuleList`` s so a new family can be added.
    """
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for _, module in model.named_modules():
        for attr in BLOCK_LIST_NAMES:
            lst = module._modules.get(attr)
            if isinstance(lst, nn.ModuleList):
                for block in lst:
                    if id(block) not in seen:
                        blocks.append(block)
                        seen.add(id(block))
    # A block list nested inside another block belongs to that block's FSDP unit.
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    blocks = [b for b in blocks if id(b) not in inner]
    if not blocks:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(
            f"{type(model).__name__} has no transformer block list named one of {list(BLOCK_LIST_NAMES)}; "
            f"its ModuleLists are {lists or 'none'}: FSDP2 needs to know which modules are the blocks"
        )
    return blocks


def _called_outside_block(blocks: list[nn.Module]) -> list[nn.Module]:
    # diffusers DiTTransformer2DModel (and the DFM adapter, which follows it) calls
    # transformer_blocks[0].norm1.emb once more after the loop for the final modulation: outside
    # the block's forward, where FSDP would not have gathered its weights. Its own FSDP unit
    # gathers them whenever it runs.
    norm1 = getattr(blocks[0], "norm1", None) if blocks else None
    emb = getattr(norm1, "emb", None)
    return [emb] if isinstance(emb, nn.Module) and any(True for _ in emb.parameters()) else []


def shard_model(model: nn.Module, mesh: Any, *, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every transformer block, then the root; returns ``model`` (sharded in place).

    Unused parameters (a stage's LoRA that no local sample drew) are reduce-scattered as zero
    gradients, so the ranks' collectives stay in step when they used different parameters.

    Args:
        model: the (wrapped) model, already on the mesh's device.
        mesh: a 1-D ``DeviceMesh`` over all ranks.
        reshard_after_forward: free the gathered block weights after each block's forward.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    for unit in _called_outside_block(blocks):  # inner units first, then the blocks holding them
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    model.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    return model


def _ema_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    # Parameters (trainable or not) and buffers, as AveragedModel(use_buffers=True) averages them.
    return [*model.named_parameters(), *model.named_buffers()]


class ShardedEMA:
    """Exponential moving average of a sharded model, kept sharded like its parameters.

    ``shadow[name]`` is a detached copy of the parameter or buffer ``name`` (a ``DTensor`` with
    the same mesh and placements for sharded parameters). :meth:`update` follows
    ``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)``: the first
    update copies, later ones do ``ema <- ema + (1 - decay) (p - ema)`` (``_foreach_lerp_``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.n_averaged = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {n: t.detach().clone() for n, t in _ema_tensors(model)}

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        tensors = _ema_tensors(model)
        names = [n for n, _ in tensors]
        if names != list(self.shadow):
            raise ValueError("the model's parameters and buffers differ from the ones the EMA was built with")
        return [_local(self.shadow[n]) for n in names], [_local(t.detach()) for _, t in tensors]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current (local shards of) weights into the average."""
        ema, cur = self._pairs(model)
        if self.n_averaged == 0:
            torch._foreach_copy_(ema, cur)
        else:
            fl = [i for i, t in enumerate(ema) if t.is_floating_point() or t.is_complex()]
            if fl:
                torch._foreach_lerp_([ema[i] for i in fl], [cur[i] for i in fl], 1.0 - self.decay)
            for i in sorted(set(range(len(ema))) - set(fl)):
                ema[i].copy_(ema[i] * self.decay + cur[i] * (1.0 - self.decay))
        self.n_averaged += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run with the EMA weights in ``model`` (every rank); the trained weights come back exactly."""
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
        """The counter only: the shadow tensors are saved sharded by :func:`save_sharded_checkpoint`."""
        return {"n_averaged": self.n_averaged, "decay": self.decay}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_averaged = int(state["n_averaged"])


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("sharded checkpoints need an initialised torch.distributed process group")
    return dist


def _states(model: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.shadow
    return state


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` was written by :func:`save_sharded_checkpoint`."""
    return (Path(path) / SHARDED_MARKER).is_file()


def save_sharded_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ema: ShardedEMA | None = None,
    extra: Mapping[str, Stateful] | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``root/step-<step>`` with ``torch.distributed.checkpoint`` (every rank calls this).

    Each rank writes its shards into ``tmp-step-<step>``; the main rank then writes
    ``extra_state.pt`` (``extra``'s state dicts, the same on every rank), :data:`SHARDED_MARKER`
    and the completeness record (:func:`~.checkpointing.write_manifest`) last, renames the folder
    (``os.replace``) and points ``latest`` at it. A crash at any moment leaves no folder that
    counts as complete.

    Raises:
        FileExistsError: ``root/step-<step>`` exists (checked on every rank first): never written over.
        DiskFullError: the disk filled up; ``tmp-<step>`` is removed at the next start.
    """
    import torch.distributed.checkpoint as dcp

    dist = _dist()

    def write_main(tmp: Path) -> None:
        torch.save({k: v.state_dict() for k, v in (extra or {}).items()}, tmp / EXTRA_STATE)
        marker = {"format": "torch.distributed.checkpoint", "world_size": dist.get_world_size(), "step": step}
        atomic_write_text(tmp / SHARDED_MARKER, json.dumps(marker) + "\n")

    return write_checkpoint_atomically(
        root, step, keep=keep, is_main=dist.get_rank() == 0, barrier=dist.barrier,
        write_all=lambda tmp: dcp.save(_states(model, optimizer, ema), checkpoint_id=str(tmp)),  # metadata by rank 0
        write_main=write_main,
    )  # fmt: skip


def load_sharded_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ema: ShardedEMA | None = None,
    extra: Mapping[str, Stateful] | None = None,
) -> None:
    """Restore :func:`save_sharded_checkpoint`'s state into the sharded ``model``/``optimizer``/``ema``.

    The world size may differ from the one that wrote it (DCP reshards on load). Nothing is
    unpickled: ``extra_state.pt`` loads with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` is not a sharded checkpoint, or lacks ``extra``'s file.
        KeyError: the checkpoint has no EMA but ``ema`` is given, or ``extra`` names a missing state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no {SHARDED_MARKER}); it was written without train.sharding=fsdp2")
    state = _states(model, optimizer, ema)
    if ema is not None and not any(k.startswith("ema.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata):
        raise KeyError(f"{path} holds no EMA weights but the run has train.ema_decay set")
    dcp.load(state, checkpoint_id=str(path))  # in place, into the local shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    load_extra_state(path, extra, writer="save_sharded_checkpoint")


def load_full_state(path: str | Path, template: Mapping[str, Tensor], *, key: str = "model") -> dict[str, Tensor]:
    """Full tensors of one part (``"model"`` or ``"ema"``) of a sharded checkpoint, in one process.

    Args:
        path: a folder written by :func:`save_sharded_checkpoint`.
        template: name -> tensor of the full shape and dtype (e.g. a freshly built model's
            ``state_dict()``); it is not modified.
        key: ``"model"`` (the trained weights) or ``"ema"``.

    Returns:
        name -> full CPU tensor, for every name of ``template``.
    """
    import torch.distributed.checkpoint as dcp

    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no {SHARDED_MARKER})")
    out = {k: torch.empty_like(v, device="cpu") for k, v in template.items()}
    dcp.load({key: out}, checkpoint_id=str(path), no_dist=True)
    return out


def gather_full_state(model: nn.Module) -> dict[str, Tensor]:
    """The full ``state_dict`` of a sharded model on rank 0 (CPU tensors; ``{}`` on other ranks).

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def uses_fsdp2(mode: str, accelerator: Any) -> bool:
    """Whether a run shards with FSDP2: ``train.sharding`` (``mode``) ``fsdp2``, or ``auto`` under an
    accelerate FSDP launch config; refuses the combinations that cannot work.

    Raises:
        ConfigError: ``none`` under an FSDP launch config, or FSDP2 with fp16 mixed precision.
    """
    accelerate_fsdp = str(accelerator.distributed_type).endswith("FSDP")
    if mode == "none" and accelerate_fsdp:
        raise ConfigError("train.sharding=none but accelerate was launched with an FSDP config; use train.sharding=fsdp2 or auto")
    fsdp = mode == "fsdp2" or (mode == "auto" and accelerate_fsdp)
    if fsdp and accelerator.mixed_precision == "fp16":
        raise ConfigError("train.sharding=fsdp2 with mixed_precision=fp16 is not supported (no sharded grad scaler); use bf16")
    return fsdp


def device_mesh(accelerator: Any) -> Any:
    """A 1-D device mesh over every process (one process: a world of one, so the same code path runs)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():  # one process: a world of one, so the same code path runs
        backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(accelerator.device.type, (dist.get_world_size(),))
