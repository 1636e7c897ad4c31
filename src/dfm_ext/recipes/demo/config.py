"""The demo's settings: :class:`DemoConfig` (checked before any data is read) and the names it accepts.

* :data:`DECOMPOSITIONS`, :data:`MODEL_SIZES`: what ``decomposition`` and ``size`` may be.
* :func:`make_decomposition`: a decomposition from a kind name or a config dict.
* :func:`check_schedule`: a sampling schedule that fits the decomposition, checked without a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dfm_ext.validation import parse_device

__all__ = ["DECOMPOSITIONS", "MODEL_SIZES", "DemoConfig", "check_schedule", "make_decomposition"]

DECOMPOSITIONS = ("laplacian", "wavelet", "dct", "identity")

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
            from dfm_ext.recipes.engine.trainer import TrainConfig

            TrainConfig(compile=True, compile_backend=self.compile_backend)



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

