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

from dfm_ext.recipes.engine.cli import assets_main

__all__ = ["PHOTOS", "TINY_VAE_BLOCKS", "make_image_folder", "make_tiny_vae", "save_tiny_vae"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
#: The widths of the tiny VAEs (this image one and :mod:`.tiny_video_assets`' video one).
TINY_VAE_BLOCKS: dict[str, Any] = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4)


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


def save_tiny_vae(cls: type, path: str | Path, seed: int, **config: Any) -> Path:
    """``cls(**TINY_VAE_BLOCKS, **config)`` initialised under ``seed`` and saved with ``save_pretrained``
    under ``path/vae`` (so it loads through ``from_pretrained``, as a real checkpoint does). Returns ``path``."""
    import torch

    torch.manual_seed(seed)
    cls(**TINY_VAE_BLOCKS, **config).save_pretrained(str(Path(path) / "vae"))
    return Path(path)


def make_tiny_vae(path: str | Path, *, seed: int = 0, latent_channels: int = 4) -> Path:
    """A 4x-downsampling ``AutoencoderKL`` (channels 8-16) saved under ``path/vae``."""
    from diffusers import AutoencoderKL

    return save_tiny_vae(
        AutoencoderKL, path, seed, in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.5, shift_factor=0.1,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    assets_main(
        argv, prog="python -m dfm_ext.recipes.imagenet.assets", doc=__doc__, data_dir="images",
        make_data=make_image_folder, make_vae=make_tiny_vae,
    )  # fmt: skip


if __name__ == "__main__":
    main()
