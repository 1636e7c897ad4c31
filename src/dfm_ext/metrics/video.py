r"""FVD (the 16-frame I3D protocol of StyleGAN-V / cd-fvd) and frame-FID of uint8 videos ``[N, T, H, W, C]``.

**FVD**: each video's first ``num_frames`` (16) frames, every frame resized bilinearly (no
antialiasing) to 224 x 224 from its ``[0, 255]`` values and scaled to ``[-1, 1]``, go through the
Kinetics-400 I3D; its 400 logits, averaged over time, are the features. The distance is the
Frechet distance with *biased* covariances (``E[x x^T] - mu mu^T``, divided by ``N``), as in the
StyleGAN-V and cd-fvd code. The network is cd-fvd's ``InceptionI3d`` (a PyTorch port of the
DeepMind I3D) with your copy of ``i3d_pretrained_400.pt`` (:data:`I3D_WEIGHTS_FILE`); cd-fvd itself
declares torchvision, so install it with ``pip install --no-deps cd-fvd`` (its I3D module needs
only torch). Any module mapping ``[B, 3, T, 224, 224]`` clips in ``[-1, 1]`` to ``[B, D]`` may stand in.

**Frame-FID**: FID (unbiased covariances) of all frames as images, with the ADM Inception pool
features (:class:`~dfm_ext.metrics.adm_features.ADMInceptionFeatures`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_ext.validation import parse_device
from ._images import load_state_dict_file
from .adm_features import InceptionOutput
from .samples import iter_npz_rows
from .frechet import FeatureStatistics

__all__ = ["I3D_WEIGHTS_FILE", "I3DFeatures", "VideoSource", "frame_fid", "fvd", "fvd_features", "iter_video_batches", "preprocess_i3d"]

#: cd-fvd's / TATS's Kinetics-400 I3D weights (a state dict for ``InceptionI3d(400)``).
I3D_WEIGHTS_FILE = "i3d_pretrained_400.pt"
_I3D_SOURCE = "the TATS repository (songweige/TATS, tats/fvd/i3d_pretrained_400.pt), the file cd-fvd downloads"

#: Videos: a uint8 array ``[N, T, H, W, C]`` or an iterable of such batches.
VideoSource = Union[np.ndarray, Iterable[np.ndarray]]


def preprocess_i3d(videos: np.ndarray | Tensor, resolution: int = 224) -> Tensor:
    """uint8 videos ``[B, T, H, W, C]`` -> float clips ``[B, C, T, r, r]`` in ``[-1, 1]`` (cd-fvd's ``preprocess_i3d``)."""
    x = torch.as_tensor(np.asarray(videos) if not isinstance(videos, Tensor) else videos).float()
    b, t, h, w, c = x.shape
    frames = x.flatten(0, 1).permute(0, 3, 1, 2)
    frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (2.0 * frames.view(b, t, c, resolution, resolution).transpose(1, 2) / 255.0 - 1).contiguous()


class I3DFeatures(nn.Module):
    """Kinetics-400 I3D features ``[B, 400]`` of uint8 videos ``[B, T, H, W, 3]`` (the FVD features).

    Args:
        model: your ``i3d_pretrained_400.pt`` (loaded into cd-fvd's ``InceptionI3d(400)`` with
            ``weights_only=True``), or a module mapping ``[B, 3, T, 224, 224]`` in ``[-1, 1]`` to ``[B, D]``.
        device: where the network runs.
    """

    def __init__(self, model: str | os.PathLike | nn.Module, *, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device = parse_device(device if device is not None else "cpu")
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"no I3D weights at {path!r}: FVD needs {I3D_WEIGHTS_FILE} from {_I3D_SOURCE} (nothing is downloaded)"
                )
            try:  # import_module: cd-fvd ships no type information (and is optional here)
                i3d = importlib.import_module("cdfvd.third_party.i3d.pytorch_i3d")
            except ImportError as err:
                raise ImportError("FVD's I3D network comes from cd-fvd: pip install --no-deps cd-fvd") from err
            network: nn.Module = i3d.InceptionI3d(400, in_channels=3)
            network.load_state_dict(load_state_dict_file(path))
        elif isinstance(model, nn.Module):
            network = model
        else:
            raise TypeError(f"model must be a weights path or an nn.Module, got {type(model).__name__}")
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.name = "i3d-400"

    def train(self, mode: bool = True) -> I3DFeatures:
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, videos: np.ndarray | Tensor) -> Tensor:
        features = self.network(preprocess_i3d(videos).to(self.device))
        if not isinstance(features, Tensor) or features.ndim != 2:
            raise ValueError(f"the I3D network must return [B, D], returned {getattr(features, 'shape', type(features).__name__)}")
        return features


def iter_video_batches(source: str | os.PathLike, batch_size: int = 8, *, num_frames: int | None = None) -> Iterator[np.ndarray]:
    """uint8 video batches ``[B, T, H, W, C]`` of an ``.npz`` (``arr_0`` ``[N, T, H, W, C]``, streamed) or of the
    ``.mp4`` files under a folder (sorted paths, class subfolders included; decoded with PyAV, ``pip install av``).

    ``num_frames``: keep each video's first frames (a shorter video is an error). Videos of another size than
    the one before start a new batch. MP4 is lossy: the ``.npz`` the ``sample`` commands write holds the exact frames.
    """
    path = Path(source)
    if path.is_file():
        batches: Iterable[Iterable[np.ndarray]] = iter_npz_rows(path, batch_size)
    else:
        files = sorted(path.rglob("*.mp4")) if path.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no .npz of videos or folder of .mp4 files at {str(path)!r}")
        batches = ([v] for v in map(_decode_mp4, files))
    pending: list[np.ndarray] = []
    for batch in batches:
        for video in batch:
            if num_frames is not None:
                if len(video) < num_frames:
                    raise ValueError(f"a video of {str(path)!r} has {len(video)} frames, fewer than the {num_frames} evaluated")
                video = video[:num_frames]
            if pending and (video.shape != pending[0].shape or len(pending) == batch_size):
                yield np.stack(pending)
                pending = []
            pending.append(video)
    if pending:
        yield np.stack(pending)


def _decode_mp4(file: Path) -> np.ndarray:
    import av

    with av.open(str(file)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _video_batches(videos: VideoSource, batch_size: int, name: str) -> Iterable[np.ndarray]:
    batches = (videos[i : i + batch_size] for i in range(0, len(videos), batch_size)) if isinstance(videos, np.ndarray) else videos
    for batch in batches:
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 5 or batch.shape[-1] not in (1, 3):
            raise ValueError(f"{name} must be uint8 videos [N, T, H, W, 1 or 3], got a batch of {batch.dtype} {batch.shape}")
        yield batch


def fvd_features(
    videos: VideoSource, extractor: Callable[[np.ndarray], Tensor], *, num_frames: int = 16, batch_size: int = 8
) -> FeatureStatistics:
    """I3D feature statistics of the first ``num_frames`` frames of every video (grey repeated to RGB)."""
    stats = FeatureStatistics()
    for batch in _video_batches(videos, batch_size, "videos"):
        if batch.shape[1] < num_frames:
            raise ValueError(f"FVD uses {num_frames} frames per video; these videos have {batch.shape[1]}")
        clip = np.array(np.broadcast_to(batch[:, :num_frames], (*batch.shape[:1], num_frames, *batch.shape[2:4], 3)))  # a writable copy (torch warns on read-only arrays)
        stats.update(extractor(clip))
    return stats


def fvd(
    real: VideoSource | FeatureStatistics,
    fake: VideoSource | FeatureStatistics,
    *,
    extractor: Callable[[np.ndarray], Tensor] | None = None,
    num_frames: int = 16,
    batch_size: int = 8,
) -> float:
    """FVD between two video sets (uint8 ``[N, T, H, W, C]``, or their :func:`fvd_features`).

    Biased covariances (``ddof=0``), the StyleGAN-V / cd-fvd convention.
    """
    stats = []
    for name, videos in (("real", real), ("fake", fake)):
        if isinstance(videos, FeatureStatistics):
            stats.append(videos)
        elif extractor is None:
            raise ValueError(f"the {name} videos need extractor= (I3DFeatures with your {I3D_WEIGHTS_FILE})")
        else:
            stats.append(fvd_features(videos, extractor, num_frames=num_frames, batch_size=batch_size))
    return stats[0].frechet_distance(stats[1], ddof=0)


def frame_fid(
    real: VideoSource | FeatureStatistics,
    fake: VideoSource | FeatureStatistics,
    *,
    inception: Callable[[Tensor], InceptionOutput] | None = None,
    batch_size: int = 4,
) -> float:
    """FID over all frames of two video sets, with the ADM Inception pool features (unbiased covariances)."""
    stats = []
    for name, videos in (("real", real), ("fake", fake)):
        if isinstance(videos, FeatureStatistics):
            stats.append(videos)
            continue
        if inception is None:
            raise ValueError(f"the {name} videos need inception= (ADMInceptionFeatures with your weights)")
        part = FeatureStatistics()
        for batch in _video_batches(videos, batch_size, name):
            frames = torch.from_numpy(np.ascontiguousarray(batch)).flatten(0, 1).permute(0, 3, 1, 2)
            part.update(inception(frames.expand(-1, 3, -1, -1).contiguous()).pool)
        stats.append(part)
    return stats[0].frechet_distance(stats[1])
