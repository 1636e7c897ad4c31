"""Config sections the recipes share: ``decomposition``, ``dfm``, ``sampling``, ``model``, ``specialize``, ``vae``, ``data``,
and :class:`RecipeConfig` (a ``dfm`` field a recipe does not read must stay at its default: never silently ignored)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import nn

from dfm_ext.decompositions.base import Decomposition
from dfm_ext.decompositions.factory import DECOMPOSITION_FIELDS, decomposition_config, decomposition_from_config
from dfm_ext.process.allocation import make_allocation
from dfm_ext.process.conventions import check_time_convention
from dfm_ext.process.objective import DFMObjective
from dfm_ext.process.sampler import DFMSampler
from dfm_ext.process.schedule import StageScheduler
from dfm_ext.process.timesteps import StageTimestepSampler, default_stage_probabilities
from dfm_ext.recipes.engine.config import ConfigError, OptimConfig, TrainConfig, check_fields, yaml_value
from dfm_ext.specialization import GROUP_PATTERNS, StageSpecialization, specialize

__all__ = [
    "RECIPE_SECTIONS", "ClassDataSection", "ClassSamplingConfig", "DFMConfig", "DecompositionConfig", "LatentVAEConfig", "ModelConfig",
    "RecipeConfig", "SamplingConfig", "SpecializeConfig", "VAESection", "enable_gradient_checkpointing", "import_factory",
]  # fmt: skip


@dataclass
class DecompositionConfig:
    """Every field of every kind of :mod:`dfm_ext.decompositions.factory` (a field of another kind than ``kind`` must
    stay at its default; ``identity`` is plain Flow Matching). Checked and resolved when the config loads, so
    ``config.yaml`` says what is built (a wavelet given by ``levels`` is written with its ``factors``)."""

    kind: Literal["laplacian", "identity", "wavelet", "dct"] = "laplacian"
    factors: tuple[int, ...] | None = (2, 1)
    down: Literal["area", "bilinear", "bicubic"] = "area"
    up: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    temporal_factors: tuple[int, ...] | None = None
    wave: str = "haar"
    levels: int | None = None
    num_stages: int | None = None
    mode: str = "periodization"
    block_size: int = 4
    bands: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        kind = self.kind
        defaults = {f.name: f.default for f in dataclasses.fields(DecompositionConfig)}
        own = set(DECOMPOSITION_FIELDS.get(kind, ())) | ({"levels", "num_stages"} if kind == "wavelet" else set())
        for name, default in defaults.items():
            value = getattr(self, name)
            if name == "kind" or name in own or value == default:
                continue
            if name == "factors" and (kind, value) in (("identity", (1,)), ("identity", None), ("dct", None)):
                continue  # identity: one stage at full resolution, [1] (older configs) or null; dct: null
            users = [k for k, names in DECOMPOSITION_FIELDS.items() if name in names] or ["wavelet"]
            raise ConfigError(
                f"decomposition.{name}={yaml_value(value)} applies to kind={'/'.join(users)}, not kind={kind}; "
                f"leave it at its default {yaml_value(default)}"
                + (" (factors: null for dct)" if name == "factors" else "")
            )
        if kind == "wavelet" and (self.levels is not None or self.num_stages is not None):
            if self.factors not in (None, defaults["factors"]):
                raise ConfigError(
                    f"decomposition: give either factors ({yaml_value(self.factors)}) or levels/num_stages "
                    f"({self.levels}/{self.num_stages}) for a wavelet, not both; set the other to null"
                )
            self.factors = None
        try:
            built = self.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"kind={kind}: {e}") from e
        resolved = decomposition_config(built)
        # Write back what is built (the defaults of the other kinds stay as they are).
        for name in DECOMPOSITION_FIELDS[kind]:
            value = resolved[name]
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self.levels = self.num_stages = None
        self.factors = {"identity": (1,), "dct": None}.get(kind, self.factors)
        self._num_stages = built.num_stages
        factors = self.factors or (1,)
        # Latent sides must be multiples of this (the coarsest stage's downsampling, or the DCT block).
        multiples = {"laplacian": math.lcm(*factors), "wavelet": factors[0], "dct": self.block_size, "identity": 1}
        self.sample_multiple = multiples[kind]

    def build(self) -> Decomposition:
        """The decomposition, through :func:`dfm_ext.decomposition_from_config` of this kind's fields."""
        kind, config = self.kind, dict[str, Any](kind=self.kind)
        for name in DECOMPOSITION_FIELDS[kind] + (("levels", "num_stages") if kind == "wavelet" else ()):
            value = getattr(self, name)
            if not (kind == "wavelet" and value is None and name in ("levels", "num_stages", "factors")):
                config[name] = list(value) if isinstance(value, tuple) else value
        return decomposition_from_config(config)

    def check_sample_shape(self, shape: Sequence[int], what: str = "latent") -> None:
        """A :class:`ConfigError` unless the decomposition accepts samples of ``shape`` ``(C, H, W)`` / ``(C, T, H, W)``."""
        try:
            self.build().stage_shapes((1, *shape))
        except ValueError as e:
            raise ConfigError(f"decomposition (kind={self.kind}) cannot split the {what} shape {tuple(shape)}: {e}") from e


# The DFMConfig fields only some recipes read, and what reads them.
RECIPE_DFM_FIELDS = {
    "label_dropout": "class-conditional recipes (FLUX drops captions with data.caption_dropout)",
    **dict.fromkeys(("standardize", "scales", "scale_estimation_clips"), "the video recipe"),
    "allocation": "the ImageNet and video recipes (their tasks feed it the losses)",
}


@dataclass
class DFMConfig:
    """Stage times and loss (paper 3.3, A.5: :class:`dfm_ext.StageTimestepSampler`, :class:`dfm_ext.DFMObjective`),
    label dropout, per-stage standardisation (``scales`` null: estimated from ``scale_estimation_clips`` clips);
    ``allocation``: ``progress`` (stage probabilities follow each stage's learning progress) or ``reducible`` (they
    follow the reducible part of each stage's error, :class:`dfm_ext.process.ReducibleAllocation`), from the prior
    ``stage_probabilities``; ``fixed``: the prior throughout."""

    stage_probabilities: tuple[float, ...] | None = None
    current: tuple[float, float] = (0.0, 1.0)
    earlier: tuple[float, float] = (1.5, 1.0)
    timestep_mode: Literal["dfm", "tied", "uniform"] = "dfm"
    masking: bool = True
    stage_weights: tuple[float, ...] | None = None
    label_dropout: float = 0.1
    standardize: bool = False
    scales: tuple[float, ...] | None = None
    scale_estimation_clips: int = 64
    allocation: Literal["fixed", "progress", "reducible"] = "fixed"

    def timestep_sampler(self, num_stages: int) -> StageTimestepSampler:
        """The :class:`dfm_ext.StageTimestepSampler` (with an ``allocation`` the task feeds it each step, :func:`feed_allocation`)."""
        prior = self.stage_probabilities or default_stage_probabilities(num_stages)
        allocation = make_allocation(self.allocation, num_stages, prior=prior) if num_stages > 1 else None
        return StageTimestepSampler(
            num_stages, probabilities=self.stage_probabilities, current=self.current, earlier=self.earlier,
            mode=self.timestep_mode, allocation=allocation,  # type: ignore[arg-type]
        )  # fmt: skip

    def objective(self, num_stages: int) -> DFMObjective:
        """The :class:`dfm_ext.DFMObjective` of this section."""
        return DFMObjective(num_stages, masking=self.masking, stage_weights=self.stage_weights)

    def check(self, num_stages: int, *, reads: tuple[str, ...], default: DFMConfig, recipe: str) -> None:
        """Every value against ``num_stages`` (by building the library objects); the fields of
        :data:`RECIPE_DFM_FIELDS` not in ``reads`` must equal ``default``'s."""
        for name, users in RECIPE_DFM_FIELDS.items():
            value, want = getattr(self, name), getattr(default, name)
            if name not in reads and value != want:
                raise ConfigError(
                    f"dfm.{name}={yaml_value(value)} is not read by the {recipe} recipe (it is for {users}); "
                    f"leave it at its default {yaml_value(want)}"
                )
        try:
            self.timestep_sampler(num_stages)
        except ValueError as e:
            first = str(e).split()[0]
            key = {"probabilities": "dfm.stage_probabilities", "prior": f"dfm.stage_probabilities (the prior of dfm.allocation={self.allocation})",
                   "current": "dfm.current", "earlier": "dfm.earlier"}.get(first, "dfm.timestep_mode")  # fmt: skip
            raise ConfigError(f"{key}: {e}") from e
        try:  # the objective checks the weights: one per stage, finite, non-negative
            self.objective(num_stages)
        except ValueError as e:
            raise ConfigError(f"dfm.stage_weights {yaml_value(self.stage_weights)}: {e}") from e
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"dfm.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.scales is not None:
            if len(self.scales) != num_stages:
                raise ConfigError(f"dfm.scales {list(self.scales)} needs one entry per stage ({num_stages})")
            if not all(s > 0 for s in self.scales):
                raise ConfigError(f"dfm.scales {list(self.scales)} must all be > 0")
        if self.scale_estimation_clips < 1:
            raise ConfigError(f"dfm.scale_estimation_clips must be >= 1, got {self.scale_estimation_clips}")


@dataclass
class SamplingConfig:
    """What every recipe's sampler reads (a recipe's ``sampling`` section extends it with its outputs)."""

    steps: tuple[int, ...] = (30, 10)
    thresholds: tuple[float, ...] = (0.9,)
    method: Literal["euler", "heun"] = "euler"
    guidance_scale: float = 1.5
    seed: int = 0

    def check(self, num_stages: int, *, kind: str = "") -> None:
        """Steps and thresholds per stage, a finite guidance scale."""
        where = f" for decomposition.kind={kind}" if kind else ""
        steps, thresholds = tuple(self.steps), tuple(self.thresholds)
        if len(steps) != num_stages:
            raise ConfigError(f"sampling.steps {list(steps)} needs one entry per stage ({num_stages}{where})")
        if len(thresholds) != num_stages - 1:
            raise ConfigError(
                f"sampling.thresholds {list(thresholds)} needs one entry per stage boundary ({num_stages - 1}{where})"
            )
        try:
            StageScheduler(steps=steps, thresholds=thresholds)
        except ValueError as e:
            key = "sampling.thresholds" if "threshold" in str(e) else "sampling.steps"
            raise ConfigError(f"{key}: {e}") from e
        if not math.isfinite(self.guidance_scale):
            raise ConfigError(f"sampling.guidance_scale must be a finite number, got {self.guidance_scale}")

    def sampler(self, decomposition: Decomposition, **kwargs: Any) -> DFMSampler:
        """The :class:`dfm_ext.DFMSampler` of this section (``kwargs`` replace settings, e.g. ``guidance_scale``)."""
        scheduler = StageScheduler(steps=self.steps, thresholds=self.thresholds)
        return DFMSampler(decomposition, scheduler, **{"method": self.method, "guidance_scale": self.guidance_scale, **kwargs})


@dataclass
class ClassSamplingConfig(SamplingConfig):
    """:class:`SamplingConfig` of the class-conditional recipes: ``classes`` to cycle through (null: the first ones)."""

    classes: tuple[int, ...] | None = None

    def check_classes(self, num_classes: int) -> None:
        if self.classes is None:
            return
        if not self.classes:
            raise ConfigError("sampling.classes is empty; give class indices or null")
        if bad := [c for c in self.classes if not 0 <= c < num_classes]:
            raise ConfigError(f"sampling.classes {bad} out of range [0, {num_classes - 1}] (data.num_classes={num_classes})")


def check_count(section: Any, name: str) -> None:
    """``sampling.<name>`` (a number of samples) is at least 1."""
    if (n := getattr(section, name)) < 1:
        raise ConfigError(f"sampling.{name} must be >= 1, got {n}")


@dataclass
class ModelConfig:
    """A reference model (``preset`` + ``overrides``) or any model ``wrap_dit`` accepts (``factory``:
    ``"package.module:function"``, called with the whole run config). ``time_convention``: how it reads time
    (``None``: the model declares it, else it is refused with the choices rather than guessed)."""

    preset: str = "XL/2"
    overrides: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    time_convention: str | None = None
    init: Literal["scratch", "pretrained"] = "scratch"
    gradient_checkpointing: bool = False

    def check(self, preset_config: Any = None, **base: Any) -> None:
        """``time_convention``; and ``preset_config.preset(preset, **base, **overrides)`` builds (no factory)."""
        try:
            check_time_convention(self.time_convention, allow_none=True)
        except ValueError as e:
            raise ConfigError(f"model.time_convention: {e}") from None
        if self.factory is not None or preset_config is None:
            return
        try:
            preset_config.preset(self.preset, **{**base, **self.overrides})
        except TypeError as e:  # an override that is not a field of the model config
            raise ConfigError(f"model.overrides {dict(self.overrides)}: {e}") from e
        except ValueError as e:
            key = "model.preset" if "preset" in str(e) else "model.overrides"
            raise ConfigError(f"{key}: {e}") from e


def import_factory(spec: str, *, key: str = "model.factory") -> Any:
    """The function ``"package.module:function"`` that the config key ``key`` names."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{key} must look like 'package.module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key} {spec!r} cannot be imported: {e}") from e


def enable_gradient_checkpointing(base: nn.Module) -> None:
    """``model.gradient_checkpointing: true``: turn it on in the unwrapped model (DiT or diffusers)."""
    enable = getattr(base, "enable_gradient_checkpointing", None)
    if not callable(enable):
        raise ConfigError(
            f"model.gradient_checkpointing is true but {type(base).__name__} has no enable_gradient_checkpointing(); "
            "set it to false or build a model that supports it"
        )
    enable()


@dataclass
class SpecializeConfig:
    """Per-stage parameters (paper 4.2, Table 1d) of :func:`dfm_ext.specialize`: ``kind`` none, full or lora
    (``rank``, scaled by ``alpha / rank``; ``alpha`` null: ``= rank``) on the layer groups ``targets``."""

    kind: Literal["none", "full", "lora"] = "none"
    targets: tuple[str, ...] = ("mlp",)
    rank: int = 16
    alpha: float | None = None

    def validate(self, num_stages: int) -> None:
        if self.kind == "none":
            return
        if num_stages < 2:
            raise ConfigError(f"specialize.kind={self.kind} needs a decomposition with >= 2 stages, this one has {num_stages}")
        known = ("all", *GROUP_PATTERNS)
        unknown = [g for g in self.targets if g not in known]
        if not self.targets or unknown:
            raise ConfigError(f"specialize.targets {list(self.targets)}: unknown group(s) {unknown}; known: {list(known)}")
        if self.kind == "lora":
            if self.rank < 1:
                raise ConfigError(f"specialize.rank must be >= 1, got {self.rank}")
            if self.alpha is not None and not math.isfinite(self.alpha):
                raise ConfigError(f"specialize.alpha must be a finite number or null, got {self.alpha}")

    def apply(self, model: nn.Module) -> StageSpecialization | None:
        """:func:`dfm_ext.specialize` of ``model`` as configured (``None`` for ``kind=none``)."""
        if self.kind == "none":
            return None
        lora = self.kind == "lora"
        return specialize(model, kind=self.kind, targets=list(self.targets), rank=self.rank if lora else None, alpha=self.alpha if lora else None)


@dataclass
class VAESection:
    """What every recipe's ``vae`` section says about the latents: the VAE's ``subfolder`` and the
    normalisation ``z = (z - shift) * scale`` (``None``: the VAE config's factors, shift 0 if it has none)."""

    subfolder: str | None = "vae"
    scaling_factor: float | None = None
    shift_factor: float | None = None
    sample_posterior: bool = False

    def __post_init__(self) -> None:
        scale, shift = self.scaling_factor, self.shift_factor
        check_fields(self, "vae.", [
            ("scaling_factor", scale is None or (math.isfinite(scale) and scale != 0), "a finite non-zero number or null"),
            ("shift_factor", shift is None or math.isfinite(shift), "a finite number or null"),
        ])  # fmt: skip


@dataclass
class LatentVAEConfig(VAESection):
    """:class:`VAESection` of a recipe that trains from scratch: a diffusers VAE folder or hub id
    (``path``, read offline from the local cache), its latent channels and dtype."""

    path: str | None = None
    latent_channels: int = 16
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class ClassDataSection:
    """The class-conditional recipes' ``data``: ``root/<class>/<item>`` or a ``latent_cache``, the side ``resolution``,
    mirroring, the class count and how many consecutive unreadable items a run may skip."""

    root: str | None = None
    latent_cache: str | None = None
    resolution: int = 512
    random_flip: bool = True
    num_classes: int = 1000
    max_skips: int = 64

    def __post_init__(self) -> None:
        lows = (("resolution", 1), ("num_classes", 1), ("max_skips", 0))
        check_fields(self, "data.", [(key, getattr(self, key) >= low, f">= {low}") for key, low in lows])


DataT = TypeVar("DataT")
VAET = TypeVar("VAET")
ModelT = TypeVar("ModelT")
SamplingT = TypeVar("SamplingT")

#: The sections a recipe names as ``RecipeConfig[Data, VAE, Model, Sampling]``, in that order.
RECIPE_SECTIONS = ("data", "vae", "model", "sampling")


def _named_by_the_recipe() -> Any:
    raise TypeError("RecipeConfig is abstract: a recipe's config subclasses RecipeConfig[Data, VAE, Model, Sampling]")


@dataclass
class RecipeConfig(Generic[DataT, VAET, ModelT, SamplingT]):
    """Every recipe's sections: ``train``, ``optim``, ``decomposition``, ``dfm``, and the four it names by type,
    ``RecipeConfig[Data, VAE, Model, Sampling]``; a recipe declares only sections beyond these (or other defaults)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    dfm: DFMConfig = field(default_factory=DFMConfig)
    data: DataT = field(default_factory=_named_by_the_recipe)
    vae: VAET = field(default_factory=_named_by_the_recipe)
    model: ModelT = field(default_factory=_named_by_the_recipe)
    sampling: SamplingT = field(default_factory=_named_by_the_recipe)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Before @dataclass runs: each section type named in the base becomes the subclass's own
        # annotation and default factory (a field in the subclass's body wins).
        super().__init_subclass__(**kwargs)
        named = [typing.get_args(b) for b in cls.__dict__.get("__orig_bases__", ()) if typing.get_origin(b) is RecipeConfig]
        if not named:
            return
        if "__annotations__" not in cls.__dict__:
            cls.__annotations__ = {}
        for name, section in zip(RECIPE_SECTIONS, named[0]):
            if name not in cls.__dict__["__annotations__"]:
                cls.__dict__["__annotations__"][name] = section
                setattr(cls, name, field(default_factory=section))

    @property
    def num_stages(self) -> int:
        return self.decomposition._num_stages

    def check_shared(self, recipe: str, *, reads: tuple[str, ...]) -> None:
        """``sampling``, ``dfm`` (the fields this recipe ``reads``; the others at the recipe's defaults) and the batch
        split over ``$WORLD_SIZE`` processes (set by ``accelerate launch``): a wrong process count fails at start-up."""
        self.sampling.check(self.num_stages, kind=self.decomposition.kind)  # type: ignore[attr-defined]
        default = next(f for f in dataclasses.fields(self) if f.name == "dfm").default_factory()  # type: ignore[operator]
        self.dfm.check(self.num_stages, reads=reads, default=default, recipe=recipe)
        t, world = self.train, int(os.environ.get("WORLD_SIZE", "1") or 1)
        if t.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.mixed_precision=fp16 needs a CUDA device and this machine has none (fp16 autocast would not run); use bf16 or no")
        if t.global_batch_size % (world * t.grad_accumulation):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by {world} process(es) x "
                f"train.grad_accumulation={t.grad_accumulation} (= {world * t.grad_accumulation})"
            )
