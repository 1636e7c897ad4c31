"""Sample-quality metrics: the paper's (FID, sFID, IS, precision/recall, FDD, FVD) and offline ones (SWD, FD-EffNet).

- :mod:`~dfm_ext.metrics.adm`: the ADM evaluation suite's FID / sFID / IS / precision / recall and
  FDD-DINOv2 of a PNG folder or an ADM ``.npz`` against a reference batch (``evaluate``), from the
  features :mod:`~dfm_ext.metrics.adm_features` extracts (its InceptionV3, ``extract_features``);
  :mod:`~dfm_ext.metrics.samples` reads and writes those sample files, :mod:`~dfm_ext.metrics.shards` draws
  them in resumable shards over several processes, :mod:`~dfm_ext.metrics.commands` is the recipes' ``evaluate``.
- :mod:`~dfm_ext.metrics.video`: FVD (16-frame I3D) and frame-FID.
- :mod:`~dfm_ext.metrics.swd`, :mod:`~dfm_ext.metrics.effnet`: the multi-scale SWD and FD-EffNet
  that need no downloaded weights, on float image batches ``[B, C, H, W]``.

Feature networks come from the libraries that define them (torch-fidelity's InceptionV3,
transformers' DINOv2, cd-fvd's I3D) with weight files you provide; nothing is downloaded. Heavy
dependencies are imported only by the extractor that needs them.

Example:
    >>> import torch
    >>> from dfm_ext.metrics import swd
    >>> images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> swd(images[:8], images[8:], progress_bar=False, patches_per_image=16).resolutions
    ((32, 32), (16, 16))
"""

from __future__ import annotations

from .adm import EvaluationResult, ReferenceBatch, evaluate, inception_score, precision_recall, scores_from_features
from .adm_features import INCEPTION_WEIGHTS_FILE, ADMInceptionFeatures, InceptionOutput, SampleFeatures, extract_features
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
from .commands import evaluate_images_command, evaluate_videos_command
from .samples import SampleSource, count_images, iter_npz_rows, iter_uint8_batches, read_npz_labels, save_samples, to_uint8, write_npz
from .shards import SampleShards
from .swd import SlicedWassersteinDistance, SWDResult, laplacian_pyramid, pyramid_sizes, sliced_wasserstein, swd
from .video import I3D_WEIGHTS_FILE, I3DFeatures, VideoSource, frame_fid, fvd, fvd_features, iter_video_batches, preprocess_i3d

__all__ = [
    "ADMInceptionFeatures",
    "DINOv2Features",
    "EvaluationResult",
    "I3DFeatures",
    "I3D_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_FILE",
    "InceptionOutput",
    "ReferenceBatch",
    "SampleFeatures",
    "SampleShards",
    "SampleSource",
    "VideoSource",
    "count_images",
    "evaluate",
    "evaluate_images_command",
    "evaluate_videos_command",
    "extract_features",
    "frame_fid",
    "fvd",
    "fvd_features",
    "inception_score",
    "iter_npz_rows",
    "iter_uint8_batches",
    "iter_video_batches",
    "precision_recall",
    "preprocess_i3d",
    "read_npz_labels",
    "save_samples",
    "scores_from_features",
    "to_uint8",
    "write_npz",
    "EfficientNetLite0Features",
    "FeatureExtractor",
    "FeatureStatistics",
    "FrechetDistance",
    "SWDResult",
    "SlicedWassersteinDistance",
    "effnet_weights_path",
    "fd_effnet",
    "fdd",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_images",
    "laplacian_pyramid",
    "pyramid_sizes",
    "sliced_wasserstein",
    "swd",
]
