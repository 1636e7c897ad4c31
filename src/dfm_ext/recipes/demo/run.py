"""The demo: train a small class-conditional DiT with DFM on real offline images, sample, measure.

:func:`run_demo` is what ``dfm-ext demo`` runs. The pieces are public so the benchmarks and
users can reuse them:

* :func:`make_decomposition` and :func:`build_model`: a reference DiT on a fixed token grid
  (``image_size / 4`` per side, e.g. 8x8 = 64 tokens for 32x32 images), wrapped with
  :func:`~dfm_ext.wrapping.wrapper.wrap_dit` for any decomposition (per-stage patch sizes are chosen so
  every stage lands on that grid: Laplacian 16x16 patch 2 + 32x32 patch 4).
* :func:`train`: the paper's recipe scaled down, run by the recipes' training engine
  (:class:`dfm_ext.recipes.engine.trainer.Trainer`, one process, :class:`DemoTask`): stage probabilities
  ``(0.9, 0.1)``, logit-normal times ``(0, 1)`` / ``(1.5, 1)``, masking, 10% label dropout,
  Adam(0.9, 0.99, eps 1e-8) with weight decay 0.01, linear warmup, gradient clipping 1.0, an EMA
  of the weights with warmup, a time budget and optionally ``torch.compile``.
* :func:`generate`: :class:`~dfm_ext.process.sampler.DFMSampler` with Euler 30 + 10 steps, tau 0.9 and
  classifier-free guidance.
* :func:`compute_metrics`: multi-scale SWD (and FD-EffNet when its weights are installed) against
  a held-out split.

The pieces live by job: :mod:`.demo_config` (settings), :mod:`.demo_model` (model, sampler),
:mod:`.demo_train` (the engine run), :mod:`.demo_eval` (metrics, ``sample``/``eval``),
:mod:`.demo_files` (checkpoint, atomic files); this module runs them and re-exports their names.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dfm_ext.validation import parse_device

from dfm_ext.recipes.demo.config import DECOMPOSITIONS, MODEL_SIZES, DemoConfig, check_schedule, make_decomposition
from dfm_ext.recipes.demo.data import load_dataset
from dfm_ext.recipes.demo.eval import FD_RESOLUTION, compute_metrics, evaluate_path, load_png_folder, read_png_folder, sample_checkpoint
from dfm_ext.recipes.demo.files import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    DEMO_RECORD,
    dump_json,
    load_demo_checkpoint,
    load_wrapped_demo,
    replace_dir,
    save_demo_checkpoint,
    staging,
    write_record,
    write_text_atomic,
)
from dfm_ext.recipes.demo.model import balanced_labels, build_model, generate, make_sampler, model_config, null_label
from dfm_ext.recipes.demo.train import DemoTask, TrainResult, engine_configs, train
from dfm_ext.recipes.engine.viz import umask

__all__ = [
    "CHECKPOINT_KIND", "CHECKPOINT_VERSION", "DECOMPOSITIONS", "DEMO_RECORD", "FD_RESOLUTION", "MODEL_SIZES",
    "DemoConfig", "DemoResult", "DemoTask", "TrainResult",
    "balanced_labels", "build_model", "check_schedule", "compute_metrics", "dump_json", "engine_configs",
    "evaluate_path", "generate", "load_demo_checkpoint", "load_png_folder", "load_wrapped_demo", "make_decomposition",
    "make_sampler", "model_config", "null_label", "parse_device", "read_png_folder", "run_demo", "sample_checkpoint",
    "save_demo_checkpoint", "train", "write_text_atomic",
]  # fmt: skip


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` returns: the output folder, its files, and the metrics written."""

    out: Path
    files: dict[str, Path]
    metrics: dict[str, Any]



def run_demo(cfg: DemoConfig, out: str | os.PathLike[str], *, progress: bool = True) -> DemoResult:
    """Train (the engine, :func:`train`), sample and measure; write the pictures, the checkpoint
    and ``metrics.json`` into ``out`` (built in a temp folder inside it, then moved into place)."""
    from dfm_ext.recipes.engine.viz import save_image_grid, save_loss_curves, save_progressive

    out = Path(out)
    parse_device(cfg.device)  # before any data is read or any step trained
    t_start = time.perf_counter()
    train_data = load_dataset(cfg.dataset, "train", size=cfg.image_size, seed=cfg.seed, num=cfg.train_subset)
    cfg = replace(cfg, dataset=train_data.name)
    mconfig = model_config(cfg, train_data.image_shape, train_data.num_classes)
    n_params = sum(p.numel() for p in build_model(mconfig).parameters())
    if progress:
        print(f"dfm-ext demo: {train_data.name} ({len(train_data)} images {train_data.image_shape}), "
              f"{cfg.decomposition} decomposition, DiT {cfg.size} ({n_params / 1e6:.2f} M parameters), "
              f"{cfg.steps} steps of batch {cfg.batch_size} on {cfg.device}")  # fmt: skip
    with staging(out) as tmp:
        result = train(cfg, train_data, run_dir=tmp / "run", progress=progress)
        ema = result.ema
        nc = train_data.num_classes
        g = torch.Generator().manual_seed(cfg.seed + 1)
        say = print if progress else (lambda *a, **k: None)
        t_sample = time.perf_counter()
        per_class = 8
        say(f"sampling {per_class * nc} images for samples.png (cfg {cfg.cfg_scale:g}) ...", flush=True)
        grid_labels = torch.arange(nc).repeat_interleave(per_class)
        grid, previews = generate(ema, mconfig, grid_labels, steps=cfg.sample_steps, thresholds=cfg.thresholds,
                                  cfg_scale=cfg.cfg_scale, generator=g, device=cfg.device)  # fmt: skip
        sample_seconds = time.perf_counter() - t_sample
        metrics: dict[str, Any] = {
            "dataset": train_data.name,
            "decomposition": cfg.decomposition,
            "model": {"size": cfg.size, "parameters": n_params, **MODEL_SIZES[cfg.size]},
            "steps": result.steps,
            "steps_requested": cfg.steps,
            "max_train_seconds": cfg.max_train_seconds,
            "batch_size": cfg.batch_size,
            "compile": cfg.compile,
            "train_seconds": round(result.seconds, 2),
            "seconds_per_step": round(result.seconds / max(result.steps, 1), 4),
            "final_loss_ema100": _tail_mean(result.history["loss"], 100),
            "final_stage_loss_ema100": {k: _tail_mean(v, 100) for k, v in result.history.items() if k.startswith("stage_")},
            "sampling": {"steps": list(cfg.sample_steps), "thresholds": list(cfg.thresholds),
                         "grid_cfg_scale": cfg.cfg_scale, "grid_seconds": round(sample_seconds, 2),
                         "grid_images": int(grid.shape[0])},  # fmt: skip
        }
        if cfg.num_eval > 0:
            t_eval = time.perf_counter()
            say(f"sampling {cfg.num_eval} images and scoring them against the test split ...", flush=True)
            test = load_dataset(train_data.name, "test", size=cfg.image_size, seed=cfg.seed)
            labels = balanced_labels(cfg.num_eval, nc)
            fake, _ = generate(ema, mconfig, labels, steps=cfg.sample_steps, thresholds=cfg.thresholds,
                               cfg_scale=cfg.eval_cfg_scale, generator=torch.Generator().manual_seed(cfg.seed + 2),
                               device=cfg.device)  # fmt: skip
            real = test.subset(cfg.num_reference, generator=torch.Generator().manual_seed(cfg.seed)).images
            metrics["eval"] = {"split": "test", "cfg_scale": cfg.eval_cfg_scale,
                               **compute_metrics(fake, real, seed=cfg.seed, fd=cfg.fd)}  # fmt: skip
            metrics["eval"]["seconds"] = round(time.perf_counter() - t_eval, 2)
        else:
            metrics["eval"] = None

        # The engine's final/ (EMA weights, save_pretrained) is the checkpoint, with demo.json beside.
        os.replace(tmp / "run" / "final", tmp / "checkpoint")
        write_record(tmp / "checkpoint", mconfig, cfg, train_data)
        files = {
            "samples": save_image_grid(grid, tmp / "samples.png", nrow=per_class, scale=3),
            # previews[-1] is the final sample itself: show the coarser previews next to it.
            "progressive": save_progressive([p[::per_class][:8] for p in previews[:-1]], grid[::per_class][:8],
                                            tmp / "progressive.png", scale=4),  # fmt: skip
            "loss": save_loss_curves(
                {("total" if k == "loss" else k.replace("_", " ")): v for k, v in result.history.items()},
                tmp / "loss.png", title=f"DFM training loss ({cfg.decomposition}, {train_data.name})",
            ),
            "checkpoint": tmp / "checkpoint",
        }
        metrics["total_seconds"] = round(time.perf_counter() - t_start, 2)
        (tmp / "metrics.json").write_text(dump_json(metrics) + "\n")
        os.chmod(tmp / "metrics.json", 0o666 & ~umask())
        files["metrics"] = tmp / "metrics.json"
        final: dict[str, Path] = {}
        for name, path in files.items():
            replace_dir(path, out / path.name) if path.is_dir() else os.replace(path, out / path.name)
            final[name] = out / path.name
    return DemoResult(out=out, files=final, metrics=metrics)


def _tail_mean(values: Sequence[float], n: int) -> float | None:
    tail = [v for v in values[-n:] if math.isfinite(v)]
    return round(sum(tail) / len(tail), 5) if tail else None

