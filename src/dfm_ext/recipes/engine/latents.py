"""VAEs and latent caches: load a frozen diffusers autoencoder; encode a dataset once, train without the VAE.

A cache (built by a recipe's cache command, read by :class:`~dfm_ext.recipes.engine.data.LatentCache`)::

    index.json                 metadata (VAE, resolution, normalisation, latent shape, classes, shards); written last
    shard-00000.safetensors    "latents" [n, C, ...], "labels" [n] (int64), "latents_flipped" when built with flips
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from dfm_ext.fileio import atomic_write_text

__all__ = [
    "CACHE_FORMAT", "CacheMismatchError", "CacheOptions", "SkipUnreadable", "check_cache_labels", "check_cache_metadata", "encode_class_cache",
    "load_vae", "looks_local", "write_latent_cache",
]  # fmt: skip

#: The format tag of a latent cache's ``index.json``.
CACHE_FORMAT = "dfm_ext.latent_cache/1"


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local folder rather than a hub id.

    Example:
        >>> looks_local("./models/vae"), looks_local("black-forest-labs/FLUX.1-dev")
        (True, False)
    """
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def load_vae(
    path: str, subfolder: str | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    cls: Any = None, what: str = "VAE",
) -> Any:  # fmt: skip
    """``cls.from_pretrained(path, subfolder=...)`` (default ``AutoencoderKL``, called ``what`` in errors), frozen, in eval mode."""
    if cls is None:
        from diffusers import AutoencoderKL

        cls = AutoencoderKL
    local = looks_local(path)
    root = Path(path).expanduser()
    if local and not (root / (subfolder or "") / "config.json").is_file():
        raise FileNotFoundError(f"no {what} at {str(root / (subfolder or ''))!r} (expected a diffusers folder with config.json)")
    vae = cls.from_pretrained(str(root) if local else path, subfolder=subfolder or None, torch_dtype=dtype)
    vae.requires_grad_(False)
    return vae.eval().to(device)


class CacheMismatchError(ValueError):
    """The latent cache was built for another VAE, resolution or normalisation."""


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(have, (int, float)):
        return abs(have - want) <= 1e-6 * max(1.0, abs(want))
    if isinstance(want, list) and isinstance(have, list):
        return len(want) == len(have) and all(_same(h, w) for h, w in zip(have, want))
    return have == want


def check_cache_metadata(
    meta: dict[str, Any], expected: dict[str, Any], *, path: str = "cache", fmt: str = CACHE_FORMAT, what: str = "latent cache",
    rebuild: str = "python -m dfm_ext.recipes.imagenet.cache", key: str = "data.latent_cache",
) -> None:  # fmt: skip
    """Raise :class:`CacheMismatchError` naming every key where ``meta`` and ``expected`` differ (``rebuild``: the command)."""
    if meta.get("format") != fmt:
        raise CacheMismatchError(f"{path}: format {meta.get('format')!r}, expected {fmt!r}")
    diffs = [f"{k}: cache has {meta.get(k)!r}, config wants {v!r}" for k, v in expected.items() if not _same(meta.get(k), v)]
    if diffs:
        raise CacheMismatchError(
            f"{what} {path} does not match the config ({'; '.join(diffs)}); rebuild it with {rebuild} or point {key} elsewhere"
        )


def check_cache_labels(path: str | Path, meta: dict[str, Any], num_classes: int, *, key: str = "data.latent_cache") -> None:
    """Refuse a cache whose labels fall outside ``[0, num_classes)`` (``num_classes`` is the null class of guidance:
    a label equal to it would silently train unconditional, a larger one fail at the first step). Reads only the labels."""
    bounds: list[int] = []  # each shard's lowest and highest label
    for shard in meta.get("shards", []):
        with safe_open(str(Path(path) / shard["file"]), framework="pt") as f:
            labels = f.get_tensor("labels")
        if labels.numel():
            bounds += [int(labels.min()), int(labels.max())]
    if bounds and (low := min(bounds)) < 0:
        raise CacheMismatchError(f"{key}={str(path)!r} holds label {low}; labels must be >= 0")
    if bounds and (high := max(bounds)) >= num_classes:
        raise CacheMismatchError(
            f"{key}={str(path)!r} holds labels up to {high} but data.num_classes={num_classes} (label {num_classes} is the "
            f"null class of guidance); set data.num_classes={high + 1} or more, or rebuild the cache"
        )


def write_latent_cache(
    out_dir: str | Path, batches: Iterable[tuple[Tensor, Tensor, Tensor | None]], metadata: dict[str, Any], *,
    shard_size: int = 4096, dtype: torch.dtype = torch.float32,
) -> Path:  # fmt: skip
    """Write ``(latents, labels, latents_flipped | None)`` batches as shards, then ``index.json`` (atomically, last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    shards: list[dict[str, Any]] = []
    buf: dict[str, list[Tensor]] = {"latents": [], "labels": [], "latents_flipped": []}
    shape: list[int] | None = None

    def flush() -> None:
        if not buf["labels"]:
            return
        tensors = {"latents": torch.cat(buf["latents"]).to(dtype).contiguous(), "labels": torch.cat(buf["labels"]).long().contiguous()}
        if buf["latents_flipped"]:
            tensors["latents_flipped"] = torch.cat(buf["latents_flipped"]).to(dtype).contiguous()
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name))
        shards.append({"file": name, "start": sum(s["count"] for s in shards), "count": tensors["labels"].shape[0]})
        for v in buf.values():
            v.clear()

    for latents, labels, flipped in batches:
        if shape is None:
            shape = list(latents.shape[1:])
        elif list(latents.shape[1:]) != shape:
            raise ValueError(f"latent shape changed from {shape} to {list(latents.shape[1:])}")
        for key, t in (("latents", latents), ("labels", labels), ("latents_flipped", flipped)):
            if t is not None:
                buf[key].append(t.detach().cpu())
        if sum(len(t) for t in buf["labels"]) >= shard_size:
            flush()
    flush()
    if (count := sum(s["count"] for s in shards)) == 0:
        raise ValueError("no latents to write")
    index = {**metadata, "format": CACHE_FORMAT, "num_items": count, "latent_shape": shape, "dtype": str(dtype).removeprefix("torch."),
             "shards": shards}  # fmt: skip
    atomic_write_text(out / "index.json", json.dumps(index, indent=2))
    return out


class SkipUnreadable(torch.utils.data.Dataset):
    """Items ``{"pixels", "label", "index"}`` of a dataset with ``items`` and ``read(i)``, without its fall-back:
    an index whose read raises one of ``errors`` yields the int, so a cache holds each readable item once."""

    def __init__(self, ds: Any, errors: tuple[type[BaseException], ...]) -> None:
        self.ds, self.errors = ds, errors

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict | int:
        try:
            return {"pixels": self.ds.read(i), "label": self.ds.items[i][1], "index": i}
        except self.errors:
            return i


@dataclass(frozen=True)
class CacheOptions:
    """How a cache builder encodes: items per VAE call on ``device`` (``None``: CUDA if any), items per file, stored dtype."""

    batch_size: int = 32
    shard_size: int = 4096
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.bfloat16
    progress: bool = True


def encode_class_cache(
    cfg: Any, readable: SkipUnreadable, out: str | Path, options: CacheOptions, *, load_codec: Any, metadata: dict[str, Any],
    extra: dict[str, Any], skipped_key: str,
) -> dict[str, Any]:  # fmt: skip
    """Encode every readable item (and, with ``cfg.data.random_flip``, its mirror image) with ``load_codec(cfg, device)``;
    ``metadata`` is what the cache must agree on with the config. Returns the ``index.json`` contents."""
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codec, flip, bad = load_codec(cfg, device), cfg.data.random_flip, list[int]()
    loader = torch.utils.data.DataLoader(readable, batch_size=options.batch_size, num_workers=min(8, cfg.train.num_workers), collate_fn=list)

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        for got in tqdm(loader, disable=not options.progress, desc="encoding"):
            ok = [it for it in got if not isinstance(it, int)]
            bad.extend(it for it in got if isinstance(it, int))
            if not ok:
                continue
            pixels = torch.stack([it["pixels"] for it in ok]).to(device)
            # Flipping a latent is not encoding the flipped image, so mirrors are encoded too.
            yield codec.encode(pixels), torch.tensor([it["label"] for it in ok]), codec.encode(pixels.flip(-1)) if flip else None

    meta = {**metadata, "flipped": flip, "scaling_factor": codec.scaling, "shift_factor": codec.shifting, **extra}
    path = write_latent_cache(out, batches(), meta, shard_size=options.shard_size, dtype=options.dtype)
    index = json.loads((path / "index.json").read_text())
    index[skipped_key] = [readable.ds.items[i][0] for i in bad]
    atomic_write_text(path / "index.json", json.dumps(index, indent=2))
    return index
