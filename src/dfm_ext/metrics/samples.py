"""Sample sets on disk: PNG folders and the ADM ``.npz`` layout, read in uint8 batches ``[B, H, W, C]``.

The ADM evaluation suite (guided-diffusion ``evaluations/evaluator.py``, used by DiT, SiT and the
DFM paper) reads a sample batch as one ``.npz`` whose ``arr_0`` is uint8 ``[N, H, W, 3]``; sampling
scripts add the class labels as ``arr_1`` int ``[N]``. Its reference batches
(``VIRTUAL_imagenet256_labeled.npz`` ...) hold ``arr_0`` (the reference images) and the Inception
statistics ``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial features): see
:class:`~dfm_ext.metrics.adm.ReferenceBatch`.

A PNG folder is the same set as files ``000000.png, 000001.png, ...``; images are read in sorted
file-name order, so a folder and an ``.npz`` written by :func:`save_samples` give the same batches.
Arrays are streamed from the ``.npz`` (a 50k x 256 x 256 batch is 9.8 GB): only one batch is in memory.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from dfm_ext.fileio import fsync_directory

__all__ = [
    "SampleSource", "count_images", "iter_npz_rows", "iter_uint8_batches", "read_npz_labels", "save_samples", "to_uint8", "write_npz",
]  # fmt: skip

#: What the evaluation functions accept for a sample set: a PNG folder, an ADM ``.npz`` (``arr_0``),
#: or a uint8 array ``[N, H, W, C]``.
SampleSource = Union[str, os.PathLike, np.ndarray]

_IMAGE_SUFFIXES = (".png",)


def to_uint8(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Float images ``[B, C, H, W]`` in ``value_range`` -> uint8 ``[B, H, W, C]`` (what a PNG stores).

    ``round(255 (x - lo) / (hi - lo))`` clamped to ``[0, 255]``: for ``[-1, 1]`` this is DiT's
    ``clamp(127.5 x + 128, 0, 255)`` truncated, i.e. rounding half up.

    Example:
        >>> to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2))[..., 0].tolist()
        [[[0, 128], [255, 255]]]
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        what = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, C, H, W], got {what}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    scaled = ((images.detach().float().cpu() - lo) * (255.0 / (hi - lo)) + 0.5).clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _check_uint8(images: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        what = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 array [N, H, W, 1 or 3] (the ADM layout), got {what}")
    return images


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write an ADM sample batch: ``arr_0`` uint8 ``[N, H, W, C]`` and, when given, ``arr_1`` labels ``[N]``.

    Written through a temporary sibling and renamed, so a crash never leaves a truncated ``.npz``.
    """
    images = _check_uint8(images, "images")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers [N] = [{images.shape[0]}], got {labels.dtype} {labels.shape}")
        arrays["arr_1"] = labels
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def save_samples(
    images: Tensor | np.ndarray,
    *,
    folder: str | os.PathLike | None = None,
    npz: str | os.PathLike | None = None,
    start: int = 0,
    labels: np.ndarray | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Save a batch as PNG files ``{start:06d}.png ...`` in ``folder`` and/or as an ADM ``npz``.

    Args:
        images: float ``[B, C, H, W]`` in ``value_range`` or uint8 ``[B, H, W, C]``.
        folder: PNG folder (created); file names continue from ``start`` so shards can be written
            by several processes into one folder.
        npz: an ADM ``.npz`` holding exactly this batch.
        start: index of the first image (its file name).
        labels: class labels ``[B]`` for ``arr_1`` of the ``.npz``.
        value_range: range of float ``images``.

    Returns:
        The uint8 ``[B, H, W, C]`` array that was written.
    """
    from PIL import Image

    array = to_uint8(images, value_range) if isinstance(images, Tensor) else _check_uint8(images, "images")
    if folder is not None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(array):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out / f"{start + i:06d}.png")
    if npz is not None:
        write_npz(npz, array, labels)
    return array


def _png_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{str(folder)!r} holds no .png images")
    return files


class _NpzArray:
    """The header of ``arr_0`` inside an ``.npz`` and a stream over its rows (no full load)."""

    def __init__(self, path: Path, name: str = "arr_0") -> None:
        self.path, self.name = path, name
        try:
            with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
                self.shape, self.dtype = self._header(f)
        except KeyError:
            raise ValueError(f"{str(path)!r} has no {name!r} array (an ADM sample batch stores its images in arr_0)") from None
        except zipfile.BadZipFile as err:
            raise ValueError(f"{str(path)!r} is not an .npz file: {err}") from None

    @staticmethod
    def _header(f) -> tuple[tuple[int, ...], np.dtype]:  # type: ignore[no-untyped-def]
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        if fortran or dtype.hasobject:
            raise ValueError("arrays in Fortran order or of Python objects are not sample batches")
        return tuple(shape), dtype

    def batches(self, batch_size: int, start: int, stop: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.name}.npy") as f:
            self._header(f)
            if start:
                f.seek(start * row, os.SEEK_CUR)  # np.savez stores uncompressed: a cheap seek
            for begin in range(start, stop, batch_size):
                n = min(batch_size, stop - begin)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{str(self.path)!r}: {self.name} is truncated at image {begin}")
                yield np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])


def _source(source: SampleSource) -> np.ndarray | _NpzArray | list[Path]:
    if isinstance(source, np.ndarray):
        return _check_uint8(source, "samples")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"samples must be a PNG folder, an .npz path or a uint8 array, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        return _png_files(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sample folder or .npz at {str(path)!r}")
    array = _NpzArray(path)
    if array.dtype != np.uint8 or len(array.shape) != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{str(path)!r}: arr_0 must be uint8 [N, H, W, 1 or 3], got {array.dtype} {array.shape}")
    return array


def count_images(source: SampleSource) -> int:
    """Number of images in a PNG folder, an ADM ``.npz`` or an array (without reading them)."""
    found = _source(source)
    return found.shape[0] if isinstance(found, (np.ndarray, _NpzArray)) else len(found)


def iter_uint8_batches(
    source: SampleSource, batch_size: int = 100, *, start: int = 0, stop: int | None = None
) -> Iterator[np.ndarray]:
    """uint8 batches ``[B, H, W, C]`` of images ``[start, stop)`` of a PNG folder (sorted names), an ADM ``.npz`` or an array.

    Example:
        >>> images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
        >>> [b.shape[0] for b in iter_uint8_batches(images, batch_size=2)]
        [2, 2, 1]
    """
    from PIL import Image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    found = _source(source)
    total = found.shape[0] if isinstance(found, (np.ndarray, _NpzArray)) else len(found)
    stop = total if stop is None else stop
    if not 0 <= start <= stop <= total:
        raise ValueError(f"need 0 <= start <= stop <= {total} (the number of images), got start={start}, stop={stop}")
    if isinstance(found, np.ndarray):
        for begin in range(start, stop, batch_size):
            yield found[begin : min(begin + batch_size, stop)]
    elif isinstance(found, _NpzArray):
        yield from found.batches(batch_size, start, stop)
    else:
        shape: tuple[int, ...] | None = None
        for begin in range(start, stop, batch_size):
            batch = []
            for file in found[begin : min(begin + batch_size, stop)]:
                with Image.open(file) as im:
                    array = np.asarray(im.convert("L") if im.mode in ("L", "I;16", "I") else im.convert("RGB"))
                array = array[..., None] if array.ndim == 2 else array
                if shape is not None and array.shape != shape:
                    raise ValueError(f"{file} has shape {array.shape}, the images before it {shape}")
                shape = array.shape
                batch.append(array)
            yield np.stack(batch)


def iter_npz_rows(path: str | os.PathLike, batch_size: int = 100, *, name: str = "arr_0") -> Iterator[np.ndarray]:
    """Batches of the rows of array ``name`` (any number of dimensions, e.g. videos ``[N, T, H, W, C]``) of an
    uncompressed ``.npz`` (``np.savez``), streamed: one batch in memory at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    array = _NpzArray(Path(path), name)
    yield from array.batches(batch_size, 0, array.shape[0])


def read_npz_labels(path: str | os.PathLike) -> np.ndarray | None:
    """The class labels ``arr_1`` of an ADM sample ``.npz``, or ``None`` when it has none."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return np.asarray(data["arr_1"]) if "arr_1" in data.files else None
