"""Kinetics-style video datasets: class folders of clips (``root/<class>/<clip>``, searched recursively), or a CSV or
JSON list of paths and labels (the formats: docs/recipes/kinetics.md). Listed files that are missing are skipped (and
counted) when read.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from dfm_ext.recipes.engine.data import read_with_fallback, scan_class_folders
from dfm_ext.recipes.kinetics.video_io import DECODE_ERRORS, read_clip

__all__ = ["VIDEO_EXTENSIONS", "VideoClips", "scan_videos"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")


def _label_index(raw: list[tuple[str, Any]], where: str) -> tuple[list[tuple[str, int]], list[str]]:
    labels = [lab for _, lab in raw]
    if all(isinstance(lab, int) or (isinstance(lab, str) and lab.strip().isdigit()) for lab in labels):
        ints = [int(lab) for lab in labels]
        if min(ints) < 0:
            raise ValueError(f"{where}: negative label {min(ints)}")
        classes = [str(i) for i in range(max(ints) + 1)]
        return [(p, i) for (p, _), i in zip(raw, ints)], classes
    classes = sorted({str(lab) for lab in labels})
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[str(lab)]) for p, lab in raw], classes


def _resolve(path: str, base: Path, root: Path | None) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else root / p if root is not None and (root / p).exists() else base / p)


def _from_csv(file: Path, root: Path | None) -> tuple[list[tuple[str, int]], list[str]]:
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{file}: no rows")
    cols = set(rows[0])
    if {"path", "label"} <= cols:
        raw = [(_resolve(r["path"], file.parent, root), r["label"]) for r in rows]
    elif {"label", "youtube_id", "time_start", "time_end"} <= cols:
        base = root if root is not None else file.parent
        name = "{}_{:06d}_{:06d}.mp4"  # the download scripts' clip names
        raw = [(str(base / r["label"] / name.format(r["youtube_id"], int(float(r["time_start"])), int(float(r["time_end"])))), r["label"]) for r in rows]
    else:
        raise ValueError(f"{file}: expected columns 'path,label' or Kinetics' 'label,youtube_id,time_start,time_end'; got {sorted(cols)}")
    return _label_index(raw, str(file))


def _from_json(file: Path, root: Path | None) -> tuple[list[tuple[str, int]], list[str]]:
    data = json.loads(file.read_text())
    if not isinstance(data, list) or not all(isinstance(d, dict) and {"path", "label"} <= set(d) for d in data):
        raise ValueError(f"{file}: expected a JSON list of {{'path': ..., 'label': ...}} objects")
    if not data:
        raise ValueError(f"{file}: empty list")
    return _label_index([(_resolve(str(d["path"]), file.parent, root), d["label"]) for d in data], str(file))


def scan_videos(root: str | Path | None = None, annotations: str | Path | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` for every clip and the class names, from ``root`` or the ``annotations`` list (relative to ``root``)."""
    if annotations is not None:
        file = Path(annotations)
        if not file.is_file():
            raise FileNotFoundError(f"annotation list {str(file)!r} does not exist")
        base = Path(root) if root is not None else None
        if file.suffix.lower() == ".csv":
            return _from_csv(file, base)
        if file.suffix.lower() == ".json":
            return _from_json(file, base)
        raise ValueError(f"annotations must be a .csv or .json file, got {str(file)!r}")
    if root is None:
        raise ValueError("give a video folder (root) or an annotation list (annotations)")
    return scan_class_folders(root, VIDEO_EXTENSIONS, what="video root", item="clip")


class VideoClips(torch.utils.data.Dataset):
    """One clip per video (:func:`~.video_io.read_clip`): items like :class:`~dfm_ext.recipes.engine.data.ImageFolder`'s,
    with ``pixels [3, T, R, R]``; a video that cannot be opened, is corrupt or too short is skipped."""

    def __init__(
        self, items: list[tuple[str, int]], *, num_frames: int, stride: int = 1, resolution: int, position: str = "center",
        max_skips: int = 64, classes: list[str] | None = None,
    ) -> None:  # fmt: skip
        if not items:
            raise ValueError("VideoClips needs at least one (path, label) item")
        if num_frames < 1 or stride < 1 or resolution < 1 or max_skips < 1:
            raise ValueError(
                f"num_frames, stride, resolution and max_skips must be >= 1, got {num_frames}, {stride}, {resolution}, {max_skips}"
            )
        if position not in ("center", "start"):
            raise ValueError(f"position must be 'center' or 'start', got {position!r}")
        self.items = list(items)
        self.classes = list(classes) if classes is not None else sorted({str(lab) for _, lab in items})
        self.num_frames, self.stride, self.resolution = int(num_frames), int(stride), int(resolution)
        self.position, self.max_skips = position, int(max_skips)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> torch.Tensor:
        """The clip of video ``index`` (raises on an unreadable video; no fall-back)."""
        return read_clip(self.items[index][0], self.num_frames, self.stride, self.resolution, position=self.position)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        return read_with_fallback(self.items, key, self.read, DECODE_ERRORS, max_skips=self.max_skips, what="videos")
