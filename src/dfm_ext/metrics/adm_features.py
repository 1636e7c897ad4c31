"""The features the ADM suite's scores are computed from: its InceptionV3 network and a sample set's features.

:class:`ADMInceptionFeatures` is torch-fidelity's ``FeatureExtractorInceptionV3``: the TF graph
``classify_image_graph_def.pb`` of guided-diffusion's ``evaluations/evaluator.py`` converted to
PyTorch, TF1's bilinear resize to 299 reproduced, so its features match the TF graph's. Its
weights are your file (nothing is downloaded): :data:`INCEPTION_WEIGHTS_FILE`. One pass gives an
:class:`InceptionOutput` (pool features, spatial features, logits without bias).

:func:`extract_features` runs the Inception and/or DINOv2 extractors over images
``[begin, end)`` of a PNG folder, an ADM ``.npz`` or a uint8 array and keeps what the scores
need (:class:`SampleFeatures`; several processes' slices merge in order). The scores themselves
are in :mod:`~dfm_ext.metrics.adm`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfm_ext.validation import parse_device
from ._images import progress
from .dinov2 import DINOv2Features
from .frechet import FeatureStatistics
from .samples import SampleSource, count_images, iter_uint8_batches

__all__ = [
    "ADMInceptionFeatures",
    "INCEPTION_WEIGHTS_FILE",
    "InceptionExtractor",
    "InceptionOutput",
    "SampleFeatures",
    "extract_features",
    "feature_extractors",
]

#: The torch-fidelity InceptionV3 weights (converted from the TF graph the ADM suite uses).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_INCEPTION_SOURCE = (
    "torch-fidelity's release v0.2.0 on GitHub (toshas/torch-fidelity, asset "
    f"{INCEPTION_WEIGHTS_FILE}, 91 MB), converted from the TF graph classify_image_graph_def.pb of the ADM suite"
)


@dataclass(frozen=True)
class InceptionOutput:
    """What one InceptionV3 pass gives the ADM metrics.

    Attributes:
        pool: ``pool_3`` features ``[B, 2048]`` (FID, precision/recall).
        spatial: ``mixed_6/conv[..., :7]`` flattened in ``(H, W, C)`` order ``[B, 2023]`` (sFID).
        logits: classifier logits without bias ``[B, 1008]`` (IS).
    """

    pool: Tensor
    spatial: Tensor
    logits: Tensor


def _torch_fidelity_inception() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` class, also where torchvision is missing."""
    try:
        # import_module: torch-fidelity ships no type information (and is optional here).
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    except ModuleNotFoundError as err:
        spec = importlib.util.find_spec("torch_fidelity")
        if err.name != "torchvision" or spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "the ADM Inception features need torch-fidelity: pip install torch-fidelity "
                "(where torch and torchvision match), or pip install --no-deps torch-fidelity"
            ) from err
    # torch-fidelity's package __init__ imports its CLIP and VGG extractors, which need torchvision
    # (it does not import beside a CPU torch here); the Inception module needs torch only. Load it
    # under a bare parent package, then drop that parent so the import state is as before.
    saved = sys.modules.get("torch_fidelity")
    bare = types.ModuleType("torch_fidelity")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = bare
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        if saved is None:
            del sys.modules["torch_fidelity"]
        else:
            sys.modules["torch_fidelity"] = saved
    return module.FeatureExtractorInceptionV3


class ADMInceptionFeatures(nn.Module):
    """The ADM suite's InceptionV3 features of uint8 RGB images ``[B, 3, H, W]`` (any ``H, W``).

    Args:
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a state dict;
            read once with ``weights_only=True`` to check it holds tensors only, since torch-fidelity
            itself unpickles it fully).
        device: where the network runs.

    Returns ``InceptionOutput`` (pool ``[B, 2048]``, spatial ``[B, 2023]``, logits ``[B, 1008]``).
    """

    def __init__(self, weights_path: str | os.PathLike, *, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device = parse_device(device if device is not None else "cpu")
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no InceptionV3 weights at {path!r}: FID/sFID/IS/precision/recall need {INCEPTION_WEIGHTS_FILE} "
                f"from {_INCEPTION_SOURCE} (nothing is downloaded at run time)"
            )
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path!r} is not a plain state dict (weights_only load failed: {err})") from None
        network = _torch_fidelity_inception()("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path)
        self.network = network.to(self.device).eval().requires_grad_(False)
        self._spatial: list[Tensor] = []
        # mixed_6/conv of the TF graph is Mixed_6d's 1x1 branch (conv + batch norm + ReLU), 192 x 17 x 17.
        self.network.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: self._spatial.append(out))
        self.name = "inception-v3-adm"

    def train(self, mode: bool = True) -> ADMInceptionFeatures:
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> InceptionOutput:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be uint8 [B, 3, H, W], got {what}")
        self._spatial.clear()
        pool, logits = self.network(images.to(self.device))
        (spatial,) = self._spatial
        self._spatial.clear()
        return InceptionOutput(pool, spatial[:, :7].permute(0, 2, 3, 1).flatten(1).float(), logits)


#: What :func:`extract_features` accepts as the Inception network: uint8 ``[B, 3, H, W]`` ->
#: :class:`InceptionOutput` (:class:`ADMInceptionFeatures`, or a stand-in with the same outputs).
InceptionExtractor = Callable[[Tensor], InceptionOutput]


# ---------------------------------------------------------------- features of a sample set


@dataclass
class SampleFeatures:
    """The features of a sample set that the scores need (``None`` where no extractor was given).

    Attributes:
        count: number of images.
        pool: Inception pool features ``[N, 2048]`` float32, in sample order.
        logits: Inception logits without bias ``[N, 1008]`` float32, in sample order.
        spatial: statistics of the spatial features (2023-d).
        dinov2: statistics of the DINOv2 features.
    """

    count: int = 0
    pool: np.ndarray | None = None
    logits: np.ndarray | None = None
    spatial: FeatureStatistics | None = None
    dinov2: FeatureStatistics | None = None

    def merge(self, other: SampleFeatures) -> SampleFeatures:
        """Both parts, ``self`` first (e.g. the slices of several processes, in rank order)."""
        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return b if a is None else a if b is None else np.concatenate([a, b])

        def merge(a: FeatureStatistics | None, b: FeatureStatistics | None) -> FeatureStatistics | None:
            return b if a is None else a if b is None else a.merge(b)

        for name in ("pool", "logits", "spatial", "dinov2"):
            if self.count and other.count and (getattr(self, name) is None) != (getattr(other, name) is None):
                raise ValueError(f"one part has {name} features and the other not: extract both with the same extractors")
        return SampleFeatures(
            self.count + other.count, cat(self.pool, other.pool), cat(self.logits, other.logits),
            merge(self.spatial, other.spatial), merge(self.dinov2, other.dinov2),
        )  # fmt: skip


def _dinov2_input(batch: np.ndarray, resolution: int) -> Tensor:
    """uint8 ``[B, H, W, C]`` -> float ``[B, 3, r, r]`` in ``[0, 1]``: PIL bicubic, as dgm-eval's torchvision transform."""
    from PIL import Image

    out = []
    for image in batch:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        out.append(np.asarray(pil.resize((resolution, resolution), Image.Resampling.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def feature_extractors(
    inception: InceptionExtractor | str | os.PathLike | None,
    dinov2: DINOv2Features | str | os.PathLike | nn.Module | None,
    device: Any,
) -> tuple[InceptionExtractor | None, DINOv2Features | None]:
    """``(inception, dinov2)``: the extractors that :func:`extract_features`' arguments of those names stand for.

    A weights path becomes :class:`ADMInceptionFeatures`, a DINOv2 folder or module
    :class:`~dfm_ext.metrics.dinov2.DINOv2Features` (both on ``device``); an extractor or ``None``
    is passed through. :func:`~dfm_ext.metrics.adm.evaluate` builds them here once, so that the
    reference's and the samples' passes share the networks (their weights are read once).
    """
    if isinstance(inception, (str, os.PathLike)):
        network: InceptionExtractor | None = ADMInceptionFeatures(inception, device=device)
    elif inception is not None and not callable(inception):
        raise TypeError(f"inception must be a weights path or a callable returning InceptionOutput, got {type(inception).__name__}")
    else:
        network = inception
    dino = dinov2 if dinov2 is None or isinstance(dinov2, DINOv2Features) else DINOv2Features(dinov2, device=device)
    return network, dino


@torch.no_grad()
def extract_features(
    samples: SampleSource,
    *,
    inception: InceptionExtractor | str | os.PathLike | None = None,
    dinov2: DINOv2Features | str | os.PathLike | nn.Module | None = None,
    begin: int = 0,
    end: int | None = None,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    progress_bar: bool = True,
) -> SampleFeatures:
    """Features of images ``[begin, end)`` of a PNG folder, an ADM ``.npz`` or a uint8 array ``[N, H, W, C]``.

    Args:
        samples: the sample set (grey images are repeated to RGB).
        inception: :class:`ADMInceptionFeatures`, its weights path, or any callable mapping uint8
            ``[B, 3, H, W]`` to :class:`InceptionOutput`; ``None`` skips FID/sFID/IS/precision/recall.
        dinov2: :class:`~dfm_ext.metrics.dinov2.DINOv2Features`, a local transformers DINOv2 folder
            or a module; ``None`` skips FDD.
        begin: first image (a process's slice).
        end: one past the last image (default: all).
        batch_size: images per forward pass.
        device: where the networks built here run.
        progress_bar: show a tqdm bar.
    """
    inception, dino = feature_extractors(inception, dinov2, device)
    if inception is None and dino is None:
        raise ValueError("extract_features needs inception= (FID, sFID, IS, precision/recall) or dinov2= (FDD)")
    total = count_images(samples)
    stop = total if end is None else end
    if not 0 <= begin <= stop <= total:
        raise ValueError(f"need 0 <= begin <= end <= {total} images, got begin={begin}, end={end}")
    pools, logits = [], []
    spatial = FeatureStatistics() if inception is not None else None
    dino_stats = FeatureStatistics() if dino is not None else None
    seen = 0
    batches = iter_uint8_batches(samples, batch_size, start=begin, stop=stop)
    for batch in progress(batches, enabled=progress_bar, desc="features", total=-(-(stop - begin) // batch_size)):
        seen += batch.shape[0]
        if inception is not None and spatial is not None:
            rgb = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()  # a writable copy
            out = inception(rgb)
            pools.append(out.pool.float().cpu().numpy())
            logits.append(out.logits.float().cpu().numpy())
            spatial.update(out.spatial)
        if dino is not None and dino_stats is not None:
            dino_stats.update(dino(_dinov2_input(batch, dino.resolution)))
    return SampleFeatures(
        seen, np.concatenate(pools) if pools else None, np.concatenate(logits) if logits else None, spatial, dino_stats
    )
