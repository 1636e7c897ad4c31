"""Offline image datasets for the demo and the benchmarks (nothing is downloaded), both real images on disk:
``"fashion-mnist"`` (60k train + 10k test, 28x28 grey, 10 classes: the IDX files of the Debian package
``dataset-fashion-mnist``), ``"skimage"`` (crops of the photos bundled with scikit-image; the class is the photo;
train and test crops never share pixels) and ``"auto"`` (Fashion-MNIST when its files exist). Images are float32
``[N, C, H, W]`` in ``[-1, 1]``, labels int64 ``[N]``. The study's two more sources: ``benchmarks/study_data.py``.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "ImageDataset", "fashion_mnist_available", "load_dataset", "load_fashion_mnist", "load_skimage_crops",
           "read_idx", "read_image"]

DATASETS = ("fashion-mnist", "skimage", "auto")
SPLITS = ("train", "test")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")  # fmt: skip
_FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # fmt: skip
# skimage photos that are bundled with the wheel (others need a download and are skipped).
SKIMAGE_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field",
                   "immunohistochemistry", "camera")  # fmt: skip

# IDX type codes (http://yann.lecun.com/exdb/mnist/ format description) -> numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageDataset:
    """Images ``[N, C, H, W]`` (float32 in ``[-1, 1]``) and labels ``[N]`` (int64 in ``[0, num_classes)``) held in
    memory, one name per class, the source (``"fashion-mnist"`` or ``"skimage"``) and the split."""

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    name: str
    split: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N] with N = {len(self.images)}, got shape {tuple(self.labels.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, batch_size: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A random batch (with replacement across calls, without within one): ``([B, C, H, W], [B])``."""
        if batch_size < 1 or batch_size > len(self):
            raise ValueError(f"batch_size must be in [1, {len(self)}], got {batch_size}")
        idx = torch.randperm(len(self), generator=generator)[:batch_size]
        return self.images[idx], self.labels[idx]

    def subset(self, num: int, *, generator: torch.Generator | None = None) -> ImageDataset:
        """A random subset of ``num`` images (all of them, in order, when ``num >= len(self)``)."""
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if num >= len(self):
            return self
        idx = torch.randperm(len(self), generator=generator)[:num]
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names, self.name, self.split)


# Modes Pillow gives 16-bit PNGs (grey); their values run to 65535, not 255.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_GREY = ("L", "1", "LA", *_SIXTEEN_BIT)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """One image file as ``[H, W, C]`` float32 in ``[0, 1]`` (``C`` = 1 for grey, 3 otherwise; alpha dropped), or
    Pillow's ``OSError`` / ``ValueError`` / ``SyntaxError``. 16-bit PNGs are scaled by ``1/65535``: converting them
    to ``L`` would clip at 255 (white)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, inside the caller's try
        if im.mode in _SIXTEEN_BIT:
            arr: np.ndarray = np.asarray(im, dtype=np.float64) / 65535.0
            return np.clip(arr, 0.0, 1.0).astype(np.float32)[..., None]
        rgb = im.convert("L" if im.mode in _GREY else "RGB")
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file (the MNIST container format; gzipped or not) as the array its header describes (``ValueError``
    for a malformed header or a payload of another size).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.idx"
        >>> _ = p.write_bytes(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
        >>> read_idx(p).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), payload has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path | None:
    return next((root / name for name in (stem, stem + ".gz") if (root / name).is_file()), None)


def fashion_mnist_available(root: str | os.PathLike[str] | None = None) -> bool:
    """Whether all four Fashion-MNIST IDX files exist under ``root``."""
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    return all(_find(root, stem) is not None for files in _FASHION_MNIST_FILES.values() for stem in files)


def load_fashion_mnist(split: str = "train", *, root: str | os.PathLike[str] | None = None, size: int = 32
                       ) -> ImageDataset:  # fmt: skip
    """Fashion-MNIST ``split`` (train: 60k, test: 10k) from the IDX files under ``root``, zero-padded (black
    background) evenly from 28x28 to ``size`` x ``size``; ``FileNotFoundError`` when the files are missing."""
    _check_split(split)
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    img_stem, lbl_stem = _FASHION_MNIST_FILES[split]
    img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({img_stem}[.gz], {lbl_stem}[.gz]) not found under {root}; "
            "install them with `apt-get install dataset-fashion-mnist` (or `make data`), or use --dataset skimage"
        )
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"inconsistent Fashion-MNIST files: images {images.shape}, labels {labels.shape}")
    h, w = images.shape[1:]
    if size < max(h, w):
        raise ValueError(f"size must be >= {max(h, w)} (the images are {h}x{w}), got {size}")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    top, left = (size - h) // 2, (size - w) // 2
    x = torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)
    return ImageDataset(x.contiguous(), torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES,
                        "fashion-mnist", split)  # fmt: skip


def _skimage_photo(name: str, channels: int) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if channels == 1 and img.ndim == 3:
        # ITU-R 601 luma, the usual grey conversion.
        img = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if channels == 3 and img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img[..., None] if img.ndim == 2 else img


def load_skimage_crops(
    split: str = "train", *, num: int | None = None, size: int = 32, channels: int = 1, seed: int = 0,
    sources: Sequence[str] = SKIMAGE_SOURCES,
) -> ImageDataset:  # fmt: skip
    """``num`` (default 20000 train, 4000 test) random ``size`` x ``size`` crops, spread evenly over the classes, of
    scikit-image's bundled photos ``sources`` (those that cannot be loaded offline skipped); the class is the photo.

    Crops are taken at half resolution (the photo downscaled 2x by averaging) so a 32 px crop
    holds some structure rather than a flat patch. Train crops lie in the top 3/4 of each photo,
    test crops in the bottom 1/4. ``seed`` fixes the crop positions and flips.
    """
    _check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 4:
        raise ValueError(f"size must be >= 4, got {size}")
    num = num if num is not None else (20000 if split == "train" else 4000)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    photos: list[tuple[str, Tensor]] = []
    for name in sources:
        try:
            img = _skimage_photo(name, channels)
        except (AttributeError, OSError, ValueError, ImportError) as e:
            if isinstance(e, ModuleNotFoundError):
                raise
            continue
        t = torch.from_numpy(img).permute(2, 0, 1).float()[None]
        t = torch.nn.functional.avg_pool2d(t, 2)[0]
        cut = (t.shape[1] * 3) // 4
        region = t[:, :cut] if split == "train" else t[:, cut:]
        if region.shape[1] < size or region.shape[2] < size:
            continue
        photos.append((name, region))
    if not photos:
        raise ValueError(f"none of the scikit-image photos {tuple(sources)} could be loaded at {size}x{size}")
    # Different streams for the two splits so test crops are not a shifted copy of train crops.
    g = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
    out = torch.empty(num, channels, size, size)
    labels = torch.arange(num) % len(photos)
    for i in range(num):
        region = photos[int(labels[i])][1]
        top = int(torch.randint(0, region.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(0, region.shape[2] - size + 1, (1,), generator=g))
        crop = region[:, top : top + size, left : left + size]
        if bool(torch.rand((), generator=g) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop
    return ImageDataset(out / 127.5 - 1.0, labels, tuple(n for n, _ in photos), "skimage", split)


def load_dataset(
    name: str = "auto", split: str = "train", *, size: int = 32, seed: int = 0, num: int | None = None,
    root: str | os.PathLike[str] | None = None,
) -> ImageDataset:  # fmt: skip
    """The dataset ``name`` (``"auto"``: Fashion-MNIST when its files exist under ``root``, else scikit-image) at side
    ``size``; ``num`` images (``None``: all) are a subset seeded by ``seed`` or, for scikit-image, the crop count.

    Example:
        >>> load_dataset("imagenet")
        Traceback (most recent call last):
        ...
        ValueError: unknown dataset 'imagenet'; choose one of fashion-mnist, skimage, auto
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    _check_split(split)
    if name == "auto":
        name = "fashion-mnist" if fashion_mnist_available(root) else "skimage"
    if name == "skimage":
        return load_skimage_crops(split, num=num, size=size, seed=seed)
    ds = load_fashion_mnist(split, root=root, size=size)
    if num is not None:
        ds = ds.subset(num, generator=torch.Generator().manual_seed(seed))
    return ds


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
