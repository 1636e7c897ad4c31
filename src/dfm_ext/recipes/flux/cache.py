"""Precomputed FLUX latents and text embeddings: build once, train without the VAE and text encoders.

Layout (``index.json`` written last; a cache whose metadata disagree with the config is refused)::

    index.json                 metadata, and one entry per (image, bucket): shard, key, bucket, source, caption
    empty.safetensors          "encoder_hidden_states" [1, L, D], "pooled_projections" [1, P]: the empty prompt
    shard-00000.safetensors    "<key>.latents" [C, h, w], "<key>.encoder_hidden_states" [L, D], "<key>.pooled_projections" [P]

An entry's latents and embeddings share one key prefix, so they cannot drift apart. With FLUX.1-dev's
512 T5 tokens x 4096 in bfloat16 an entry's text embedding is 4 MiB (a 1024 px latent 0.5 MiB).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dfm_ext.fileio import atomic_write_text
from dfm_ext.recipes.engine.cli import cache_builder_main
from dfm_ext.recipes.engine.config import load_config
from dfm_ext.recipes.engine.latents import CacheOptions, check_cache_metadata
from dfm_ext.recipes.flux.config import FluxFinetuneConfig
from dfm_ext.recipes.flux.data import CaptionedImages, load_bucket_image
from dfm_ext.recipes.flux.text_encoding import FluxEncoders, TextEmbeddings

__all__ = ["FLUX_CACHE", "FLUX_CACHE_FORMAT", "FluxCache", "build_flux_cache", "cache_metadata", "main"]

#: The format tag of a FLUX cache's ``index.json``.
FLUX_CACHE_FORMAT = "dfm_ext.flux_cache/1"
#: The FLUX cache's defaults (``--batch-size`` overrides the batch).
FLUX_CACHE = CacheOptions(batch_size=16, shard_size=1024, progress=False)


def cache_metadata(cfg: FluxFinetuneConfig) -> dict[str, Any]:
    """What a cache must agree on with a :class:`~dfm_ext.recipes.flux.config.FluxFinetuneConfig`."""
    v, d = cfg.vae, cfg.data
    return {
        "model_path": cfg.model.path, "vae_subfolder": v.subfolder, "scaling_factor_override": v.scaling_factor,
        "shift_factor_override": v.shift_factor, "sample_posterior": v.sample_posterior, "downsample": v.downsample,
        "max_sequence_length": d.max_sequence_length, "resolutions": list(d.resolutions), "ratios": [float(r) for r in d.ratios],
        "bucket_multiple": d.bucket_multiple, "min_area_fraction": float(d.min_area_fraction),
    }  # fmt: skip


@torch.no_grad()
def build_flux_cache(cfg: Any, out: str | Path, options: CacheOptions = FLUX_CACHE) -> dict[str, Any]:
    """Encode ``cfg.data.source`` into ``out`` (images that fail to decode are listed under ``skipped_images``);
    returns the written ``index.json`` contents."""
    if cfg.data.source is None:
        raise ValueError("data.source must name the captioned images to encode")
    dtype = options.dtype
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = CaptionedImages(cfg.data.source, cfg.buckets(), on_missing=cfg.data.on_missing,
                              min_area_fraction=cfg.data.min_area_fraction, max_skips=1)
    encoders, out = FluxEncoders(cfg), Path(out)
    codec, text = encoders.codec(device), encoders.text_encoder(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    entries, skipped, shard_names = list[dict[str, Any]](), list[str](), list[str]()
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        if shard:
            name = f"shard-{len(shard_names):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, str(out / name))
            shard_names.append(name)
            shard.clear()

    for bucket, members in sorted(dataset.members.items()):
        for start in range(0, len(members), options.batch_size):
            items, pixels = [], []
            for j in members[start : start + options.batch_size]:
                item = dataset.items[dataset.entries[j][0]]
                try:
                    pixels.append(load_bucket_image(item.path, dataset.buckets.shapes[bucket]))
                except Exception:  # noqa: BLE001 - any decode failure: leave the image out, list it
                    skipped.append(item.path)
                    continue
                items.append(item)
            if not items:
                continue
            z = codec.encode(torch.stack(pixels).to(device))
            emb = text.encode([item.caption for item in items])
            for k, item in enumerate(items):
                key = str(len(entries))
                for name, t in (("latents", z), *emb.as_kwargs().items()):
                    shard[f"{key}.{name}"] = t[k].to("cpu", dtype)
                entries.append({"shard": len(shard_names), "key": key, "bucket": bucket, "source": item.path, "caption": item.caption})
                if len(shard) >= 3 * options.shard_size:
                    flush()
    flush()
    if not entries:
        raise ValueError(f"no readable images in {cfg.data.source}")
    save_file({k: v.to("cpu", dtype).contiguous() for k, v in text.empty().as_kwargs().items()}, str(out / "empty.safetensors"))
    index = {
        **cache_metadata(cfg), "format": FLUX_CACHE_FORMAT, "scaling_factor": codec.scaling, "shift_factor": codec.shifting,
        "buckets": [list(s) for s in dataset.buckets.shapes], "dtype": str(dtype).removeprefix("torch."), "shards": shard_names,
        "source": str(cfg.data.source), "stats": dataset.stats, "skipped_images": skipped, "entries": entries,
    }  # fmt: skip
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))
    return index


class FluxCache(torch.utils.data.Dataset):
    """A FLUX cache, items keyed like :class:`~dfm_ext.recipes.flux.data.CaptionedImages`'s: ``latents [C, h, w]``,
    ``encoder_hidden_states [L, D]``, ``pooled_projections [P]`` (float32), ``bucket``, ``index``, ``bad`` (empty);
    ``bucket_of`` (bucket id per index) and ``empty_text`` (the empty prompt's embeddings) as the dataset has them."""

    def __init__(self, path: str | Path, expected: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "index.json").is_file():
            raise FileNotFoundError(f"no FLUX cache at {str(self.path)!r} (index.json missing: not built or unfinished)")
        self.meta = json.loads((self.path / "index.json").read_text())
        check_cache_metadata(self.meta, expected or {}, path=str(self.path), fmt=FLUX_CACHE_FORMAT, what="FLUX cache",
                             rebuild="python -m dfm_ext.recipes.flux cache", key="data.cache")  # fmt: skip
        self.entries = self.meta["entries"]
        self.bucket_of: tuple[int, ...] = tuple(int(e["bucket"]) for e in self.entries)
        empty = load_file(str(self.path / "empty.safetensors"))
        self.empty_text = TextEmbeddings(empty["encoder_hidden_states"].float(), empty["pooled_projections"].float())
        self.stats = {"entries": len(self.entries), "skipped_images": len(self.meta.get("skipped_images", []))}
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        index = int(key if isinstance(key, int) else key[0])
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)}")
        e = self.entries[index]
        s = int(e["shard"])
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.path / self.meta["shards"][s]), framework="pt")
        f = self._handles[s]
        out = {name: f.get_tensor(f"{e['key']}.{name}").float() for name in ("latents", "encoder_hidden_states", "pooled_projections")}
        return {**out, "bucket": int(e["bucket"]), "index": index, "bad": []}


def _load(args: Any) -> FluxFinetuneConfig:
    cfg = load_config(FluxFinetuneConfig, args.config, args.overrides)
    if cfg.data.source is None or cfg.model.path is None:
        raise FileNotFoundError("set data.source (captioned images) and model.path (the FLUX folder or hub id)")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    return cache_builder_main(argv, prog="python -m dfm_ext.recipes.flux cache", doc=__doc__, defaults=FLUX_CACHE, load=_load,
                              build=build_flux_cache, skipped_key="skipped_images", count="entries")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
