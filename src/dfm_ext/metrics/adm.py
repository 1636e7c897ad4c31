r"""The ADM evaluation suite's image metrics (FID, sFID, IS, precision/recall) and FDD-DINOv2, from sample files.

The DFM paper, DiT and SiT report ImageNet numbers from guided-diffusion's
``evaluations/evaluator.py`` (the "ADM suite"): one TensorFlow InceptionV3 graph
(``classify_image_graph_def.pb``) fed uint8 images at their native size. Its definitions:

- **FID**: Frechet distance of the 2048-d ``pool_3`` features, ``mu`` and ``numpy.cov``.
- **sFID**: the same on the *spatial* features ``mixed_6/conv[..., :7]``, flattened in
  ``(H, W, C)`` order: ``17 x 17 x 7 = 2023`` dimensions.
- **IS**: ``exp(E_x KL(p(y|x) || p(y)))`` with ``p(y|x) = softmax(pool_3 @ W)`` (the classifier
  *without* its bias, 1008 classes), computed on consecutive splits of 5000 samples, averaged.
- **Precision / recall** (Kynkaanniemi et al. 2019) on the pool features with ``k = 3``: a
  point's radius is the squared distance to its 3rd nearest neighbour in its own set; precision is
  the fraction of samples within some reference point's radius, recall the fraction of reference
  points within some sample's radius (``<=``).

The network is torch-fidelity's ``FeatureExtractorInceptionV3``
(:class:`~dfm_ext.metrics.adm_features.ADMInceptionFeatures`): the same TF weights converted to
PyTorch, with TF1's bilinear resize to 299 reproduced, so its features match the TF graph's. Its
weights are your file (nothing is downloaded):
:data:`~dfm_ext.metrics.adm_features.INCEPTION_WEIGHTS_FILE`.
**FDD** is the Frechet distance of DINOv2 ViT-L/14 CLS features (dgm-eval's protocol: each uint8
image resized to 224 x 224 with PIL bicubic, ImageNet normalisation), via
:class:`~dfm_ext.metrics.dinov2.DINOv2Features`.

Use: ``evaluate(samples, reference, inception=..., dinov2=...)``, where ``samples`` is a PNG folder,
an ADM ``.npz`` or a uint8 array, and ``reference`` an ADM reference batch (``.npz``) or a
:class:`ReferenceBatch`. For many processes: each runs
:func:`~dfm_ext.metrics.adm_features.extract_features` on its own ``[begin, end)`` slice, the
first merges the parts in order (:meth:`~dfm_ext.metrics.adm_features.SampleFeatures.merge`) and
calls :func:`scores_from_features`.

This module holds the scores, the reference batch and :func:`evaluate`;
:mod:`~dfm_ext.metrics.adm_features` the Inception network and the features of a sample set.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfm_ext.validation import parse_device
from .adm_features import InceptionExtractor, SampleFeatures, extract_features, feature_extractors
from .dinov2 import DINOv2Features
from .frechet import FeatureStatistics
from .samples import SampleSource, count_images

__all__ = [
    "EvaluationResult",
    "ReferenceBatch",
    "evaluate",
    "inception_score",
    "precision_recall",
    "scores_from_features",
]


# ---------------------------------------------------------------- scores from features


def inception_score(logits: Tensor | np.ndarray, *, split_size: int = 5000) -> float:
    r"""Inception score of classifier logits ``[N, K]``, the ADM suite's way.

    ``IS = mean over splits of exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))``, ``p(y)`` the
    mean of ``p(y|x)`` over the split; splits are consecutive runs of ``split_size`` samples (the
    last may be shorter), in the given order, no shuffling. Computed in float64.

    Example:
        >>> round(inception_score(torch.eye(4) * 50), 6)  # confident and evenly spread over K = 4 classes
        4.0
    """
    x = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"logits must be [N, K] with N >= 1, got {tuple(x.shape)}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i - b_j|^2`` ``[A, B]`` as ``|a|^2 - 2 a.b + |b|^2`` clipped at 0 (the ADM suite's formula)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min(0)


def _knn_radii(x: Tensor, k: int, block: int) -> Tensor:
    # The point itself is its own nearest neighbour (distance 0), hence the (k + 1)-th smallest.
    return torch.cat([_squared_distances(rows, x).kthvalue(k + 1, dim=1).values for rows in x.split(block)])


def _covered(points: Tensor, centres: Tensor, radii: Tensor, block: int) -> Tensor:
    """For each point: is it within ``radii[j]`` of some ``centres[j]``? ``[N]`` bool."""
    return torch.cat([(_squared_distances(rows, centres) <= radii[None, :]).any(dim=1) for rows in points.split(block)])


def precision_recall(
    reference: Tensor | np.ndarray, samples: Tensor | np.ndarray, *, k: int = 3, block: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[float, float]:  # fmt: skip
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``samples`` against ``reference``.

    Args:
        reference: reference features ``[N_r, D]`` (pool features of real images).
        samples: sample features ``[N_s, D]``.
        k: neighbourhood size (3 in the ADM suite).
        block: rows per distance block (memory: ``block x N`` float64).
        device: where the distances are computed (default: the features' device).

    Returns:
        ``(precision, recall)``. Squared Euclidean distances in float64 (the ADM suite computes
        them in float16 when that is finite, so a point on a ball's boundary can come out otherwise).

    Example:
        >>> ref = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
        >>> precision_recall(ref, ref + 0.5, k=1)  # every shifted point lies in a unit ball
        (1.0, 1.0)
        >>> precision_recall(ref, ref + 10.0, k=1)
        (0.0, 0.0)
    """
    ref, fake = torch.as_tensor(reference), torch.as_tensor(samples)
    if ref.ndim != 2 or fake.ndim != 2 or ref.shape[1] != fake.shape[1]:
        raise ValueError(f"reference and samples must be [N, D] with one D, got {tuple(ref.shape)} and {tuple(fake.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if min(ref.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"both sets need more than k={k} points, got {ref.shape[0]} and {fake.shape[0]}")
    dev = parse_device(device) if device is not None else ref.device
    dtype = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
    ref, fake = ref.to(dev, dtype), fake.to(dev, dtype)
    precision = _covered(fake, ref, _knn_radii(ref, k, block), block).double().mean()
    recall = _covered(ref, fake, _knn_radii(fake, k, block), block).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------- reference batches and scores


@dataclass
class ReferenceBatch:
    """Reference statistics in the ADM suite's ``.npz`` keys, plus what FDD and precision/recall need.

    Attributes:
        mu, sigma: pool-feature mean ``[2048]`` and covariance (``numpy.cov``) (ADM keys ``mu``, ``sigma``).
        mu_s, sigma_s: the same for the spatial features (``mu_s``, ``sigma_s``).
        count: number of reference images.
        pool: reference pool features ``[N, 2048]`` (precision/recall); computed from the images when absent.
        mu_dinov2, sigma_dinov2: DINOv2 statistics for FDD (this library's keys; not in ADM's files).
        images: path of the ``.npz`` whose ``arr_0`` holds the reference images, for what is missing.
    """

    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    count: int = 0
    pool: np.ndarray | None = None
    mu_dinov2: np.ndarray | None = None
    sigma_dinov2: np.ndarray | None = None
    images: Path | None = field(default=None, repr=False)

    _KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool", "mu_dinov2", "sigma_dinov2")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceBatch:
        """Read a reference ``.npz`` (an ADM one such as ``VIRTUAL_imagenet256_labeled.npz``, or one :meth:`save` wrote)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reference batch at {str(path)!r} (an ADM reference .npz, e.g. VIRTUAL_imagenet256_labeled.npz)")
        with np.load(path, allow_pickle=False) as data:
            found = {k: np.asarray(data[k]) for k in cls._KEYS if k in data.files}
            has_images = "arr_0" in data.files
            count = int(data["count"]) if "count" in data.files else 0
        ref = cls(**found, count=count, images=path if has_images else None)
        if has_images and not ref.count:
            ref.count = count_images(path)
        if ref.mu is None and not has_images:
            raise ValueError(f"{str(path)!r} has neither Inception statistics (mu, sigma) nor reference images (arr_0)")
        return ref

    def save(self, path: str | os.PathLike, *, images: np.ndarray | None = None) -> Path:
        """Write the statistics (and ``images`` as ``arr_0``) as an ``.npz`` the ADM suite can read too."""
        arrays = {k: v for k in self._KEYS if (v := getattr(self, k)) is not None}
        arrays["count"] = np.asarray(self.count)
        if images is not None:
            arrays["arr_0"] = images
        path = Path(path)
        np.savez(path, **arrays)
        return path

    @classmethod
    def from_images(
        cls, images: SampleSource, *, inception: InceptionExtractor | str | os.PathLike | None = None,
        dinov2: DINOv2Features | str | os.PathLike | nn.Module | None = None, batch_size: int = 100,
        device: str | torch.device | None = None, progress_bar: bool = True,
    ) -> ReferenceBatch:  # fmt: skip
        """Reference statistics of a set of images (a PNG folder, an ``.npz`` or an array)."""
        features = extract_features(images, inception=inception, dinov2=dinov2, batch_size=batch_size,
                                    device=device, progress_bar=progress_bar)  # fmt: skip
        ref = cls(count=features.count)
        ref._fill(features)
        if isinstance(images, (str, os.PathLike)) and Path(images).is_file():
            ref.images = Path(images)
        return ref

    def _fill(self, features: SampleFeatures) -> None:
        if features.pool is not None and features.spatial is not None:
            stats = _pool_statistics(features.pool)
            self.mu, self.sigma, self.pool = stats.mean.numpy(), stats.covariance.numpy(), features.pool
            self.mu_s, self.sigma_s = features.spatial.mean.numpy(), features.spatial.covariance.numpy()
        if features.dinov2 is not None:
            self.mu_dinov2, self.sigma_dinov2 = features.dinov2.mean.numpy(), features.dinov2.covariance.numpy()

    def prepare(
        self, *, inception: InceptionExtractor | str | os.PathLike | None = None,
        dinov2: DINOv2Features | str | os.PathLike | nn.Module | None = None, batch_size: int = 100,
        device: str | torch.device | None = None, progress_bar: bool = True,
    ) -> ReferenceBatch:  # fmt: skip
        """Compute from the reference images what the given extractors' scores need and the file lacks.

        An ADM reference batch has ``mu``/``sigma``/``mu_s``/``sigma_s`` but no raw pool features
        (precision/recall) or DINOv2 statistics (FDD): those come from its ``arr_0``, as in the ADM suite.
        """
        need_pool = inception is not None and self.pool is None
        need_dino = dinov2 is not None and self.mu_dinov2 is None
        if not (need_pool or need_dino):
            return self
        if self.images is None:
            missing = ["pool features" if need_pool else "", "DINOv2 statistics" if need_dino else ""]
            raise ValueError(f"the reference batch lacks {' and '.join(m for m in missing if m)} and holds no images (arr_0) to compute them")
        features = extract_features(self.images, inception=inception if need_pool else None, dinov2=dinov2 if need_dino else None,
                                    batch_size=batch_size, device=device, progress_bar=progress_bar)  # fmt: skip
        kept = (self.mu, self.sigma, self.mu_s, self.sigma_s)
        self._fill(features)
        if kept[0] is not None:  # the file's own Inception statistics win, as in the ADM suite
            self.mu, self.sigma, self.mu_s, self.sigma_s = kept
        return self


def _pool_statistics(pool: np.ndarray) -> FeatureStatistics:
    stats = FeatureStatistics()
    stats.update(torch.from_numpy(pool))
    return stats


def _moments(mu: np.ndarray | None, sigma: np.ndarray | None, count: int, what: str) -> FeatureStatistics:
    if mu is None or sigma is None:
        raise ValueError(f"the reference batch has no {what} statistics")
    return FeatureStatistics.from_moments(mu, sigma, max(count, 2))


@dataclass(frozen=True)
class EvaluationResult:
    """Scores of a sample set against a reference batch (``None``: not computed, no extractor given).

    Attributes:
        num_samples: images scored.
        fid, sfid, inception_score, precision, recall: the ADM suite's numbers.
        fdd: Frechet distance of DINOv2 features.
    """

    num_samples: int
    fid: float | None = None
    sfid: float | None = None
    inception_score: float | None = None
    precision: float | None = None
    recall: float | None = None
    fdd: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The scores as a plain dict (e.g. for a JSON line)."""
        return asdict(self)


def scores_from_features(
    features: SampleFeatures, reference: ReferenceBatch, *, split_size: int = 5000, k: int = 3,
    device: str | torch.device | None = None,
) -> EvaluationResult:  # fmt: skip
    """The scores of extracted sample features against a reference (see the module docs for the definitions)."""
    values: dict[str, float] = {}
    if features.pool is not None and features.logits is not None and features.spatial is not None:
        fake = _pool_statistics(features.pool)
        values["fid"] = _moments(reference.mu, reference.sigma, reference.count, "pool").frechet_distance(fake)
        values["sfid"] = _moments(reference.mu_s, reference.sigma_s, reference.count, "spatial").frechet_distance(features.spatial)
        values["inception_score"] = inception_score(features.logits, split_size=split_size)
        if reference.pool is None:
            raise ValueError("precision/recall need the reference pool features: call reference.prepare(inception=...) first")
        values["precision"], values["recall"] = precision_recall(reference.pool, features.pool, k=k, device=device)
    if features.dinov2 is not None:
        ref = _moments(reference.mu_dinov2, reference.sigma_dinov2, reference.count, "DINOv2")
        values["fdd"] = ref.frechet_distance(features.dinov2)
    return EvaluationResult(num_samples=features.count, **values)


def evaluate(
    samples: SampleSource,
    reference: ReferenceBatch | str | os.PathLike,
    *,
    inception: InceptionExtractor | str | os.PathLike | None = None,
    dinov2: DINOv2Features | str | os.PathLike | nn.Module | None = None,
    batch_size: int = 100,
    split_size: int = 5000,
    device: str | torch.device | None = None,
    progress_bar: bool = True,
) -> EvaluationResult:
    """Score a PNG folder, an ADM ``.npz`` or a uint8 array against a reference batch.

    Args:
        samples: the samples (a folder and an ``.npz`` of the same images score identically).
        reference: an ADM reference ``.npz`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``) or a
            :class:`ReferenceBatch`; what it lacks is computed from its images (:meth:`ReferenceBatch.prepare`).
        inception: ADM Inception (weights path or extractor): FID, sFID, IS, precision, recall.
        dinov2: DINOv2 (folder, module or extractor): FDD.
        batch_size: images per forward pass.
        split_size: IS split size (5000 in the ADM suite).
        device: where the networks and distances run.
        progress_bar: show tqdm bars.
    """
    inception, dino = feature_extractors(inception, dinov2, device)
    ref = reference if isinstance(reference, ReferenceBatch) else ReferenceBatch.load(reference)
    ref.prepare(inception=inception, dinov2=dino, batch_size=batch_size, device=device, progress_bar=progress_bar)
    features = extract_features(samples, inception=inception, dinov2=dino, batch_size=batch_size, device=device,
                                progress_bar=progress_bar)  # fmt: skip
    return scores_from_features(features, ref, split_size=split_size, device=device)
