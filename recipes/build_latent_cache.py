"""Pre-encode an image folder into a latent cache for a recipe config.

::

    python -m dfm_ext.recipes.build_latent_cache --config imagenet_512 \\
        data.root=/data/imagenet/train --out /data/latents/imagenet_512
    accelerate launch -m dfm_ext.recipes.imagenet --config imagenet_512 \\
        data.latent_cache=/data/latents/imagenet_512

Every image is encoded (and, with ``data.random_flip``, its mirror image too, since flipping a
latent is not the same as encoding a flipped image) with the config's VAE and normalisation.
The cache's ``index.json`` records the VAE, resolution, normalisation and latent shape; training
refuses a cache that disagrees with its config. Unreadable images are left out and listed in
``index.json`` (``skipped_images``). Runs as one process (on a GPU when there is one).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._common import USAGE_ERRORS, cache_builder_parser, usage_error
from .config import load_config
from .data_images import DECODE_ERRORS, ImageFolder, load_image
from .imagenet import ImageNetConfig, cache_metadata, load_codec
from .latents import SkipUnreadable, encode_to_cache

__all__ = ["build_cache", "main"]


def build_cache(
    cfg: ImageNetConfig,
    out: str | Path,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> dict:
    """Encode ``cfg.data.root`` into ``out``; returns the written ``index.json`` contents."""
    if cfg.data.root is None:
        raise ValueError("data.root must name the image folder to encode")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = ImageFolder(cfg.data.root, cfg.data.resolution, max_skips=cfg.data.max_skips)
    codec = load_codec(cfg, device)
    return encode_to_cache(
        _Readable(dataset), codec, out, metadata=cache_metadata(cfg),
        extra={"classes": dataset.classes, "source": str(cfg.data.root)}, flip=cfg.data.random_flip,
        skipped_key="skipped_images", device=device, batch_size=batch_size, num_workers=min(8, cfg.train.num_workers),
        shard_size=shard_size, dtype=dtype, progress=progress,
    )  # fmt: skip


class _Readable(SkipUnreadable):
    """Items of an ``ImageFolder`` without the fall-back: an unreadable index yields the int."""

    errors = DECODE_ERRORS

    def pixels(self, i: int) -> torch.Tensor:
        return load_image(self.ds.items[i][0], self.ds.resolution)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cache_builder_parser("python -m dfm_ext.recipes.build_latent_cache", __doc__, batch_size=32)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ImageNetConfig, args.config, args.overrides)
        if cfg.data.root is None or not Path(cfg.data.root).is_dir():
            raise FileNotFoundError(f"data.root={cfg.data.root!r} is not an image folder")
        index = build_cache(cfg, args.out, batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype))
    except USAGE_ERRORS as e:
        return usage_error(e)
    print(json.dumps({"out": args.out, "num_items": index["num_items"], "skipped_images": len(index["skipped_images"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
