"""Offline assets for the ``tiny`` config: crops of scikit-image's bundled photos (one class per photo) and a tiny VAE."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dfm_ext.recipes.engine.cli import assets_main, make_tiny_vae, photo

__all__ = ["PHOTOS", "make_image_folder", "main"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_image_folder(root: str | Path, *, per_class: int = 6, size: int = 48, photos: Sequence[str] = PHOTOS, seed: int = 0) -> Path:
    """Write ``per_class`` random square crops of each photo as ``root/<photo>/<i>.{png,jpg}``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in photos:
        img = photo(name)
        h, w = img.shape[:2]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(min(h, w) // 3, min(h, w)))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BICUBIC)
            crop.save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def main(argv: Sequence[str] | None = None) -> None:
    assets_main(argv, prog="python -m dfm_ext.recipes.imagenet.assets", doc=__doc__,
                makers={"data.root": ("images", make_image_folder), "vae.path": ("", make_tiny_vae)})  # fmt: skip


if __name__ == "__main__":
    main()
