"""Pre-encode video clips into a latent cache for a Kinetics recipe config.

::

    python -m dfm_ext.recipes.build_video_latent_cache --config kinetics_512 \\
        data.root=/data/kinetics700/train --out /data/latents/k700_512
    accelerate launch -m dfm_ext.recipes.kinetics --config kinetics_512 \\
        data.latent_cache=/data/latents/k700_512

The cache is the engine's format (:mod:`.latents`: sharded safetensors + ``index.json``) with
latents ``[C, T', H', W']``. Every clip is encoded with the config's CogVideoX VAE and
normalisation (and its mirror image too with ``data.random_flip``). ``index.json`` records the
VAE, resolution, frame count and stride, normalisation and latent shape; training refuses a
cache that disagrees with its config. Unreadable, corrupt or too-short videos are left out and
listed (``skipped_videos``). Runs as one process (on a GPU when there is one).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._common import USAGE_ERRORS, cache_builder_parser, usage_error
from .config import load_config
from .kinetics import CONFIG_ALIASES, KineticsConfig, cache_metadata, load_codec
from .latents import SkipUnreadable, encode_to_cache
from .video_io import DECODE_ERRORS

__all__ = ["build_cache", "main"]


class _Readable(SkipUnreadable):
    """Clips of a ``VideoClips`` without the fall-back: an unreadable index yields the int."""

    errors = DECODE_ERRORS

    def pixels(self, i: int) -> torch.Tensor:
        return self.ds.read(i)


def build_cache(
    cfg: KineticsConfig,
    out: str | Path,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> dict:
    """Encode the clips of ``cfg.data`` into ``out``; returns the written ``index.json`` contents."""
    from .data_video import VideoClips, scan_videos

    if cfg.data.root is None and cfg.data.annotations is None:
        raise ValueError("data.root or data.annotations must name the clips to encode")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    items, classes = scan_videos(cfg.data.root, cfg.data.annotations)
    d = cfg.data
    dataset = VideoClips(items, num_frames=d.num_frames, stride=d.frame_stride, resolution=d.resolution, position=d.position, classes=classes)
    codec = load_codec(cfg, device)
    return encode_to_cache(
        _Readable(dataset), codec, out, metadata=cache_metadata(cfg),
        extra={"classes": classes, "source": str(d.annotations or d.root)}, flip=d.random_flip,
        skipped_key="skipped_videos", device=device, batch_size=batch_size, num_workers=min(8, cfg.train.num_workers),
        shard_size=shard_size, dtype=dtype, progress=progress,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = cache_builder_parser("python -m dfm_ext.recipes.build_video_latent_cache", __doc__, batch_size=8)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(KineticsConfig, CONFIG_ALIASES.get(args.config, args.config), args.overrides)
        index = build_cache(cfg, args.out, batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype), progress=False)
    except USAGE_ERRORS as e:
        return usage_error(e)
    print(json.dumps({"out": args.out, "num_items": index["num_items"], "skipped_videos": len(index["skipped_videos"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
