"""The paper's metrics (FID, sFID, IS, precision/recall, FDD, FVD, frame-FID) against well-kept implementations.

Each score is fed the same random features as a reference implementation and must agree to 1e-5
relative: torchmetrics (installed with the ``metrics`` extra) always; pytorch-fid, cd-fvd and
torch-fidelity where they are installed. Those three declare torchvision (which pulls a CUDA torch
and does not import beside the CPU torch here), so they are installed with ``pip install --no-deps``
and their modules that import torchvision at the top cannot be imported: their functions are run
from their installed source (:func:`library_function`), verbatim.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dfm_ext.metrics import (
    INCEPTION_WEIGHTS_FILE,
    ADMInceptionFeatures,
    FeatureStatistics,
    I3DFeatures,
    InceptionOutput,
    ReferenceBatch,
    count_images,
    evaluate,
    extract_features,
    frame_fid,
    frechet_distance,
    fvd,
    inception_score,
    iter_uint8_batches,
    precision_recall,
    preprocess_i3d,
    read_npz_labels,
    save_samples,
    to_uint8,
    write_npz,
)

REL = 1e-5


def library_function(package: str, relpath: str, name: str, namespace: dict[str, Any]) -> Any:
    """Function ``name`` from the installed ``package``'s file ``relpath``, compiled from its source.

    ``find_spec`` of a top-level package locates it without importing it (torch-fidelity's
    ``__init__`` fails without torchvision).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
            return namespace[name]
    raise AssertionError(f"{path} defines no function {name}")


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def _stats(x: torch.Tensor) -> FeatureStatistics:
    stats = FeatureStatistics()
    stats.update(x)
    return stats


# ---------------------------------------------------------------- Frechet distances


def test_fid_equals_torchmetrics_on_the_same_features() -> None:
    fid_module = pytest.importorskip("torchmetrics.image.fid")

    class Features(nn.Module):
        num_features = 48

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    real, fake = _features(300, 48, 0), _features(250, 48, 1, shift=0.2)
    reference = fid_module.FrechetInceptionDistance(feature=Features())
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())
    assert _stats(real).frechet_distance(_stats(fake)) == pytest.approx(expected, rel=REL)
    # The ADM keys round-trip: mu/sigma read back give the same distance.
    stored = FeatureStatistics.from_moments(_stats(real).mean.numpy(), _stats(real).covariance.numpy(), 300)
    assert stored.frechet_distance(_stats(fake)) == pytest.approx(expected, rel=REL)


def test_frechet_distance_equals_pytorch_fid_and_cd_fvd_formulations() -> None:
    import scipy.linalg

    real, fake = _features(200, 32, 2), _features(220, 32, 3, shift=-0.1)
    r, f = _stats(real), _stats(fake)
    calculate = library_function("pytorch_fid", "fid_score.py", "calculate_frechet_distance", {"np": np, "linalg": scipy.linalg})
    expected = calculate(r.mean.numpy(), r.covariance.numpy(), f.mean.numpy(), f.covariance.numpy())
    assert frechet_distance(r.mean, r.covariance, f.mean, f.covariance) == pytest.approx(expected, rel=REL)
    # FVD: cd-fvd's FeatureStats (raw sums, covariance / N) and its compute_fvd_from_stats.
    metric_utils = pytest.importorskip("cdfvd.utils.metric_utils")
    from_stats = library_function("cdfvd", "fvd.py", "compute_fvd_from_stats", {"np": np, "scipy": scipy})
    theirs = []
    for x in (real, fake):
        s = metric_utils.FeatureStats(capture_mean_cov=True)
        s.append(x.float().numpy())
        theirs.append(s)
    expected_fvd = from_stats(None, fake_stats=theirs[1], real_stats=theirs[0])
    ours = fvd(_stats(real.float().double()), _stats(fake.float().double()))
    assert ours == pytest.approx(float(expected_fvd), rel=REL)


def test_frechet_distance_of_rotated_gaussians_matches_the_closed_form() -> None:
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a, b = torch.rand(6, generator=g, dtype=torch.float64) * 4, torch.rand(6, generator=g, dtype=torch.float64) * 4
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    value = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert value == pytest.approx(expected, rel=1e-9)
    # ddof=0 (FVD) is the same distance on covariances scaled by (n - 1) / n.
    x, y = _features(30, 6, 5), _features(40, 6, 6)
    biased = frechet_distance(x.mean(0), torch.cov(x.T, correction=0), y.mean(0), torch.cov(y.T, correction=0))
    assert _stats(x).frechet_distance(_stats(y), ddof=0) == pytest.approx(biased, rel=1e-9)


# ---------------------------------------------------------------- Inception score, precision / recall


def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """guided-diffusion evaluator.py's compute_inception_score, with the TF softmax done in numpy."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds = preds / preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_equals_torchmetrics_and_the_adm_splits() -> None:
    inception = pytest.importorskip("torchmetrics.image.inception")
    logits = _features(400, 30, 7) * 3

    class Logits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about its feature buffer and the std of one split
        reference = inception.InceptionScore(feature=Logits(), splits=1)
        reference.update(logits)
        expected = float(reference.compute()[0])
    assert inception_score(logits) == pytest.approx(expected, rel=REL)  # one split: order does not matter
    # Several splits: the ADM suite's consecutive splits of split_size (torchmetrics shuffles first).
    assert inception_score(logits, split_size=150) == pytest.approx(_adm_inception_score(logits.numpy(), 150), rel=REL)
    assert inception_score(logits, split_size=150) != pytest.approx(inception_score(logits.flip(0), split_size=150), rel=REL)


def _adm_precision_recall(ref: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """guided-diffusion's ManifoldEstimator (one block): squared distances, radius = k-th neighbour, <=."""
    def dist(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0.0)

    radii_ref = np.partition(dist(ref, ref), k, axis=1)[:, k]
    radii_fake = np.partition(dist(fake, fake), k, axis=1)[:, k]
    d = dist(ref, fake)
    precision = np.mean(np.any(d <= radii_ref[:, None], axis=0))
    recall = np.mean(np.any(d <= radii_fake[None, :], axis=1))
    return float(precision), float(recall)


def test_precision_recall_equal_the_adm_definition_and_torch_fidelity() -> None:
    ref, fake = _features(300, 16, 8), _features(280, 16, 9, shift=0.05) * 1.2
    ours = precision_recall(ref, fake, block=100)
    assert ours == _adm_precision_recall(ref.numpy(), fake.numpy())
    assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.95  # a case where both balls matter
    assert precision_recall(ref, ref) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k=3 points"):
        precision_recall(ref[:3], fake)
    # torch-fidelity's prc (generated first, real second; Euclidean distances, kthvalue(k + 1)).
    namespace: dict[str, Any] = {"torch": torch}
    library_function("torch_fidelity", "metric_prc.py", "calc_cdist_full", namespace)
    full = library_function("torch_fidelity", "metric_prc.py", "calculate_precision_recall_full", namespace)
    assert ours == pytest.approx(full(fake, ref, 3, 10000), rel=REL)


# ---------------------------------------------------------------- sample files and evaluate()


class _ToyInception(nn.Module):
    """Stands in for the ADM Inception: uint8 [B, 3, H, W] -> InceptionOutput (8-d pool, 6-d spatial, 5 logits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        x = torch.relu(self.conv(images.float() / 255))
        pool = x.mean(dim=(2, 3))
        return InceptionOutput(pool, x[:, :2, :3, :1].flatten(1), self.fc(pool))


def _images(n: int, seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_npz_layout_round_trips_and_streams(tmp_path: Path) -> None:
    images = _images(7, 0)
    write_npz(tmp_path / "s.npz", images, labels=np.arange(7))
    with np.load(tmp_path / "s.npz") as data:  # the ADM layout: arr_0 uint8 NHWC, arr_1 labels
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 12, 12, 3)
    np.testing.assert_array_equal(np.concatenate(list(iter_uint8_batches(tmp_path / "s.npz", 3))), images)
    np.testing.assert_array_equal(np.concatenate(list(iter_uint8_batches(tmp_path / "s.npz", 2, start=3, stop=6))), images[3:6])
    np.testing.assert_array_equal(read_npz_labels(tmp_path / "s.npz"), np.arange(7))
    floats = torch.rand(3, 3, 5, 5) * 2 - 1
    array = save_samples(floats, folder=tmp_path / "png", start=10)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["000010.png", "000011.png", "000012.png"]
    np.testing.assert_array_equal(np.concatenate(list(iter_uint8_batches(tmp_path / "png"))), array)
    np.testing.assert_array_equal(array, to_uint8(floats))
    with pytest.raises(ValueError, match="uint8 array"):
        write_npz(tmp_path / "bad.npz", images.astype(np.float32))
    np.savez(tmp_path / "other.npz", x=images)
    with pytest.raises(ValueError, match="no 'arr_0'"):
        count_images(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="no sample folder"):
        count_images(tmp_path / "missing.npz")


def test_evaluate_folder_equals_npz_and_reference_round_trips(tmp_path: Path) -> None:
    samples, reference_images = _images(40, 1), _images(36, 2)
    save_samples(samples, folder=tmp_path / "samples", npz=tmp_path / "samples.npz")
    write_npz(tmp_path / "ref.npz", reference_images)
    inception = _ToyInception()
    dinov2 = nn.Sequential(nn.Conv2d(3, 4, 14, stride=14), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ref = ReferenceBatch.from_images(tmp_path / "ref.npz", inception=inception, dinov2=dinov2, progress_bar=False)
    ref.save(tmp_path / "ref_stats.npz")
    options: dict[str, Any] = dict(inception=inception, dinov2=dinov2, batch_size=16, split_size=25, progress_bar=False)
    from_folder = evaluate(tmp_path / "samples", tmp_path / "ref_stats.npz", **options)
    from_npz = evaluate(tmp_path / "samples.npz", ref, **options)
    assert from_folder == from_npz
    assert from_folder.num_samples == 40 and all(v is not None for v in from_folder.as_dict().values())
    # An ADM-style reference batch (images + mu/sigma/mu_s/sigma_s, no pool features, no DINOv2
    # statistics) gives the same scores: what it lacks comes from its arr_0.
    np.savez(tmp_path / "adm_ref.npz", arr_0=reference_images, mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s, sigma_s=ref.sigma_s)
    adm = evaluate(tmp_path / "samples.npz", tmp_path / "adm_ref.npz", **options).as_dict()
    assert adm == pytest.approx(from_folder.as_dict(), rel=1e-9)  # DINOv2 statistics: other batches, other round-off
    # Scored by hand from the same features: FID is the Frechet distance of the pool features.
    features = extract_features(samples, inception=inception, progress_bar=False)
    assert features.pool is not None
    assert from_folder.fid == pytest.approx(_stats(torch.from_numpy(ref.pool).double()).frechet_distance(_stats(torch.from_numpy(features.pool).double())), rel=1e-9)
    # Slices of several processes, merged in order, give the same features.
    parts = [extract_features(tmp_path / "samples", inception=inception, begin=b, end=e, progress_bar=False) for b, e in ((0, 13), (13, 40))]
    merged = parts[0].merge(parts[1])
    assert merged.count == 40 and merged.pool is not None
    np.testing.assert_allclose(merged.pool, features.pool, rtol=1e-6)
    with pytest.raises(ValueError, match="needs inception="):
        extract_features(samples)


def test_missing_weights_say_which_file_and_where_from(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{INCEPTION_WEIGHTS_FILE}.*torch-fidelity"):
        ADMInceptionFeatures(tmp_path / INCEPTION_WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match=r"i3d_pretrained_400.pt.*TATS"):
        I3DFeatures(tmp_path / "i3d_pretrained_400.pt")
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled"):
        ReferenceBatch.load(tmp_path / "ref.npz")
    (tmp_path / "pickled.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a plain state dict"):
        ADMInceptionFeatures(tmp_path / "pickled.pth")


# ---------------------------------------------------------------- video


def test_fvd_and_frame_fid_on_toy_extractors() -> None:
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (4, 17, 10, 12, 3), dtype=np.uint8)
    fake = (real.astype(np.int64) // 2).astype(np.uint8)
    pooled = nn.Sequential(nn.AdaptiveAvgPool3d((2, 1, 1)), nn.Flatten())  # [B, 3, T, 224, 224] -> [B, 6]
    extractor = I3DFeatures(pooled)
    clips = preprocess_i3d(real[:, :16])
    assert clips.shape == (4, 3, 16, 224, 224) and -1 - 1e-6 <= float(clips.min()) and float(clips.max()) <= 1 + 1e-6
    value = fvd(real, fake, extractor=extractor, batch_size=4)
    r, f = extractor(real[:, :16]).double(), extractor(fake[:, :16]).double()
    expected = frechet_distance(r.mean(0), torch.cov(r.T, correction=0), f.mean(0), torch.cov(f.T, correction=0))
    assert value == pytest.approx(expected, rel=1e-9) and value > 0
    assert fvd(real, real, extractor=extractor) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="16 frames"):
        fvd(real[:, :8], fake, extractor=extractor)
    toy = _ToyInception()
    assert frame_fid(real, fake, inception=toy) > frame_fid(real, real, inception=toy)


def test_i3d_features_equal_cd_fvd(tmp_path: Path) -> None:
    utils = pytest.importorskip("cdfvd.third_party.i3d.utils")
    pytorch_i3d = pytest.importorskip("cdfvd.third_party.i3d.pytorch_i3d")
    videos = np.random.default_rng(1).integers(0, 256, (2, 16, 20, 24, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess_i3d(videos), utils.preprocess_i3d(videos), rtol=0, atol=0)
    torch.manual_seed(0)
    network = pytorch_i3d.InceptionI3d(400, in_channels=3).eval()
    torch.save(network.state_dict(), tmp_path / "i3d_pretrained_400.pt")
    ours = I3DFeatures(tmp_path / "i3d_pretrained_400.pt")(videos)
    with torch.no_grad():
        theirs = network(utils.preprocess_i3d(videos))
    assert ours.shape == (2, 400)
    torch.testing.assert_close(ours, theirs, rtol=REL, atol=1e-6)


def test_adm_inception_features_from_torch_fidelity(tmp_path: Path) -> None:
    from dfm_ext.metrics.adm_features import _torch_fidelity_inception

    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
    cls = _torch_fidelity_inception()
    module = sys.modules[cls.__module__]
    # A state dict of the right layout with random weights: build without loading any (no download).
    saved = module.load_state_dict_from_url, cls.load_state_dict
    module.load_state_dict_from_url, cls.load_state_dict = (lambda *a, **k: {}), (lambda self, *a, **k: None)
    try:
        torch.manual_seed(0)
        random_net = cls("random", ["2048"])
    finally:
        module.load_state_dict_from_url, cls.load_state_dict = saved
    torch.save(random_net.state_dict(), tmp_path / INCEPTION_WEIGHTS_FILE)
    extractor = ADMInceptionFeatures(tmp_path / INCEPTION_WEIGHTS_FILE)
    images = torch.from_numpy(_images(2, 3, size=40)).permute(0, 3, 1, 2).contiguous()
    out = extractor(images)
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 17 * 17 * 7) and out.logits.shape == (2, 1008)
    captured: list[torch.Tensor] = []
    hook = random_net.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, o: captured.append(o))
    pool, = random_net.eval()(images)
    hook.remove()
    torch.testing.assert_close(out.pool, pool)
    torch.testing.assert_close(out.spatial, captured[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(out.logits, pool @ random_net.fc.weight.T)
