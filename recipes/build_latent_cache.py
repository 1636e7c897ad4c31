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

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import load_config
from .data_images import ImageFolder
from .imagenet import ImageNetConfig, cache_metadata, load_codec
from .latents import write_latent_cache

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
    # Unreadable files are left out of the cache (not replaced by a neighbour): the cache
    # holds each readable image exactly once.
    readable: list[int] = []
    bad: list[int] = []
    loader = torch.utils.data.DataLoader(
        _Readable(dataset), batch_size=batch_size, num_workers=min(8, cfg.train.num_workers), collate_fn=list
    )

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        for items in tqdm(loader, disable=not progress, desc="encoding"):
            ok = [it for it in items if it is not None and not isinstance(it, int)]
            bad.extend(it for it in items if isinstance(it, int))
            if not ok:
                continue
            readable.extend(it["index"] for it in ok)
            pixels = torch.stack([it["pixels"] for it in ok]).to(device)
            labels = torch.tensor([it["label"] for it in ok])
            z = codec.encode(pixels)
            zf = codec.encode(pixels.flip(-1)) if cfg.data.random_flip else None
            yield z, labels, zf

    meta = {
        **cache_metadata(cfg),
        "flipped": cfg.data.random_flip,
        "scaling_factor": codec.scaling,
        "shift_factor": codec.shifting,
        "classes": dataset.classes,
        "source": str(cfg.data.root),
    }
    path = write_latent_cache(out, batches(), meta, shard_size=shard_size, dtype=dtype)
    index = json.loads((path / "index.json").read_text())
    index["skipped_images"] = [dataset.items[i][0] for i in bad]
    (path / "index.json").write_text(json.dumps(index, indent=2))
    return index


class _Readable(torch.utils.data.Dataset):
    """Items of an ``ImageFolder`` without the fall-back: an unreadable index yields the int."""

    def __init__(self, ds: ImageFolder) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict | int:
        from .data_images import _DECODE_ERRORS, load_image

        path, label = self.ds.items[i]
        try:
            return {"pixels": load_image(path, self.ds.resolution), "label": label, "index": i}
        except _DECODE_ERRORS:
            return i


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfm_ext.recipes.build_latent_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ImageNetConfig, args.config, args.overrides)
        if cfg.data.root is None or not Path(cfg.data.root).is_dir():
            raise FileNotFoundError(f"data.root={cfg.data.root!r} is not an image folder")
        index = build_cache(cfg, args.out, batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "num_items": index["num_items"], "skipped_images": len(index["skipped_images"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
