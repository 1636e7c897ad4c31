"""Reading clips with PyAV; writing videos (MP4 through PyAV, GIF and frame strips through Pillow), atomically,
and the sample videos with their stage previews side by side. Writers take ``[3, T, H, W]`` floats in ``[-1, 1]``
or ``[T, H, W, 3]`` uint8 frames."""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dfm_ext.recipes.engine.viz import atomic_file, make_grid, save_image_grid, to_uint8

__all__ = [
    "DECODE_ERRORS", "ClipError", "clip_indices", "read_clip", "save_frame_strip", "save_video_samples", "side_by_side", "to_uint8_frames",
    "write_gif", "write_mp4",
]  # fmt: skip


class ClipError(ValueError):
    """A video decoded, but not into a usable clip (too short, no video stream)."""


#: What a dataset treats as "skip this file": PyAV's errors, unreadable files, :class:`ClipError`.
DECODE_ERRORS: tuple[type[BaseException], ...] = (av.error.FFmpegError, OSError, ClipError, ValueError, EOFError)


def clip_indices(num_available: int, num_frames: int, stride: int, position: str = "center") -> list[int]:
    """Frame indices of a clip of ``num_frames`` frames ``stride`` apart at the ``"center"`` or ``"start"`` of
    ``num_available`` (:class:`ClipError` when the video is too short).

    Example:
        >>> clip_indices(20, 4, 3)
        [5, 8, 11, 14]
        >>> clip_indices(20, 4, 3, "start")
        [0, 3, 6, 9]
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    span = (num_frames - 1) * stride + 1
    if num_available < span:
        raise ClipError(f"video has {num_available} frames, a clip of {num_frames} frames at stride {stride} needs {span}")
    if position not in ("center", "start"):
        raise ValueError(f"position must be 'center' or 'start', got {position!r}")
    start = (num_available - span) // 2 if position == "center" else 0
    return list(range(start, start + span, stride))


def _resized(frame: av.VideoFrame, resolution: int) -> np.ndarray:
    """One ``av.VideoFrame`` -> ``[R, R, 3]`` uint8: short side to ``R`` (bicubic), centre crop."""
    w, h = frame.width, frame.height
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    rgb = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="BICUBIC").to_ndarray()
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return rgb[top : top + resolution, left : left + resolution]


def read_clip(path: str | os.PathLike[str], num_frames: int, stride: int, resolution: int, *, position: str = "center") -> Tensor:
    """Decode a clip: ``[3, num_frames, R, R]`` float32 in ``[-1, 1]``, each frame's short side resized to ``R``
    (swscale, bicubic) and centre cropped. Frames are counted by decoding (headers can lie about truncated
    files); :class:`ClipError` when too few decode."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ClipError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames: list[np.ndarray] = []
        wanted: set[int] | None = None
        if stream.frames > 0:
            # Trust the header only for where to stop; too few decoded frames still fails below.
            idx = clip_indices(stream.frames, num_frames, stride, position)
            wanted, last = set(idx), idx[-1]
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None or i in wanted:
                frames.append(_resized(frame, resolution))
            if wanted is not None and i >= last:
                break
    if wanted is None:
        frames = [frames[i] for i in clip_indices(len(frames), num_frames, stride, position)]
    elif len(frames) != num_frames:
        raise ClipError(f"{path}: decoded {len(frames)} of the {num_frames} frames the clip needs (truncated?)")
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)  # from [T, R, R, 3]


def to_uint8_frames(video: Tensor | np.ndarray) -> np.ndarray:
    """``[3, T, H, W]`` floats in ``[-1, 1]`` (clipped) or ``[T, H, W, 3]`` uint8 -> ``[T, H, W, 3]`` uint8.

    Example:
        >>> to_uint8_frames(torch.ones(3, 2, 4, 4)).shape
        (2, 4, 4, 3)
    """
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"array frames must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
        return video
    if not isinstance(video, Tensor) or video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be a tensor [3, T, H, W], got {getattr(video, 'shape', type(video))}")
    return np.ascontiguousarray(to_uint8(video.transpose(0, 1)))


def write_mp4(video: Tensor | np.ndarray, path: str | os.PathLike[str], *, fps: float = 8.0) -> Path:
    """Write frames as an H.264 MP4 (MPEG-4 part 2 without libx264), yuv420p: odd sides padded by a pixel."""
    frames = to_uint8_frames(video)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = h + h % 2, w + w % 2
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with atomic_file(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for arr in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")))
        out.mux(stream.encode())
    return Path(path)


def write_gif(video: Tensor | np.ndarray, path: str | os.PathLike[str], *, fps: float = 8.0) -> Path:
    """Write frames as a looping GIF through Pillow."""
    images = [Image.fromarray(f) for f in to_uint8_frames(video)]
    with atomic_file(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return Path(path)


def save_frame_strip(videos: Sequence[Tensor] | Tensor, path: str | os.PathLike[str], *, scale: int = 1) -> Path:
    """One PNG: row ``i`` holds the frames of ``videos[i]`` (each ``[3, T, H, W]`` in ``[-1, 1]``) left to right."""
    videos = list(videos)
    if not videos:
        raise ValueError("save_frame_strip needs at least one video")
    t = videos[0].shape[1]
    for i, v in enumerate(videos):
        if v.ndim != 4 or v.shape[0] != 3 or v.shape[1] != t:
            raise ValueError(f"videos[{i}] has shape {tuple(v.shape)}, expected [3, {t}, H, W]")
    tiles = torch.cat([v.transpose(0, 1) for v in videos])  # [N * T, 3, H, W]
    return save_image_grid(tiles, path, nrow=t, padding=1, scale=scale)


def side_by_side(columns: Sequence[Tensor], *, scale: int = 1, padding: int = 2) -> np.ndarray:
    """Tile ``K`` videos ``[N, 3, T, H, W]`` in ``[-1, 1]`` into ``[T, H_grid, W_grid, 3]`` uint8 frames: row ``i`` holds
    ``columns[c][i]`` for every column ``c`` (e.g. stage previews, then the final).

    Example:
        >>> side_by_side([torch.zeros(2, 3, 4, 8, 8), torch.zeros(2, 3, 4, 8, 8)], padding=1).shape
        (4, 19, 19, 3)
    """
    shape = columns[0].shape
    for i, c in enumerate(columns):
        if c.shape != shape or c.ndim != 5:
            raise ValueError(f"columns[{i}] has shape {tuple(c.shape)}, expected {tuple(shape)} [N, 3, T, H, W]")
    tiles = torch.stack(list(columns), dim=1).flatten(0, 1)  # [N * K, 3, T, H, W], row-major by example
    return np.stack([make_grid(tiles[:, :, t], len(columns), padding=padding, scale=scale) for t in range(shape[2])])


def save_video_samples(previews: Sequence[Tensor], final: Tensor, stem: Path, *, fps: float, formats: Sequence[str]) -> None:
    """``stem.mp4`` / ``stem.gif`` (previews and final ``[N, 3, T, H, W]`` side by side), ``stem-frames.png`` (final frames)."""
    scale = 2 if final.shape[-1] < 128 else 1
    video = side_by_side([*previews, final], scale=scale)
    if "mp4" in formats:
        write_mp4(video, stem.with_suffix(".mp4"), fps=fps)
    if "gif" in formats:
        write_gif(video, stem.with_suffix(".gif"), fps=fps)
    if "png" in formats:
        save_frame_strip(list(final), stem.with_name(stem.name + "-frames.png"), scale=scale)
