"""Class-conditional ImageNet training with DFM (or the Flow Matching baseline) on DiT.

Run::

    accelerate launch -m dfm_ext.recipes.imagenet --config imagenet_512 data.root=/data/imagenet/train
    python -m dfm_ext.recipes.imagenet --config tiny data.root=... vae.path=...   # one process

The pipeline: an ImageNet-style folder (or a latent cache from ``build_latent_cache``) ->
latents of a diffusers ``AutoencoderKL`` (``z = (z - shift) * scale``) -> the decomposition's
stages -> :class:`dfm_ext.DFMObjective` on the wrapped DiT, with 10% label dropout for
classifier-free guidance. Samples (with per-stage previews) are drawn with
:class:`dfm_ext.DFMSampler` on the EMA weights every ``train.sample_every`` steps.
``decomposition.kind=identity`` (with ``sampling.steps=[40]`` and ``sampling.thresholds=[]``)
trains the plain Flow Matching baseline with everything else unchanged.

``specialize.kind=full|lora`` gives the layers of ``specialize.targets`` per-stage parameters
(:func:`dfm_ext.specialize`). ``final/`` then also holds ``stage_parameters.safetensors`` and
``stage_lora.json``; reload for sampling with::

    model = dfm_ext.load_wrapped("runs/NAME/final")
    dfm_ext.load_specialization(model, "runs/NAME/final")  # None (a no-op) for unspecialised runs
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._common import (
    ClassConditionalTask,
    check_vae_path,
    cycled_labels,
    parse_config_args,
    save_progressive_samples,
    stage_sampler,
    timestep_sampler,
    train_main,
)
from .config import ConfigError
from .engine import OptimConfig, StepLoss, Trainer, TrainConfig, TrainResult

__all__ = ["ImageNetConfig", "ImageNetTask", "SpecializeConfig", "build_dataset", "build_decomposition", "main", "parse_args", "prepare", "run"]


@dataclass
class DataConfig:
    """Images (``root``) or a latent cache (``latent_cache``); exactly one is used."""

    root: str | None = None
    latent_cache: str | None = None
    resolution: int = 512
    random_flip: bool = True
    num_classes: int = 1000
    max_skips: int = 64


@dataclass
class VAEConfig:
    """A diffusers ``AutoencoderKL`` folder or hub id (loaded offline from the local cache)."""

    path: str | None = None
    subfolder: str | None = "vae"
    scaling_factor: float | None = None  # None: vae.config.scaling_factor
    shift_factor: float | None = None  # None: vae.config.shift_factor (FLUX) or 0
    sample_posterior: bool = False
    downsample: int = 8
    latent_channels: int = 16
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class ModelConfig:
    """The reference DiT (``preset`` + ``overrides``) or any model ``wrap_dit`` accepts.

    ``factory``: ``"package.module:function"``; called as ``function(config)`` with the whole
    :class:`ImageNetConfig`, it returns the unwrapped DiT (replacing ``preset``).
    """

    preset: str = "XL/2"
    overrides: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    init: Literal["scratch", "pretrained"] = "scratch"


@dataclass
class DecompositionConfig:
    kind: Literal["laplacian", "identity", "wavelet", "dct"] = "laplacian"
    factors: tuple[int, ...] = (2, 1)


@dataclass
class DFMConfig:
    """Training distribution of stage times and the loss (paper section 3.3, A.5)."""

    stage_probabilities: tuple[float, ...] | None = None  # None: p_0 = 0.9 for two stages
    current: tuple[float, float] = (0.0, 1.0)
    earlier: tuple[float, float] = (1.5, 1.0)
    timestep_mode: Literal["dfm", "tied", "uniform"] = "dfm"
    masking: bool = True
    stage_weights: tuple[float, ...] | None = None
    label_dropout: float = 0.1
    # "progress": stage probabilities follow each stage's learning progress
    # (dfm_ext.allocation.ProgressAllocation, prior = stage_probabilities); "fixed": as given.
    allocation: Literal["fixed", "progress"] = "fixed"


@dataclass
class SamplingConfig:
    steps: tuple[int, ...] = (30, 10)
    thresholds: tuple[float, ...] = (0.9,)
    method: Literal["euler", "heun"] = "euler"
    guidance_scale: float = 1.5
    num_images: int = 16
    classes: tuple[int, ...] | None = None
    seed: int = 0
    # Periodic metrics (dfm_ext.metrics) between metric_images samples and as many training images.
    metrics: tuple[Literal["swd", "fd_effnet"], ...] = ()
    metric_images: int = 256


@dataclass
class SpecializeConfig:
    """Per-stage parameters (paper 4.2, Table 1d) from :func:`dfm_ext.specialize`.

    ``kind``: ``none`` (one shared model), ``full`` (stage weights averaged with the shared
    ones) or ``lora`` (a per-stage LoRA of ``rank``, scaled by ``alpha / rank``; ``alpha``
    null: ``= rank``). ``targets``: layer groups (``mod``, ``proj``, ``cond``, ``attn``,
    ``mlp``, ``all``).
    """

    kind: Literal["none", "full", "lora"] = "none"
    targets: tuple[str, ...] = ("mlp",)
    rank: int = 16
    alpha: float | None = None

    def validate(self, num_stages: int) -> None:
        import math

        from dfm_ext.specialization import GROUP_PATTERNS

        if self.kind not in ("none", "full", "lora"):
            raise ConfigError(f"specialize.kind must be none, full or lora, got {self.kind!r}")
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


@dataclass
class ImageNetConfig:
    """The whole run: every field can be overridden as ``section.key=value``."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    dfm: DFMConfig = field(default_factory=DFMConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    specialize: SpecializeConfig = field(default_factory=SpecializeConfig)

    @property
    def latent_size(self) -> int:
        return self.data.resolution // self.vae.downsample

    def validate(self) -> None:
        """Cross-field checks that need no files and no compute."""
        if self.data.resolution % self.vae.downsample:
            raise ConfigError(f"data.resolution {self.data.resolution} is not divisible by vae.downsample {self.vae.downsample}")
        if self.data.root is None and self.data.latent_cache is None:
            raise ConfigError("set data.root (an image folder) or data.latent_cache (a built latent cache)")
        if self.sampling.metrics and self.sampling.metric_images < 2:
            raise ConfigError(f"sampling.metric_images must be >= 2 when sampling.metrics is set, got {self.sampling.metric_images}")
        if not 0.0 <= self.dfm.label_dropout < 1.0:
            raise ConfigError(f"dfm.label_dropout must be in [0, 1), got {self.dfm.label_dropout}")
        stages = 1 if self.decomposition.kind == "identity" else len(self.decomposition.factors)
        if len(self.sampling.steps) != stages:
            raise ConfigError(
                f"sampling.steps {list(self.sampling.steps)} needs one entry per stage ({stages} for "
                f"decomposition.kind={self.decomposition.kind})"
            )
        self.specialize.validate(stages)
        if self.decomposition.kind == "laplacian":
            for f in self.decomposition.factors:
                if self.latent_size % f:
                    raise ConfigError(f"latent size {self.latent_size} is not divisible by decomposition factor {f}")


# -- building blocks -------------------------------------------------------------------------


def build_decomposition(cfg: DecompositionConfig) -> Any:
    import dfm_ext

    if cfg.kind == "identity":
        return dfm_ext.IdentityDecomposition()
    if cfg.kind == "laplacian":
        return dfm_ext.LaplacianPyramid(factors=cfg.factors)
    if cfg.kind == "wavelet":
        return dfm_ext.WaveletDecomposition(levels=len(cfg.factors) - 1)
    return dfm_ext.DCTDecomposition(num_stages=len(cfg.factors))


def _import_factory(spec: str) -> Any:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"model.factory must look like 'package.module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.factory {spec!r} cannot be imported: {e}") from e


def build_base_model(cfg: ImageNetConfig) -> nn.Module:
    """The unwrapped DiT: the reference ``DiT`` preset or the user's factory."""
    if cfg.model.factory:
        return _import_factory(cfg.model.factory)(cfg)
    from dfm_ext.models import DiT, DiTConfig

    overrides = {
        "input_size": cfg.latent_size,
        "in_channels": cfg.vae.latent_channels,
        "num_classes": cfg.data.num_classes,
        # Label dropout is done once per sample by the recipe, from the step's generator.
        "class_dropout_prob": 0.0,
        **cfg.model.overrides,
    }
    return DiT(DiTConfig.preset(cfg.model.preset, **overrides))


def build_dataset(cfg: ImageNetConfig) -> torch.utils.data.Dataset:
    """The image folder or the latent cache (checked against the config)."""
    if cfg.data.latent_cache is not None:
        from .latents import LatentCache

        return LatentCache(cfg.data.latent_cache, expected=cache_metadata(cfg))
    from .data_images import ImageFolder

    ds = ImageFolder(cfg.data.root, cfg.data.resolution, max_skips=cfg.data.max_skips)
    if len(ds.classes) > cfg.data.num_classes:
        raise ConfigError(f"{cfg.data.root} has {len(ds.classes)} class folders but data.num_classes={cfg.data.num_classes}")
    return ds


def cache_metadata(cfg: ImageNetConfig) -> dict[str, Any]:
    """What a latent cache must agree on with the config."""
    return {
        "vae_path": cfg.vae.path,
        "vae_subfolder": cfg.vae.subfolder,
        "resolution": cfg.data.resolution,
        "latent_shape": [cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size],
        "scaling_factor_override": cfg.vae.scaling_factor,
        "shift_factor_override": cfg.vae.shift_factor,
        "sample_posterior": cfg.vae.sample_posterior,
    }


def load_codec(cfg: ImageNetConfig, device: torch.device | str) -> Any:
    from .latents import LatentCodec, load_vae

    if cfg.vae.path is None:
        raise ConfigError("vae.path is not set (a diffusers AutoencoderKL folder, e.g. the FLUX repo with vae.subfolder=vae)")
    vae = load_vae(cfg.vae.path, cfg.vae.subfolder, device=device, dtype=getattr(torch, cfg.vae.dtype))
    channels = vae.config.latent_channels
    if channels != cfg.vae.latent_channels:
        raise ConfigError(f"the VAE at {cfg.vae.path} has {channels} latent channels, vae.latent_channels={cfg.vae.latent_channels}")
    return LatentCodec(vae, cfg.vae.scaling_factor, cfg.vae.shift_factor, sample=cfg.vae.sample_posterior)


class ImageNetTask(ClassConditionalTask):
    """Model, loss and sampling of the class-conditional DFM recipe (a ``TrainTask``)."""

    def __init__(self, cfg: ImageNetConfig) -> None:
        import dfm_ext

        self.cfg = cfg
        self.decomposition = build_decomposition(cfg.decomposition)
        s = self.decomposition.num_stages
        self.timesteps = timestep_sampler(cfg.dfm, s)
        self.objective = dfm_ext.DFMObjective(s, masking=cfg.dfm.masking, stage_weights=cfg.dfm.stage_weights)
        self.null_class = cfg.data.num_classes
        self.reference: torch.utils.data.Dataset | None = None  # real data for metrics
        self._codec: Any = None
        # A micro-batch without a sample of stage s leaves stage s's parameters unused (engine -> DDP).
        self.find_unused_parameters = cfg.specialize.kind != "none"

    def _load_codec(self, device: torch.device) -> Any:
        return load_codec(self.cfg, device)

    def build_model(self) -> nn.Module:
        """The wrapped DiT; with ``specialize.kind`` set, its handle is ``model.stage_specialization``.

        The handle rides along when the engine deep-copies the model for the EMA, and
        ``save_pretrained`` (``final/``) writes the stage parameters beside the shared weights.
        """
        from dfm_ext.specialization import specialize
        from dfm_ext.wrapper import wrap_dit

        model = wrap_dit(build_base_model(self.cfg), self.decomposition, init=self.cfg.model.init)
        sp = self.cfg.specialize
        if sp.kind != "none":
            lora = sp.kind == "lora"
            model.stage_specialization = specialize(
                model, kind=sp.kind, targets=list(sp.targets), rank=sp.rank if lora else None,
                alpha=sp.alpha if lora else None,
            )  # fmt: skip
        return model

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        stages, ts, labels = self.training_inputs(batch, generator=generator, device=device)
        out = self.objective(model, stages, ts, generator=generator, y=labels)
        self.timesteps.update(out.per_stage)  # the allocation's input (a no-op for fixed probabilities)
        logs = {f"loss_stage{i}": v for i, v in enumerate(out.per_stage)}
        return StepLoss(out.loss, logs)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        cfg = self.cfg.sampling
        n = cfg.num_images
        labels = cycled_labels(cfg.classes, n, self.cfg.data.num_classes, device)
        sampler = stage_sampler(self.decomposition, cfg)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        shape = (n, self.cfg.vae.latent_channels, self.cfg.latent_size, self.cfg.latent_size)
        out = sampler.sample(model, shape, generator=g, device=device, uncond={"y": torch.full_like(labels, self.null_class)}, y=labels)
        final = save_progressive_samples(self.codec(device), out, out_dir, step)
        scalars = {"sample_std": float(final.std())}
        if cfg.metrics:
            scalars.update(self._metrics(model, sampler, device))
        return scalars

    def _real_images(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` training images spread evenly over the dataset, in ``[-1, 1]`` (decoded when cached)."""
        if self.reference is None:
            raise RuntimeError("sampling.metrics needs ImageNetTask.reference (the training dataset)")
        size = len(self.reference)
        items = [self.reference[(i * size) // n] for i in range(n)]
        if "pixels" in items[0]:
            return torch.stack([it["pixels"] for it in items])
        latents = torch.stack([it["latents"] for it in items]).to(device)
        return torch.cat([self.codec(device).decode(z) for z in latents.split(self.cfg.sampling.num_images)]).cpu()

    def _metrics(self, model: nn.Module, sampler: Any, device: torch.device) -> dict[str, float]:
        from dfm_ext import metrics

        cfg = self.cfg.sampling
        n, b = cfg.metric_images, cfg.num_images
        g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        fakes = []
        for start in range(0, n, b):
            m = min(b, n - start)
            labels = torch.randint(0, self.cfg.data.num_classes, (m,), generator=g, device=g.device).to(device)
            shape = (m, self.cfg.vae.latent_channels, self.cfg.latent_size, self.cfg.latent_size)
            z = sampler.sample(model, shape, generator=g, device=device, uncond={"y": torch.full_like(labels, self.null_class)}, y=labels).x
            fakes.append(self.codec(device).decode(z).cpu())
        fake = torch.cat(fakes)
        real = self._real_images(n, device)
        out: dict[str, float] = {}
        if "swd" in cfg.metrics:
            out["swd"] = metrics.swd(real, fake, progress_bar=False).mean
        if "fd_effnet" in cfg.metrics:
            out["fd_effnet"] = metrics.fd_effnet(real, fake, progress_bar=False, device=device)
        return out


# -- entry point -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, ImageNetConfig]:
    """``--config NAME [key.sub=value ...]`` -> (name, validated config); no compute spent."""
    return parse_config_args(ImageNetConfig, argv, prog="python -m dfm_ext.recipes.imagenet", doc=__doc__)


def check_inputs(cfg: ImageNetConfig) -> None:
    """Fail fast on missing data/VAE paths before any model is built."""
    if cfg.data.latent_cache is None:
        root = Path(cfg.data.root)  # type: ignore[arg-type]
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={cfg.data.root!r} does not exist or is not a folder")
    elif not (Path(cfg.data.latent_cache) / "index.json").is_file():
        raise FileNotFoundError(f"data.latent_cache={cfg.data.latent_cache!r} has no index.json (build it first)")
    check_vae_path(cfg.vae.path, cfg.vae.subfolder, "AutoencoderKL")


def prepare(argv: Sequence[str] | None = None) -> tuple[str, ImageNetConfig, torch.utils.data.Dataset]:
    """Parse, validate and open the data; everything that can fail before compute is spent."""
    name, cfg = parse_args(argv)
    check_inputs(cfg)
    return name, cfg, build_dataset(cfg)


def run(name: str, cfg: ImageNetConfig, dataset: torch.utils.data.Dataset) -> TrainResult:
    task = ImageNetTask(cfg)
    task.reference = dataset
    trainer = Trainer(task, dataset, cfg.train, cfg.optim, full_config=cfg, name=name, random_flip=cfg.data.random_flip)
    return trainer.fit()


def main(argv: Sequence[str] | None = None) -> int:
    return train_main(prepare, run, argv, lambda result: {"skipped_images": result.skipped_images})


if __name__ == "__main__":
    sys.exit(main())

