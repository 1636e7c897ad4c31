"""The demo's measurements and the ``dfm-ext sample`` / ``dfm-ext eval`` commands.

* :func:`compute_metrics`: multi-scale SWD (and FD-EffNet when its weights are installed).
* :func:`sample_checkpoint`: samples of a demo checkpoint (a grid or a folder of PNGs).
* :func:`evaluate_path`: metrics of a PNG folder or of a checkpoint's fresh samples against a split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfm_ext.validation import parse_device

from dfm_ext.recipes.demo.config import check_schedule
from dfm_ext.recipes.demo.data import load_dataset
from dfm_ext.recipes.demo.files import DEMO_RECORD, load_demo_checkpoint, staging
from dfm_ext.recipes.demo.model import balanced_labels, generate

__all__ = ["FD_RESOLUTION", "compute_metrics", "evaluate_path", "load_png_folder", "read_png_folder", "sample_checkpoint"]


FD_RESOLUTION = 64


def compute_metrics(
    fake: Tensor,
    real: Tensor | None,
    *,
    seed: int = 0,
    fd: bool = True,
    fd_resolution: int = FD_RESOLUTION,
    real_features: Any = None,
    extractor: Any = None,
) -> dict[str, Any]:
    """SWD per pyramid level (x1e3) and FD-EffNet, fake vs real (lower is better for both).

    Both sets are ``[N, C, H, W]`` in ``[-1, 1]``. FD-EffNet uses EfficientNet-Lite0 features of
    the images resized to ``fd_resolution`` (64 by default: 224 costs about 10x more on CPU and
    32 px images hold no more detail); it is ``None`` with a reason when the weights are not
    installed. Generated images are clipped to ``[-1, 1]`` first, as when saved to PNG. ``real_features`` (a ``FeatureStatistics`` of the real set) and ``extractor``
    avoid recomputing the reference features between calls.
    """
    from dfm_ext.metrics.swd import swd

    # Scored as they would be saved: clipped to the image range.
    fake = fake.clamp(-1.0, 1.0)
    out: dict[str, Any] = {"num_fake": int(fake.shape[0]), "num_real": None if real is None else int(real.shape[0])}
    if real is not None:
        g = torch.Generator().manual_seed(seed)
        # 32 px images: levels 32, 16 and 8 (the paper's 16 px floor would leave only two).
        res = swd(real, fake, progress_bar=False, generator=g, min_resolution=8)
        out["swd"] = {
            "per_level": {f"{h}x{w}": round(v, 4) for (h, w), v in zip(res.resolutions, res.per_level)},
            "mean": round(res.mean, 4),
        }
    out["fd_effnet"] = None
    if fd:
        try:
            from dfm_ext.metrics.effnet import EfficientNetLite0Features, fd_effnet

            if extractor is None:
                extractor = EfficientNetLite0Features(fd_resolution)
            value = fd_effnet(real_features if real_features is not None else real, fake,
                              extractor=extractor, progress_bar=False)  # fmt: skip
        except ImportError as e:
            out["fd_effnet_error"] = str(e)
        else:
            out["fd_effnet"] = round(float(value), 4)
            out["fd_effnet_resolution"] = int(extractor.resolution)
    return out



def sample_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    cfg_scale: float | None = None,
    steps: Sequence[int] | None = None,
    thresholds: Sequence[float] | None = None,
    seed: int = 0,
    num_per_class: int = 8,
    device: str = "cpu",
) -> Path:
    """Sample ``num_per_class`` images per class from a demo checkpoint.

    ``out`` ending in ``.png`` gets a grid (rows = classes); any other path is a folder that gets
    one PNG per sample (``<index>_class<k>.png``, usable by ``dfm-ext eval``) plus ``grid.png``.
    """
    from dfm_ext.recipes.engine.viz import save_array_png, save_image_grid, to_uint8

    parse_device(device)
    model, config = load_demo_checkpoint(checkpoint, device=device)
    train_cfg = config.get("train", {})
    steps = tuple(steps) if steps is not None else tuple(train_cfg.get("sample_steps", (30, 10)))
    thresholds = tuple(thresholds) if thresholds is not None else tuple(train_cfg.get("thresholds", (0.9,)))
    cfg_scale = float(cfg_scale) if cfg_scale is not None else float(train_cfg.get("cfg_scale", 1.0))
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    check_schedule(config["model"]["decomposition"], steps, thresholds)
    nc = int(config["model"]["num_classes"])
    labels = torch.arange(nc).repeat_interleave(num_per_class)
    images, _ = generate(model, config["model"], labels, steps=steps, thresholds=thresholds, cfg_scale=cfg_scale,
                         generator=torch.Generator().manual_seed(seed), device=device)  # fmt: skip
    out = Path(out)
    if out.suffix.lower() == ".png":
        return save_image_grid(images, out, nrow=num_per_class, scale=3)
    with staging(out) as tmp:
        arrays = to_uint8(images)
        names = []
        for i, (arr, y) in enumerate(zip(arrays, labels.tolist())):
            names.append(save_array_png(arr, tmp / f"{i:05d}_class{y}.png").name)
        save_image_grid(images, tmp / "grid.png", nrow=num_per_class, scale=3)
        for name in [*names, "grid.png"]:
            os.replace(tmp / name, out / name)
    return out


def read_png_folder(folder: str | os.PathLike[str], *, limit: int | None = None) -> tuple[Tensor, list[Path]]:
    """PNG files of a folder (sorted by name; ``grid.png`` skipped) as ``[N, C, H, W]`` in ``[-1, 1]``.

    Unreadable files (truncated, not an image) are skipped and returned as the second value;
    with ``limit``, reading goes on until ``limit`` readable images are found. 16-bit PNGs keep
    their brightness (:func:`dfm_ext.recipes.demo.data.read_image`).

    Raises:
        ValueError: no readable PNGs, or images of different sizes/modes.
    """
    from PIL import UnidentifiedImageError

    from dfm_ext.recipes.demo.data import read_image

    folder = Path(folder)
    paths = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
    arrays, skipped = [], []
    for p in paths:
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(read_image(p))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            skipped.append(p)
    if not arrays:
        extra = f" ({len(skipped)} unreadable, e.g. {skipped[0].name})" if skipped else ""
        raise ValueError(f"no readable PNG samples in {folder}{extra}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"samples in {folder} have different shapes: {sorted(shapes)}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x * 2.0 - 1.0, skipped


def load_png_folder(folder: str | os.PathLike[str], *, limit: int | None = None) -> Tensor:
    """:func:`read_png_folder` without the list of skipped files."""
    return read_png_folder(folder, limit=limit)[0]


def evaluate_path(
    path: str | os.PathLike[str],
    *,
    dataset: str = "auto",
    split: str = "test",
    num: int = 1000,
    cfg_scale: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    num_reference: int = 2000,
    fd: bool = True,
) -> dict[str, Any]:
    """Metrics of a folder of PNG samples, or of ``num`` fresh samples of a checkpoint, vs a split."""
    path = Path(path)
    parse_device(device)
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if not path.is_dir():
        raise ValueError(f"--samples {str(path)!r} is not a folder (PNG samples or a checkpoint)")
    if any((path / n).is_file() for n in (DEMO_RECORD, "config.json", "model.safetensors")):
        model, config = load_demo_checkpoint(path, device=device)
        train_cfg = config.get("train", {})
        scale = float(cfg_scale) if cfg_scale is not None else float(train_cfg.get("eval_cfg_scale", 1.0))
        labels = balanced_labels(num, int(config["model"]["num_classes"]))
        fake, _ = generate(model, config["model"], labels, steps=train_cfg.get("sample_steps", (30, 10)),
                           thresholds=train_cfg.get("thresholds", (0.9,)), cfg_scale=scale,
                           generator=torch.Generator().manual_seed(seed), device=device)  # fmt: skip
        source = {"checkpoint": str(path), "cfg_scale": scale}
    else:
        fake, skipped = read_png_folder(path, limit=num)
        # Unreadable files are counted, not fatal: one damaged PNG should not void an evaluation.
        source = {"folder": str(path), "images": int(fake.shape[0]), "skipped_images": len(skipped)}
        if skipped:
            import sys

            print(f"dfm-ext eval: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", file=sys.stderr)
    c, h, w = fake.shape[1:]
    real_ds = load_dataset(dataset, split, size=int(h), seed=seed)
    real = real_ds.subset(num_reference, generator=torch.Generator().manual_seed(seed)).images
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"samples are {tuple(fake.shape[1:])} but {real_ds.name} {split} images are {tuple(real.shape[1:])}"
        )
    return {"source": source, "dataset": real_ds.name, "split": split, **compute_metrics(fake, real, seed=seed, fd=fd)}
