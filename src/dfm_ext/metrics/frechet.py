"""Frechet distance between Gaussians fitted to image features (the maths behind FID and FDD).

``FD = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})``

computed in float64. The trace term comes from symmetric eigendecompositions: ``S_1 = R R^T``
(eigenpairs above round-off), then the eigenvalues of ``R^T S_2 R``. That stays real and finite
where ``scipy.linalg.sqrtm`` of the non-symmetric ``S_1 S_2`` returns complex parts for
rank-deficient covariances (fewer samples than feature dimensions), and it is fast there: the
second eigenproblem is only as large as the rank of ``S_1``. Moments stream: ``FeatureStatistics`` accumulates a running mean and centred
second moment (Chan et al.'s pairwise update), mergeable across batches and processes.

Which features is the user's choice (a ``FeatureExtractor``); ``dfm_ext.metrics`` ships
EfficientNet-Lite0 features (offline, "FD-EffNet") and loaders for user-provided InceptionV3 (FID)
and DINOv2 (FDD) weights. Values from different extractors, resolutions or sample counts are not
comparable.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ._images import ImageSource, SetShapes, iter_batches, num_batches, progress, to_unit_range

__all__ = [
    "FeatureExtractor",
    "FeatureStatistics",
    "FrechetDistance",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_images",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images to feature vectors.

    ``__call__(images)`` takes ``[B, C, H, W]`` float images in ``[0, 1]`` (``C`` = 1 or 3, any
    ``H, W``; the extractor resizes and normalises as its network needs) and returns ``[B, D]``.
    ``name`` identifies the features in logs (e.g. ``"effnet-lite0-224"``).
    """

    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


def _as_float64(x: Tensor | np.ndarray, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite entries")
    return x


def _sqrt_factor(s: Tensor) -> Tensor:
    """``R [D, r]`` with ``R R^T = S`` for a positive semi-definite ``S``, ``r`` its numerical rank.

    ``R = V_r diag(sqrt(l_r))`` from the eigenpairs above round-off. With fewer samples than
    feature dimensions (``r < D``) the second eigenproblem below shrinks from ``D x D`` to ``r x r``.
    """
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    tol = vals.abs().max() * s.shape[0] * torch.finfo(vals.dtype).eps
    keep = vals > tol
    return vecs[:, keep] * vals[keep].sqrt()


def frechet_distance(
    mu1: Tensor | np.ndarray, sigma1: Tensor | np.ndarray, mu2: Tensor | np.ndarray, sigma2: Tensor | np.ndarray
) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Args:
        mu1: mean ``[D]``.
        sigma1: covariance ``[D, D]`` (symmetric positive semi-definite).
        mu2: mean ``[D]``.
        sigma2: covariance ``[D, D]``.

    Returns:
        ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)``, in
        float64, clipped at 0 (it is a squared distance; round-off can dip below).

    Example:
        >>> mu, var = torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0]))
        >>> frechet_distance(mu, var, mu + 1, torch.diag(torch.tensor([4.0, 1.0])))  # 2 + (1 + 1)
        4.0
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must both be [D], got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [D, D] = [{d}, {d}] to match the means, got {tuple(s.shape)}")
    return _frechet_distance(mu1, sigma1, mu2, sigma2, _sqrt_factor(sigma1))


def _frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, root1: Tensor) -> float:
    # With S1 = R R^T, the non-zero eigenvalues of S1^1/2 S2 S1^1/2 (equivalently of S1 S2) are
    # those of the symmetric R^T S2 R, so they stay real and the matrix is only r x r.
    middle = root1.T @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(value), 0.0)


class FeatureStatistics:
    """Streaming mean and covariance of feature vectors, in float64, mergeable.

    Keeps the count, the mean and the centred second moment ``M2 = sum (x - mean)(x - mean)^T``;
    batches combine with Chan et al.'s pairwise formula, so the result equals the statistics of
    all features at once (up to round-off) and needs no second pass.

    Args:
        num_features: ``D``; inferred from the first batch when ``None``.

    Example:
        >>> x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
        >>> stats = FeatureStatistics()
        >>> for batch in x.split(7):
        ...     stats.update(batch)
        >>> stats.count, torch.allclose(stats.covariance, torch.cov(x.T).double())
        (100, True)
    """

    def __init__(self, num_features: int | None = None) -> None:
        if num_features is not None and num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        self._root: tuple[tuple[int, int], Tensor] | None = None

    def _combine(self, count: int, mean: Tensor, m2: Tensor) -> None:
        if self.count == 0:
            self.count, self._mean, self._m2 = count, mean.clone(), m2.clone()
            return
        assert self._mean is not None and self._m2 is not None
        total = self.count + count
        delta = mean - self._mean
        self._m2 = self._m2 + m2 + torch.outer(delta, delta) * (self.count * count / total)
        self._mean = self._mean + delta * (count / total)
        self.count = total

    def _check_dim(self, d: int, what: str) -> None:
        if self.num_features is None:
            self.num_features = d
        elif d != self.num_features:
            raise ValueError(f"{what} has {d} features, these statistics have {self.num_features}")

    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        """Add a batch of features ``[B, D]``."""
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor [B, D], got {type(features).__name__}")
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"features must be a non-empty [B, D] tensor, got shape {tuple(features.shape)}")
        x = features.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError(f"features of shape {tuple(x.shape)} have non-finite entries")
        self._check_dim(x.shape[1], f"a batch of shape {tuple(x.shape)}")
        mean = x.mean(dim=0)
        centred = x - mean
        self._combine(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """A new ``FeatureStatistics`` of both sets together (e.g. gathered from several processes)."""
        if not isinstance(other, FeatureStatistics):
            raise TypeError(f"can only merge FeatureStatistics, got {type(other).__name__}")
        merged = FeatureStatistics(self.num_features)
        for part in (self, other):
            if part.count:
                assert part._mean is not None and part._m2 is not None
                merged._check_dim(part._mean.shape[0], "merged statistics")
                merged._combine(part.count, part._mean, part._m2)
        return merged

    @property
    def mean(self) -> Tensor:
        """Mean ``[D]`` (float64)."""
        if self._mean is None:
            raise ValueError("no features were added yet")
        return self._mean.clone()

    @property
    def covariance(self) -> Tensor:
        """Unbiased covariance ``[D, D]`` (float64, divides by ``count - 1`` like ``numpy.cov``)."""
        return self.covariance_with(ddof=1)

    def covariance_with(self, ddof: int) -> Tensor:
        """Covariance ``M2 / (count - ddof)``: ``ddof=1`` unbiased (FID), ``ddof=0`` biased (StyleGAN-V's FVD)."""
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        if self._m2 is None or self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self._m2 / (self.count - ddof)

    @classmethod
    def from_moments(cls, mean: Tensor | np.ndarray, covariance: Tensor | np.ndarray, count: int) -> FeatureStatistics:
        """Statistics from a stored mean ``[D]`` and unbiased covariance ``[D, D]`` (e.g. an ADM reference batch).

        ``count`` is the number of feature vectors they came from; it matters only when these
        statistics are merged with others or read with ``ddof=0``.
        """
        mu, sigma = _as_float64(mean, "mean"), _as_float64(covariance, "covariance")
        d = mu.shape[0] if mu.ndim == 1 else -1
        if mu.ndim != 1 or sigma.shape != (d, d):
            raise ValueError(f"mean must be [D] and covariance [D, D], got {tuple(mu.shape)} and {tuple(sigma.shape)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ValueError(f"count must be an int >= 2, got {count!r}")
        stats = cls(d)
        stats._combine(count, mu, sigma * (count - 1))
        return stats

    def frechet_distance(self, other: FeatureStatistics, *, ddof: int = 1) -> float:
        """Frechet distance between the Gaussians fitted to ``self`` and ``other``.

        ``ddof=1`` (unbiased covariances) is FID's convention (``numpy.cov``); ``ddof=0`` is the
        one of the StyleGAN-V / cd-fvd FVD code.
        """
        if not isinstance(other, FeatureStatistics):
            raise TypeError(f"other must be FeatureStatistics, got {type(other).__name__}")
        if self.num_features != other.num_features:
            raise ValueError(f"feature sizes differ: {self.num_features} vs {other.num_features}")
        own = self.covariance_with(ddof)
        # The square root of our covariance is cached: comparing one reference with many models
        # then costs one eigendecomposition per model instead of two.
        if self._root is None or self._root[0] != (self.count, ddof):
            self._root = ((self.count, ddof), _sqrt_factor(own))
        return _frechet_distance(self.mean, own, other.mean, other.covariance_with(ddof), self._root[1])

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to a ``.safetensors`` file (e.g. reference statistics of a data set)."""
        from safetensors.torch import save_file

        if self._mean is None or self._m2 is None:
            raise ValueError("no features were added yet; nothing to save")
        save_file(
            {"count": torch.tensor([self.count], dtype=torch.int64), "mean": self._mean, "m2": self._m2},
            os.fspath(path),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStatistics:
        """Read statistics written by ``save``."""
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no statistics file at {os.fspath(path)!r}")
        tensors = load_file(os.fspath(path))
        if set(tensors) != {"count", "mean", "m2"}:
            raise ValueError(f"{os.fspath(path)!r} is not a FeatureStatistics file (keys {sorted(tensors)})")
        stats = cls(tensors["mean"].shape[0])
        stats._combine(int(tensors["count"][0]), tensors["mean"].double(), tensors["m2"].double())
        return stats


class FrechetDistance:
    """Streaming Frechet distance between the features of real and fake images.

    Args:
        extractor: the feature network (see ``FeatureExtractor``).
        value_range: the range the images come in, ``(-1, 1)`` or ``(0, 1)``; mapped to ``[0, 1]``
            and clamped before the extractor sees them (as saving to uint8 would).
        reference: precomputed statistics of the real set (``feature_statistics`` or
            ``FeatureStatistics.load``); real batches added with ``update`` are merged into them.

    Example:
        >>> class MeanColour:  # a toy extractor: the mean of each channel
        ...     name = "mean-colour"
        ...     def __call__(self, images):
        ...         return images.mean(dim=(2, 3))
        >>> g = torch.Generator().manual_seed(0)
        >>> metric = FrechetDistance(MeanColour(), value_range=(0, 1))
        >>> metric.update(torch.rand(64, 3, 8, 8, generator=g), real=True)
        >>> metric.update(torch.rand(64, 3, 8, 8, generator=g) * 0.5, real=False)  # darker
        >>> round(metric.compute(), 2)  # about 3 channels x 0.25^2 from the means
        0.19
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        *,
        value_range: tuple[float, float] = (-1.0, 1.0),
        reference: FeatureStatistics | None = None,
    ) -> None:
        if not callable(extractor):
            raise TypeError(f"extractor must be callable (a FeatureExtractor), got {type(extractor).__name__}")
        if reference is not None and not isinstance(reference, FeatureStatistics):
            raise TypeError(f"reference must be FeatureStatistics, got {type(reference).__name__}")
        self.extractor = extractor
        self.value_range = value_range
        self.real = reference.merge(FeatureStatistics()) if reference is not None else FeatureStatistics()
        self.fake = FeatureStatistics()
        self._shapes = SetShapes()

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Extract features of a batch ``[B, C, H, W]`` and add them to the real or the fake set."""
        self._shapes.check(images, real)
        features = self.extractor(to_unit_range(images, self.value_range))
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"extractor must return [B, D] with B = {images.shape[0]}, returned {shape}")
        (self.real if real else self.fake).update(features)

    def compute(self) -> float:
        """The Frechet distance between everything added so far."""
        for name, stats in (("real", self.real), ("fake", self.fake)):
            if stats.count < 2:
                raise ValueError(f"the {name} set has {stats.count} images; a Frechet distance needs at least 2 per set")
        return self.real.frechet_distance(self.fake)


def feature_statistics(
    images: ImageSource,
    extractor: FeatureExtractor,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
    progress_bar: bool = True,
) -> FeatureStatistics:
    """Feature statistics of a set of images, e.g. to save reference statistics of a data set once.

    Args:
        images: a tensor ``[N, C, H, W]`` or an iterable of batches.
        extractor: the feature network.
        value_range: the range the images come in.
        batch_size: batch size used to split a tensor input.
        progress_bar: show a tqdm bar.
    """
    metric = FrechetDistance(extractor, value_range=value_range)
    batches = iter_batches(images, batch_size, name="images")
    for batch in progress(batches, enabled=progress_bar, desc=f"features {getattr(extractor, 'name', '')}",
                          total=num_batches(images, batch_size)):
        metric.update(batch, real=True)
    return metric.real


def frechet_distance_from_images(
    real: ImageSource | FeatureStatistics,
    fake: ImageSource,
    extractor: FeatureExtractor,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
    progress_bar: bool = True,
) -> float:
    """Frechet distance between the ``extractor`` features of two image sets (lower is better).

    Args:
        real: reference images (a tensor ``[N, C, H, W]`` or an iterable of batches), or their
            precomputed ``FeatureStatistics``.
        fake: generated images, same ``C, H, W`` as ``real``.
        extractor: the feature network.
        value_range: the range both sets come in, ``(-1, 1)`` or ``(0, 1)``.
        batch_size: batch size used to split tensor inputs.
        progress_bar: show a tqdm bar per set.
    """
    reference = real if isinstance(real, FeatureStatistics) else None
    metric = FrechetDistance(extractor, value_range=value_range, reference=reference)
    sets: list[tuple[bool, ImageSource, str]] = [] if isinstance(real, FeatureStatistics) else [(True, real, "real")]
    sets.append((False, fake, "fake"))
    for flag, source, name in sets:
        batches = iter_batches(source, batch_size, name=name)
        for batch in progress(batches, enabled=progress_bar, desc=f"FD {name}", total=num_batches(source, batch_size)):
            metric.update(batch, real=flag)
    return metric.compute()
