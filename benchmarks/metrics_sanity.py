"""Sanity check of dfm_ext.metrics on real data: real vs other real, blurred and noised images.

Fashion-MNIST test images (Debian package dataset-fashion-mnist) when present, else 28x28 grey
crops of scikit-image photos. Prints SWD (x1e3, per level) and FD-EffNet; lower = closer to real.

    .venv/bin/python benchmarks/metrics_sanity.py --count 500
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from dfm_ext.metrics import EfficientNetLite0Features, FrechetDistance, fd_effnet, swd

FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def load_images(count: int) -> tuple[torch.Tensor, str]:
    if os.path.isfile(FASHION):
        with gzip.open(FASHION, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
        return torch.from_numpy(data[: 2 * count].copy()).float() / 255, "Fashion-MNIST t10k"
    from skimage import data as skdata

    photos = [skdata.camera(), skdata.brick(), skdata.grass(), skdata.gravel(), skdata.coins(), skdata.moon()]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(2 * count):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 28), rng.integers(0, p.shape[1] - 28)
        crops.append(p[None, y : y + 28, x : x + 28])
    return torch.from_numpy(np.stack(crops)).float() / 255, "scikit-image grey crops"


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(x, k), k.transpose(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="images per set")
    parser.add_argument("--resolution", type=int, default=224, help="EfficientNet input size")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    images, source = load_images(args.count)
    real, other = images[: args.count], images[args.count :]
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(0))
    variants = {"other real": other}
    variants.update({f"blur sigma {s}": blur(other, s) for s in (0.5, 1.0, 2.0)})
    variants.update({f"noise std {s}": (other + s * noise).clamp(0, 1) for s in (0.05, 0.1, 0.2)})
    print(f"{source}: {args.count} reference images vs {args.count} others, FD-EffNet at {args.resolution} px")
    extractor = EfficientNetLite0Features(args.resolution)
    reference = FrechetDistance(extractor, value_range=(0, 1))
    start = time.time()
    for batch in real.split(100):
        reference.update(batch, real=True)
    print(f"{'set':<16} {'SWD mean':>9} {'SWD per level':>22} {'FD-EffNet':>10}")
    for name, fake in variants.items():
        s = swd(real, fake, progress_bar=False)
        fd = fd_effnet(reference.real, fake, value_range=(0, 1), extractor=extractor, progress_bar=False)
        levels = ", ".join(f"{v:.1f}" for v in s.per_level)
        print(f"{name:<16} {s.mean:9.1f} {levels:>22} {fd:10.2f}")
    print(f"levels {s.resolutions}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
