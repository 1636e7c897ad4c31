"""What a step reads: the batch plan, image folders, latents (a VAE codec or a latent cache), model inputs.
Items are keyed by ``(index, flip)``; an undecodable file is skipped, listed in the item's ``bad`` (counted)."""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from torch import Tensor

from dfm_ext.decompositions.base import Decomposition
from dfm_ext.process.objective import DFMLossOutput
from dfm_ext.process.reducible import stage_errors
from dfm_ext.process.timesteps import StageTimesteps, StageTimestepSampler
from dfm_ext.recipes.engine.config import check_fields
from dfm_ext.recipes.engine.latents import check_cache_metadata

__all__ = [
    "BatchPlan", "ClassConditionalInputs", "Codec", "ImageFolder", "LatentCache", "LatentCodec", "PlanBatchSampler", "class_folders", "collate_items",
    "cycled_labels", "dropout_mask", "load_image", "read_with_fallback", "scan_class_folders", "scan_image_folder", "stage_generator",
]  # fmt: skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def scan_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` for every image file under ``root/<class>/``, and the sorted class names."""
    return scan_class_folders(root, IMAGE_EXTENSIONS)


def scan_class_folders(
    root: str | Path, extensions: Sequence[str], *, what: str = "data root", item: str = "image"
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` for every file under ``root/<class>/`` (recursively) with one of ``extensions``, and the
    sorted class names (non-hidden subfolders); ``what`` and ``item`` name the folder and its files in messages."""
    root = Path(root)
    classes = class_folders(root, what=what, item=item)
    items = [(str(p), label) for label, name in enumerate(classes) for p in sorted((root / name).rglob("*"))
             if p.is_file() and p.suffix.lower() in extensions]  # fmt: skip
    if not items:
        raise ValueError(f"{what} {str(root)!r} has class folders but no {item}s with extensions {extensions}")
    return items, classes


def class_folders(root: str | Path, *, what: str = "data root", item: str = "image") -> list[str]:
    """The sorted class names under ``root`` (non-hidden subfolders); one listing of ``root`` only."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {str(root)!r} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{what} {str(root)!r} has no class subfolders (expected root/<class>/<{item}>)")
    return classes


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
    """``root/<class>/<image>`` read with Pillow (:func:`load_image`): items ``pixels [3, R, R]`` in ``[-1, 1]``,
    ``label``, ``index`` (the one read) and ``bad``; ``max_skips`` consecutive unreadable files end the run.
    ``scan``: list the files now (default: on ``RANK`` 0 only; the others get the list by :meth:`share_scan`
    when the trainer starts, or scan on first use)."""

    def __init__(self, root: str | Path, resolution: int, *, max_skips: int = 64, scan: bool | None = None) -> None:
        self.root, self.resolution, self.max_skips = str(root), int(resolution), int(max_skips)
        self._items: list[tuple[str, int]] | None = None
        if scan if scan is not None else os.environ.get("RANK", "0") == "0":
            self._items, self.classes = scan_image_folder(root)
        else:
            self.classes = class_folders(root)

    @property
    def items(self) -> list[tuple[str, int]]:
        """``(path, label)`` of every image, sorted by class then path."""
        if self._items is None:
            self._items, self.classes = scan_image_folder(self.root)
        return self._items

    def share_scan(self, is_main: bool, broadcast: Callable[[list[Any]], list[Any]]) -> None:
        """The main process's file list to every process (``broadcast``: ``accelerate.utils.broadcast_object_list``);
        sent as file names relative to their class folder."""
        prefixes = [str(Path(self.root) / c) + os.sep for c in self.classes]
        payload: list[Any] = [None]
        if is_main:
            payload[0] = [[p[len(prefixes[label]) :] for p, label in self.items if label == k] for k in range(len(self.classes))]
        names = broadcast(payload)[0]
        if not is_main:
            self._items = [(prefixes[k] + name, k) for k, group in enumerate(names) for name in group]

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> Tensor:
        """The image ``index`` (raises on an unreadable file; no fall-back)."""
        return load_image(self.items[index][0], self.resolution)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        return read_with_fallback(self.items, key, self.read, DECODE_ERRORS, max_skips=self.max_skips, what="images")


def read_with_fallback(
    items: Sequence[tuple[str, int]], key: int | tuple[int, bool], read: Callable[[int], Tensor],
    errors: tuple[type[BaseException], ...], *, max_skips: int, what: str,
) -> dict[str, Any]:  # fmt: skip
    """Item ``key`` (``index`` or ``(index, flip)``) of ``(path, label)`` items whose pixels ``read(index)`` loads;
    a read raising one of ``errors`` falls back to the next index (at most ``max_skips`` times), listed in ``bad``."""
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
    """Which ``(index, flip)`` pairs each process reads at each step; depends only on ``(seed, step)``.

    The data are an endless stream of per-epoch permutations (and flips) seeded by ``(seed, epoch)``;
    step ``k`` takes positions ``[k G, (k + 1) G)``, split into ``W A`` equal micro-batches (``W``
    processes, ``A`` accumulation), process ``r`` taking ``r A .. r A + A - 1``. So one process with
    accumulation ``W A`` sees the global batches of ``W`` processes with ``A``.

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
        counts = ("num_items", "global_batch_size", "world_size", "accumulation")
        check_fields(self, "", [(name, getattr(self, name) >= 1, ">= 1") for name in counts])
        check_fields(self, "", [("rank", 0 <= self.rank < self.world_size, f"in [0, {self.world_size - 1}]")])
        if self.global_batch_size % (self.world_size * self.accumulation):
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be divisible by "
                f"world_size * accumulation = {self.world_size} * {self.accumulation}"
            )

    def global_batch(self, step: int) -> list[tuple[int, bool]]:
        """The ``G`` ``(index, flip)`` pairs of optimiser step ``step`` (all processes); ``O(G)`` host work whatever
        the dataset size, as each epoch's permutation and flips are drawn once and kept."""
        start, end, n = step * self.global_batch_size, (step + 1) * self.global_batch_size, self.num_items
        out: list[tuple[int, bool]] = []
        for epoch in range(start // n, (end - 1) // n + 1):  # the epochs positions [start, end) fall in
            order, flips = self._epoch(epoch)
            idx = order[max(start - epoch * n, 0) : min(end - epoch * n, n)]
            out += zip(idx.tolist(), flips[idx].tolist())
        return out

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s permutation ``[N]`` and flips ``[N]`` (drawn from ``(seed, epoch)``; cached)."""
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = self.__dict__.setdefault("_epochs", {})
        if epoch not in cache:
            n = self.num_items
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            cache[epoch] = order, rng.integers(0, 2, n).astype(bool) if self.random_flip else np.zeros(n, bool)
            while len(cache) > 2:  # steps are read in order: the previous epoch at most
                del cache[next(iter(cache))]
        return cache[epoch]

    def shard_index(self, micro: int) -> int:
        """Global index of this process's micro-batch ``micro``: ``rank * A + micro``."""
        return self.rank * self.accumulation + micro

    def micro_batches(self, step: int) -> list[list[tuple[int, bool]]]:
        """This process's ``A`` micro-batches for step ``step``."""
        batch, b = self.global_batch(step), self.global_batch_size // (self.world_size * self.accumulation)
        return [batch[self.shard_index(m) * b : (self.shard_index(m) + 1) * b] for m in range(self.accumulation)]


class PlanBatchSampler(torch.utils.data.Sampler):
    """A ``DataLoader`` batch sampler: this process's micro-batches of steps ``start_step .. end_step - 1``, in order."""

    def __init__(self, plan: BatchPlan, start_step: int, end_step: int) -> None:
        self.plan, self.start_step, self.end_step = plan, start_step, end_step

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for step in range(self.start_step, self.end_step):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.plan.accumulation


class Codec(Protocol):
    """Pixels ``[B, C, ...]`` in ``[-1, 1]`` <-> the latents a model trains on (a VAE's, or the pixels themselves)."""

    def encode(self, pixels: Tensor, *, generator: torch.Generator | None = None) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class LatentCodec:
    """Pixels ``[B, 3, ...]`` in ``[-1, 1]`` <-> normalised latents ``z = (vae_latent - shift) * scale`` of a diffusers
    autoencoder; ``scale`` / ``shift`` ``None``: its config's (1 / 0 when absent); ``sample``: from the posterior."""

    vae: Any
    scale: float | None = None
    shift: float | None = None
    sample: bool = False

    @property
    def scaling(self) -> float:
        return float(self.scale if self.scale is not None else getattr(self.vae.config, "scaling_factor", None) or 1.0)

    @property
    def shifting(self) -> float:
        return float(self.shift if self.shift is not None else getattr(self.vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, pixels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if self.sample else dist.mode()
        return (z.float() - self.shifting) * self.scaling

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents / self.scaling + self.shifting
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


class LatentCache(torch.utils.data.Dataset):
    """A latent cache (:mod:`~dfm_ext.recipes.engine.latents`): items ``latents [C, ...]`` (float32), ``label``,
    ``index``, ``bad`` (empty); refused when its metadata disagree with ``expected`` (``rebuild``: the command that builds it)."""

    def __init__(self, path: str | Path, expected: dict[str, Any] | None = None, *, rebuild: str = "python -m dfm_ext.recipes.imagenet.cache") -> None:
        self.path = Path(path)
        index = self.path / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"no latent cache at {str(self.path)!r} (index.json missing: not built or unfinished)")
        self.meta = json.loads(index.read_text())
        check_cache_metadata(self.meta, expected or {}, path=str(self.path), rebuild=rebuild)
        self._starts = [s["start"] for s in self.meta["shards"]]
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.meta["num_items"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        index, flip = (key, False) if isinstance(key, int) else key
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)}")
        s = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[s]
        if s not in self._handles:  # one handle per shard and worker process: safe_open reads slices lazily (mmap)
            self._handles[s] = safe_open(str(self.path / self.meta["shards"][s]["file"]), framework="pt")
        f = self._handles[s]
        name = "latents_flipped" if flip and self.meta.get("flipped", False) else "latents"
        latents = f.get_slice(name)[local : local + 1][0].float()
        label = int(f.get_slice("labels")[local : local + 1][0])
        return {"latents": latents, "label": label, "index": index, "bad": []}


def dropout_mask(n: int, p: float, *, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[n]`` bools, each true with probability ``p``, drawn from the step's ``generator``.

    Example:
        >>> dropout_mask(4, 0.0, generator=torch.Generator(), device=torch.device("cpu")).tolist()
        [False, False, False, False]
    """
    # Drawn on the generator's device and moved, so the draw is the same wherever the model runs.
    return torch.rand(n, generator=generator, device=generator.device).to(device) < p


def stage_generator(generator: torch.Generator) -> np.random.Generator:
    """The host generator a step draws its current stages from, seeded by the step generator's seed (a host value:
    nothing is read from the device), so the draw is the same on any device and any number of processes.

    Example:
        >>> g = torch.Generator().manual_seed(7)
        >>> bool(stage_generator(g).integers(0, 2**30) == stage_generator(g).integers(0, 2**30))
        True
    """
    return np.random.default_rng([generator.initial_seed(), 0x57A6E])


def cycled_labels(classes: Sequence[int] | None, n: int, num_classes: int, device: torch.device) -> Tensor:
    """``n`` sample labels cycling through ``classes`` (default: the first ``min(n, num_classes)``).

    Example:
        >>> cycled_labels((3, 5), 5, 10, torch.device("cpu")).tolist()
        [3, 5, 3, 5, 3]
    """
    classes = classes or tuple(range(min(n, num_classes)))
    return torch.tensor([classes[i % len(classes)] for i in range(n)], device=device)


class ClassConditionalInputs:
    """The class-conditional recipes' inputs from their config ``cfg``: pixels (encoded by ``load_codec(cfg, device)``)
    or cached latents, the decomposition's stages, stage times and labels."""

    def __init__(self, cfg: Any, load_codec: Callable[[Any, torch.device], Codec]) -> None:
        self.cfg, self._load_codec = cfg, load_codec
        self._codec: Codec | None = None
        self.random_flip = cfg.data.random_flip
        self.decomposition: Decomposition = cfg.decomposition.build()
        self.timesteps: StageTimestepSampler = cfg.dfm.timestep_sampler(self.decomposition.num_stages)
        self.null_class, self.label_dropout = cfg.data.num_classes, cfg.dfm.label_dropout

    def codec(self, device: torch.device) -> Codec:
        """The pixels <-> latents codec, loaded on first use."""
        if self._codec is None:
            self._codec = self._load_codec(self.cfg, device)
        return self._codec

    def state(self) -> dict[str, Any]:
        """The stage allocation, when it adapts (checkpointed with the run)."""
        return {"timesteps": self.timesteps} if self.timesteps.allocation is not None else {}

    def feed_allocation(self, out: DFMLossOutput, timesteps: StageTimesteps) -> None:
        """One micro-batch's losses to ``dfm.allocation`` (per-sample errors only where it reads them); a no-op for
        fixed probabilities. Tensor operations only: no host read in the step."""
        errors = stage_errors(out) if getattr(self.timesteps.allocation, "needs_samples", False) else None
        self.timesteps.update(out.per_stage, timesteps=timesteps, errors=errors)

    def training_inputs(self, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> tuple[list[Tensor], StageTimesteps, Tensor]:
        """A step's stages, stage times and labels (each dropped to the null class with probability ``label_dropout``),
        drawn from ``generator`` in a fixed order (posterior sample, times, dropout) that exact resume relies on."""
        if "latents" in batch:
            z = batch["latents"].to(device, non_blocking=True)
        else:
            z = self.codec(device).encode(batch["pixels"].to(device, non_blocking=True), generator=generator)
        stages = self.decomposition.decompose(z)
        ts = self.timesteps.sample(z.shape[0], generator=generator, device=device, stage_generator=stage_generator(generator))
        labels = batch["label"].to(device, non_blocking=True)
        drop = dropout_mask(labels.shape[0], self.label_dropout, generator=generator, device=labels.device)
        return stages, ts, torch.where(drop, torch.full_like(labels, self.null_class), labels)
