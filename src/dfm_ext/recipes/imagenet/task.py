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
(:func:`dfm_ext.specialize`). ``final/`` then also holds ``stage_parameters.safetensors`` (its
record in ``dfm_config.json``); reload for sampling with::

    model = dfm_ext.load_wrapped("runs/NAME/final")  # the specialisation re-applied (model.specialization)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dfm_ext.recipes.engine.cli import ClassConditionalTask, check_batch, check_latent_cache, check_vae_path, cycled_labels, parse_config_args, prepare_run, save_progressive_samples, train_main
from dfm_ext.recipes.engine.config import ConfigError
from dfm_ext.recipes.engine.decomposition import build_decomposition
from dfm_ext.recipes.imagenet.metrics import sample_metrics
from dfm_ext.recipes.engine.trainer import StepLoss, Trainer, TrainResult
from dfm_ext.recipes.engine.sections import (
    ClassDataSection,
    ClassSamplingConfig,
    LatentVAEConfig,
    ModelConfig,
    RecipeConfig,
    SpecializeConfig,
    check_count,
    default_of,
    enable_gradient_checkpointing,
    import_factory,
)

__all__ = ["ImageNetConfig", "ImageNetTask", "SpecializeConfig", "build_dataset", "build_decomposition", "main", "parse_args", "prepare", "run"]


@dataclass
class DataConfig(ClassDataSection):
    """Images (``root``, one class per folder) or a latent cache (``latent_cache``); exactly one is used."""


@dataclass
class VAEConfig(LatentVAEConfig):
    """A diffusers ``AutoencoderKL`` (:class:`~.sections.LatentVAEConfig`) that downsamples by ``downsample``."""

    downsample: int = 8


@dataclass
class ImageSamplingConfig(ClassSamplingConfig):
    """:class:`~.sections.ClassSamplingConfig` plus ``num_images`` per evaluation and periodic metrics
    (:mod:`dfm_ext.metrics`) between ``metric_images`` samples and as many training images."""

    num_images: int = 16
    metrics: tuple[Literal["swd", "fd_effnet"], ...] = ()
    metric_images: int = 256


@dataclass
class ImageNetConfig(RecipeConfig[DataConfig, VAEConfig, ModelConfig, ImageSamplingConfig]):
    """An ImageNet run: the shared sections, image data, its VAE, the DiT, samples and metrics, per-stage parameters."""

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
        stages = self.num_stages
        self.sampling.check(stages, kind=self.decomposition.kind)
        self.sampling.check_classes(self.data.num_classes)
        check_count(self.sampling, "num_images")
        self.dfm.check(stages, reads=("label_dropout", "allocation"), default=default_of(self, "dfm"), recipe="imagenet")
        check_batch(self.train)
        from dfm_ext.models.dit import DiTConfig

        base = {"input_size": self.latent_size, "in_channels": self.vae.latent_channels, "num_classes": self.data.num_classes}
        self.model.check(DiTConfig, **base)
        self.specialize.validate(stages)
        self.decomposition.check_sample_shape((self.vae.latent_channels, self.latent_size, self.latent_size))


# -- building blocks -------------------------------------------------------------------------


def build_base_model(cfg: ImageNetConfig) -> nn.Module:
    """The unwrapped DiT: the reference ``DiT`` preset or the user's factory."""
    if cfg.model.factory:
        return import_factory(cfg.model.factory)(cfg)
    from dfm_ext.models.dit import DiT, DiTConfig

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
        from dfm_ext.recipes.engine.latents import LatentCache

        return LatentCache(cfg.data.latent_cache, expected=cache_metadata(cfg))
    from dfm_ext.recipes.engine.data import ImageFolder

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
    from dfm_ext.recipes.engine.latents import LatentCodec, load_vae

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
        self.cfg = cfg
        self.decomposition = build_decomposition(cfg.decomposition)
        s = self.decomposition.num_stages
        self.timesteps = cfg.dfm.timestep_sampler(s)
        self.objective = cfg.dfm.objective(s)
        self.null_class = cfg.data.num_classes
        self.reference: torch.utils.data.Dataset | None = None  # real data for metrics
        self._codec: Any = None
        # Every stage's specialised parameters take part in every forward (zero gradients for a
        # stage absent from the micro-batch), so DDP needs no search for unused parameters.
        self.find_unused_parameters = False

    def _load_codec(self, device: torch.device) -> Any:
        return load_codec(self.cfg, device)

    def build_model(self) -> nn.Module:
        """The wrapped DiT; with ``specialize.kind`` set, its handle is ``model.stage_specialization``.

        The handle rides along when the engine deep-copies the model for the EMA, and
        ``save_pretrained`` (``final/``) writes the stage parameters beside the shared weights.
        """
        from dfm_ext.wrapping.wrapper import wrap_dit

        base = build_base_model(self.cfg)
        if self.cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(base)
        try:
            model = wrap_dit(base, self.decomposition, init=self.cfg.model.init, time_convention=self.cfg.model.time_convention)
        except ValueError as e:  # before any step: a usage error (exit 2), e.g. an undeclared time convention
            raise ConfigError(f"model (set model.time_convention or fix model.factory): {e}") from e
        if self.cfg.specialize.kind != "none":
            model.stage_specialization = self.cfg.specialize.apply(model)
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
        sampler = cfg.sampler(self.decomposition)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        shape = (n, self.cfg.vae.latent_channels, self.cfg.latent_size, self.cfg.latent_size)
        out = sampler.sample(model, shape, generator=g, device=device, uncond={"y": torch.full_like(labels, self.null_class)}, y=labels)
        final = save_progressive_samples(self.codec(device), out, out_dir, step)
        scalars = {"sample_std": float(final.std())}
        if cfg.metrics:
            scalars.update(sample_metrics(self, model, sampler, device))
        return scalars


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
    else:
        check_latent_cache(cfg.data.latent_cache)
    check_vae_path(cfg.vae.path, cfg.vae.subfolder, "AutoencoderKL")


def prepare(argv: Sequence[str] | None = None) -> tuple[str, ImageNetConfig, torch.utils.data.Dataset]:
    """Parse, validate and open the data; everything that can fail before compute is spent."""
    return prepare_run(argv, parse_args, check_inputs, build_dataset)


def run(name: str, cfg: ImageNetConfig, dataset: torch.utils.data.Dataset) -> TrainResult:
    task = ImageNetTask(cfg)
    task.reference = dataset
    trainer = Trainer(task, dataset, cfg.train, cfg.optim, full_config=cfg, name=name, random_flip=cfg.data.random_flip)
    return trainer.fit()


def main(argv: Sequence[str] | None = None) -> int:
    """The command (``python -m dfm_ext.recipes.imagenet``); returns the exit status (2: a usage error)."""
    return train_main(prepare, run, argv, lambda result: {"skipped_images": result.skipped_images})


if __name__ == "__main__":
    sys.exit(main())

