"""Class-conditional video generation on Kinetics with DFM (paper sections 4, A.1, A.5): the training script.

Commands, configs and the pipeline (clips or a latent cache -> ``AutoencoderKLCogVideoX`` latents -> stages,
standardised per stage -> the wrapped ``VideoDiT`` or CogVideoX, labels as text tokens): docs/recipes/kinetics.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from dfm_ext.metrics.commands import evaluate_videos_command
from dfm_ext.models.video_dit import VideoDiT, VideoDiTConfig
from dfm_ext.fileio import atomic_write_text
from dfm_ext.process.objective import estimate_stage_scales
from dfm_ext.recipes.engine.cli import check_latent_cache, check_vae_path, parse_config_args, train_main
from dfm_ext.recipes.engine.config import ConfigError, config_to_dict
from dfm_ext.recipes.engine.data import ClassConditionalInputs, LatentCache, LatentCodec, cycled_labels
from dfm_ext.recipes.engine.latents import check_cache_labels, load_vae
from dfm_ext.recipes.engine.parallel import unwrap
from dfm_ext.recipes.engine.sections import (
    ClassDataSection, ClassSamplingConfig, DFMConfig, LatentVAEConfig, ModelConfig, RecipeConfig, check_count,
    enable_gradient_checkpointing, import_factory,
)  # fmt: skip
from dfm_ext.recipes.engine.sampling import SampleJob, dispatch, sample_command
from dfm_ext.recipes.engine.trainer import StepLoss, Trainer, TrainResult, TrainTask
from dfm_ext.wrapping.wrapper import DFMTransformer, load_wrapped, wrap_dit

__all__ = [
    "KineticsConfig", "KineticsTask", "LabelTokenDFM", "LabelTokens", "build_dataset", "cache_metadata", "load_codec", "main",
    "parse_args", "prepare", "run", "sample_job",
]  # fmt: skip

CONFIG_ALIASES = {"tiny": "kinetics_tiny"}
LABEL_TOKENS_FILE = "label_tokens.safetensors"
SCALES_FILE = "stage_scales.json"


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
    """A diffusers ``AutoencoderKLCogVideoX`` and its space and time downsampling."""

    spatial_downsample: int = 8
    temporal_downsample: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("spatial_downsample", "temporal_downsample", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"vae.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class VideoModelConfig(ModelConfig):
    """Plus ``kind``: ``video_dit`` (the reference ``VideoDiT``) or ``cogvideox`` (``CogVideoXTransformer3DModel``
    from ``pretrained`` + ``subfolder``, or built from ``overrides``). A ``factory`` model must take labels ``y``."""

    kind: Literal["video_dit", "cogvideox"] = "video_dit"
    pretrained: str | None = None
    subfolder: str | None = "transformer"


@dataclass
class VideoSamplingConfig(ClassSamplingConfig):
    """Plus ``num_videos`` per evaluation, written at ``fps`` as ``formats``."""

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
        d, v, side = self.data, self.vae, self.data.resolution // self.vae.spatial_downsample
        return (v.latent_channels, (d.num_frames - 1) // v.temporal_downsample + 1, side, side)

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
        self.check_shared("kinetics", reads=("label_dropout", "standardize", "scales", "scale_estimation_clips", "allocation"))
        self.sampling.check_classes(d.num_classes)
        if not self.sampling.fps > 0:
            raise ConfigError(f"sampling.fps must be > 0, got {self.sampling.fps}")
        if bad := set(self.sampling.formats) - {"mp4", "gif", "png"}:
            raise ConfigError(f"sampling.formats has unknown entries {sorted(bad)}; choose from mp4, gif, png")
        c, *grid = self.latent_shape
        preset = VideoDiTConfig if self.model.kind == "video_dit" else None
        self.model.check(preset, input_size=tuple(grid), in_channels=c, num_classes=d.num_classes)
        self.decomposition.check_sample_shape(self.latent_shape)


def load_codec(cfg: KineticsConfig, device: torch.device | str) -> Any:
    """Pixels ``[B, 3, T, H, W]`` <-> normalised latents ``[B, C, T', H', W']``, the VAE checked against the config."""
    from diffusers import AutoencoderKLCogVideoX

    if cfg.vae.path is None:
        raise ConfigError("vae.path is not set (a diffusers AutoencoderKLCogVideoX folder or hub id, e.g. THUDM/CogVideoX-2b)")
    vae = load_vae(cfg.vae.path, cfg.vae.subfolder, device=device, dtype=getattr(torch, cfg.vae.dtype), cls=AutoencoderKLCogVideoX,
                   what="video VAE")  # fmt: skip
    v, c = cfg.vae, vae.config
    found = {"latent_channels": (c.latent_channels, "has {} latent channels"), "temporal_downsample": (int(c.temporal_compression_ratio),
             "compresses time by {}"), "spatial_downsample": (2 ** (len(c.block_out_channels) - 1), "downsamples space by {}")}  # fmt: skip
    for key, (have, how) in found.items():
        if have != getattr(v, key):
            raise ConfigError(f"the VAE at {v.path} {how.format(have)}, vae.{key}={getattr(v, key)}")
    return LatentCodec(vae, v.scaling_factor, v.shift_factor, sample=v.sample_posterior)


def cache_metadata(cfg: KineticsConfig) -> dict[str, Any]:
    """What a latent cache must agree on with the config."""
    d, v = cfg.data, cfg.vae
    return {
        "kind": "video", "vae_path": v.path, "vae_subfolder": v.subfolder, "resolution": d.resolution, "num_frames": d.num_frames,
        "frame_stride": d.frame_stride, "position": d.position, "latent_shape": list(cfg.latent_shape),
        "scaling_factor_override": v.scaling_factor, "shift_factor_override": v.shift_factor, "sample_posterior": v.sample_posterior,
    }  # fmt: skip


def build_dataset(cfg: KineticsConfig) -> torch.utils.data.Dataset:
    """The clips or the latent cache (checked against the config)."""
    if cfg.data.latent_cache is not None:
        cache = LatentCache(cfg.data.latent_cache, expected=cache_metadata(cfg), rebuild="python -m dfm_ext.recipes.kinetics.cache")
        check_cache_labels(cache.path, cache.meta, cfg.data.num_classes)
        return cache
    from dfm_ext.recipes.kinetics.data import VideoClips, scan_videos

    d = cfg.data
    items, classes = scan_videos(d.root, d.annotations)
    if len(classes) > d.num_classes:
        raise ConfigError(f"the data has {len(classes)} classes but data.num_classes={d.num_classes}")
    return VideoClips(items, num_frames=d.num_frames, stride=d.frame_stride, resolution=d.resolution,
                      position=d.position, max_skips=d.max_skips, classes=classes)  # fmt: skip


class LabelTokens(nn.Module):
    """Class labels as ``L`` text tokens ``[B, L, D]``: ``positions + table[y_b]``, one learned vector per class
    (null class included) broadcast over ``L`` learned positions (not ``L * D`` parameters per class).

    Example:
        >>> LabelTokens(10, 4, 8)(torch.tensor([0, 10])).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, num_classes: int, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.num_classes, self.table = num_classes, nn.Embedding(num_classes + 1, dim)
        self.positions = nn.Parameter(torch.zeros(num_tokens, dim))
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.positions[None] + self.table(y)[:, None]


class CogVideoXRotary:
    """``(cos, sin)`` for a CogVideoX token grid, as ``CogVideoXPipeline`` computes them."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __call__(self, grid: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (tuple(grid), str(device))
        if key not in self._cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            c, (frames, gh, gw) = self.config, grid
            kwargs: dict[str, Any]
            base_w, base_h = c.sample_width // c.patch_size, c.sample_height // c.patch_size
            if c.patch_size_t is None:
                crops, kwargs = get_resize_crop_region_for_grid((gh, gw), base_w, base_h), {}
            else:
                crops, kwargs = None, {"grid_type": "slice", "max_size": (base_h, base_w)}
            # use_real (the default): the (cos, sin) pair
            self._cache[key] = cast(
                "tuple[Tensor, Tensor]",
                get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), frames, device=device, **kwargs),
            )
        return self._cache[key]


class LabelTokenDFM(nn.Module):
    """A wrapped text-conditioned video DiT (CogVideoX, the :class:`dfm_ext.DFMTransformer` ``dfm``) fed class labels
    as learned text tokens: ``forward(stages, t [B, S], stage [B], mask [B, S] | None, *, y [B]) -> list[Tensor]``
    (``num_classes`` is the null class). ``rotary``: CogVideoX's rotary positions, or ``None``. The stage scales
    and ``save_pretrained`` are the wrapper's (``label_tokens.safetensors`` an extra file of its folder)."""

    def __init__(self, dfm: DFMTransformer, label_tokens: LabelTokens, num_classes: int, *, rotary: Any = None) -> None:
        super().__init__()
        self.dfm, self.label_tokens, self.num_classes, self.rotary = dfm, label_tokens, num_classes, rotary

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
        tokens = {k: v.detach().cpu().contiguous() for k, v in self.label_tokens.state_dict().items()}
        self.dfm.save_pretrained(directory, extra_files={LABEL_TOKENS_FILE: save(tokens)})


def build_base_model(cfg: KineticsConfig) -> nn.Module:
    """The unwrapped video DiT (reference VideoDiT, CogVideoX transformer, or the user's factory)."""
    c, frames, h, w = cfg.latent_shape
    if cfg.model.factory:
        return import_factory(cfg.model.factory)(cfg)
    if cfg.model.kind == "video_dit":
        # label dropout is the recipe's (once per sample, from the step's generator), not the DiT's
        sizes = {"input_size": (frames, h, w), "in_channels": c, "num_classes": cfg.data.num_classes, "class_dropout_prob": 0.0}
        # VideoDiT takes its config_class, VideoDiTConfig (DiT.__init__ is annotated with DiTConfig)
        return VideoDiT(cast(Any, VideoDiTConfig.preset(cfg.model.preset, **{**sizes, **cfg.model.overrides})))
    from diffusers import CogVideoXTransformer3DModel

    if cfg.model.pretrained is not None:
        return CogVideoXTransformer3DModel.from_pretrained(cfg.model.pretrained, subfolder=cfg.model.subfolder or None)
    # diffusers' top-level exports resolve to its dummy objects under mypy
    return CogVideoXTransformer3DModel(**{  # type: ignore[return-value]
        "in_channels": c, "out_channels": c, "sample_frames": cfg.data.num_frames, "sample_height": h, "sample_width": w,
        "temporal_compression_ratio": cfg.vae.temporal_downsample, **cfg.model.overrides,
    })  # fmt: skip


class KineticsTask(ClassConditionalInputs, TrainTask):
    """Model, loss and video sampling of the class-conditional video recipe (a ``TrainTask``)."""

    def __init__(self, cfg: KineticsConfig, dataset: torch.utils.data.Dataset | None = None, *, name: str = "kinetics") -> None:
        super().__init__(cfg, load_codec)
        self.dataset, self.name = dataset, name
        self.objective = cfg.dfm.objective(self.decomposition.num_stages)  # scales: the model's stage_scales

    def estimate_scales(self, device: torch.device | str = "cpu", *, batch_size: int = 8) -> Tensor:
        """Per-stage std of the latents of ``dfm.scale_estimation_clips`` clips spread evenly over the data (paper A.5)."""
        if self.dataset is None:
            raise ValueError("estimating stage scales needs the dataset; pass dataset= or set dfm.scales")
        n = len(self.dataset)  # type: ignore[arg-type]
        picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, self.cfg.dfm.scale_estimation_clips)).round()})
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(self.cfg.train.seed)

        def batches() -> Iterator[Tensor]:
            for start in range(0, len(picks), batch_size):
                items = [self.dataset[(i, False)] for i in picks[start : start + batch_size]]  # type: ignore[index]
                if "latents" in items[0]:
                    yield torch.stack([it["latents"] for it in items]).to(device)
                else:
                    yield self.codec(device).encode(torch.stack([it["pixels"] for it in items]).to(device), generator=g)

        return estimate_stage_scales(self.decomposition, batches())

    def stage_scales(self) -> Tensor:
        """Ones, ``dfm.scales``, the run's ``stage_scales.json`` (keyed by the config parts it depends on), or a new
        estimate (the main process's, broadcast: every rank trains with bitwise the same scales)."""
        s = self.decomposition.num_stages
        if not self.cfg.dfm.standardize:
            return torch.ones(s)
        if self.cfg.dfm.scales is not None:
            return torch.tensor(self.cfg.dfm.scales, dtype=torch.float32)
        from accelerate import PartialState

        state = PartialState()
        path = Path(self.cfg.train.output_dir.format(name=self.name)).expanduser() / SCALES_FILE
        relevant = {k: config_to_dict(self.cfg)[k] for k in ("data", "vae", "decomposition")}
        key = hashlib.sha256(json.dumps({**relevant, "clips": self.cfg.dfm.scale_estimation_clips}, sort_keys=True).encode()).hexdigest()[:16]
        scales, fresh = torch.zeros(s, dtype=torch.float32), False
        if state.is_main_process:
            saved = json.loads(path.read_text()) if path.is_file() else {}
            if saved.get("key") == key and len(saved.get("scales", [])) == s:
                scales = torch.tensor(saved["scales"], dtype=torch.float32)
            else:
                scales, fresh = self.estimate_scales(state.device), True
        if state.num_processes > 1:
            from accelerate.utils import broadcast

            scales = broadcast(scales.to(state.device), from_process=0).cpu()
        if fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "scales": scales.tolist()}, indent=2))
        return scales

    def build_model(self) -> nn.Module:
        base = build_base_model(self.cfg)
        if self.cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(base)
        label_tokens, rotary, adapter = None, None, "auto"
        if not self.cfg.model.factory and self.cfg.model.kind == "cogvideox":
            c: Any = base.config  # diffusers' FrozenDict config (attribute access)
            tokens = int(c.max_text_seq_length) if c.use_learned_positional_embeddings or not c.use_rotary_positional_embeddings else 16
            label_tokens = LabelTokens(self.cfg.data.num_classes, tokens, int(c.text_embed_dim))
            rotary = CogVideoXRotary(c) if c.use_rotary_positional_embeddings else None
            adapter = "cogvideox"
        dfm = wrap_dit(
            base, self.decomposition, adapter=adapter, sample_shape=self.cfg.latent_shape, init=self.cfg.model.init,
            time_convention=self.cfg.model.time_convention, stage_scales=self.stage_scales(),
        )
        return dfm if label_tokens is None else LabelTokenDFM(dfm, label_tokens, self.null_class, rotary=rotary)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        stages, ts, labels = self.training_inputs(batch, generator=generator, device=device)
        out = self.objective(model, stages, ts, generator=generator, y=labels)
        self.feed_allocation(out, ts)
        return StepLoss(out.loss, {f"loss_stage{i}": v for i, v in enumerate(out.per_stage)})

    @torch.no_grad()
    def sample(
        self, model: nn.Module, *, device: torch.device, labels: Tensor | None = None, noise: list[Tensor] | None = None, previews: bool = True
    ) -> tuple[list[Tensor], Tensor]:  # fmt: skip
        """Decoded previews (one per stage before the last) and final videos, ``[N, 3, T, H, W]`` in ``[-1, 1]``, for
        ``labels`` (default: ``sampling.num_videos`` cycling through ``sampling.classes``) from ``noise`` per stage
        (default: drawn from ``sampling.seed``)."""
        cfg = self.cfg.sampling
        labels = cycled_labels(cfg.classes, cfg.num_videos, self.cfg.data.num_classes, device) if labels is None else labels
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        shape = (len(labels), *self.cfg.latent_shape)
        out = cfg.sampler(self.decomposition).sample(unwrap(model), noise or shape, generator=g, device=device, y=labels)
        codec = self.codec(device)  # (scales: the model's stage_scales)
        final = codec.decode(out.x)
        shown = out.previews[:-1] if previews else []
        return [torch.nn.functional.interpolate(codec.decode(p), size=tuple(final.shape[2:]), mode="nearest") for p in shown], final

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        from dfm_ext.recipes.kinetics.video_io import save_video_samples  # PyAV: only when writing

        previews, final = self.sample(model, device=device)
        save_video_samples(previews, final, Path(out_dir) / "samples" / f"step-{step:06d}", fps=self.cfg.sampling.fps,
                           formats=self.cfg.sampling.formats)
        return {"sample_std": float(final.std())}


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, KineticsConfig]:
    """``--config NAME [key.sub=value ...]`` -> (name, validated config)."""
    return parse_config_args(
        KineticsConfig, argv, prog="python -m dfm_ext.recipes.kinetics", doc=__doc__, aliases=CONFIG_ALIASES,
        config_help="kinetics_512, tiny (= kinetics_tiny), another name in dfm_ext/recipes/configs or a YAML path",
    )  # fmt: skip


def prepare(argv: Sequence[str] | None = None) -> tuple[str, KineticsConfig, torch.utils.data.Dataset]:
    """Parse, validate, check the paths and open the data: everything that can fail before compute is spent."""
    name, cfg = parse_args(argv)
    d = cfg.data
    if d.latent_cache is not None:
        check_latent_cache(d.latent_cache)
    elif d.annotations is not None:
        if not Path(d.annotations).is_file():
            raise FileNotFoundError(f"data.annotations={d.annotations!r} does not exist")
    elif not Path(d.root).is_dir():  # type: ignore[arg-type]
        raise FileNotFoundError(f"data.root={d.root!r} does not exist or is not a folder")
    check_vae_path(cfg.vae.path, cfg.vae.subfolder, "AutoencoderKLCogVideoX")
    return name, cfg, build_dataset(cfg)


def run(name: str, cfg: KineticsConfig, dataset: torch.utils.data.Dataset) -> TrainResult:
    return Trainer(KineticsTask(cfg, dataset, name=name), dataset, cfg, name=name).fit()


def sample_job(cfg: KineticsConfig) -> SampleJob:
    """What ``sample`` draws: class-balanced clips (sample ``i`` has class ``i mod data.num_classes``), as MP4 files."""
    from dfm_ext.recipes.kinetics.video_io import write_mp4  # PyAV: only when writing

    task = KineticsTask(cfg)

    def draw(model: nn.Module, noise: list[Tensor], labels: np.ndarray, device: torch.device) -> Tensor:
        return task.sample(model, device=device, labels=torch.as_tensor(labels, device=device), noise=noise, previews=False)[1]

    def load_final(folder: Path) -> nn.Module:
        dfm = load_wrapped(folder, build_base_model(cfg))
        if not (folder / LABEL_TOKENS_FILE).is_file():
            return dfm
        model = cast(LabelTokenDFM, task.build_model())  # LabelTokenDFM: the label tokens beside the wrapped CogVideoX
        model.dfm = dfm
        model.label_tokens.load_state_dict(load_file(str(folder / LABEL_TOKENS_FILE)))
        return model

    def write_item(video: np.ndarray, stem: Path) -> None:
        write_mp4(video, stem.with_suffix(".mp4"), fps=cfg.sampling.fps)

    return SampleJob(task.decomposition, cfg.latent_shape, lambda i: i % cfg.data.num_classes, draw, task.build_model, load_final, write_item)


def main(argv: Sequence[str] | None = None) -> int:
    """The command (``python -m dfm_ext.recipes.kinetics [sample | evaluate]``); returns the exit status (2: a usage error)."""
    prog = "python -m dfm_ext.recipes.kinetics"
    return dispatch(argv, {
        "sample": lambda a: sample_command(a, prog=prog, config_cls=KineticsConfig, make_job=sample_job),
        "evaluate": lambda a: evaluate_videos_command(a, prog=f"{prog} evaluate"),
    }, lambda a: train_main(prepare, run, a, lambda r: {"skipped_videos": r.skipped_images, "unique_bad_videos": r.unique_bad_images}))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
