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
:class:`dfm_ext.video_models.VideoDiT` (per-frame patches, 3-D RoPE) or diffusers'
``CogVideoXTransformer3DModel`` (``model.kind=cogvideox``; class labels become learned text
tokens). Samples are written as MP4 and GIF with the stage previews side by side, and as a PNG
strip of frames.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._common import (
    ClassConditionalTask,
    check_vae_path,
    cycled_labels,
    parse_config_args,
    stage_sampler,
    timestep_sampler,
    train_main,
)
from .config import ConfigError, config_to_dict
from .engine import (
    OptimConfig,
    StepLoss,
    TrainConfig,
    Trainer,
    TrainResult,
    resolve_output_dir,
)
from .imagenet import DFMConfig, _import_factory

__all__ = [
    "KineticsConfig",
    "KineticsTask",
    "LabelTokens",
    "VideoDFMModel",
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
SCALES_FILE = "stage_scales.json"


@dataclass
class VideoDataConfig:
    """Clips from ``root`` (class folders) or ``annotations`` (CSV/JSON), or a ``latent_cache``."""

    root: str | None = None
    annotations: str | None = None
    latent_cache: str | None = None
    resolution: int = 512
    num_frames: int = 17
    frame_stride: int = 2
    position: Literal["center", "start"] = "center"
    random_flip: bool = True
    num_classes: int = 700
    max_skips: int = 64


@dataclass
class VideoVAEConfig:
    """A diffusers ``AutoencoderKLCogVideoX`` folder or hub id (read offline from the local cache)."""

    path: str | None = None
    subfolder: str | None = "vae"
    scaling_factor: float | None = None  # None: vae.config.scaling_factor
    shift_factor: float | None = None  # None: vae.config.shift_factor or 0
    sample_posterior: bool = False
    spatial_downsample: int = 8
    temporal_downsample: int = 4
    latent_channels: int = 16
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class VideoModelConfig:
    """``kind=video_dit``: :class:`~dfm_ext.video_models.VideoDiT` from ``preset`` + ``overrides``.
    ``kind=cogvideox``: ``CogVideoXTransformer3DModel`` from ``pretrained`` (a diffusers folder or
    hub id, ``subfolder``) or built from ``overrides`` (its config keys). ``factory``:
    ``"package.module:function"`` called with the whole config, returning any model ``wrap_dit``
    accepts that takes class labels ``y`` (replaces ``kind``).
    """

    kind: Literal["video_dit", "cogvideox"] = "video_dit"
    preset: str = "XL/2"
    overrides: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    pretrained: str | None = None
    subfolder: str | None = "transformer"
    init: Literal["scratch", "pretrained"] = "scratch"


@dataclass
class VideoDecompositionConfig:
    """Spatial Laplacian per latent frame by default; ``temporal_factors`` adds time (e.g. ``[2, 1]``)."""

    kind: Literal["laplacian", "identity"] = "laplacian"
    factors: tuple[int, ...] = (2, 1)
    temporal_factors: tuple[int, ...] | None = None


@dataclass
class VideoDFMConfig(DFMConfig):
    """:class:`~.imagenet.DFMConfig` plus per-stage standardisation (paper A.5: on for CogVideoX latents).

    ``scales``: fixed per-stage scales; ``None`` estimates them from ``scale_estimation_clips``
    clips spread over the dataset at the start of the run.
    """

    standardize: bool = True
    scales: tuple[float, ...] | None = None
    scale_estimation_clips: int = 64


@dataclass
class VideoSamplingConfig:
    steps: tuple[int, ...] = (30, 10)
    thresholds: tuple[float, ...] = (0.9,)
    method: Literal["euler", "heun"] = "euler"
    guidance_scale: float = 1.5
    num_videos: int = 8
    classes: tuple[int, ...] | None = None
    seed: int = 0
    fps: float = 8.0
    formats: tuple[str, ...] = ("mp4", "gif", "png")


@dataclass
class KineticsConfig:
    """The whole run: every field can be overridden as ``section.key=value``."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    vae: VideoVAEConfig = field(default_factory=VideoVAEConfig)
    model: VideoModelConfig = field(default_factory=VideoModelConfig)
    decomposition: VideoDecompositionConfig = field(default_factory=VideoDecompositionConfig)
    dfm: VideoDFMConfig = field(default_factory=VideoDFMConfig)
    sampling: VideoSamplingConfig = field(default_factory=VideoSamplingConfig)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of one clip's latent."""
        d, v = self.data, self.vae
        frames = (d.num_frames - 1) // v.temporal_downsample + 1
        side = d.resolution // v.spatial_downsample
        return (v.latent_channels, frames, side, side)

    @property
    def num_stages(self) -> int:
        return 1 if self.decomposition.kind == "identity" else len(self.decomposition.factors)

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
        if not 0.0 <= self.dfm.label_dropout < 1.0:
            raise ConfigError(f"dfm.label_dropout must be in [0, 1), got {self.dfm.label_dropout}")
        if self.dfm.scales is not None and len(self.dfm.scales) != self.num_stages:
            raise ConfigError(f"dfm.scales {list(self.dfm.scales)} needs one entry per stage ({self.num_stages})")
        if self.dfm.scale_estimation_clips < 1:
            raise ConfigError(f"dfm.scale_estimation_clips must be >= 1, got {self.dfm.scale_estimation_clips}")
        if len(self.sampling.steps) != self.num_stages:
            raise ConfigError(f"sampling.steps {list(self.sampling.steps)} needs one entry per stage ({self.num_stages})")
        bad = set(self.sampling.formats) - {"mp4", "gif", "png"}
        if bad:
            raise ConfigError(f"sampling.formats has unknown entries {sorted(bad)}; choose from mp4, gif, png")
        _, frames, side, _ = self.latent_shape
        if self.decomposition.kind == "laplacian":
            for f in self.decomposition.factors:
                if side % f:
                    raise ConfigError(f"latent size {side} is not divisible by decomposition factor {f}")
            tf = self.decomposition.temporal_factors
            if tf is not None:
                if len(tf) != len(self.decomposition.factors):
                    raise ConfigError(f"decomposition.temporal_factors {list(tf)} needs one entry per stage")
                for f in tf:
                    if frames % f:
                        raise ConfigError(f"{frames} latent frames are not divisible by decomposition temporal factor {f}")


# -- building blocks -------------------------------------------------------------------------


def build_decomposition(cfg: VideoDecompositionConfig) -> Any:
    import dfm_ext

    if cfg.kind == "identity":
        return dfm_ext.IdentityDecomposition()
    return dfm_ext.LaplacianPyramid(factors=cfg.factors, temporal_factors=cfg.temporal_factors)


def load_video_vae(path: str, subfolder: str | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """``AutoencoderKLCogVideoX.from_pretrained(path, subfolder=...)``, frozen, in eval mode.

    Raises:
        FileNotFoundError: ``path`` is a local path without a diffusers ``config.json``.
    """
    from diffusers import AutoencoderKLCogVideoX

    from .latents import load_frozen_vae

    return load_frozen_vae(AutoencoderKLCogVideoX, path, subfolder, device=device, dtype=dtype, what="video VAE")


def load_codec(cfg: KineticsConfig, device: torch.device | str) -> Any:
    """Pixels ``[B, 3, T, H, W]`` <-> normalised latents ``[B, C, T', H', W']`` (:class:`~.latents.LatentCodec`)."""
    from .latents import LatentCodec

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
        from .latents import LatentCache

        return LatentCache(cfg.data.latent_cache, expected=cache_metadata(cfg))
    from .data_video import VideoClips, scan_videos

    items, classes = scan_videos(cfg.data.root, cfg.data.annotations)
    if len(classes) > cfg.data.num_classes:
        raise ConfigError(f"the data has {len(classes)} classes but data.num_classes={cfg.data.num_classes}")
    d = cfg.data
    return VideoClips(
        items, num_frames=d.num_frames, stride=d.frame_stride, resolution=d.resolution, position=d.position,
        max_skips=d.max_skips, classes=classes,
    )  # fmt: skip


class LabelTokens(nn.Module):
    """Class labels as ``L`` text tokens ``[B, L, D]`` for text-conditioned DiTs (CogVideoX).

    ``tokens[b] = positions + table[y_b]``: one learned vector per class (null class included),
    broadcast over ``L`` learned positions, so the size does not grow with ``L * D`` per class.

    Example:
        >>> LabelTokens(10, 4, 8)(torch.tensor([0, 10])).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, num_classes: int, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        self.positions = nn.Parameter(torch.zeros(num_tokens, dim))
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.positions[None] + self.table(y)[:, None]


class VideoDFMModel(nn.Module):
    """The wrapped video DiT, its label conditioning and the per-stage scales it was trained with.

    ``forward(stages, t [B, S], stage [B], mask [B, S] | None, *, y [B]) -> list[Tensor]`` (the
    DFM model contract, class labels ``y``; ``num_classes`` is the null class). The
    ``stage_scales`` buffer ``[S]`` travels with the weights (EMA, checkpoints, ``final/``).

    Attributes:
        dfm: the :class:`dfm_ext.DFMTransformer`.
        label_tokens: :class:`LabelTokens` for text-conditioned models, else ``None`` (labels go
            to the model as ``y``).
        rotary: CogVideoX rotary positions ``(cos, sin)`` builder, else ``None``.
    """

    stage_scales: Tensor

    def __init__(self, dfm: nn.Module, scales: Tensor, num_classes: int, *, label_tokens: LabelTokens | None = None, rotary: Any = None) -> None:
        super().__init__()
        self.dfm = dfm
        self.label_tokens = label_tokens
        self.num_classes = num_classes
        self.rotary = rotary
        self.register_buffer("stage_scales", torch.as_tensor(scales, dtype=torch.float32).clone())

    def forward(self, stages: Sequence[Tensor], t: Tensor, stage: Tensor, mask: Tensor | None = None, *, y: Tensor) -> list[Tensor]:
        if self.label_tokens is None:
            return self.dfm(stages, t, stage, mask, y=y)
        cond: dict[str, Any] = {"encoder_hidden_states": self.label_tokens(y)}
        if self.rotary is not None:
            cond["image_rotary_emb"] = self.rotary(self.dfm.packer.grid, stages[0].device)
        return self.dfm(stages, t, stage, mask, **cond)

    def null_condition(self, *, y: Tensor) -> dict[str, Tensor]:
        return {"y": torch.full_like(y, self.num_classes)}

    def save_pretrained(self, directory: str | Path) -> None:
        """``dfm.save_pretrained`` + ``video_dfm.safetensors`` (scales, label tokens) + ``stage_scales.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.dfm.save_pretrained(directory)
        extras = {"stage_scales": self.stage_scales.detach().cpu().contiguous()}
        if self.label_tokens is not None:
            extras.update({f"label_tokens.{k}": v.detach().cpu().contiguous() for k, v in self.label_tokens.state_dict().items()})
        save_file(extras, str(directory / "video_dfm.safetensors"))
        (directory / SCALES_FILE).write_text(json.dumps({"scales": self.stage_scales.tolist()}, indent=2))


class _CogVideoXRotary:
    """``(cos, sin)`` for a CogVideoX token grid, as ``CogVideoXPipeline`` computes them."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __call__(self, grid: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (tuple(grid), str(device))
        if key not in self._cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import (
                get_resize_crop_region_for_grid,
            )

            c = self.config
            frames, gh, gw = grid
            base_w, base_h = c.sample_width // c.patch_size, c.sample_height // c.patch_size
            if c.patch_size_t is None:
                crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
                out = get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), frames, device=device)
            else:
                out = get_3d_rotary_pos_embed(
                    c.attention_head_dim, None, (gh, gw), frames, grid_type="slice", max_size=(base_h, base_w), device=device
                )
            self._cache[key] = out
        return self._cache[key]


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def build_base_model(cfg: KineticsConfig) -> nn.Module:
    """The unwrapped video DiT (reference VideoDiT, CogVideoX transformer, or the user's factory)."""
    c, frames, h, w = cfg.latent_shape
    if cfg.model.factory:
        return _import_factory(cfg.model.factory)(cfg)
    if cfg.model.kind == "video_dit":
        from dfm_ext.video_models import VideoDiT, VideoDiTConfig

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


class KineticsTask(ClassConditionalTask):
    """Model, loss and video sampling of the class-conditional video recipe (a ``TrainTask``)."""

    def __init__(self, cfg: KineticsConfig, dataset: torch.utils.data.Dataset | None = None, *, name: str = "kinetics") -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.name = name
        self.decomposition = build_decomposition(cfg.decomposition)
        self.timesteps = timestep_sampler(cfg.dfm, self.decomposition.num_stages)
        self.null_class = cfg.data.num_classes
        self._codec: Any = None

    def _load_codec(self, device: torch.device) -> Any:
        return load_codec(self.cfg, device)

    # -- standardisation -----------------------------------------------------------------------

    def _scales_key(self) -> str:
        relevant = {k: config_to_dict(self.cfg)[k] for k in ("data", "vae", "decomposition")}
        relevant["clips"] = self.cfg.dfm.scale_estimation_clips
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def estimate_scales(self, device: torch.device | str = "cpu", *, batch_size: int = 8) -> Tensor:
        """Per-stage std of the latents of ``dfm.scale_estimation_clips`` clips spread evenly over the data."""
        from dfm_ext.objective import estimate_stage_scales

        if self.dataset is None:
            raise ValueError("estimating stage scales needs the dataset; pass dataset= or set dfm.scales")
        n = len(self.dataset)
        k = min(n, self.cfg.dfm.scale_estimation_clips)
        picks = sorted({int(i) for i in np.linspace(0, n - 1, k).round()})
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(self.cfg.train.seed)

        def batches():
            for start in range(0, len(picks), batch_size):
                items = [self.dataset[(i, False)] for i in picks[start : start + batch_size]]
                if "latents" in items[0]:
                    yield torch.stack([it["latents"] for it in items]).to(device)
                else:
                    pixels = torch.stack([it["pixels"] for it in items]).to(device)
                    yield self.codec(device).encode(pixels, generator=g)

        return estimate_stage_scales(self.decomposition, batches())

    def stage_scales(self) -> Tensor:
        """The scales of this run: ones, ``dfm.scales``, the run folder's saved estimate, or a new estimate.

        A new estimate is computed on the main process and broadcast, so every rank trains with
        bitwise the same scales; the main process writes it to ``<run>/stage_scales.json``.
        """
        s = self.decomposition.num_stages
        if not self.cfg.dfm.standardize:
            return torch.ones(s)
        if self.cfg.dfm.scales is not None:
            return torch.tensor(self.cfg.dfm.scales, dtype=torch.float32)
        from accelerate import PartialState

        state = PartialState()
        path = resolve_output_dir(self.cfg.train, self.name) / SCALES_FILE
        key = self._scales_key()
        scales, fresh = torch.zeros(s, dtype=torch.float32), False
        if state.is_main_process:
            saved = json.loads(path.read_text()) if path.is_file() else {}
            if saved.get("key") == key and len(saved.get("scales", [])) == s:
                scales = torch.tensor(saved["scales"], dtype=torch.float32)
            else:
                scales, fresh = self.estimate_scales(state.device), True
        if state.num_processes > 1:
            # Every rank takes the main process's scales (only it reads the file or the data).
            from accelerate.utils import broadcast

            scales = broadcast(scales.to(state.device), from_process=0).cpu()
        if fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "scales": scales.tolist()}, indent=2))
        return scales

    # -- TrainTask -----------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        from dfm_ext.wrapper import wrap_dit

        base = build_base_model(self.cfg)
        label_tokens = rotary = None
        adapter = "auto"
        if not self.cfg.model.factory and self.cfg.model.kind == "cogvideox":
            c = base.config
            if c.use_learned_positional_embeddings or not c.use_rotary_positional_embeddings:
                tokens = int(c.max_text_seq_length)
            else:
                tokens = 16
            label_tokens = LabelTokens(self.cfg.data.num_classes, tokens, int(c.text_embed_dim))
            rotary = _CogVideoXRotary(c) if c.use_rotary_positional_embeddings else None
            adapter = "cogvideox"
        dfm = wrap_dit(base, self.decomposition, adapter=adapter, sample_shape=self.cfg.latent_shape, init=self.cfg.model.init)
        scales = self.stage_scales()
        return VideoDFMModel(dfm, scales, self.cfg.data.num_classes, label_tokens=label_tokens, rotary=rotary)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        from dfm_ext.objective import dfm_loss

        stages, ts, labels = self.training_inputs(batch, generator=generator, device=device)
        out = dfm_loss(
            model, stages, ts, masking=self.cfg.dfm.masking, stage_weights=self.cfg.dfm.stage_weights,
            scales=_unwrap(model).stage_scales, generator=generator, y=labels,
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
        sampler = stage_sampler(self.decomposition, cfg, scales=net.stage_scales)
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
        from .video_io import save_frame_strip, write_gif, write_mp4

        previews, final = self.sample(model, device=device)
        video = side_by_side([*previews, final], scale=2 if final.shape[-1] < 128 else 1)
        stem = Path(out_dir) / "samples" / f"step-{step:06d}"
        fps = self.cfg.sampling.fps
        if "mp4" in self.cfg.sampling.formats:
            write_mp4(video, stem.with_suffix(".mp4"), fps=fps)
        if "gif" in self.cfg.sampling.formats:
            write_gif(video, stem.with_suffix(".gif"), fps=fps)
        if "png" in self.cfg.sampling.formats:
            save_frame_strip(list(final), stem.with_name(stem.name + "-frames.png"), scale=2 if final.shape[-1] < 128 else 1)
        return {"sample_std": float(final.std())}


def side_by_side(columns: Sequence[Tensor], *, scale: int = 1, padding: int = 2) -> np.ndarray:
    """Tile videos into one: row ``i`` holds ``columns[c][i]`` for every column ``c``.

    Args:
        columns: ``K`` tensors ``[N, 3, T, H, W]`` in ``[-1, 1]`` (e.g. stage previews, then the final).

    Returns:
        ``[T, H_grid, W_grid, 3]`` uint8 frames.

    Example:
        >>> side_by_side([torch.zeros(2, 3, 4, 8, 8), torch.zeros(2, 3, 4, 8, 8)], padding=1).shape
        (4, 19, 19, 3)
    """
    from dfm_ext.viz import make_grid

    shape = columns[0].shape
    for i, c in enumerate(columns):
        if c.shape != shape or c.ndim != 5:
            raise ValueError(f"columns[{i}] has shape {tuple(c.shape)}, expected {tuple(shape)} [N, 3, T, H, W]")
    tiles = torch.stack(list(columns), dim=1).flatten(0, 1)  # [N * K, 3, T, H, W], row-major by example
    return np.stack([make_grid(tiles[:, :, t], len(columns), padding=padding, scale=scale) for t in range(shape[2])])


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
        if not (Path(d.latent_cache) / "index.json").is_file():
            raise FileNotFoundError(f"data.latent_cache={d.latent_cache!r} has no index.json (build it first)")
    elif d.annotations is not None:
        if not Path(d.annotations).is_file():
            raise FileNotFoundError(f"data.annotations={d.annotations!r} does not exist")
    elif not Path(d.root).is_dir():  # type: ignore[arg-type]
        raise FileNotFoundError(f"data.root={d.root!r} does not exist or is not a folder")
    check_vae_path(cfg.vae.path, cfg.vae.subfolder, "AutoencoderKLCogVideoX")


def prepare(argv: Sequence[str] | None = None) -> tuple[str, KineticsConfig, torch.utils.data.Dataset]:
    """Parse, validate and open the data; everything that can fail before compute is spent."""
    name, cfg = parse_args(argv)
    check_inputs(cfg)
    return name, cfg, build_dataset(cfg)


def run(name: str, cfg: KineticsConfig, dataset: torch.utils.data.Dataset) -> TrainResult:
    task = KineticsTask(cfg, dataset, name=name)
    trainer = Trainer(task, dataset, cfg.train, cfg.optim, full_config=cfg, name=name, random_flip=cfg.data.random_flip)
    return trainer.fit()


def _summary(result: TrainResult) -> dict[str, Any]:
    # The engine counts "images"; for this recipe they are videos.
    return {"skipped_videos": result.skipped_images, "unique_bad_videos": result.unique_bad_images}


def main(argv: Sequence[str] | None = None) -> int:
    return train_main(prepare, run, argv, _summary)


if __name__ == "__main__":
    sys.exit(main())
