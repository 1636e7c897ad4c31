"""Image folders and a resumable, deterministic global-batch plan.

``ImageFolder`` reads an ImageNet-style tree (``root/<class>/<image>``) with Pillow: resize the
short side, centre crop, optional horizontal flip (decided by the plan, not by a global RNG).
A file that cannot be decoded is skipped: the item falls back to the next index and reports the
bad index so that the trainer can count skips across data-loader workers.

``BatchPlan`` decides what every process sees at every step. The data is an endless stream of
per-epoch permutations (seeded by ``seed`` and the epoch); optimiser step ``k`` consumes stream
positions ``[k*G, (k+1)*G)`` for a global batch ``G``, split into ``world_size * accumulation``
equal micro-batches; process ``r`` takes micro-batches ``r*A .. r*A + A - 1``. So the training
data depend only on ``(seed, step)``: resuming at step ``k`` needs nothing but ``k``, and one
process with accumulation ``A*W`` sees the same global batches as ``W`` processes with ``A``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = ["BatchPlan", "ImageFolder", "collate_items", "scan_image_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def scan_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` for every image file under ``root/<class>/``, and the sorted class names.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no class folders or no image files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} does not exist or is not a folder")
    return scan_class_folders(root, IMAGE_EXTENSIONS)


def scan_class_folders(
    root: Path, extensions: Sequence[str], *, what: str = "data root", item: str = "image"
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` for every file under ``root/<class>/`` (recursively) with one of ``extensions``.

    Classes are the sorted names of the non-hidden subfolders; ``what`` and ``item`` name the
    folder and its files in the messages.

    Raises:
        ValueError: no class folders or no matching files.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{what} {str(root)!r} has no class subfolders (expected root/<class>/<{item}>)")
    items = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in extensions:
                items.append((str(p), label))
    if not items:
        raise ValueError(f"{what} {str(root)!r} has class folders but no {item}s with extensions {extensions}")
    return items, classes


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: str, resolution: int) -> Tensor:
    """Decode, resize the short side to ``resolution``, centre crop: ``[3, R, R]`` in ``[-1, 1]``."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in _SIXTEEN_BIT:  # convert("RGB") would clip 16-bit values at 255 (white)
            im = Image.fromarray(np.round(np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8))
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageFolder(torch.utils.data.Dataset):
    """An ImageNet-style folder of class subfolders; corrupt files are skipped, not fatal.

    Items are keyed by ``(index, flip)`` pairs (what :class:`BatchPlan` yields) or plain ints.
    Each item is a dict ``pixels [3, R, R]`` in ``[-1, 1]``, ``label`` (int), ``index`` (the
    index actually read) and ``bad`` (list of indices that failed to decode on the way).

    Args:
        root: folder with one subfolder per class.
        resolution: output side ``R`` in pixels.
        max_skips: how many consecutive unreadable files to skip before giving up.
    """

    def __init__(self, root: str | Path, resolution: int, *, max_skips: int = 64) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.root = str(root)
        self.resolution = int(resolution)
        self.max_skips = int(max_skips)
        self.items, self.classes = scan_image_folder(root)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, index: int) -> Tensor:
        return load_image(self.items[index][0], self.resolution)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        return read_with_fallback(self.items, key, self._read, DECODE_ERRORS, max_skips=self.max_skips, what="images")


def read_with_fallback(
    items: Sequence[tuple[str, int]],
    key: int | tuple[int, bool],
    read: Callable[[int], Tensor],
    errors: tuple[type[BaseException], ...],
    *,
    max_skips: int,
    what: str,
) -> dict[str, Any]:
    """Item ``key`` (``index`` or ``(index, flip)``) of ``(path, label)`` items whose pixels ``read(index)`` loads.

    An index whose read raises one of ``errors`` falls back to the next index (wrapping), up to
    ``max_skips`` tries; the item lists the failed indices in ``bad`` so that the trainer can
    count skips across data-loader workers.

    Raises:
        RuntimeError: ``max_skips`` consecutive unreadable ``what`` (e.g. ``"images"``).
    """
    index, flip = (key, False) if isinstance(key, (int, np.integer)) else key
    index = int(index)
    bad: list[int] = []
    for _ in range(min(max_skips, len(items))):
        try:
            pixels = read(index)
        except errors:
            bad.append(index)
            index = (index + 1) % len(items)
            continue
        if flip:
            pixels = pixels.flip(-1)
        return {"pixels": pixels, "label": items[index][1], "index": index, "bad": bad}
    raise RuntimeError(f"{len(bad)} consecutive unreadable {what} starting at {items[bad[0]][0]!r}; is the data folder corrupt?")


def collate_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn ints into a LongTensor, concatenate the ``bad`` lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "bad":
            out[key] = [b for v in values for b in v]
        elif isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)):
            out[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            out[key] = values
    return out


@dataclass(frozen=True)
class BatchPlan:
    """Which ``(index, flip)`` pairs each process reads at each step; depends only on the step.

    Args:
        num_items: dataset length ``N``.
        global_batch_size: samples per optimiser step over all processes ``G``.
        world_size: number of processes ``W``.
        accumulation: micro-batches per process per step ``A``; ``G`` must divide by ``W*A``.
        seed: seeds the per-epoch permutations and flips.
        random_flip: whether half the items are mirrored.

    Example:
        >>> one = BatchPlan(10, 4, world_size=1, accumulation=2, seed=0)
        >>> two = [BatchPlan(10, 4, world_size=2, accumulation=1, seed=0, rank=r) for r in (0, 1)]
        >>> one.micro_batches(3) == two[0].micro_batches(3) + two[1].micro_batches(3)
        True
    """

    num_items: int
    global_batch_size: int
    world_size: int = 1
    accumulation: int = 1
    seed: int = 0
    random_flip: bool = False
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("num_items", "global_batch_size", "world_size", "accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size - 1}], got {self.rank}")
        shards = self.world_size * self.accumulation
        if self.global_batch_size % shards:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be divisible by "
                f"world_size * accumulation = {self.world_size} * {self.accumulation}"
            )

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.world_size * self.accumulation)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_items)
        flips = rng.integers(0, 2, self.num_items).astype(bool) if self.random_flip else np.zeros(self.num_items, bool)
        return order, flips

    def global_batch(self, step: int) -> list[tuple[int, bool]]:
        """The ``G`` ``(index, flip)`` pairs of optimiser step ``step`` (all processes)."""
        start = step * self.global_batch_size
        out: list[tuple[int, bool]] = []
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for pos in range(start, start + self.global_batch_size):
            epoch, offset = divmod(pos, self.num_items)
            if epoch not in cache:
                cache[epoch] = self._epoch(epoch)
            order, flips = cache[epoch]
            idx = int(order[offset])
            out.append((idx, bool(flips[idx])))
        return out

    def shard_index(self, micro: int) -> int:
        """Global index of this process's micro-batch ``micro``: ``rank * A + micro``."""
        return self.rank * self.accumulation + micro

    def micro_batches(self, step: int) -> list[list[tuple[int, bool]]]:
        """This process's ``A`` micro-batches for step ``step``."""
        batch = self.global_batch(step)
        b = self.micro_batch_size
        return [batch[self.shard_index(m) * b : (self.shard_index(m) + 1) * b] for m in range(self.accumulation)]

    def sampler(self, start_step: int, end_step: int) -> Iterator[list[tuple[int, bool]]]:
        """Micro-batches for steps ``start_step .. end_step - 1``, in order (a batch sampler)."""
        for step in range(start_step, end_step):
            yield from self.micro_batches(step)


class PlanBatchSampler(torch.utils.data.Sampler):
    """A ``DataLoader`` batch sampler over :meth:`BatchPlan.sampler` (sized for tqdm)."""

    def __init__(self, plan: BatchPlan, start_step: int, end_step: int) -> None:
        self.plan, self.start_step, self.end_step = plan, start_step, end_step

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        return self.plan.sampler(self.start_step, self.end_step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.plan.accumulation
