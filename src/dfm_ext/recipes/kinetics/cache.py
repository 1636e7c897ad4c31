"""Pre-encode video clips into a latent cache (latents ``[C, T', H', W']``) for a Kinetics config.
As the image one; unreadable, corrupt or too-short videos are left out and listed (``skipped_videos``)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from dfm_ext.recipes.engine.cli import cache_builder_main
from dfm_ext.recipes.engine.config import load_config
from dfm_ext.recipes.engine.latents import CacheOptions, SkipUnreadable, encode_class_cache
from dfm_ext.recipes.kinetics.data import VideoClips, scan_videos
from dfm_ext.recipes.kinetics.task import CONFIG_ALIASES, KineticsConfig, cache_metadata, load_codec
from dfm_ext.recipes.kinetics.video_io import DECODE_ERRORS

__all__ = ["VIDEO_CACHE", "build_cache", "main"]

#: The video cache's defaults (``--batch-size`` overrides the batch); the command shows no progress bar.
VIDEO_CACHE = CacheOptions(batch_size=8, shard_size=1024)


def build_cache(cfg: KineticsConfig, out: str | Path, options: CacheOptions = VIDEO_CACHE) -> dict:
    """Encode the clips of ``cfg.data`` into ``out``; returns the written ``index.json`` contents."""
    d = cfg.data
    if d.root is None and d.annotations is None:
        raise ValueError("data.root or data.annotations must name the clips to encode")
    items, classes = scan_videos(d.root, d.annotations)
    dataset = VideoClips(items, num_frames=d.num_frames, stride=d.frame_stride, resolution=d.resolution, position=d.position, classes=classes)
    return encode_class_cache(
        cfg, SkipUnreadable(dataset, DECODE_ERRORS), out, options, load_codec=load_codec, metadata=cache_metadata(cfg),
        extra={"classes": classes, "source": str(d.annotations or d.root)}, skipped_key="skipped_videos",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return cache_builder_main(
        argv, prog="python -m dfm_ext.recipes.kinetics.cache", doc=__doc__, defaults=dataclasses.replace(VIDEO_CACHE, progress=False),
        load=lambda args: load_config(KineticsConfig, CONFIG_ALIASES.get(args.config, args.config), args.overrides),
        build=build_cache, skipped_key="skipped_videos",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
