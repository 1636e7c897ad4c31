"""Class-conditional image generation with DFM (or the Flow Matching baseline) on DiT: the training script.

Commands, configs and the pipeline (images, cached latents or a ``data.factory`` dataset -> latents, or pixels with
``vae.kind=none`` -> stages -> the wrapped DiT with label dropout): docs/recipes/imagenet.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dfm_ext.metrics.commands import evaluate_images_command
from dfm_ext.models.dit import DiT, DiTConfig
from dfm_ext.recipes.engine.cli import check_latent_cache, check_vae_path, parse_config_args, train_main
from dfm_ext.recipes.engine.config import ConfigError
from dfm_ext.recipes.engine.data import ClassConditionalInputs, Codec, ImageFolder, LatentCache, LatentCodec, cycled_labels
from dfm_ext.recipes.engine.latents import check_cache_labels, load_vae
from dfm_ext.recipes.engine.sections import (
    ClassDataSection, ClassSamplingConfig, LatentVAEConfig, ModelConfig, RecipeConfig, SpecializeConfig, check_count,
    enable_gradient_checkpointing, import_factory,
)  # fmt: skip
from dfm_ext.recipes.engine.sampling import SampleJob, dispatch, sample_command
from dfm_ext.recipes.engine.trainer import StepLoss, Trainer, TrainResult, TrainTask
from dfm_ext.recipes.engine.viz import save_progressive_samples
from dfm_ext.wrapping.wrapper import load_wrapped, wrap_dit

__all__ = ["ImageNetConfig", "ImageNetTask", "build_dataset", "cache_metadata", "load_codec", "main", "parse_args", "run", "sample_job"]


@dataclass
class DataConfig(ClassDataSection):
    """Exactly one source: ``root``, ``latent_cache``, or ``factory`` (``"package.module:function"``, called as
    ``function(cfg, **factory_kwargs)``: a dataset keyed by ``(index, flip)`` of ``{"pixels": [C, R, R], "label": int}``)."""

    factory: str | None = None
    factory_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class VAEConfig(LatentVAEConfig):
    """A diffusers ``AutoencoderKL`` downsampling by ``downsample``, or ``kind=none``: train on pixels (``downsample: 1``)."""

    kind: Literal["diffusers", "none"] = "diffusers"
    downsample: int = 8


@dataclass
class ImageSamplingConfig(ClassSamplingConfig):
    """Plus ``num_images`` per evaluation and ``metrics`` between ``metric_images`` samples and as many training images."""

    num_images: int = 16
    metrics: tuple[Literal["swd", "fd_effnet"], ...] = ()
    metric_images: int = 256


@dataclass
class ImageNetConfig(RecipeConfig[DataConfig, VAEConfig, ModelConfig, ImageSamplingConfig]):
    """An image run: the shared sections, image data, its VAE, the DiT, samples and metrics, per-stage parameters."""

    specialize: SpecializeConfig = field(default_factory=SpecializeConfig)

    @property
    def latent_size(self) -> int:
        return self.data.resolution // self.vae.downsample

    def validate(self) -> None:
        """Cross-field checks that need no files and no compute."""
        d, v = self.data, self.vae
        sources = [k for k in ("root", "latent_cache", "factory") if getattr(d, k) is not None]
        if len(sources) != 1:
            raise ConfigError(f"set exactly one of data.root, data.latent_cache and data.factory, got {sources or 'none'}")
        if v.downsample < 1 or d.resolution % v.downsample:
            raise ConfigError(f"data.resolution {d.resolution} is not divisible by vae.downsample {v.downsample} (>= 1)")
        if v.kind == "none" and (v.path is not None or v.downsample != 1):
            raise ConfigError(f"vae.kind=none trains on pixels: set vae.path=null and vae.downsample=1 (got {v.path!r}, {v.downsample})")
        if self.sampling.metrics and self.sampling.metric_images < 2:
            raise ConfigError(f"sampling.metric_images must be >= 2 when sampling.metrics is set, got {self.sampling.metric_images}")
        self.check_shared("imagenet", reads=("label_dropout", "allocation"))
        self.sampling.check_classes(d.num_classes)
        check_count(self.sampling, "num_images")
        self.model.check(DiTConfig, input_size=self.latent_size, in_channels=v.latent_channels, num_classes=d.num_classes)
        self.specialize.validate(self.num_stages)
        self.decomposition.check_sample_shape((v.latent_channels, self.latent_size, self.latent_size))


class PixelCodec:
    """``vae.kind=none``: the pixels are the latents (no VAE)."""

    def encode(self, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return pixels.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1, 1)


def load_codec(cfg: ImageNetConfig, device: torch.device | str) -> Codec:
    """The pixels <-> latents codec of the ``vae`` section."""
    if cfg.vae.kind == "none":
        return PixelCodec()
    vae = load_vae(cfg.vae.path, cfg.vae.subfolder, device=device, dtype=getattr(torch, cfg.vae.dtype))  # type: ignore[arg-type]
    if vae.config.latent_channels != cfg.vae.latent_channels:
        raise ConfigError(f"the VAE at {cfg.vae.path} has {vae.config.latent_channels} latent channels, vae.latent_channels={cfg.vae.latent_channels}")
    return LatentCodec(vae, cfg.vae.scaling_factor, cfg.vae.shift_factor, sample=cfg.vae.sample_posterior)


def cache_metadata(cfg: ImageNetConfig) -> dict[str, Any]:
    """What a latent cache must agree on with the config."""
    v = cfg.vae
    return {
        "vae_path": v.path, "vae_subfolder": v.subfolder, "resolution": cfg.data.resolution,
        "latent_shape": [v.latent_channels, cfg.latent_size, cfg.latent_size], "scaling_factor_override": v.scaling_factor,
        "shift_factor_override": v.shift_factor, "sample_posterior": v.sample_posterior,
    }  # fmt: skip


def build_dataset(cfg: ImageNetConfig) -> torch.utils.data.Dataset:
    """The image folder, the latent cache or the factory's dataset, checked against the config."""
    d = cfg.data
    if d.latent_cache is not None:
        cache = LatentCache(d.latent_cache, expected=cache_metadata(cfg))
        check_cache_labels(cache.path, cache.meta, d.num_classes)
        return cache
    if d.factory is not None:
        return import_factory(d.factory, key="data.factory")(cfg, **d.factory_kwargs)
    ds = ImageFolder(d.root, d.resolution, max_skips=d.max_skips)  # type: ignore[arg-type]
    if len(ds.classes) > d.num_classes:
        raise ConfigError(f"{d.root} has {len(ds.classes)} class folders but data.num_classes={d.num_classes}")
    return ds


class ImageNetTask(ClassConditionalInputs, TrainTask):
    """What one step of the image recipe computes: the DFM loss of the wrapped DiT on a class-labelled batch."""

    def __init__(self, cfg: ImageNetConfig, reference: torch.utils.data.Dataset | None = None) -> None:
        super().__init__(cfg, load_codec)
        self.reference = reference  # real images for sampling.metrics
        self.objective = cfg.dfm.objective(self.decomposition.num_stages)

    def build_model(self) -> nn.Module:
        """The wrapped DiT (``model.factory`` or the reference DiT preset); per-stage parameters with ``specialize``."""
        cfg = self.cfg
        if cfg.model.factory:
            base = import_factory(cfg.model.factory)(cfg)
        else:  # label dropout is the recipe's (once per sample, from the step's generator), not the DiT's
            sizes = {"input_size": cfg.latent_size, "in_channels": cfg.vae.latent_channels, "num_classes": cfg.data.num_classes}
            overrides = {**cfg.model.overrides, "patch_size": self.trunk_patch_size()}
            base = DiT(DiTConfig.preset(cfg.model.preset, **sizes, class_dropout_prob=0.0, **overrides))
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(base)
        try:
            model = wrap_dit(base, self.decomposition, init=cfg.model.init, time_convention=cfg.model.time_convention)
        except ValueError as e:  # before any step: a usage error (exit 2), naming what to change
            what = "set model.time_convention" if "time_convention" in str(e) else "the model and the decomposition do not fit"
            raise ConfigError(f"{'model.factory' if cfg.model.factory else 'model'} ({what}): {e}") from e
        if cfg.specialize.kind != "none":
            model.stage_specialization = cfg.specialize.apply(model)  # rides along into the EMA copy and final/
        return model

    def trunk_patch_size(self) -> int:
        """The DiT's patch size: the preset's, or larger when the coarsest stage needs a coarser token grid.

        Every stage must land on the trunk's token grid with a patch of at least 1: with
        ``factors: [4, 1]`` on 128 x 128 latents, stage 0 is 32 x 32, so the trunk works on a 32 x 32
        grid (patch 4 on the full stage, 1 on stage 0; the paper's 1024 px setting) even for XL/2.
        """

        cfg = self.cfg
        patch = int(cfg.model.overrides.get("patch_size", DiTConfig.preset(cfg.model.preset).patch_size))
        coarsest = self.decomposition.stage_shapes((1, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size))[0][-1]
        return max(patch, cfg.latent_size // coarsest)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        stages, ts, labels = self.training_inputs(batch, generator=generator, device=device)
        out = self.objective(model, stages, ts, generator=generator, y=labels)
        self.feed_allocation(out, ts)
        return StepLoss(out.loss, {f"loss_stage{i}": v for i, v in enumerate(out.per_stage)})

    def sample(
        self, model: nn.Module, labels: torch.Tensor, *, generator: torch.Generator | None, device: torch.device, noise: list[torch.Tensor] | None = None
    ) -> Any:  # fmt: skip
        """``SampleOutput`` (latents) of the configured sampler for ``labels`` (from ``noise`` per stage, or drawn from
        ``generator``), with guidance against the null class."""
        shape = (len(labels), self.cfg.vae.latent_channels, self.cfg.latent_size, self.cfg.latent_size)
        sampler = self.cfg.sampling.sampler(self.decomposition)
        return sampler.sample(model, noise or shape, generator=generator, device=device, uncond={"y": torch.full_like(labels, self.null_class)}, y=labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        cfg = self.cfg.sampling
        labels = cycled_labels(cfg.classes, cfg.num_images, self.cfg.data.num_classes, device)
        out = self.sample(model, labels, generator=torch.Generator(device=device).manual_seed(cfg.seed), device=device)
        final = save_progressive_samples(self.codec(device), out, out_dir, step)
        return {"sample_std": float(final.std()), **(self._metrics(model, device) if cfg.metrics else {})}

    def _metrics(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``sampling.metrics`` between ``metric_images`` samples (random classes) and as many training images."""
        from dfm_ext import metrics

        cfg, n = self.cfg.sampling, self.cfg.sampling.metric_images
        g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        fakes = []
        for start in range(0, n, cfg.num_images):
            labels = torch.randint(0, self.cfg.data.num_classes, (min(cfg.num_images, n - start),), generator=g, device=g.device)
            fakes.append(self.codec(device).decode(self.sample(model, labels.to(device), generator=g, device=device).x).cpu())
        assert self.reference is not None, "sampling.metrics needs the training dataset as ImageNetTask.reference"
        items = [self.reference[(i * len(self.reference)) // n] for i in range(n)]  # type: ignore[arg-type]
        if "pixels" in items[0]:
            real = torch.stack([it["pixels"] for it in items])
        else:
            z = torch.stack([it["latents"] for it in items]).to(device)
            real = torch.cat([self.codec(device).decode(c) for c in z.split(cfg.num_images)]).cpu()
        fake, out = torch.cat(fakes), {}
        if "swd" in cfg.metrics:
            out["swd"] = metrics.swd(real, fake, progress_bar=False).mean
        if "fd_effnet" in cfg.metrics:
            out["fd_effnet"] = metrics.fd_effnet(real, fake, progress_bar=False, device=device)
        return out


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, ImageNetConfig]:
    """``--config NAME [key.sub=value ...]`` -> (name, validated config)."""
    return parse_config_args(ImageNetConfig, argv, prog="python -m dfm_ext.recipes.imagenet", doc=__doc__)


def prepare(argv: Sequence[str] | None = None) -> tuple[str, ImageNetConfig, torch.utils.data.Dataset]:
    """Parse, validate, check the paths and open the data: everything that can fail before compute is spent."""
    name, cfg = parse_args(argv)
    if cfg.data.root is not None and not Path(cfg.data.root).is_dir():
        raise FileNotFoundError(f"data.root={cfg.data.root!r} does not exist or is not a folder")
    if cfg.data.latent_cache is not None:
        check_latent_cache(cfg.data.latent_cache)
    if cfg.vae.kind == "diffusers":
        check_vae_path(cfg.vae.path, cfg.vae.subfolder, "AutoencoderKL")
    return name, cfg, build_dataset(cfg)


def run(name: str, cfg: ImageNetConfig, dataset: torch.utils.data.Dataset) -> TrainResult:
    """Train ``cfg`` on ``dataset`` (from :func:`prepare`) with the engine."""
    return Trainer(ImageNetTask(cfg, reference=dataset), dataset, cfg, name=name).fit()


def sample_job(cfg: ImageNetConfig) -> SampleJob:
    """What ``sample`` draws: class-balanced labels (sample ``i`` has class ``i mod data.num_classes``), decoded images."""
    task = ImageNetTask(cfg)

    def draw(model: nn.Module, noise: list[torch.Tensor], labels: np.ndarray, device: torch.device) -> torch.Tensor:
        return task.codec(device).decode(task.sample(model, torch.as_tensor(labels, device=device), generator=None, device=device, noise=noise).x)

    def load_final(folder: Path) -> nn.Module:
        return load_wrapped(folder, import_factory(cfg.model.factory)(cfg) if cfg.model.factory else None)

    shape = (cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    return SampleJob(task.decomposition, shape, lambda i: i % cfg.data.num_classes, draw, task.build_model, load_final)


def main(argv: Sequence[str] | None = None) -> int:
    """The command (``python -m dfm_ext.recipes.imagenet [sample | evaluate]``); returns the exit status (2: a usage error)."""
    prog = "python -m dfm_ext.recipes.imagenet"
    return dispatch(argv, {
        "sample": lambda a: sample_command(a, prog=prog, config_cls=ImageNetConfig, make_job=sample_job),
        "evaluate": lambda a: evaluate_images_command(a, prog=f"{prog} evaluate"),
    }, lambda a: train_main(prepare, run, a, lambda result: {"skipped_images": result.skipped_images}))  # fmt: skip
