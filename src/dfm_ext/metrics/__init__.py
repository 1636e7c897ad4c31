"""Sample-quality metrics: multi-scale SWD and Frechet distances (FD-EffNet offline, FID/FDD with your weights).

Everything streams over batches of float images ``[B, C, H, W]`` (grey or RGB) and refuses real
and fake sets of different sizes or channels. Heavy dependencies (the EfficientNet packages,
transformers) are imported only by the extractor that needs them.

Example:
    >>> import torch
    >>> from dfm_ext.metrics import swd
    >>> images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> swd(images[:8], images[8:], progress_bar=False, patches_per_image=16).resolutions
    ((32, 32), (16, 16))
"""

from __future__ import annotations

from .dinov2 import DINOv2Features, fdd
from .effnet import EfficientNetLite0Features, effnet_weights_path, fd_effnet
from .frechet import (
    FeatureExtractor,
    FeatureStatistics,
    FrechetDistance,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_images,
)
from .inception import InceptionV3Features, fid
from .swd import SlicedWassersteinDistance, SWDResult, laplacian_pyramid, pyramid_sizes, sliced_wasserstein, swd

__all__ = [
    "DINOv2Features",
    "EfficientNetLite0Features",
    "FeatureExtractor",
    "FeatureStatistics",
    "FrechetDistance",
    "InceptionV3Features",
    "SWDResult",
    "SlicedWassersteinDistance",
    "effnet_weights_path",
    "fd_effnet",
    "fdd",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "frechet_distance_from_images",
    "laplacian_pyramid",
    "pyramid_sizes",
    "sliced_wasserstein",
    "swd",
]
