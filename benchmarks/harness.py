"""The benchmarks' training harness: several small runs advanced a chunk of steps at a time, round-robin.

The quality, ablation and study benchmarks compare arms (FM, DFM, p0, ...) side by side in one
process, so that machine noise hits every arm alike. :class:`Trainer` is one such run of the
demo's model (:func:`model_config` / :func:`build_model`: a reference DiT on a fixed token grid,
wrapped for any decomposition) with the paper's recipe scaled down: stage probabilities
``(p0, rest)``, logit-normal times, masking, label dropout, fused AdamW with warmup and clipping,
a warming-up EMA, every draw from one generator. It is frozen: the committed results
(``benchmarks/results/*.json``) were measured with it, and resumable benchmarks continue them.
(The ``dfm-ext demo`` command trains the same model with the recipes' engine, whose random
stream is per step; ``tests/test_benchmarks_harness.py`` checks both compute the same loss.)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.process.objective import DFMObjective
from dfm_ext.process.timesteps import StageTimestepSampler
from dfm_ext.recipes.demo.data import ImageDataset
from dfm_ext.validation import parse_device

__all__ = [
    "DECOMPOSITIONS", "EMA", "MODEL_SIZES", "DemoConfig", "Trainer", "balanced_labels", "build_model", "check_schedule",
    "generate", "make_decomposition", "make_sampler", "model_config", "null_label", "timestep_sampler",
]  # fmt: skip


DECOMPOSITIONS = ("laplacian", "wavelet", "dct", "identity")

#: Model sizes on CPU: "demo" (1.3 M parameters), "tiny" for smoke tests.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "demo": {"hidden_size": 128, "depth": 4, "num_heads": 4},
    "tiny": {"hidden_size": 32, "depth": 1, "num_heads": 2},
}


@dataclass(frozen=True)
class DemoConfig:
    """Everything one benchmark arm's training and sampling depend on (the demo's settings before it ran on the engine).

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



def make_decomposition(spec: str | Mapping[str, Any], **kwargs: Any):
    """The decomposition ``spec`` names: a kind (``laplacian``, ``wavelet``, ``dct``, ``identity``;
    defaults, e.g. Laplacian ``factors=(2, 1)``: 16x16 + 32x32) or a config dict of
    :func:`dfm_ext.decomposition_from_config` (what checkpoints store). ``kwargs`` add fields.
    """
    from dfm_ext.decompositions.factory import decomposition_from_config

    config = {"kind": spec} if isinstance(spec, str) else dict(spec)
    return decomposition_from_config(config | kwargs)


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


class EMA:
    """EMA of a module's floating-point state; the decay warms up as ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        ema_state = self.module.state_dict()
        floats, sources = [], []
        for k, v in module.state_dict().items():
            e = ema_state[k]
            if e.is_floating_point():
                floats.append(e)
                sources.append(v.detach())
            else:
                e.copy_(v)
        if floats:
            torch._foreach_lerp_(floats, sources, 1 - d)


def timestep_sampler(cfg: DemoConfig, num_stages: int) -> StageTimestepSampler:
    """The demo's training distribution: ``p0`` for stage 0, the rest split evenly."""
    rest = (1.0 - cfg.p0) / max(1, num_stages - 1)
    probs = (1.0,) if num_stages == 1 else (cfg.p0,) + (rest,) * (num_stages - 1)
    return StageTimestepSampler(num_stages, probabilities=probs, mode=cfg.timestep_mode)


def _batches(data: ImageDataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled epochs without replacement, forever (the demo's data order)."""
    n = len(data)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} images)")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield data.images[idx], data.labels[idx]


class Trainer:
    """One demo training run, advanced a step at a time.

    Attributes:
        history: ``"loss"`` and ``"stage_<s>"`` per step (NaN where stage ``s`` was not active).
        seconds: wall time spent inside :meth:`step`.
        ema: the :class:`EMA` of the weights (sample from ``ema.module``).
    """

    def __init__(self, cfg: DemoConfig, data: ImageDataset, *, model: nn.Module | None = None) -> None:
        self.cfg, self.data = cfg, data
        self.device = torch.device(cfg.device)
        if model is None:
            torch.manual_seed(cfg.seed)  # parameter init; everything else draws from the generator
            model = build_model(model_config(cfg, data.image_shape, data.num_classes))
        self.model = model.to(self.device).train()
        own = getattr(self.model, "decomposition", None)
        self.decomposition = own if own is not None else make_decomposition(cfg.decomposition)
        self.num_stages = self.decomposition.num_stages
        self.sampler = timestep_sampler(cfg, self.num_stages)
        self.objective = DFMObjective(self.num_stages, masking=cfg.masking).to(self.device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=cfg.weight_decay, fused=True
        )
        warmup = max(1, min(cfg.warmup, cfg.steps // 5))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / warmup))
        self.ema = EMA(self.model, cfg.ema_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.null = null_label(self.model, data.num_classes)
        self.history: dict[str, list[float]] = {"loss": [], **{f"stage_{s}": [] for s in range(self.num_stages)}}
        self.seconds = 0.0
        self.steps_done = 0
        self._batches = _batches(data, cfg.batch_size, self.generator)

    def step(self) -> float:
        """One optimiser step; returns the loss. Raises ``FloatingPointError`` on a non-finite loss."""
        start = time.perf_counter()
        cfg, g = self.cfg, self.generator
        x, y = next(self._batches)
        drop = torch.rand(y.shape, generator=g) < cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null), y)
        x, y = x.to(self.device), y.to(self.device)
        ts = self.sampler.sample(x.shape[0], generator=g, device=self.device)
        out = self.objective(self.model, self.decomposition.decompose(x), ts, generator=g, y=y)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        self.opt.step()
        self.lr_schedule.step()
        self.ema.update(self.model)
        self.seconds += time.perf_counter() - start
        self.steps_done += 1
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at step {self.steps_done}")
        self.history["loss"].append(loss)
        for s, v in enumerate(out.per_stage.tolist()):
            self.history[f"stage_{s}"].append(v)
        return loss
