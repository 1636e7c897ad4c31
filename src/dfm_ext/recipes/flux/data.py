"""Captioned images for text-to-image finetuning: sources, aspect-ratio buckets (paper E), a bucketed plan.

A source (docs/recipes/flux.md) is a folder of images with same-name ``.txt`` captions or a JSONL file. An image
whose caption or header is missing is an error (``on_missing="skip"``: left out and counted); one that fails to
decode in training is replaced by the next image of its bucket, so a caption always travels with its own image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dfm_ext.recipes.engine.data import DECODE_ERRORS, IMAGE_EXTENSIONS, BatchPlan, collate_items

__all__ = [
    "DEFAULT_RATIOS", "AspectBuckets", "BucketBatchPlan", "CaptionScan", "CaptionedImages", "CaptionedItem", "collate_captioned",
    "load_bucket_image", "scan_captions",
]  # fmt: skip

#: Aspect ratios ``w / h`` of the default buckets: square, 4:3, 3:2, 16:9 and their portraits.
DEFAULT_RATIOS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)

_IMAGE_KEYS = ("image", "path", "file_name")
_CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class CaptionedItem:
    """One training pair: an image file and its caption."""

    path: str
    caption: str


@dataclass(frozen=True)
class CaptionScan:
    """What :func:`scan_captions` found: the usable pairs (in a deterministic order) and their ``(height, width)``,
    the images without a caption (or JSONL lines naming a missing file), the files whose header is unreadable."""

    items: list[CaptionedItem]
    missing: list[str]
    unreadable: list[str]
    sizes: list[tuple[int, int]]


def _read_pairs(source: Path) -> tuple[list[tuple[Path, str | None]], str]:
    """``(image path, caption or None)`` for a folder or a JSONL file, and a description for errors."""
    pairs: list[tuple[Path, str | None]] = []
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                txt = p.with_suffix(".txt")
                pairs.append((p, txt.read_text(encoding="utf-8").strip() if txt.is_file() else None))
        return pairs, "image without a same-name .txt caption"
    if source.is_file() and source.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{source}:{n}: expected a JSON object, got {type(record).__name__}")
            image = next((record[k] for k in _IMAGE_KEYS if k in record), None)
            caption = next((record[k] for k in _CAPTION_KEYS if k in record), None)
            if not isinstance(image, str) or not isinstance(caption, str):
                raise ValueError(
                    f"{source}:{n}: needs a string image path (one of {list(_IMAGE_KEYS)}) and a string "
                    f"caption (one of {list(_CAPTION_KEYS)}); got keys {sorted(record)}"
                )
            path = Path(image).expanduser()
            pairs.append((path if path.is_absolute() else source.parent / path, caption.strip()))
        return pairs, "JSONL line naming a missing image file"
    raise FileNotFoundError(f"data source {str(source)!r} is neither a folder of images nor a .jsonl file")


def scan_captions(source: str | Path, *, on_missing: Literal["error", "skip"] = "error") -> CaptionScan:
    """Pair every image with its caption and read its size (``ValueError`` for a malformed source or no usable pair)."""
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    source = Path(source).expanduser()
    pairs, what = _read_pairs(source)
    if not pairs:
        raise ValueError(f"{source}: no images (extensions {IMAGE_EXTENSIONS})")
    items, missing, unreadable, sizes = [], [], [], []
    for path, caption in pairs:
        if caption is None or not path.is_file():
            missing.append(str(path))
            continue
        try:
            with Image.open(path) as im:  # the size from the header, as displayed: EXIF rotations 5-8 swap the sides
                (w, h), rotated = im.size, im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except DECODE_ERRORS:
            unreadable.append(str(path))
            continue
        items.append(CaptionedItem(str(path), caption))
        sizes.append((w, h) if rotated else (h, w))
    if missing and on_missing == "error":
        raise ValueError(
            f"{source}: {len(missing)} {what}(s), e.g. {missing[:3]}; fix the data or set "
            "data.on_missing=skip to leave them out (they are counted)"
        )
    if not items:
        raise ValueError(f"{source}: no usable captioned images ({len(missing)} missing, {len(unreadable)} unreadable)")
    return CaptionScan(items, missing, unreadable, sizes)


@dataclass(frozen=True)
class AspectBuckets:
    """For every base side ``R`` in ``resolutions`` and aspect ratio ``a = w / h`` in ``ratios``, a bucket ``(h, w)``
    with ``h w ~ R^2``, both sides multiples of ``multiple`` (VAE x patching x the decomposition's factors).

    Example:
        >>> b = AspectBuckets(resolutions=(512,), ratios=(1.0, 16 / 9), multiple=64)
        >>> b.shapes
        ((512, 512), (384, 704))
        >>> b.assign(1080, 1920), b.assign(300, 300)
        ([1], [])
    """

    resolutions: tuple[int, ...] = (512, 1024)
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    multiple: int = 64
    shapes: tuple[tuple[int, int], ...] = field(init=False)
    resolution_of: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.resolutions or any(int(r) < self.multiple for r in self.resolutions):
            raise ValueError(f"resolutions must be non-empty and each >= multiple={self.multiple}, got {self.resolutions}")
        if self.multiple < 1 or not self.ratios or any(not r > 0 for r in self.ratios):
            raise ValueError(f"multiple must be >= 1 and ratios positive, got {self.multiple}, {self.ratios}")
        owner: dict[tuple[int, int], int] = {}  # every bucket's shape -> the resolution that made it first
        m = self.multiple
        for res in self.resolutions:
            for a in self.ratios:
                h, w = max(m, round(res / math.sqrt(a) / m) * m), max(m, round(res * math.sqrt(a) / m) * m)
                owner.setdefault((h, w), int(res))
        object.__setattr__(self, "shapes", tuple(owner))
        object.__setattr__(self, "resolution_of", tuple(owner.values()))

    def assign(self, height: int, width: int, *, min_area_fraction: float = 1.0) -> list[int]:
        """Bucket ids of an image: per resolution ``R`` with ``height * width >= min_area_fraction * R^2`` (``1``: never
        upsample), the nearest aspect ratio in log space."""
        out = []
        ratio = math.log(width / height)
        for res in dict.fromkeys(self.resolution_of):
            if height * width < min_area_fraction * res * res:
                continue
            ids = [i for i, r in enumerate(self.resolution_of) if r == res]
            out.append(min(ids, key=lambda i: abs(math.log(self.shapes[i][1] / self.shapes[i][0]) - ratio)))
        return out


def load_bucket_image(path: str, shape: tuple[int, int]) -> Tensor:
    """Decode, resize to cover ``shape = (h, w)``, centre crop: ``[3, h, w]`` in ``[-1, 1]``."""
    h, w = shape
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = max(h / im.height, w / im.width)
        size = (max(w, math.ceil(im.width * scale)), max(h, math.ceil(im.height * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        arr = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


class CaptionedImages(torch.utils.data.Dataset):
    """``entries``: ``(item index, bucket id)`` for every bucket :meth:`AspectBuckets.assign` gives an image; items
    keyed by ``(index, flip)``: ``pixels [3, h, w]`` in ``[-1, 1]`` (covering the bucket, centre cropped), ``caption``,
    ``bucket``, ``index`` (the entry read), ``bad``; ``bucket_of``: what :class:`BucketBatchPlan` groups by."""

    #: No precomputed text embeddings (a :class:`~dfm_ext.recipes.flux.cache.FluxCache` has the empty prompt's).
    empty_text = None

    def __init__(
        self, source: str | Path, buckets: AspectBuckets, *, on_missing: Literal["error", "skip"] = "error", min_area_fraction: float = 1.0,
        max_skips: int = 64,
    ) -> None:  # fmt: skip
        scan = scan_captions(source, on_missing=on_missing)
        self.source, self.buckets, self.max_skips, self.items = str(source), buckets, int(max_skips), scan.items
        self.entries: list[tuple[int, int]] = []
        too_small = 0
        for i, (h, w) in enumerate(scan.sizes):
            ids = buckets.assign(h, w, min_area_fraction=min_area_fraction)
            too_small += not ids
            self.entries.extend((i, b) for b in ids)
        if not self.entries:
            raise ValueError(
                f"{source}: none of {len(self.items)} images is large enough for buckets {buckets.shapes} "
                f"(min_area_fraction={min_area_fraction})"
            )
        self.bucket_of: tuple[int, ...] = tuple(b for _, b in self.entries)
        self.members: dict[int, list[int]] = {}  # bucket -> its entries, in order
        for j, b in enumerate(self.bucket_of):
            self.members.setdefault(b, []).append(j)
        # The entry read instead of j when j fails to decode: the next one in j's bucket.
        self._next = [0] * len(self.entries)
        for js in self.members.values():
            for j, after in zip(js, js[1:] + js[:1]):
                self._next[j] = after
        self.stats = {"images": len(self.items), "entries": len(self.entries), "missing_captions": len(scan.missing),
                      "unreadable": len(scan.unreadable), "too_small": too_small}  # fmt: skip

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        index, flip = (key, False) if isinstance(key, (int, np.integer)) else key
        index = int(index)
        bad: list[int] = []
        for _ in range(min(self.max_skips, len(self.entries))):
            item, bucket = self.items[self.entries[index][0]], self.entries[index][1]
            try:
                pixels = load_bucket_image(item.path, self.buckets.shapes[bucket])
            except DECODE_ERRORS:
                bad.append(index)
                index = self._next[index]
                continue
            if flip:
                pixels = pixels.flip(-1)
            return {"pixels": pixels, "caption": item.caption, "bucket": bucket, "index": index, "bad": bad}
        raise RuntimeError(
            f"{len(bad)} consecutive unreadable images in bucket {self.buckets.shapes[self.bucket_of[bad[0]]]}, "
            f"starting at {self.items[self.entries[bad[0]][0]].path!r}"
        )


@dataclass(frozen=True)
class BucketBatchPlan(BatchPlan):
    """A :class:`BatchPlan` whose every global batch comes from one bucket (``buckets``: the id of every index).

    Per epoch (seeded by ``(seed, epoch)``) each bucket's members are shuffled and cut into
    ``ceil(n_b / G)`` global batches (the last wrapping around to the bucket's start), and all
    buckets' batches are shuffled together: a step's data still depend only on ``(seed, step)``.

    Example:
        >>> plan = BucketBatchPlan(6, 2, seed=0, buckets=(0, 0, 0, 1, 1, 1))
        >>> all(len({plan.buckets[i] for i, _ in plan.global_batch(s)}) == 1 for s in range(10))
        True
    """

    buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.buckets) != self.num_items:
            raise ValueError(f"buckets has {len(self.buckets)} entries for num_items={self.num_items}")
        members = {b: np.flatnonzero(np.asarray(self.buckets) == b) for b in sorted(set(self.buckets))}
        object.__setattr__(self, "_members", members)
        object.__setattr__(self, "_cache", {})

    @property
    def steps_per_epoch(self) -> int:
        g = self.global_batch_size
        members: dict[int, np.ndarray] = self._members  # type: ignore[attr-defined]
        return sum(math.ceil(len(m) / g) for m in members.values())

    def _epoch_batches(self, epoch: int) -> list[list[tuple[int, bool]]]:
        cache: dict[int, Any] = self._cache  # type: ignore[attr-defined]
        if epoch not in cache:
            rng = np.random.default_rng([self.seed, epoch])
            g = self.global_batch_size
            flips = rng.integers(0, 2, self.num_items).astype(bool) if self.random_flip else np.zeros(self.num_items, bool)
            batches = []
            for m in self._members.values():  # type: ignore[attr-defined]
                perm = rng.permutation(m)
                for k in range(math.ceil(len(perm) / g)):
                    idx = perm[np.arange(k * g, (k + 1) * g) % len(perm)]
                    batches.append([(int(i), bool(flips[i])) for i in idx])
            order = rng.permutation(len(batches))
            cache.clear()  # one epoch at a time: steps are read in order
            cache[epoch] = [batches[i] for i in order]
        return cache[epoch]

    def global_batch(self, step: int) -> list[tuple[int, bool]]:
        epoch, j = divmod(step, self.steps_per_epoch)
        return list(self._epoch_batches(epoch)[j])


def collate_captioned(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's items (``pixels`` or ``latents`` of one shape, else ``ValueError``), captions as a list."""
    for key in ("pixels", "latents"):
        if key in items[0]:
            shapes = {tuple(it[key].shape) for it in items}
            if len(shapes) > 1:
                raise ValueError(f"a batch mixes {key} shapes {sorted(shapes)}; batches must come from one bucket")
    return collate_items(items)
