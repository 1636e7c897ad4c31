"""Input handling shared by the metrics: batches of images, value ranges, set-shape checks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSource",
    "SetShapes",
    "check_images",
    "default_generator",
    "iter_batches",
    "load_state_dict_file",
    "num_batches",
    "progress",
    "to_network_input",
    "to_unit_range",
]

#: What the functional metrics accept for a set of images: one tensor ``[N, C, H, W]`` (split
#: into batches), or an iterable of batches ``[B, C, H, W]`` (a batch may also be a tuple or list
#: whose first element is the image tensor, as a ``DataLoader`` over a ``TensorDataset`` yields).
ImageSource = Union[Tensor, Iterable[Tensor], Iterable[tuple]]


def check_images(images: Tensor, *, name: str = "images") -> Tensor:
    """Check a batch of images ``[B, C, H, W]`` (floating point, 1 or 3 channels) and return it."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (scale uint8 images to [0, 1] first), got dtype {images.dtype}"
        )
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 (grey) or 3 (RGB) channels, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: shape {tuple(images.shape)}")
    return images


def iter_batches(source: ImageSource, batch_size: int, *, name: str) -> Iterator[Tensor]:
    """Yield image batches from a tensor ``[N, C, H, W]`` or an iterable of batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, Tensor):
        check_images(source, name=name)
        yield from source.split(batch_size)
        return
    if not isinstance(source, Iterable):
        raise TypeError(f"{name} must be a tensor [N, C, H, W] or an iterable of batches, got {type(source).__name__}")
    for batch in source:
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"{name} yielded an empty {type(batch).__name__}")
            batch = batch[0]
        yield check_images(batch, name=f"a batch of {name}")


def num_batches(source: ImageSource, batch_size: int) -> int | None:
    """Number of batches ``iter_batches`` will yield, when it can be known (for the progress bar)."""
    if isinstance(source, Tensor):
        return -(-source.shape[0] // batch_size)
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return None


def to_unit_range(images: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Map images from ``value_range`` to ``[0, 1]``, clamping overshoot (as saving to uint8 would).

    Values far outside ``value_range`` (more than one range-width beyond it) mean the range is
    wrong, e.g. ``[0, 255]`` images passed with ``value_range=(-1, 1)``; that raises.
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    width = hi - lo
    vmin, vmax = float(images.min()), float(images.max())
    if vmin < lo - width or vmax > hi + width:
        raise ValueError(
            f"images span [{vmin:.3g}, {vmax:.3g}], far outside value_range={value_range}; pass the right value_range"
        )
    return ((images - lo) / width).clamp(0.0, 1.0)


class SetShapes:
    """Remembers the ``[C, H, W]`` of the real and the fake set and refuses mismatches."""

    def __init__(self) -> None:
        self.shapes: dict[bool, tuple[int, ...]] = {}

    def check(self, images: Tensor, real: bool) -> None:
        """Validate a batch (:func:`check_images`) and the ``real`` flag, then its shape against the sets'."""
        check_images(images)
        if not isinstance(real, bool):
            raise TypeError(f"real must be a bool, got {type(real).__name__}")
        which = "real" if real else "fake"
        shape = tuple(images.shape[1:])
        other = self.shapes.get(not real)
        if other is not None and other != shape:
            real_shape, fake_shape = (shape, other) if real else (other, shape)
            raise ValueError(
                f"real and fake images differ in size or channels: real [C, H, W] = {list(real_shape)}, "
                f"fake [C, H, W] = {list(fake_shape)}"
            )
        own = self.shapes.get(real)
        if own is not None and own != shape:
            raise ValueError(
                f"{which} images changed shape within the set: [C, H, W] = {list(own)} before, {list(shape)} now"
            )
        self.shapes[real] = shape


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: int | None) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """A fresh CPU generator seeded with 0 when none is given, so results repeat run to run."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


#: ImageNet channel statistics (RGB), the normalisation ImageNet-trained torch models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_network_input(
    images: Tensor,
    *,
    resolution: int | tuple[int, int] | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    mode: str = "bilinear",
) -> Tensor:
    """``[0, 1]`` images ``[B, 1 or 3, H, W]`` -> normalised RGB float32 ``[B, 3, h, w]`` at ``resolution``.

    Grey images are repeated to three channels; resizing is antialiased so that downsampling
    averages instead of aliasing.
    """
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resolution is not None:
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict (name -> tensor)")
    return state
