"""The demo: train a small class-conditional DiT with DFM on real offline images, sample, measure.

:func:`run_demo` is what ``dfm-ext demo`` runs. The pieces are public so the benchmarks and
users can reuse them:

* :func:`make_decomposition` and :func:`build_model`: a reference DiT on a fixed token grid
  (``image_size / 4`` per side, e.g. 8x8 = 64 tokens for 32x32 images), wrapped with
  :func:`~dfm_ext.wrapping.wrapper.wrap_dit` for any decomposition (per-stage patch sizes are chosen so
  every stage lands on that grid: Laplacian 16x16 patch 2 + 32x32 patch 4).
* :func:`train`: the paper's recipe scaled down, run by the recipes' training engine
  (:class:`dfm_ext.recipes.engine.Trainer`, one process, :class:`DemoTask`): stage probabilities
  ``(0.9, 0.1)``, logit-normal times ``(0, 1)`` / ``(1.5, 1)``, masking, 10% label dropout,
  Adam(0.9, 0.99, eps 1e-8) with weight decay 0.01, linear warmup, gradient clipping 1.0, an EMA
  of the weights with warmup, a time budget and optionally ``torch.compile``.
* :func:`generate`: :class:`~dfm_ext.process.sampler.DFMSampler` with Euler 30 + 10 steps, tau 0.9 and
  classifier-free guidance.
* :func:`compute_metrics`: multi-scale SWD (and FD-EffNet when its weights are installed) against
  a held-out split.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfm_ext.recipes.data_images import BatchPlan
from dfm_ext.recipes.demo_data import ImageDataset, load_dataset
from dfm_ext.recipes.viz import umask
from dfm_ext.validation import parse_device

DECOMPOSITIONS = ("laplacian", "wavelet", "dct", "identity")
CHECKPOINT_KIND = "dfm_ext.recipes.demo"
CHECKPOINT_VERSION = 2  # 1: config.json + model.safetensors (demo_checkpoint); 2: save_pretrained + demo.json
DEMO_RECORD = "demo.json"

__all__ = [
    "CHECKPOINT_KIND", "DECOMPOSITIONS", "MODEL_SIZES", "DemoConfig", "DemoResult", "DemoTask", "TrainResult",
    "balanced_labels", "build_model", "check_schedule", "compute_metrics", "dump_json", "engine_configs",
    "evaluate_path", "generate", "load_demo_checkpoint", "load_png_folder", "load_wrapped_demo", "make_decomposition",
    "make_sampler", "model_config", "null_label", "parse_device", "read_png_folder", "run_demo", "sample_checkpoint",
    "save_demo_checkpoint", "train", "write_text_atomic",
]  # fmt: skip

# Model sizes on CPU. "demo" is sized so that the default demo trains in about 5 minutes on
# 2 cores; "tiny" exists for smoke tests.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "demo": {"hidden_size": 128, "depth": 4, "num_heads": 4},
    "tiny": {"hidden_size": 32, "depth": 1, "num_heads": 2},
}


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo's training and sampling depend on (saved in the checkpoint).

    Attributes:
        steps: optimiser steps (at most).
        max_train_seconds: stop training early when the optimisation loop has run this long
            (``None``: never), so the demo fits its time budget on a slow machine; the steps
            actually done are reported.
        dataset: ``"fashion-mnist"``, ``"skimage"`` or ``"auto"``.
        decomposition: ``"laplacian"`` (2 stages, 16x16 + 32x32), ``"wavelet"``, ``"dct"`` or
            ``"identity"`` (plain flow matching).
        size: model size, a key of ``MODEL_SIZES``.
        tokens_per_side: token grid side (patch 4 on the full-resolution stage for 32x32).
        p0: probability of training stage 0 (two-stage decompositions; the rest is spread
            evenly over later stages).
        timestep_mode: ``"dfm"``, ``"tied"`` or ``"uniform"`` (see ``StageTimestepSampler``).
        masking: ``True``, ``False`` or ``"loss"`` (see ``DFMObjective``).
        sample_steps / thresholds: the inference schedule (``StageScheduler``).
        cfg_scale: classifier-free guidance scale for the demo's pictures (1 = no guidance).
        num_eval: generated samples for the metrics (0 skips them); guidance ``eval_cfg_scale``.
        num_reference: held-out test images the metrics compare against.
        fd: compute FD-EffNet (needs the ``metrics`` extra) besides SWD.
        train_subset: train on a random subset of this many images (``None``: all).
        specialize: ``None`` (one shared model), ``"full"`` or ``"lora"``: per-stage parameters
            for the ``specialize_targets`` groups (:func:`dfm_ext.specialize`, paper Table 1d);
            ``specialize_rank`` is the LoRA rank (``None``: 16).
        compile / compile_backend: ``torch.compile`` the model for training (the engine's
            ``train.compile``; ``"aot_eager"`` traces without generating code).
    """

    steps: int = 2000
    max_train_seconds: float | None = 300.0
    dataset: str = "auto"
    decomposition: str = "laplacian"
    size: str = "demo"
    image_size: int = 32
    tokens_per_side: int = 8
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    p0: float = 0.9
    timestep_mode: str = "dfm"
    masking: bool | str = True
    sample_steps: tuple[int, ...] = (30, 10)
    thresholds: tuple[float, ...] = (0.9,)
    cfg_scale: float = 3.0
    eval_cfg_scale: float = 1.0
    num_eval: int = 1000
    num_reference: int = 2000
    fd: bool = True
    train_subset: int | None = None
    specialize: str | None = None
    specialize_targets: tuple[str, ...] = ("mlp",)
    specialize_rank: int | None = None
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.specialize not in (None, "full", "lora"):
            raise ValueError(f"specialize must be None, 'full' or 'lora', got {self.specialize!r}")
        if self.decomposition not in DECOMPOSITIONS:
            raise ValueError(f"unknown decomposition {self.decomposition!r}; choose one of {', '.join(DECOMPOSITIONS)}")
        if self.size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.size!r}; choose one of {', '.join(MODEL_SIZES)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.image_size % self.tokens_per_side != 0:
            raise ValueError(f"image_size {self.image_size} is not a multiple of tokens_per_side {self.tokens_per_side}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.max_train_seconds is not None and not self.max_train_seconds > 0:
            raise ValueError(f"max_train_seconds must be > 0 or None, got {self.max_train_seconds}")
        if self.num_eval < 0 or self.num_reference < 1:
            raise ValueError(f"num_eval must be >= 0 and num_reference >= 1, got {self.num_eval} and {self.num_reference}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"train_subset must be >= 1 or None, got {self.train_subset}")
        for name in ("lr", "ema_decay", "cfg_scale", "eval_cfg_scale", "p0", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0 or not 0.0 <= self.ema_decay < 1.0 or not 0.0 < self.p0 <= 1.0:
            raise ValueError(f"need lr > 0, ema_decay in [0, 1), p0 in (0, 1]; got lr={self.lr}, "
                             f"ema_decay={self.ema_decay}, p0={self.p0}")  # fmt: skip
        # The sampling schedule is checked here, before any training: a wrong --sample-steps
        # would otherwise fail only after the whole training budget is spent.
        check_schedule(self.decomposition, self.sample_steps, self.thresholds)
        parse_device(self.device, check_available=False)
        if self.compile:  # the engine checks it too, but only once the data is loaded
            from dfm_ext.recipes.engine import TrainConfig

            TrainConfig(compile=True, compile_backend=self.compile_backend)


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


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` returns: the output folder, its files, and the metrics written."""

    out: Path
    files: dict[str, Path]
    metrics: dict[str, Any]


# ---- model -----------------------------------------------------------------------------------


def make_decomposition(spec: str | Mapping[str, Any], **kwargs: Any):
    """The decomposition ``spec`` names: a kind (``laplacian``, ``wavelet``, ``dct``, ``identity``;
    defaults, e.g. Laplacian ``factors=(2, 1)``: 16x16 + 32x32) or a config dict of
    :func:`dfm_ext.decomposition_from_config` (what checkpoints store). ``kwargs`` add fields.
    """
    from dfm_ext.decompositions.factory import decomposition_from_config

    config = {"kind": spec} if isinstance(spec, str) else dict(spec)
    return decomposition_from_config(config | kwargs)


def model_config(cfg: DemoConfig, image_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
    """The JSON description :func:`build_model` rebuilds a model from."""
    from dfm_ext.wrapping.packing import patch_sizes_for_grid

    from dfm_ext.decompositions.factory import decomposition_config

    decomposition = make_decomposition(cfg.decomposition)
    c, h, w = (int(v) for v in image_shape)
    grid = (h * cfg.tokens_per_side // cfg.image_size, w * cfg.tokens_per_side // cfg.image_size)
    patches = patch_sizes_for_grid([s[1:] for s in decomposition.stage_shapes((1, c, h, w))], grid)
    config: dict[str, Any] = {
        # What was built, every field (checkpoints before this held just the kind's name, which
        # make_decomposition still reads as that kind's defaults).
        "decomposition": decomposition_config(decomposition),
        "image_shape": [c, h, w],
        "num_classes": int(num_classes),
        "patch_sizes": [list(p) for p in patches],
        # Label dropout happens in the training loop (seeded), so the DiT's own is off.
        "dit": {"input_size": h, "in_channels": c, "num_classes": int(num_classes), "class_dropout_prob": 0.0,
                "patch_size": h // grid[0], **MODEL_SIZES[cfg.size]},
    }  # fmt: skip
    if cfg.specialize is not None:  # absent otherwise, so older checkpoints' configs stay as they were
        config["specialize"] = {"kind": cfg.specialize, "targets": list(cfg.specialize_targets), "rank": cfg.specialize_rank}
    return config


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build the wrapped DiT described by :func:`model_config` (weights freshly initialised)."""
    from dfm_ext.models.dit import DiT, DiTConfig
    from dfm_ext.wrapping.wrapper import wrap_dit

    dit = DiT(DiTConfig(**config["dit"]))
    decomposition = make_decomposition(config["decomposition"])
    patches = [tuple(p) for p in config["patch_sizes"]]
    model = wrap_dit(dit, decomposition, init="scratch", patch_sizes=patches)
    spec = config.get("specialize")
    if spec:
        from dfm_ext.specialization import specialize

        specialize(model, kind=spec["kind"], targets=list(spec["targets"]), rank=spec.get("rank"))
    return model


def null_label(model: nn.Module, num_classes: int) -> int:
    """The label index the model uses for "no class" (classifier-free guidance)."""
    return int(num_classes)


# ---- training --------------------------------------------------------------------------------


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
    """The demo as a :class:`~dfm_ext.recipes.engine.TrainTask`: the paper's DFM loss on class labels.

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
        # Per-stage parameters (specialisation) are unused by batches without that stage.
        self.find_unused_parameters = cfg.specialize is not None

    def build_model(self) -> nn.Module:
        return build_model(self.mconfig)

    def build_optimizer(self, model: nn.Module, optim: Any) -> torch.optim.Optimizer:
        # The demo's optimiser: weight decay on every parameter, and fused (one kernel per step
        # instead of ~10 small ops per parameter, which dominate on CPU for a model this small).
        return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 weight_decay=optim.weight_decay, fused=True)  # fmt: skip

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> Any:
        from dfm_ext.recipes.engine import StepLoss

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
    from dfm_ext.recipes.engine import OptimConfig, TrainConfig

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
    from dfm_ext.recipes.engine import Trainer

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


# ---- sampling --------------------------------------------------------------------------------


def check_schedule(decomposition_name: str | Mapping[str, Any], steps: Sequence[int], thresholds: Sequence[float]) -> None:
    """Fail on a sampling schedule that does not fit the decomposition (no model, no compute).

    ``steps`` needs one positive count per stage and ``thresholds`` one value in ``(0, 1)`` per
    stage boundary; the one-stage ``identity`` decomposition takes any step list (their sum).

    Raises:
        ValueError: naming the steps or thresholds and the number of stages.
    """
    from dfm_ext.process.schedule import StageScheduler

    steps, thresholds = tuple(steps), tuple(thresholds)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in steps) or not steps:
        raise ValueError(f"sample steps must be positive integers, got {steps}")
    if any(not math.isfinite(float(v)) for v in thresholds):
        raise ValueError(f"thresholds must be finite numbers in (0, 1), got {thresholds}")
    s = make_decomposition(decomposition_name).num_stages
    if s == 1:
        return
    if len(steps) != s or len(thresholds) != s - 1:
        raise ValueError(
            f"the {decomposition_name} decomposition has {s} stages: give {s} step counts and {s - 1} "
            f"thresholds, got steps={steps} and thresholds={thresholds}"
        )
    try:
        StageScheduler(steps=steps, thresholds=thresholds)
    except ValueError as e:
        raise ValueError(f"sampling schedule steps={steps}, thresholds={thresholds}: {e}") from None


def make_sampler(
    decomposition: str | Mapping[str, Any], steps: Sequence[int], thresholds: Sequence[float], cfg_scale: float
):
    """A :class:`~dfm_ext.process.sampler.DFMSampler` (Euler) for a decomposition (kind name or config dict)."""
    from dfm_ext.process.sampler import DFMSampler
    from dfm_ext.process.schedule import StageScheduler

    decomposition_name = decomposition if isinstance(decomposition, str) else decomposition.get("kind")
    decomposition = make_decomposition(decomposition)
    s = decomposition.num_stages
    steps, thresholds = tuple(int(v) for v in steps), tuple(float(v) for v in thresholds)
    if s == 1:
        # Flow matching has one stage: the same total step budget in one segment.
        steps, thresholds = (sum(steps),), ()
    if len(steps) != s or len(thresholds) != s - 1:
        raise ValueError(
            f"the {decomposition_name} decomposition has {s} stages: give {s} step counts and {s - 1} "
            f"thresholds, got steps={steps} and thresholds={thresholds}"
        )
    return DFMSampler(decomposition, StageScheduler(steps=steps, thresholds=thresholds), guidance_scale=cfg_scale)


@torch.no_grad()
def generate(
    model: nn.Module,
    config: Mapping[str, Any],
    labels: Tensor,
    *,
    steps: Sequence[int] = (30, 10),
    thresholds: Sequence[float] = (0.9,),
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
):
    """Sample one image per label with the model's DFM sampler.

    Args:
        model: a wrapped model (see :func:`build_model`).
        config: its :func:`model_config`.
        labels: ``[N]`` class indices.
        steps, thresholds, cfg_scale: the inference schedule and guidance.
        generator: noise source (drawn on CPU, so results do not depend on ``device``).
        batch_size: images per sampler call.

    Returns:
        ``(images [N, C, H, W], previews)``, where ``previews[s]`` is ``[N, C, H_s, W_s]``, the
        image rebuilt from stages ``0..s``.
    """
    sampler = make_sampler(config["decomposition"], steps, thresholds, cfg_scale)
    model = model.eval().to(device)
    c, h, w = config["image_shape"]
    null = null_label(model, config["num_classes"])
    images: list[Tensor] = []
    previews: list[list[Tensor]] = []
    for chunk in labels.split(batch_size):
        y = chunk.to(device)
        uncond = {"y": torch.full_like(y, null)} if cfg_scale != 1.0 else None
        out = sampler.sample(model, (chunk.shape[0], c, h, w), generator=generator, device=device, uncond=uncond, y=y)
        images.append(out.x.float().cpu())
        previews.append([p.float().cpu() for p in out.previews])
    x = torch.cat(images)
    pv = [torch.cat([p[s] for p in previews]) for s in range(len(previews[0]))] if previews and previews[0] else []
    return x, pv


def balanced_labels(num: int, num_classes: int) -> Tensor:
    """``[num]`` labels cycling through the classes (so every class gets ``num // num_classes``)."""
    return torch.arange(num) % num_classes


# ---- metrics ---------------------------------------------------------------------------------


FD_RESOLUTION = 64


def compute_metrics(
    fake: Tensor,
    real: Tensor | None,
    *,
    seed: int = 0,
    fd: bool = True,
    fd_resolution: int = FD_RESOLUTION,
    real_features: Any = None,
    extractor: Any = None,
) -> dict[str, Any]:
    """SWD per pyramid level (x1e3) and FD-EffNet, fake vs real (lower is better for both).

    Both sets are ``[N, C, H, W]`` in ``[-1, 1]``. FD-EffNet uses EfficientNet-Lite0 features of
    the images resized to ``fd_resolution`` (64 by default: 224 costs about 10x more on CPU and
    32 px images hold no more detail); it is ``None`` with a reason when the weights are not
    installed. Generated images are clipped to ``[-1, 1]`` first, as when saved to PNG. ``real_features`` (a ``FeatureStatistics`` of the real set) and ``extractor``
    avoid recomputing the reference features between calls.
    """
    from dfm_ext.metrics.swd import swd

    # Scored as they would be saved: clipped to the image range.
    fake = fake.clamp(-1.0, 1.0)
    out: dict[str, Any] = {"num_fake": int(fake.shape[0]), "num_real": None if real is None else int(real.shape[0])}
    if real is not None:
        g = torch.Generator().manual_seed(seed)
        # 32 px images: levels 32, 16 and 8 (the paper's 16 px floor would leave only two).
        res = swd(real, fake, progress_bar=False, generator=g, min_resolution=8)
        out["swd"] = {
            "per_level": {f"{h}x{w}": round(v, 4) for (h, w), v in zip(res.resolutions, res.per_level)},
            "mean": round(res.mean, 4),
        }
    out["fd_effnet"] = None
    if fd:
        try:
            from dfm_ext.metrics.effnet import EfficientNetLite0Features, fd_effnet

            if extractor is None:
                extractor = EfficientNetLite0Features(fd_resolution)
            value = fd_effnet(real_features if real_features is not None else real, fake,
                              extractor=extractor, progress_bar=False)  # fmt: skip
        except ImportError as e:
            out["fd_effnet_error"] = str(e)
        else:
            out["fd_effnet"] = round(float(value), 4)
            out["fd_effnet_resolution"] = int(extractor.resolution)
    return out


# ---- files -----------------------------------------------------------------------------------


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (plus a final newline) to ``path`` through :func:`_staging` (temp file, then rename)."""
    path = Path(path)
    with _staging(path.parent) as tmp:
        (tmp / path.name).write_text(text if text.endswith("\n") else text + "\n")
        os.chmod(tmp / path.name, 0o666 & ~umask())
        os.replace(tmp / path.name, path)
    return path


def _config_dict(cfg: DemoConfig) -> dict[str, Any]:
    return json.loads(dump_json(asdict(cfg)))


def _demo_record(mconfig: Mapping[str, Any], cfg: DemoConfig, data: ImageDataset) -> dict[str, Any]:
    """``demo.json``: what ``dfm-ext sample``/``eval`` need beside the model (guidance, steps, data)."""
    return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": dict(mconfig), "train": _config_dict(cfg),
            "data": {"name": data.name, "class_names": list(data.class_names)}}  # fmt: skip


def save_demo_checkpoint(directory: str | os.PathLike[str], model: nn.Module, mconfig: Mapping[str, Any],
                         cfg: DemoConfig, data: ImageDataset) -> Path:  # fmt: skip
    """Save the (EMA) model as ``DFMTransformer.save_pretrained`` does (``dfm_config.json`` +
    ``model.safetensors``; :func:`~dfm_ext.wrapping.io.load_wrapped` alone rebuilds it) plus
    ``demo.json``; atomically (built in a temp folder beside ``directory``, then renamed)."""
    directory = Path(directory)
    with _staging(directory.parent) as tmp:
        model.save_pretrained(tmp / "checkpoint")
        _write_record(tmp / "checkpoint", mconfig, cfg, data)
        _replace_dir(tmp / "checkpoint", directory)
    return directory


def _write_record(directory: Path, mconfig: Mapping[str, Any], cfg: DemoConfig, data: ImageDataset) -> None:
    (directory / DEMO_RECORD).write_text(dump_json(_demo_record(mconfig, cfg, data)) + "\n")
    for f in directory.iterdir():  # safetensors writes 0600: give the files the usual umask modes
        os.chmod(f, 0o666 & ~umask())


def _replace_dir(src: Path, target: Path) -> None:
    """Move the folder ``src`` to ``target``, replacing a folder there (the old one is removed after)."""
    import shutil

    if target.is_dir():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)


def load_wrapped_demo(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The model of a ``save_pretrained`` folder: :func:`load_wrapped`, then its stage parameters if specialised."""
    from dfm_ext.specialization import load_specialization
    from dfm_ext.wrapping.io import load_wrapped

    model = load_wrapped(directory, device=device)
    load_specialization(model, directory)
    return model


def load_demo_checkpoint(directory: str | os.PathLike[str], device: str | torch.device = "cpu"):
    """Rebuild a demo checkpoint's model. Returns ``(model, config)`` (``config``: ``demo.json``).

    Reads both layouts: ``demo.json`` + a ``save_pretrained`` folder (this version), and the
    pre-engine ``config.json`` + ``model.safetensors``
    (:func:`~dfm_ext.recipes.demo_checkpoint.load_legacy_demo_checkpoint`).

    Raises:
        CheckpointError: (``ValueError``) missing or damaged folder, or weights that do not fit.
    """
    from dfm_ext.recipes.demo_checkpoint import CheckpointError, load_legacy_demo_checkpoint

    path = Path(directory)
    if not (path / DEMO_RECORD).is_file():
        return load_legacy_demo_checkpoint(path, build_model, device=device)
    try:
        config = json.loads((path / DEMO_RECORD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / DEMO_RECORD} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("kind") != CHECKPOINT_KIND or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path / DEMO_RECORD} is not a demo record (kind {config.get('kind') if isinstance(config, dict) else None!r})")
    try:
        model = load_wrapped_demo(path, device=device)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    return model.eval(), config


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temp folder inside ``out``; what the block moves out of it is kept, the rest deleted."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(cfg: DemoConfig, out: str | os.PathLike[str], *, progress: bool = True) -> DemoResult:
    """Train (the engine, :func:`train`), sample and measure; write the pictures, the checkpoint
    and ``metrics.json`` into ``out`` (built in a temp folder inside it, then moved into place)."""
    from dfm_ext.recipes.viz import save_image_grid, save_loss_curves, save_progressive

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
    with _staging(out) as tmp:
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
        _write_record(tmp / "checkpoint", mconfig, cfg, train_data)
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
            _replace_dir(path, out / path.name) if path.is_dir() else os.replace(path, out / path.name)
            final[name] = out / path.name
    return DemoResult(out=out, files=final, metrics=metrics)


def _tail_mean(values: Sequence[float], n: int) -> float | None:
    tail = [v for v in values[-n:] if math.isfinite(v)]
    return round(sum(tail) / len(tail), 5) if tail else None


# ---- sample / eval commands ------------------------------------------------------------------


def sample_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    cfg_scale: float | None = None,
    steps: Sequence[int] | None = None,
    thresholds: Sequence[float] | None = None,
    seed: int = 0,
    num_per_class: int = 8,
    device: str = "cpu",
) -> Path:
    """Sample ``num_per_class`` images per class from a demo checkpoint.

    ``out`` ending in ``.png`` gets a grid (rows = classes); any other path is a folder that gets
    one PNG per sample (``<index>_class<k>.png``, usable by ``dfm-ext eval``) plus ``grid.png``.
    """
    from dfm_ext.recipes.viz import save_array_png, save_image_grid, to_uint8

    parse_device(device)
    model, config = load_demo_checkpoint(checkpoint, device=device)
    train_cfg = config.get("train", {})
    steps = tuple(steps) if steps is not None else tuple(train_cfg.get("sample_steps", (30, 10)))
    thresholds = tuple(thresholds) if thresholds is not None else tuple(train_cfg.get("thresholds", (0.9,)))
    cfg_scale = float(cfg_scale) if cfg_scale is not None else float(train_cfg.get("cfg_scale", 1.0))
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    check_schedule(config["model"]["decomposition"], steps, thresholds)
    nc = int(config["model"]["num_classes"])
    labels = torch.arange(nc).repeat_interleave(num_per_class)
    images, _ = generate(model, config["model"], labels, steps=steps, thresholds=thresholds, cfg_scale=cfg_scale,
                         generator=torch.Generator().manual_seed(seed), device=device)  # fmt: skip
    out = Path(out)
    if out.suffix.lower() == ".png":
        return save_image_grid(images, out, nrow=num_per_class, scale=3)
    with _staging(out) as tmp:
        arrays = to_uint8(images)
        names = []
        for i, (arr, y) in enumerate(zip(arrays, labels.tolist())):
            names.append(save_array_png(arr, tmp / f"{i:05d}_class{y}.png").name)
        save_image_grid(images, tmp / "grid.png", nrow=num_per_class, scale=3)
        for name in [*names, "grid.png"]:
            os.replace(tmp / name, out / name)
    return out


def read_png_folder(folder: str | os.PathLike[str], *, limit: int | None = None) -> tuple[Tensor, list[Path]]:
    """PNG files of a folder (sorted by name; ``grid.png`` skipped) as ``[N, C, H, W]`` in ``[-1, 1]``.

    Unreadable files (truncated, not an image) are skipped and returned as the second value;
    with ``limit``, reading goes on until ``limit`` readable images are found. 16-bit PNGs keep
    their brightness (:func:`dfm_ext.recipes.demo_data.read_image`).

    Raises:
        ValueError: no readable PNGs, or images of different sizes/modes.
    """
    from PIL import UnidentifiedImageError

    from dfm_ext.recipes.demo_data import read_image

    folder = Path(folder)
    paths = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
    arrays, skipped = [], []
    for p in paths:
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(read_image(p))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            skipped.append(p)
    if not arrays:
        extra = f" ({len(skipped)} unreadable, e.g. {skipped[0].name})" if skipped else ""
        raise ValueError(f"no readable PNG samples in {folder}{extra}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"samples in {folder} have different shapes: {sorted(shapes)}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x * 2.0 - 1.0, skipped


def load_png_folder(folder: str | os.PathLike[str], *, limit: int | None = None) -> Tensor:
    """:func:`read_png_folder` without the list of skipped files."""
    return read_png_folder(folder, limit=limit)[0]


def evaluate_path(
    path: str | os.PathLike[str],
    *,
    dataset: str = "auto",
    split: str = "test",
    num: int = 1000,
    cfg_scale: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    num_reference: int = 2000,
    fd: bool = True,
) -> dict[str, Any]:
    """Metrics of a folder of PNG samples, or of ``num`` fresh samples of a checkpoint, vs a split."""
    path = Path(path)
    parse_device(device)
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if not path.is_dir():
        raise ValueError(f"--samples {str(path)!r} is not a folder (PNG samples or a checkpoint)")
    if any((path / n).is_file() for n in (DEMO_RECORD, "config.json", "model.safetensors")):
        model, config = load_demo_checkpoint(path, device=device)
        train_cfg = config.get("train", {})
        scale = float(cfg_scale) if cfg_scale is not None else float(train_cfg.get("eval_cfg_scale", 1.0))
        labels = balanced_labels(num, int(config["model"]["num_classes"]))
        fake, _ = generate(model, config["model"], labels, steps=train_cfg.get("sample_steps", (30, 10)),
                           thresholds=train_cfg.get("thresholds", (0.9,)), cfg_scale=scale,
                           generator=torch.Generator().manual_seed(seed), device=device)  # fmt: skip
        source = {"checkpoint": str(path), "cfg_scale": scale}
    else:
        fake, skipped = read_png_folder(path, limit=num)
        # Unreadable files are counted, not fatal: one damaged PNG should not void an evaluation.
        source = {"folder": str(path), "images": int(fake.shape[0]), "skipped_images": len(skipped)}
        if skipped:
            import sys

            print(f"dfm-ext eval: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", file=sys.stderr)
    c, h, w = fake.shape[1:]
    real_ds = load_dataset(dataset, split, size=int(h), seed=seed)
    real = real_ds.subset(num_reference, generator=torch.Generator().manual_seed(seed)).images
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"samples are {tuple(fake.shape[1:])} but {real_ds.name} {split} images are {tuple(real.shape[1:])}"
        )
    return {"source": source, "dataset": real_ds.name, "split": split, **compute_metrics(fake, real, seed=seed, fd=fd)}
