"""What the demo adds to the image recipe: its offline training set (:func:`training_set`, the ``data.factory``
of ``configs/demo.yaml``), and sampling and scoring a trained run (``dfm-ext sample`` and ``eval``)."""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import Tensor, nn

from dfm_ext.fileio import atomic_directory
from dfm_ext.metrics.swd import swd
from dfm_ext.recipes.demo.data import ImageDataset, load_dataset, read_image
from dfm_ext.recipes.engine.config import apply_overrides, load_config
from dfm_ext.recipes.engine.viz import save_array_png, save_image_grid, to_uint8
from dfm_ext.recipes.imagenet.task import ImageNetConfig
from dfm_ext.validation import parse_device
from dfm_ext.wrapping.record import CONFIG_FILE
from dfm_ext.wrapping.wrapper import load_wrapped

__all__ = [
    "FD_RESOLUTION", "InMemoryImages", "Run", "compute_metrics", "evaluate_samples", "generate", "load_run", "load_split",
    "read_png_folder", "sample_run", "training_set",
]  # fmt: skip

#: FD-EffNet reads 32 px images resized to 64 (224 costs ~10x more on CPU; 32 px hold no more detail).
FD_RESOLUTION = 64


class InMemoryImages(torch.utils.data.Dataset):
    """An :class:`~dfm_ext.recipes.demo.data.ImageDataset` keyed by ``(index, flip)``: ``{"pixels": [C, H, W], "label": int}``."""

    def __init__(self, data: ImageDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, Any]:
        pixels = self.data.images[int(key[0])]
        return {"pixels": pixels.flip(-1) if key[1] else pixels, "label": int(self.data.labels[int(key[0])])}


@functools.lru_cache(maxsize=4)
def load_split(name: str, split: str, size: int, seed: int, num: int | None = None) -> ImageDataset:
    """:func:`~dfm_ext.recipes.demo.data.load_dataset`, kept for the process (the demo reads a split twice)."""
    return load_dataset(name, split, size=size, seed=seed, num=num)


def training_set(cfg: ImageNetConfig, *, dataset: str = "auto", subset: int | None = None) -> InMemoryImages:
    """``data.factory`` of the demo: the train split of ``dataset`` at ``data.resolution``; its channels must be
    ``vae.latent_channels`` (the demo trains on pixels) and its classes at most ``data.num_classes``."""
    data = load_split(dataset, "train", cfg.data.resolution, cfg.train.seed, subset)
    c = data.image_shape[0]
    if c != cfg.vae.latent_channels or data.num_classes > cfg.data.num_classes:
        raise ValueError(
            f"{data.name} has {c}-channel images in {data.num_classes} classes; set vae.latent_channels={c} "
            f"and data.num_classes={data.num_classes} (got {cfg.vae.latent_channels} and {cfg.data.num_classes})"
        )
    return InMemoryImages(data)


@torch.no_grad()
def generate(
    model: nn.Module, cfg: ImageNetConfig, labels: Tensor, *, guidance: float, generator: torch.Generator,
    device: torch.device | str = "cpu", batch_size: int = 250,
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """One sample per label with ``cfg``'s sampler at ``guidance`` (1: no unconditional pass): ``(images [N, C, H, W],
    previews)`` in ``[-1, 1]``, ``previews[s]`` rebuilt from stages ``0..s``."""
    sampler = cfg.sampling.sampler(cfg.decomposition.build(), guidance_scale=guidance)
    shape = (cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    model = model.eval().to(device)
    images, previews = [], []
    for y in labels.split(batch_size):
        y = y.to(device)
        uncond = {"y": torch.full_like(y, cfg.data.num_classes)} if guidance != 1.0 else None
        out = sampler.sample(model, (len(y), *shape), generator=generator, device=device, uncond=uncond, y=y)
        images.append(out.x.float().cpu())
        previews.append([p.float().cpu() for p in out.previews])
    return torch.cat(images), [torch.cat(p) for p in zip(*previews)]


def compute_metrics(
    fake: Tensor, real: Tensor, *, seed: int = 0, fd: bool = True, extractor: Any = None, real_features: Any = None
) -> dict[str, Any]:
    """SWD per pyramid level (x1e3) and FD-EffNet of ``fake`` (clipped, as saved) against ``real``, ``[N, C, H, W]``.

    FD-EffNet is ``None`` with the reason when its weights are not installed; ``real_features`` (a
    ``FeatureStatistics`` of the real set) and ``extractor`` spare recomputing them between calls.
    """
    fake = fake.clamp(-1.0, 1.0)
    res = swd(real, fake, progress_bar=False, generator=torch.Generator().manual_seed(seed), min_resolution=8)
    out: dict[str, Any] = {"num_fake": len(fake), "num_real": len(real), "fd_effnet": None, "swd": {
        "per_level": {f"{h}x{w}": round(v, 4) for (h, w), v in zip(res.resolutions, res.per_level)}, "mean": round(res.mean, 4)}}  # fmt: skip
    if fd:
        try:
            from dfm_ext.metrics.effnet import EfficientNetLite0Features, fd_effnet

            extractor = extractor or EfficientNetLite0Features(FD_RESOLUTION)
            out["fd_effnet"] = round(float(fd_effnet(real if real_features is None else real_features, fake, extractor=extractor, progress_bar=False)), 4)
            out["fd_effnet_resolution"] = int(extractor.resolution)
        except ImportError as e:
            out["fd_effnet_error"] = str(e)
    return out


@dataclass(frozen=True)
class Run:
    """A trained run: the EMA ``model`` (from ``final/``), its ``config`` and where they are."""

    model: nn.Module
    config: ImageNetConfig
    folder: Path


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> Run:
    """The run at ``path``: a demo output folder (``run/`` inside), a run folder (``final/`` inside) or its ``final/``
    (a wrapped model, with ``config.yaml`` in the folder above)."""
    path = Path(path)
    candidates = [path, path / "final", path / "run" / "final"]
    final = next((p for p in candidates if (p / CONFIG_FILE).is_file()), None)
    if final is None:
        raise FileNotFoundError(
            f"{path} holds no trained model: expected {CONFIG_FILE} in it, in {path / 'final'} or in {path / 'run' / 'final'} "
            "(a demo output folder, a run folder or its final/)"
        )
    run_dir = final.parent
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{final} is a wrapped model, but {run_dir / 'config.yaml'} (its run's config: classes, sampling) is missing")
    cfg = load_config(ImageNetConfig, run_dir / "config.yaml")
    if cfg.vae.kind != "none":
        raise ValueError(f"{run_dir} trains on VAE latents (vae.kind={cfg.vae.kind}); sample it with python -m dfm_ext.recipes.imagenet sample --run {run_dir}")
    model = load_wrapped(final, device=device)
    classes = getattr(getattr(getattr(model, "base", None), "config", None), "num_classes", cfg.data.num_classes)
    if classes != cfg.data.num_classes:
        raise ValueError(f"{run_dir / 'config.yaml'} says data.num_classes={cfg.data.num_classes} but the model in {final} has {classes} classes")
    return Run(model, cfg, run_dir)


#: The most samples ``dfm-ext sample`` draws in one call (it holds them in memory); more: the recipe's sharded ``sample``.
MAX_SAMPLES = 100_000


def check_output_path(out: Path, flag: str = "--out") -> None:
    """Refuse, before any compute, an output path under a file or in a folder that cannot be written."""
    parent = out.parent if out.suffix else out
    blocker = next((a for a in (parent, *parent.parents) if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{flag} {str(out)!r}: {str(blocker)!r} is a file, not a folder")
    existing = next(a for a in (parent, *parent.parents) if a.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(out)!r}: {str(existing)!r} is not writable")


def sample_run(args: Any) -> Path:
    """``dfm-ext sample``: ``args.num`` samples per class of the run at ``args.checkpoint``, as a grid (``args.out``
    a ``.png``; rows = classes) or a folder of ``<index>_class<k>.png`` (what ``dfm-ext eval`` reads) plus ``grid.png``."""
    parse_device(args.device)
    run = load_run(args.checkpoint, device=args.device)
    schedule = [f"sampling.{key}={list(v)}" for key, v in (("steps", args.steps), ("thresholds", args.threshold)) if v is not None]
    cfg = apply_overrides(run.config, schedule)
    cfg.sampling.check(cfg.num_stages, kind=cfg.decomposition.kind)
    guidance = cfg.sampling.guidance_scale if args.cfg_scale is None else args.cfg_scale
    if not math.isfinite(guidance):
        raise ValueError(f"--cfg-scale must be a finite number, got {guidance}")
    total = args.num * cfg.data.num_classes
    if total > MAX_SAMPLES:
        raise ValueError(f"--num {args.num} x {cfg.data.num_classes} classes = {total} samples, more than the {MAX_SAMPLES} one call holds in "
                         f"memory; draw fewer, or use python -m dfm_ext.recipes.imagenet sample --run {run.folder} (sharded, resumable)")  # fmt: skip
    out = Path(args.out)
    check_output_path(out)
    foreign = [p.name for p in out.iterdir() if not (p.name == "grid.png" or "_class" in p.name)] if out.is_dir() else []
    if out.suffix.lower() != ".png" and (foreign or (out.exists() and not out.is_dir())):
        raise ValueError(f"--out {str(out)!r} exists and holds other files ({foreign[:3] or 'not a folder'}); choose a new folder or a .png")
    labels = torch.arange(cfg.data.num_classes).repeat_interleave(args.num)
    images, _ = generate(run.model, cfg, labels, guidance=guidance, generator=torch.Generator().manual_seed(args.seed), device=args.device)
    if out.suffix.lower() == ".png":
        return save_image_grid(images, out, nrow=args.num, scale=3)
    with atomic_directory(out) as tmp:
        for i, (arr, y) in enumerate(zip(to_uint8(images), labels.tolist())):
            save_array_png(arr, Path(tmp) / f"{i:05d}_class{y}.png")
        save_image_grid(images, Path(tmp) / "grid.png", nrow=args.num, scale=3)
    return out


def read_png_folder(folder: str | Path, *, limit: int | None = None) -> tuple[Tensor, list[Path]]:
    """The PNGs of ``folder`` (sorted; ``grid.png`` skipped) as ``[N, C, H, W]`` in ``[-1, 1]``, and the unreadable ones."""
    arrays: list[np.ndarray] = []
    skipped: list[Path] = []
    for p in sorted(p for p in Path(folder).glob("*.png") if p.name != "grid.png"):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(read_image(p))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            skipped.append(p)
    if not arrays:
        raise ValueError(f"no readable PNG samples in {folder}" + (f" ({len(skipped)} unreadable, e.g. {skipped[0].name})" if skipped else ""))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"samples in {folder} have different shapes: {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() * 2.0 - 1.0, skipped


def evaluate_samples(args: Any) -> dict[str, Any]:
    """``dfm-ext eval``: metrics of a folder of PNG samples, or of ``args.num`` fresh samples of a run, against a split."""
    parse_device(args.device)
    path = Path(args.samples)
    if not path.is_dir():
        raise ValueError(f"--samples {str(path)!r} is not a folder (PNG samples or a trained run)")
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    if any((p / CONFIG_FILE).is_file() for p in (path, path / "final", path / "run" / "final")):
        run = load_run(path, device=args.device)
        labels = torch.arange(args.num) % run.config.data.num_classes
        fake, _ = generate(run.model, run.config, labels, guidance=args.cfg_scale, generator=torch.Generator().manual_seed(args.seed), device=args.device)
        source: dict[str, Any] = {"run": str(run.folder), "cfg_scale": args.cfg_scale}
    else:
        fake, skipped = read_png_folder(path, limit=args.num)
        source = {"folder": str(path), "images": len(fake), "skipped_images": len(skipped)}
        if skipped:  # counted, not fatal: one damaged PNG should not void an evaluation
            print(f"dfm-ext eval: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", file=sys.stderr)
    real_ds = load_dataset(args.dataset, args.split, size=int(fake.shape[-1]), seed=args.seed)
    real = real_ds.subset(args.num_reference, generator=torch.Generator().manual_seed(args.seed)).images
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"samples are {tuple(fake.shape[1:])} but {real_ds.name} {args.split} images are {tuple(real.shape[1:])}")
    return {"source": source, "dataset": real_ds.name, "split": args.split, **compute_metrics(fake, real, seed=args.seed, fd=not args.no_fd)}
