"""The ``sample`` command every recipe shares: N samples from a run's EMA weights, over any number of processes, resumable.

``python -m dfm_ext.recipes.<recipe> sample --run RUN --num N --out DIR [--checkpoint CKPT] [key=value ...]``
(docs/recipes/reproduce.md). Sample ``i`` takes its condition from ``i`` and its noise from ``(sampling.seed, i)``
alone, and shards are written atomically (:class:`dfm_ext.metrics.SampleShards`): any number of processes writes
the same samples and a rerun draws only the missing shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfm_ext.decompositions.base import Decomposition
from dfm_ext.metrics.samples import to_uint8
from dfm_ext.metrics.shards import SampleShards
from dfm_ext.recipes.engine.checkpoint import EXTRA_STATE, verify_manifest
from dfm_ext.recipes.engine.cli import USAGE_ERRORS, usage_error
from dfm_ext.recipes.engine.config import config_to_dict, load_config
from dfm_ext.recipes.engine.parallel import load_full_state
from dfm_ext.recipes.engine.trainer import step_generator

__all__ = ["SampleJob", "checkpoint_weights", "dispatch", "sample_command", "sample_noise"]


@dataclass(frozen=True)
class SampleJob:
    """What a recipe's ``sample`` command draws, from its config (built by the recipe's ``make_job(cfg)``).

    Attributes:
        decomposition: the stages the noise is drawn for.
        sample_shape: one sample's (latent) shape, ``[C, H, W]`` or ``[C, T, H, W]``.
        condition: global indices ``[n]`` -> the int each sample is conditioned on (class label, prompt number).
        draw: ``(model, per-stage noise, conditions, device)`` -> pixels ``[n, 3, H, W]`` / ``[n, 3, T, H, W]`` in ``[-1, 1]``.
        build_model: the training architecture (a checkpoint's EMA weights are loaded into it).
        load_final: the final folder -> the exported model (on the CPU).
        write_item: a video ``[T, H, W, 3]`` uint8 and a file stem -> its file (e.g. an MP4); ``None`` for images.
    """

    decomposition: Decomposition
    sample_shape: tuple[int, ...]
    condition: Callable[[np.ndarray], np.ndarray]
    draw: Callable[[nn.Module, list[Tensor], np.ndarray, torch.device], Tensor]
    build_model: Callable[[], nn.Module]
    load_final: Callable[[Path], nn.Module]
    write_item: Callable[[np.ndarray, Path], Any] | None = None


def sample_noise(decomposition: Decomposition, sample_shape: Sequence[int], indices: Sequence[int], seed: int) -> list[Tensor]:
    """Per-stage noise ``[n, ...]`` (CPU) whose row ``j`` is drawn, stage by stage as ``DFMSampler`` draws, from a
    generator seeded by ``(seed, indices[j])`` alone: a sample's noise does not depend on its batch or process."""
    shapes = decomposition.stage_shapes((1, *sample_shape))
    generators = [step_generator(seed, int(i), 0) for i in indices]  # the per-step seeding, keyed by the sample
    rows = [[torch.randn(tuple(s), generator=g) for s in shapes] for g in generators]
    return [torch.cat([r[k] for r in rows]) for k in range(len(shapes))]


def checkpoint_weights(model: nn.Module, path: Path, *, ema: bool) -> nn.Module:
    """Load the EMA (or, without one, the trained) weights of an engine checkpoint (DDP or FSDP2) into ``model``."""
    verify_manifest(path, hashes=False)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    if (path / "sharded.json").is_file():
        state = load_full_state(path, dict(tensors), key="ema" if ema else "model")
    elif ema:
        state = torch.load(path / EXTRA_STATE, map_location="cpu", weights_only=True)["ema"]["shadow"]
    else:
        state = load_file(str(path / "model.safetensors"))
    if missing := [n for n, _ in tensors if n not in state]:
        raise ValueError(f"{path} holds another model's weights ({len(missing)} tensors missing, e.g. {missing[0]})")
    with torch.no_grad():
        for name, t in tensors:
            t.copy_(state[name])
    return model


def sample_command(argv: Sequence[str], *, prog: str, config_cls: type, make_job: Callable[..., SampleJob],
                   options: Mapping[str, str] | None = None) -> int:  # fmt: skip
    """The ``sample`` command of a recipe whose config class is ``config_cls``; returns the exit status.
    ``options``: the recipe's own required flags (``--prompts``: help), passed to ``make_job(cfg, prompts=...)``."""
    parser = argparse.ArgumentParser(prog=f"{prog} sample", description="Draw N samples from a run's EMA weights (resumable).")
    parser.add_argument("--run", required=True, help="the run folder (config.yaml, final/)")
    parser.add_argument("--num", type=int, required=True, help="number of samples, e.g. 50000")
    parser.add_argument("--out", required=True, help="the sample folder (PNG / MP4 files, shards/, samples.npz)")
    parser.add_argument("--checkpoint", help="a checkpoint folder of the run (its EMA weights) instead of RUN/final")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per shard (fixed for a folder)")
    for flag, text in (options or {}).items():
        parser.add_argument(flag, required=True, help=text)
    parser.add_argument("overrides", nargs="*", help="key=value changes of the run's config, e.g. sampling.guidance_scale=1.5")
    args = parser.parse_args(argv)
    extra = {k: getattr(args, k) for k in (f.lstrip("-").replace("-", "_") for f in options or {})}
    from accelerate import PartialState

    run = Path(args.run)
    try:
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run} is not a run folder: it has no config.yaml (the folder a training command wrote)")
        cfg: Any = load_config(config_cls, run / "config.yaml", args.overrides)
        cfg.train.output_dir = str(run)  # files the run keeps beside its weights (e.g. the stage scales)
        cfg.sampling.check(cfg.num_stages, kind=cfg.decomposition.kind)
        state = PartialState(cpu=cfg.train.cpu)
        job = make_job(cfg, **extra)
        source = Path(args.checkpoint) if args.checkpoint else run / "final"
        if not source.is_dir():
            raise FileNotFoundError(f"no weights at {source}: the run has not finished; pass --checkpoint RUN/checkpoints/step-...")
        settings = {"weights": str(source.resolve()), "sampling": config_to_dict(cfg)["sampling"], **extra}
        shards = SampleShards(args.out, args.num, args.batch_size, settings=settings)
        ema = cfg.train.ema_decay is not None
        model = checkpoint_weights(job.build_model(), source, ema=ema) if args.checkpoint else job.load_final(source)
    except USAGE_ERRORS as e:
        return usage_error(e)
    model = model.to(state.device).eval()
    todo = shards.pending(state.process_index, state.num_processes)
    for k in tqdm(todo, desc=f"shards (rank {state.process_index})", disable=not state.is_main_process):
        indices = list(shards.indices(k))
        labels = job.condition(np.asarray(indices))
        noise = [n.to(state.device) for n in sample_noise(job.decomposition, job.sample_shape, indices, cfg.sampling.seed)]
        with torch.no_grad():
            pixels = job.draw(model, noise, labels, state.device).float().cpu()
        frames = pixels.transpose(1, 2).flatten(0, 1) if pixels.ndim == 5 else pixels  # videos: every frame an image
        array = to_uint8(frames).reshape(len(indices), *([pixels.shape[2]] if pixels.ndim == 5 else []), *frames.shape[2:], frames.shape[1])
        shards.write(k, array, labels, write_item=job.write_item)
    state.wait_for_everyone()
    if state.is_main_process:
        print(json.dumps({"out": str(shards.folder), "num": args.num, "npz": str(shards.merge()), "drawn_shards": len(todo)}))
    return 0


def dispatch(argv: Sequence[str] | None, commands: Mapping[str, Callable[[list[str]], int]], default: Callable[[list[str]], int]) -> int:
    """Run ``commands[argv[0]](argv[1:])`` for a known subcommand (``sample``, ``evaluate``, ``cache``), else ``default(argv)``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return commands[args[0]](args[1:]) if args[:1] and args[0] in commands else default(args)
