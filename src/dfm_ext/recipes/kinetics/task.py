"""Class-conditional video generation on Kinetics with DFM (paper sections 4, A.1, A.5).

Run::

    accelerate launch -m dfm_ext.recipes.kinetics --config kinetics_512 data.root=/data/kinetics700/train
    python -m dfm_ext.recipes.kinetics --config tiny data.root=... vae.path=...   # CPU, one process

The pipeline: Kinetics-style clips (class folders or a CSV/JSON list, decoded with PyAV; or a
latent cache in the engine's format, ``data.latent_cache``; no video cache builder command exists yet) -> latents of diffusers'
``AutoencoderKLCogVideoX`` (``[B, C, T', H', W']``, ``T' = (T - 1) / 4 + 1``) -> the spatial
Laplacian stages of every latent frame (spatio-temporal with ``decomposition.temporal_factors``)
-> per-stage standardisation (on by default, as the paper does for CogVideoX latents; the scales
are estimated from the data at the start of the run, stored in the checkpoints and in
``final/``) -> :class:`dfm_ext.DFMObjective` on the wrapped video DiT: the reference
:class:`dfm_ext.models.video_dit.VideoDiT` (per-frame patches, 3-D RoPE) or diffusers'
``CogVideoXTransformer3DModel`` (``model.kind=cogvideox``; class labels become learned text
tokens). Samples are written as MP4 and GIF with the stage previews side by side, and as a PNG
strip of frames.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dfm_ext.recipes.engine.cli import check_batch, check_latent_cache, check_vae_path, parse_config_args, prepare_run, train_main
from dfm_ext.recipes.engine.data import ClassConditionalInputs, cycled_labels
from dfm_ext.recipes.engine.config import ConfigError
from dfm_ext.recipes.engine.decomposition import build_decomposition
from dfm_ext.recipes.engine.trainer import StepLoss, Trainer, TrainResult, TrainTask
from dfm_ext.recipes.engine.sections import (
    ClassDataSection,
    ClassSamplingConfig,
    DFMConfig,
    LatentVAEConfig,
    ModelConfig,
    RecipeConfig,
    check_count,
    default_of,
    enable_gradient_checkpointing,
    import_factory,
)
from dfm_ext.recipes.kinetics.stage_scales import SCALES_FILE, StageScalesMixin
from dfm_ext.recipes.kinetics.conditioning import CogVideoXRotary, LabelTokens, save_video_samples

__all__ = [
    "KineticsConfig",
    "KineticsTask",
    "LabelTokenDFM",
    "LabelTokens",
    "build_dataset",
    "build_decomposition",
    "cache_metadata",
    "load_codec",
    "load_video_vae",
    "main",
    "parse_args",
    "prepare",
    "run",
]

CONFIG_ALIASES = {"tiny": "kinetics_tiny"}
LABEL_TOKENS_FILE = "label_tokens.safetensors"


@dataclass
class VideoDataConfig(ClassDataSection):
    """Clips from ``root`` (class folders) or ``annotations`` (CSV/JSON), or a ``latent_cache``;
    ``num_frames`` per clip, every ``frame_stride``-th frame, from the clip's ``position``."""

    annotations: str | None = None
    num_frames: int = 17
    frame_stride: int = 2
    position: Literal["center", "start"] = "center"
    num_classes: int = 700


@dataclass
class VideoVAEConfig(LatentVAEConfig):
    """A diffusers ``AutoencoderKLCogVideoX`` (:class:`~.sections.LatentVAEConfig`) and its space and time downsampling."""

    spatial_downsample: int = 8
    temporal_downsample: int = 4


@dataclass
class VideoModelConfig(ModelConfig):
    """:class:`~.sections.ModelConfig` plus ``kind``: ``video_dit``, the reference
    :class:`~dfm_ext.models.video_dit.VideoDiT` from ``preset`` + ``overrides``; ``cogvideox``,
    ``CogVideoXTransformer3DModel`` from ``pretrained`` (a diffusers folder or hub id,
    ``subfolder``) or built from ``overrides`` (its config keys). A ``factory`` model must take
    class labels ``y`` (it replaces ``kind``).
    """

    kind: Literal["video_dit", "cogvideox"] = "video_dit"
    pretrained: str | None = None
    subfolder: str | None = "transformer"


@dataclass
class VideoSamplingConfig(ClassSamplingConfig):
    """:class:`~.sections.ClassSamplingConfig` plus ``num_videos`` per evaluation, written at ``fps`` as ``formats``."""

    num_videos: int = 8
    fps: float = 8.0
    formats: tuple[str, ...] = ("mp4", "gif", "png")


@dataclass
class KineticsConfig(RecipeConfig[VideoDataConfig, VideoVAEConfig, VideoModelConfig, VideoSamplingConfig]):
    """A Kinetics run: the shared sections (standardisation on in ``dfm``), clips, the video VAE and DiT, sample videos."""

    # Per-stage standardisation on by default: the paper does it for CogVideoX latents (A.5).
    dfm: DFMConfig = field(default_factory=functools.partial(DFMConfig, standardize=True))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of one clip's latent."""
        d, v = self.data, self.vae
        frames = (d.num_frames - 1) // v.temporal_downsample + 1
        side = d.resolution // v.spatial_downsample
        return (v.latent_channels, frames, side, side)

    def validate(self) -> None:
        """Cross-field checks that need no files and no compute."""
        d, v = self.data, self.vae
        if d.resolution % v.spatial_downsample:
            raise ConfigError(f"data.resolution {d.resolution} is not divisible by vae.spatial_downsample {v.spatial_downsample}")
        if (d.num_frames - 1) % v.temporal_downsample:
            raise ConfigError(
                f"data.num_frames {d.num_frames} must be 1 + a multiple of vae.temporal_downsample "
                f"{v.temporal_downsample} (CogVideoX encodes the first frame alone), e.g. 9, 17, 49"
            )
        if d.root is None and d.annotations is None and d.latent_cache is None:
            raise ConfigError("set data.root (class folders of clips), data.annotations (CSV/JSON) or data.latent_cache")
        check_count(self.sampling, "num_videos")
        self.sampling.check(self.num_stages, kind=self.decomposition.kind)
        self.sampling.check_classes(d.num_classes)
        if not self.sampling.fps > 0:
            raise ConfigError(f"sampling.fps must be > 0, got {self.sampling.fps}")
        bad = set(self.sampling.formats) - {"mp4", "gif", "png"}
        if bad:
            raise ConfigError(f"sampling.formats has unknown entries {sorted(bad)}; choose from mp4, gif, png")
        reads = ("label_dropout", "standardize", "scales", "scale_estimation_clips", "allocation")
        self.dfm.check(self.num_stages, reads=reads, default=default_of(self, "dfm"), recipe="kinetics")
        check_batch(self.train)
        from dfm_ext.models.video_dit import VideoDiTConfig

        c, frames, h, w = self.latent_shape
        base = {"input_size": (frames, h, w), "in_channels": c, "num_classes": d.num_classes}
        self.model.check(VideoDiTConfig if self.model.kind == "video_dit" else None, **base)
        self.decomposition.check_sample_shape(self.latent_shape)


# -- building blocks -------------------------------------------------------------------------


def load_video_vae(path: str, subfolder: str | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """``AutoencoderKLCogVideoX.from_pretrained(path, subfolder=...)``, frozen, in eval mode.

    Raises:
        FileNotFoundError: ``path`` is a local path without a diffusers ``config.json``.
    """
    from diffusers import AutoencoderKLCogVideoX

    from dfm_ext.recipes.engine.latents import load_frozen_vae

    return load_frozen_vae(AutoencoderKLCogVideoX, path, subfolder, device=device, dtype=dtype, what="video VAE")


def load_codec(cfg: KineticsConfig, device: torch.device | str) -> Any:
    """Pixels ``[B, 3, T, H, W]`` <-> normalised latents ``[B, C, T', H', W']`` (:class:`~.latents.LatentCodec`)."""
    from dfm_ext.recipes.engine.data import LatentCodec

    if cfg.vae.path is None:
        raise ConfigError("vae.path is not set (a diffusers AutoencoderKLCogVideoX folder or hub id, e.g. THUDM/CogVideoX-2b)")
    vae = load_video_vae(cfg.vae.path, cfg.vae.subfolder, device=device, dtype=getattr(torch, cfg.vae.dtype))
    if vae.config.latent_channels != cfg.vae.latent_channels:
        raise ConfigError(
            f"the VAE at {cfg.vae.path} has {vae.config.latent_channels} latent channels, vae.latent_channels={cfg.vae.latent_channels}"
        )
    if int(vae.config.temporal_compression_ratio) != cfg.vae.temporal_downsample:
        raise ConfigError(
            f"the VAE at {cfg.vae.path} compresses time by {vae.config.temporal_compression_ratio}, "
            f"vae.temporal_downsample={cfg.vae.temporal_downsample}"
        )
    spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    if spatial != cfg.vae.spatial_downsample:
        raise ConfigError(f"the VAE at {cfg.vae.path} downsamples space by {spatial}, vae.spatial_downsample={cfg.vae.spatial_downsample}")
    return LatentCodec(vae, cfg.vae.scaling_factor, cfg.vae.shift_factor, sample=cfg.vae.sample_posterior)


def cache_metadata(cfg: KineticsConfig) -> dict[str, Any]:
    """What a latent cache must agree on with the config."""
    d = cfg.data
    return {
        "kind": "video",
        "vae_path": cfg.vae.path,
        "vae_subfolder": cfg.vae.subfolder,
        "resolution": d.resolution,
        "num_frames": d.num_frames,
        "frame_stride": d.frame_stride,
        "position": d.position,
        "latent_shape": list(cfg.latent_shape),
        "scaling_factor_override": cfg.vae.scaling_factor,
        "shift_factor_override": cfg.vae.shift_factor,
        "sample_posterior": cfg.vae.sample_posterior,
    }


def build_dataset(cfg: KineticsConfig) -> torch.utils.data.Dataset:
    """The clips or the latent cache (checked against the config)."""
    if cfg.data.latent_cache is not None:
        from dfm_ext.recipes.engine.data import LatentCache

        return LatentCache(cfg.data.latent_cache, expected=cache_metadata(cfg))
    from dfm_ext.recipes.kinetics.data import VideoClips, scan_videos

    items, classes = scan_videos(cfg.data.root, cfg.data.annotations)
    if len(classes) > cfg.data.num_classes:
        raise ConfigError(f"the data has {len(classes)} classes but data.num_classes={cfg.data.num_classes}")
    d = cfg.data
    return VideoClips(
        items, num_frames=d.num_frames, stride=d.frame_stride, resolution=d.resolution, position=d.position,
        max_skips=d.max_skips, classes=classes,
    )  # fmt: skip


class LabelTokenDFM(nn.Module):
    """A wrapped text-conditioned video DiT (CogVideoX) fed class labels as learned text tokens.

    ``forward(stages, t [B, S], stage [B], mask [B, S] | None, *, y [B]) -> list[Tensor]`` (the
    DFM model contract; ``num_classes`` is the null class). Only the label tokens and the
    rotary positions are the recipe's: the stage scales are the wrapper's own ``stage_scales``
    (:func:`dfm_ext.wrap_dit`), so ``DFMObjective``/``DFMSampler`` find them, and
    :meth:`save_pretrained` is the wrapper's, with ``label_tokens.safetensors`` as an extra
    file of the same atomic folder. The reference ``VideoDiT`` needs no such module: its
    wrapper is the model.

    Attributes:
        dfm: the :class:`dfm_ext.DFMTransformer`. label_tokens: :class:`LabelTokens`.
        rotary: CogVideoX rotary positions ``(cos, sin)`` builder, else ``None``.
    """

    def __init__(self, dfm: nn.Module, label_tokens: LabelTokens, num_classes: int, *, rotary: Any = None) -> None:
        super().__init__()
        self.dfm = dfm
        self.label_tokens = label_tokens
        self.num_classes = num_classes
        self.rotary = rotary

    @property
    def stage_scales(self) -> Tensor | None:
        return self.dfm.stage_scales

    def forward(self, stages: Sequence[Tensor], t: Tensor, stage: Tensor, mask: Tensor | None = None, *, y: Tensor) -> list[Tensor]:
        cond: dict[str, Any] = {"encoder_hidden_states": self.label_tokens(y)}
        if self.rotary is not None:
            cond["image_rotary_emb"] = self.rotary(self.dfm.packer.grid, stages[0].device)
        return self.dfm(stages, t, stage, mask, **cond)

    def null_condition(self, *, y: Tensor) -> dict[str, Tensor]:
        return {"y": torch.full_like(y, self.num_classes)}

    def save_pretrained(self, directory: str | Path) -> None:
        """The wrapper's ``save_pretrained`` plus ``label_tokens.safetensors`` in the same folder."""
        from safetensors.torch import save

        tokens = {k: v.detach().cpu().contiguous() for k, v in self.label_tokens.state_dict().items()}
        self.dfm.save_pretrained(directory, extra_files={LABEL_TOKENS_FILE: save(tokens)})


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def build_base_model(cfg: KineticsConfig) -> nn.Module:
    """The unwrapped video DiT (reference VideoDiT, CogVideoX transformer, or the user's factory)."""
    c, frames, h, w = cfg.latent_shape
    if cfg.model.factory:
        return import_factory(cfg.model.factory)(cfg)
    if cfg.model.kind == "video_dit":
        from dfm_ext.models.video_dit import VideoDiT, VideoDiTConfig

        overrides = {
            "input_size": (frames, h, w),
            "in_channels": c,
            "num_classes": cfg.data.num_classes,
            "class_dropout_prob": 0.0,  # dropped once per sample by the recipe, reproducibly
            **cfg.model.overrides,
        }
        return VideoDiT(VideoDiTConfig.preset(cfg.model.preset, **overrides))
    from diffusers import CogVideoXTransformer3DModel

    if cfg.model.pretrained is not None:
        return CogVideoXTransformer3DModel.from_pretrained(cfg.model.pretrained, subfolder=cfg.model.subfolder or None)
    kwargs = {
        "in_channels": c,
        "out_channels": c,
        "sample_frames": cfg.data.num_frames,
        "sample_height": h,
        "sample_width": w,
        "temporal_compression_ratio": cfg.vae.temporal_downsample,
        **cfg.model.overrides,
    }
    return CogVideoXTransformer3DModel(**kwargs)


class KineticsTask(StageScalesMixin, ClassConditionalInputs, TrainTask):
    """Model, loss and video sampling of the class-conditional video recipe (a ``TrainTask``)."""

    def __init__(self, cfg: KineticsConfig, dataset: torch.utils.data.Dataset | None = None, *, name: str = "kinetics") -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.name = name
        self.decomposition = build_decomposition(cfg.decomposition)
        self.timesteps = cfg.dfm.timestep_sampler(self.decomposition.num_stages)
        self.null_class, self.label_dropout = cfg.data.num_classes, cfg.dfm.label_dropout
        self.random_flip = cfg.data.random_flip
        self._codec: Any = None

    def _load_codec(self, device: torch.device) -> Any:
        return load_codec(self.cfg, device)

    # -- TrainTask -----------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        from dfm_ext.wrapping.wrapper import wrap_dit

        base = build_base_model(self.cfg)
        if self.cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(base)
        label_tokens = rotary = None
        adapter = "auto"
        if not self.cfg.model.factory and self.cfg.model.kind == "cogvideox":
            c = base.config
            if c.use_learned_positional_embeddings or not c.use_rotary_positional_embeddings:
                tokens = int(c.max_text_seq_length)
            else:
                tokens = 16
            label_tokens = LabelTokens(self.cfg.data.num_classes, tokens, int(c.text_embed_dim))
            rotary = CogVideoXRotary(c) if c.use_rotary_positional_embeddings else None
            adapter = "cogvideox"
        dfm = wrap_dit(
            base, self.decomposition, adapter=adapter, sample_shape=self.cfg.latent_shape, init=self.cfg.model.init,
            time_convention=self.cfg.model.time_convention, stage_scales=self.stage_scales(),
        )
        if label_tokens is None:
            return dfm
        return LabelTokenDFM(dfm, label_tokens, self.cfg.data.num_classes, rotary=rotary)

    def state(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps} if self.timesteps.allocation is not None else {}

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        from dfm_ext.process.objective import dfm_loss

        stages, ts, labels = self.training_inputs(batch, generator=generator, device=device)
        out = dfm_loss(
            model, stages, ts, masking=self.cfg.dfm.masking, stage_weights=self.cfg.dfm.stage_weights,
            generator=generator, y=labels,  # scales: the model's stage_scales
        )  # fmt: skip
        self.timesteps.update(out.per_stage)  # the allocation's input (a no-op for fixed probabilities)
        return StepLoss(out.loss, {f"loss_stage{i}": v for i, v in enumerate(out.per_stage)})

    @torch.no_grad()
    def sample(self, model: nn.Module, *, device: torch.device) -> tuple[list[Tensor], Tensor]:
        """Decoded previews (one per stage before the last) and final videos, ``[N, 3, T, H, W]`` in ``[-1, 1]``."""
        cfg = self.cfg.sampling
        net = _unwrap(model)
        n = cfg.num_videos
        labels = cycled_labels(cfg.classes, n, self.cfg.data.num_classes, device)
        sampler = cfg.sampler(self.decomposition)  # scales: the model's stage_scales
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        out = sampler.sample(net, (n, *self.cfg.latent_shape), generator=g, device=device, y=labels)
        codec = self.codec(device)
        final = codec.decode(out.x)
        previews = [
            torch.nn.functional.interpolate(codec.decode(p), size=tuple(final.shape[2:]), mode="nearest")
            for p in out.previews[:-1]
        ]
        return previews, final

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        previews, final = self.sample(model, device=device)
        save_video_samples(previews, final, Path(out_dir) / "samples" / f"step-{step:06d}", fps=self.cfg.sampling.fps,
                           formats=self.cfg.sampling.formats)
        return {"sample_std": float(final.std())}


# -- entry point -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, KineticsConfig]:
    """``--config NAME [key.sub=value ...]`` -> (name, validated config); no compute spent."""
    return parse_config_args(
        KineticsConfig, argv, prog="python -m dfm_ext.recipes.kinetics", doc=__doc__, aliases=CONFIG_ALIASES,
        config_help="kinetics_512, tiny (= kinetics_tiny), another name in dfm_ext/recipes/configs or a YAML path",
    )  # fmt: skip


def check_inputs(cfg: KineticsConfig) -> None:
    """Fail fast on missing data/VAE paths before any model is built."""
    d = cfg.data
    if d.latent_cache is not None:
        check_latent_cache(d.latent_cache)
    elif d.annotations is not None:
        if not Path(d.annotations).is_file():
            raise FileNotFoundError(f"data.annotations={d.annotations!r} does not exist")
    elif not Path(d.root).is_dir():  # type: ignore[arg-type]
        raise FileNotFoundError(f"data.root={d.root!r} does not exist or is not a folder")
    check_vae_path(cfg.vae.path, cfg.vae.subfolder, "AutoencoderKLCogVideoX")


def prepare(argv: Sequence[str] | None = None) -> tuple[str, KineticsConfig, torch.utils.data.Dataset]:
    """Parse, validate and open the data; everything that can fail before compute is spent."""
    return prepare_run(argv, parse_args, check_inputs, build_dataset)


def run(name: str, cfg: KineticsConfig, dataset: torch.utils.data.Dataset) -> TrainResult:
    task = KineticsTask(cfg, dataset, name=name)
    return Trainer(task, dataset, cfg, name=name).fit()


def _summary(result: TrainResult) -> dict[str, Any]:
    # The engine counts "images"; for this recipe they are videos.
    return {"skipped_videos": result.skipped_images, "unique_bad_videos": result.unique_bad_images}


def main(argv: Sequence[str] | None = None) -> int:
    """The command (``python -m dfm_ext.recipes.kinetics``); returns the exit status (2: a usage error)."""
    return train_main(prepare, run, argv, _summary)


if __name__ == "__main__":
    sys.exit(main())
