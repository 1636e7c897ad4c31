"""VAEs and latent caches: load a frozen diffusers autoencoder; encode a dataset once, train without the VAE.

The cache (built by a recipe's cache command, e.g. ``python -m dfm_ext.recipes.imagenet.cache``;
read by :class:`~dfm_ext.recipes.engine.data.LatentCache`) is a folder::

    index.json                 metadata (VAE, resolution, normalisation, latent shape, classes, shards)
    shard-00000.safetensors    "latents" [n, C, h, w], "labels" [n] (int64),
                               "latents_flipped" [n, C, h, w] when built with flips
    ...

A cache whose metadata disagrees with the run config is refused, naming every disagreeing field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


__all__ = [
    "CACHE_FORMAT", "CacheMismatchError", "CacheOptions", "SkipUnreadable", "check_cache_metadata", "encode_class_cache",
    "encode_to_cache", "load_frozen_vae", "load_vae", "looks_local", "write_index", "write_latent_cache",
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


def load_frozen_vae(
    cls: Any, path: str, subfolder: str | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    what: str = "VAE",
) -> Any:  # fmt: skip
    """``cls.from_pretrained(path, subfolder=...)`` (a diffusers autoencoder class), frozen, in eval mode.

    Args:
        what: how the messages name the model (e.g. ``"video VAE"``).

    Raises:
        FileNotFoundError: ``path`` is a local path without a diffusers ``config.json``.
    """
    local = looks_local(path)
    root = Path(path).expanduser()
    if local and not (root / (subfolder or "") / "config.json").is_file():
        raise FileNotFoundError(f"no {what} at {str(root / (subfolder or ''))!r} (expected a diffusers folder with config.json)")
    vae = cls.from_pretrained(str(root) if local else path, subfolder=subfolder or None, torch_dtype=dtype)
    vae.requires_grad_(False)
    return vae.eval().to(device)


def load_vae(path: str, subfolder: str | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """``AutoencoderKL.from_pretrained(path, subfolder=...)``, frozen, in eval mode.

    Raises:
        FileNotFoundError: ``path`` is a local path that does not exist.
    """
    from diffusers import AutoencoderKL

    return load_frozen_vae(AutoencoderKL, path, subfolder, device=device, dtype=dtype)


class CacheMismatchError(ValueError):
    """The latent cache was built for another VAE, resolution or normalisation."""


def check_cache_metadata(meta: dict[str, Any], expected: dict[str, Any], *, path: str = "cache") -> None:
    """Raise :class:`CacheMismatchError` naming every key where ``meta`` and ``expected`` differ."""
    if meta.get("format") != CACHE_FORMAT:
        raise CacheMismatchError(f"{path}: format {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
    diffs = []
    for key, want in expected.items():
        have = meta.get(key)
        if isinstance(want, float) and isinstance(have, (int, float)):
            same = abs(have - want) <= 1e-6 * max(1.0, abs(want))
        else:
            same = have == want
        if not same:
            diffs.append(f"{key}: cache has {have!r}, config wants {want!r}")
    if diffs:
        raise CacheMismatchError(
            f"latent cache {path} does not match the config ({'; '.join(diffs)}); rebuild it with "
            "python -m dfm_ext.recipes.imagenet.cache or point data.latent_cache elsewhere"
        )




def write_latent_cache(
    out_dir: str | Path,
    batches: Iterable[tuple[Tensor, Tensor, Tensor | None]],
    metadata: dict[str, Any],
    *,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``(latents, labels, latents_flipped | None)`` batches as shards + ``index.json``.

    ``index.json`` is written last (through a temporary file), so a folder without it is an
    unfinished cache and is refused by :class:`LatentCache`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "index.json").exists():
        (out / "index.json").unlink()
    shards: list[dict[str, Any]] = []
    buf: dict[str, list[Tensor]] = {"latents": [], "labels": [], "latents_flipped": []}
    count = 0
    shape: list[int] | None = None

    def flush() -> None:
        nonlocal buf
        if not buf["labels"]:
            return
        tensors = {
            "latents": torch.cat(buf["latents"]).to(dtype).contiguous(),
            "labels": torch.cat(buf["labels"]).long().contiguous(),
        }
        if buf["latents_flipped"]:
            tensors["latents_flipped"] = torch.cat(buf["latents_flipped"]).to(dtype).contiguous()
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name))
        n = tensors["labels"].shape[0]
        shards.append({"file": name, "start": sum(s["count"] for s in shards), "count": n})
        buf = {"latents": [], "labels": [], "latents_flipped": []}

    pending = 0
    for latents, labels, flipped in batches:
        if shape is None:
            shape = list(latents.shape[1:])
        elif list(latents.shape[1:]) != shape:
            raise ValueError(f"latent shape changed from {shape} to {list(latents.shape[1:])}")
        buf["latents"].append(latents.detach().cpu())
        buf["labels"].append(labels.detach().cpu())
        if flipped is not None:
            buf["latents_flipped"].append(flipped.detach().cpu())
        count += latents.shape[0]
        pending += latents.shape[0]
        if pending >= shard_size:
            flush()
            pending = 0
    flush()
    if count == 0:
        raise ValueError("no latents to write")
    index = {
        **metadata,
        "format": CACHE_FORMAT,
        "num_items": count,
        "latent_shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "shards": shards,
    }
    write_index(out, index, indent=2)
    return out


def write_index(out: Path, index: dict[str, Any], *, indent: int) -> None:
    """Write ``out/index.json`` through a temporary file, so that it appears complete or not at all."""
    from dfm_ext.fileio import atomic_write_text

    atomic_write_text(out / "index.json", json.dumps(index, indent=indent))


class SkipUnreadable(torch.utils.data.Dataset):
    """Items ``{"pixels", "label", "index"}`` of a dataset of ``(path, label)`` items, without its fall-back.

    An index whose file fails with one of :attr:`errors` yields the int instead of a neighbour,
    so that a cache holds each readable item exactly once. Subclasses implement :meth:`pixels`.
    """

    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def pixels(self, i: int) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict | int:
        try:
            return {"pixels": self.pixels(i), "label": self.ds.items[i][1], "index": i}
        except self.errors:
            return i


def encode_to_cache(
    readable: SkipUnreadable,
    codec: Any,
    out: str | Path,
    *,
    metadata: dict[str, Any],
    extra: dict[str, Any],
    flip: bool,
    skipped_key: str,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    shard_size: int,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, Any]:
    """Encode every readable item (and its mirror image with ``flip``) into a cache at ``out``.

    Args:
        metadata: what the cache must agree on with the config (``cache_metadata``).
        extra: recorded after the normalisation (e.g. ``classes``, ``source``).
        skipped_key: the ``index.json`` key listing the paths of unreadable items.

    Returns:
        The written ``index.json`` contents.
    """
    from tqdm.auto import tqdm

    bad: list[int] = []
    loader = torch.utils.data.DataLoader(readable, batch_size=batch_size, num_workers=num_workers, collate_fn=list)

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        for got in tqdm(loader, disable=not progress, desc="encoding"):
            ok = [it for it in got if not isinstance(it, int)]
            bad.extend(it for it in got if isinstance(it, int))
            if not ok:
                continue
            pixels = torch.stack([it["pixels"] for it in ok]).to(device)
            labels = torch.tensor([it["label"] for it in ok])
            z = codec.encode(pixels)
            # Flipping a latent is not encoding the flipped image, so mirrors are encoded too.
            zf = codec.encode(pixels.flip(-1)) if flip else None
            yield z, labels, zf

    meta = {**metadata, "flipped": flip, "scaling_factor": codec.scaling, "shift_factor": codec.shifting, **extra}
    path = write_latent_cache(out, batches(), meta, shard_size=shard_size, dtype=dtype)
    index = json.loads((path / "index.json").read_text())
    index[skipped_key] = [readable.ds.items[i][0] for i in bad]
    (path / "index.json").write_text(json.dumps(index, indent=2))
    return index


@dataclass(frozen=True)
class CacheOptions:
    """How a cache builder encodes: ``batch_size`` items per VAE call on ``device`` (``None``: CUDA
    when available), ``shard_size`` items per file, latents stored as ``dtype``, a progress bar."""

    batch_size: int = 32
    shard_size: int = 4096
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.bfloat16
    progress: bool = True


def encode_class_cache(
    cfg: Any,
    readable: SkipUnreadable,
    out: str | Path,
    options: CacheOptions,
    *,
    load_codec: Any,
    metadata: dict[str, Any],
    extra: dict[str, Any],
    skipped_key: str,
) -> dict[str, Any]:
    """:func:`encode_to_cache` for a class-conditional recipe's config ``cfg`` (its ``data.random_flip``,
    ``train.num_workers`` and ``load_codec(cfg, device)``); returns the written ``index.json`` contents."""
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return encode_to_cache(
        readable, load_codec(cfg, device), out, metadata=metadata, extra=extra, flip=cfg.data.random_flip,
        skipped_key=skipped_key, device=device, batch_size=options.batch_size, num_workers=min(8, cfg.train.num_workers),
        shard_size=options.shard_size, dtype=options.dtype, progress=options.progress,
    )  # fmt: skip
