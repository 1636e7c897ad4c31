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

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import load_config
from .kinetics import CONFIG_ALIASES, KineticsConfig, cache_metadata, load_codec
from .latents import write_latent_cache
from .video_io import DECODE_ERRORS

__all__ = ["build_cache", "main"]


class _Readable(torch.utils.data.Dataset):
    """Clips of a ``VideoClips`` without the fall-back: an unreadable index yields the int."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict | int:
        try:
            return {"pixels": self.ds.read(i), "label": self.ds.items[i][1], "index": i}
        except DECODE_ERRORS:
            return i


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
    bad: list[int] = []
    loader = torch.utils.data.DataLoader(_Readable(dataset), batch_size=batch_size, num_workers=min(8, cfg.train.num_workers), collate_fn=list)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        for got in tqdm(loader, disable=not progress, desc="encoding"):
            ok = [it for it in got if not isinstance(it, int)]
            bad.extend(it for it in got if isinstance(it, int))
            if not ok:
                continue
            pixels = torch.stack([it["pixels"] for it in ok]).to(device)
            labels = torch.tensor([it["label"] for it in ok])
            z = codec.encode(pixels)
            zf = codec.encode(pixels.flip(-1)) if d.random_flip else None
            yield z, labels, zf

    meta = {
        **cache_metadata(cfg),
        "flipped": d.random_flip,
        "scaling_factor": codec.scaling,
        "shift_factor": codec.shifting,
        "classes": classes,
        "source": str(d.annotations or d.root),
    }
    path = write_latent_cache(out, batches(), meta, shard_size=shard_size, dtype=dtype)
    index = json.loads((path / "index.json").read_text())
    index["skipped_videos"] = [dataset.items[i][0] for i in bad]
    (path / "index.json").write_text(json.dumps(index, indent=2))
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfm_ext.recipes.build_video_latent_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(KineticsConfig, CONFIG_ALIASES.get(args.config, args.config), args.overrides)
        index = build_cache(cfg, args.out, batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype), progress=False)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "num_items": index["num_items"], "skipped_videos": len(index["skipped_videos"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
