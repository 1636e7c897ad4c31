"""Offline assets for the ``tiny`` config: a small image folder of real photos and a tiny VAE.

::

    python -m dfm_ext.recipes.imagenet.assets runs/tiny_assets
    python -m dfm_ext.recipes.imagenet --config tiny \\
        data.root=runs/tiny_assets/images vae.path=runs/tiny_assets/vae

The images are crops of scikit-image's bundled photos (one class per photo, no download). The
VAE is a randomly initialised diffusers ``AutoencoderKL`` (4x downsampling, 4 channels, with a
FLUX-style ``shift_factor``) saved with ``save_pretrained`` so that it is loaded through the
same ``from_pretrained`` path as a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dfm_ext.recipes.engine.cli import assets_main, make_tiny_vae

__all__ = ["PHOTOS", "make_image_folder", "main"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_image_folder(root: str | Path, *, per_class: int = 6, size: int = 48, photos: Sequence[str] = PHOTOS, seed: int = 0) -> Path:
    """Write ``per_class`` random square crops of each photo as ``root/<photo>/<i>.{png,jpg}``."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in photos:
        img = getattr(skdata, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        h, w = img.shape[:2]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(min(h, w) // 3, min(h, w)))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BICUBIC)
            crop.save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dfm_ext.recipes.imagenet.assets OUT``: photo crops and a tiny VAE."""
    assets_main(
        argv, prog="python -m dfm_ext.recipes.imagenet.assets", doc=__doc__, data_dir="images",
        make_data=make_image_folder, make_vae=make_tiny_vae,
    )  # fmt: skip


if __name__ == "__main__":
    main()
