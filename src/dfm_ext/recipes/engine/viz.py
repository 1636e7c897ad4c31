"""Pictures for the demo and the benchmarks: image grids, progressive strips, loss curves (matplotlib), each written
through :func:`atomic_file`, so that a crash never leaves a half-written picture that looks complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dfm_ext.process.sampler import SampleOutput
from dfm_ext.recipes.engine.data import Codec

__all__ = [
    "atomic_file", "make_grid", "save_array_png", "save_image_grid", "save_loss_curves", "save_progressive", "save_progressive_samples",
    "smooth", "to_uint8",
]  # fmt: skip


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in ``[-1, 1]`` (clipped) to ``[N, H, W, C]`` uint8 (C = 1 or 3).

    Example:
        >>> to_uint8(torch.tensor([[[[-1.0, 1.0]]]])).ravel().tolist()
        [0, 255]
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: Tensor, nrow: int, *, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images in ``[-1, 1]`` row by row, ``nrow`` per row, into one ``[H_grid, W_grid, C]``
    uint8 array (grey ``padding``; nearest upscaling by ``scale`` so that small images stay visible).

    Example:
        >>> make_grid(torch.zeros(6, 1, 4, 4), nrow=3, padding=1).shape
        (11, 16, 1)
    """
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1, scale >= 1, padding >= 0; got {nrow}, {scale}, {padding}")
    arr = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = arr.shape
    rows, pad = -(-n // nrow), padding * scale
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of ``path`` (same suffix) to write; renamed to ``path`` on success, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(name, 0o666 & ~mask)  # mkstemp makes the file private (0600): the result gets the usual permissions
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_array_png(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a ``[H, W, 1 or 3]`` uint8 array as a PNG, atomically. Returns the path."""
    if array.ndim != 3 or array.shape[2] not in (1, 3) or array.dtype != np.uint8:
        raise ValueError(f"array must be uint8 [H, W, 1 or 3], got {array.dtype} {array.shape}")
    with atomic_file(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(tmp, format="PNG")
    return Path(path)


def save_image_grid(images: Tensor, path: str | os.PathLike[str], *, nrow: int = 8, padding: int = 2, scale: int = 2) -> Path:
    """Save ``[N, C, H, W]`` images in ``[-1, 1]`` as one PNG grid (``nrow`` per row).

    Example:
        >>> Image.open(save_image_grid(torch.zeros(4, 1, 8, 8), Path(tempfile.mkdtemp()) / "g.png", nrow=2, scale=1)).size
        (22, 22)
    """
    return save_array_png(make_grid(images, nrow, padding=padding, scale=scale), path)


def save_progressive(previews: Sequence[Tensor], final: Tensor, path: str | os.PathLike[str], *, scale: int = 3, padding: int = 2) -> Path:
    """One row per example: each stage's preview ``[N, C, H_s, W_s]`` (upscaled, nearest), then ``final [N, C, H, W]``.

    Example:
        >>> path = Path(tempfile.mkdtemp()) / "p.png"
        >>> Image.open(save_progressive([torch.zeros(2, 1, 4, 4)], torch.zeros(2, 1, 8, 8), path, scale=1, padding=1)).size
        (19, 19)
    """
    if final.ndim != 4:
        raise ValueError(f"final must be [N, C, H, W], got shape {tuple(final.shape)}")
    n = final.shape[0]
    for s, p in enumerate(previews):
        if p.ndim != 4 or p.shape[0] != n or p.shape[1] != final.shape[1]:
            raise ValueError(f"previews[{s}] has shape {tuple(p.shape)}, expected [{n}, {final.shape[1]}, h, w]")
    size = tuple(final.shape[-2:])
    columns = [p if p.shape[-2:] == size else torch.nn.functional.interpolate(p.float(), size=size, mode="nearest") for p in previews]
    columns.append(final.float())
    # Interleave so that row i holds example i's stages left to right.
    tiles = torch.stack(columns, dim=1).flatten(0, 1)
    return save_image_grid(tiles, path, nrow=len(columns), padding=padding, scale=scale)


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what TensorBoard's smoothing does).

    Example:
        >>> [round(v, 3) for v in smooth([1.0, 0.0], weight=0.5)]
        [1.0, 0.333]
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be in [0, 1), got {weight}")
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * float(v)
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def save_loss_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike[str], *, title: str = "training loss") -> Path:
    """Plot named curves (name -> values; NaN skipped), smoothed (:func:`smooth`) with the raw values faint behind
    them, on a log scale, into a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        for i, (name, values) in enumerate(curves.items()):
            pts = [(x, float(v)) for x, v in enumerate(values) if np.isfinite(v)]
            if not pts:
                continue
            px, py = zip(*pts)
            ax.plot(px, py, color=f"C{i}", alpha=0.2, linewidth=0.8)
            ax.plot(px, smooth(py, 0.95) if len(py) > 1 else py, color=f"C{i}", label=name, linewidth=1.5)
        ax.set(yscale="log", xlabel="step", ylabel="loss (smoothed)", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


@torch.no_grad()
def save_progressive_samples(codec: Codec, out: SampleOutput, out_dir: str | os.PathLike[str], step: int) -> Tensor:
    """Decode a sampler output and save it with its stage previews as ``samples/step-<step>.png``; returns the decoded
    final images ``[N, 3, H, W]`` in ``[-1, 1]``."""
    previews = [codec.decode(p) for p in out.previews[:-1]]
    final = codec.decode(out.x)
    save_progressive(previews, final, Path(out_dir) / "samples" / f"step-{step:06d}.png", scale=1 if final.shape[-1] >= 128 else 3)
    return final
