"""Pre-encode an image folder into a latent cache for a recipe config (docs/recipes/imagenet.md).

Every image and, with ``data.random_flip``, its mirror are encoded with the config's VAE; unreadable images are
left out and listed (``skipped_images``). One process, on a GPU when there is one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfm_ext.recipes.engine.cli import cache_builder_main
from dfm_ext.recipes.engine.config import load_config
from dfm_ext.recipes.engine.data import DECODE_ERRORS, ImageFolder
from dfm_ext.recipes.engine.latents import CacheOptions, SkipUnreadable, encode_class_cache
from dfm_ext.recipes.imagenet.task import ImageNetConfig, cache_metadata, load_codec

__all__ = ["IMAGE_CACHE", "build_cache", "main"]

#: The image cache's defaults (``--batch-size`` overrides the batch).
IMAGE_CACHE = CacheOptions(batch_size=32, shard_size=4096)


def build_cache(cfg: ImageNetConfig, out: str | Path, options: CacheOptions = IMAGE_CACHE) -> dict:
    """Encode ``cfg.data.root`` into ``out``; returns the written ``index.json`` contents."""
    if cfg.data.root is None:
        raise ValueError("data.root must name the image folder to encode")
    dataset = ImageFolder(cfg.data.root, cfg.data.resolution, max_skips=cfg.data.max_skips)
    return encode_class_cache(
        cfg, SkipUnreadable(dataset, DECODE_ERRORS), out, options, load_codec=load_codec, metadata=cache_metadata(cfg),
        extra={"classes": dataset.classes, "source": str(cfg.data.root)}, skipped_key="skipped_images",
    )  # fmt: skip


def _load(args: Any) -> ImageNetConfig:
    cfg = load_config(ImageNetConfig, args.config, args.overrides)
    if cfg.data.root is None or not Path(cfg.data.root).is_dir():
        raise FileNotFoundError(f"data.root={cfg.data.root!r} is not an image folder")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    return cache_builder_main(
        argv, prog="python -m dfm_ext.recipes.imagenet.cache", doc=__doc__, defaults=IMAGE_CACHE, load=_load, build=build_cache,
        skipped_key="skipped_images",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
