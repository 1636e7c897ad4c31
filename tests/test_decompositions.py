"""Decompositions: exact inverse, linearity, previews, shapes, references, gradients, errors."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext import Decomposition
from dfm_ext.decompositions.dct import DCTDecomposition
from dfm_ext.decompositions.identity import IdentityDecomposition
from dfm_ext.decompositions.laplacian import LaplacianPyramid
from dfm_ext.decompositions.wavelet import WaveletDecomposition

DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies: a decomposition together with a sample shape it accepts.


@st.composite
def laplacians(draw, video: bool | None = None):
    n = draw(st.integers(1, 3))
    coarse = sorted(draw(st.sets(st.sampled_from([2, 3, 4, 6, 8]), min_size=n, max_size=n)), reverse=True)
    factors = (*coarse, 1)
    down = draw(st.sampled_from(["area", "bilinear", "bicubic"]))
    up = draw(st.sampled_from(["nearest", "bilinear", "bicubic"]))
    is_video = draw(st.booleans()) if video is None else video
    temporal = None
    if is_video and draw(st.booleans()):
        temporal = tuple(sorted(draw(st.lists(st.sampled_from([1, 2]), min_size=n + 1, max_size=n + 1)), reverse=True))
        temporal = (*temporal[:-1], 1)
    lcm = math.lcm(*factors)
    h = lcm * draw(st.integers(1, 2))
    w = lcm * draw(st.integers(1, 3))
    dims = (h, w)
    if is_video:
        dims = (draw(st.integers(1, 2)) * (2 if temporal and temporal[0] == 2 else 1), *dims)
    d = LaplacianPyramid(factors, down=down, up=up, temporal_factors=temporal)
    return d, dims


@st.composite
def wavelets(draw):
    wave = draw(st.sampled_from(["haar", "db2", "db3"]))
    levels = draw(st.integers(1, 3))
    num_stages = draw(st.integers(2, levels + 1))
    length = 2 * int(wave[2:]) if wave.startswith("db") else 2
    m_min = max(1, math.ceil(length / 2))  # the last level sees 2 * m >= filter length pixels
    h = 2**levels * draw(st.integers(m_min, m_min + 1))
    w = 2**levels * draw(st.sampled_from([m_min, m_min + 1, m_min + 3]))
    dims = (h, w)
    if draw(st.booleans()):
        dims = (draw(st.integers(1, 3)), *dims)
    return WaveletDecomposition(wave, levels=levels, num_stages=num_stages), dims


@st.composite
def dcts(draw):
    b = draw(st.integers(2, 8))
    n = draw(st.integers(1, min(3, b - 1)))
    bands = tuple(sorted(draw(st.sets(st.integers(1, b - 1), min_size=n, max_size=n))))
    dims = (b * draw(st.integers(1, 3)), b * draw(st.integers(1, 3)))
    if draw(st.booleans()):
        dims = (draw(st.integers(1, 3)), *dims)
    return DCTDecomposition(block_size=b, bands=bands), dims


@st.composite
def identities(draw):
    dims = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    if draw(st.booleans()):
        dims = (draw(st.integers(1, 3)), *dims)
    return IdentityDecomposition(), dims


any_decomposition = st.one_of(laplacians(), wavelets(), dcts(), identities())


@st.composite
def cases(draw, decompositions=any_decomposition):
    d, dims = draw(decompositions)
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), *dims)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    return d, shape, dtype, seed


def sample(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Invariants every decomposition has.


@given(cases())
def test_recompose_inverts_decompose(case):
    d, shape, dtype, seed = case
    x = sample(shape, dtype, seed)
    stages = d.decompose(x)
    assert len(stages) == d.num_stages
    assert [tuple(s.shape) for s in stages] == d.stage_shapes(shape)
    assert all(s.dtype == dtype and s.device == x.device for s in stages)
    y = d.recompose(stages)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, x) <= TOL[dtype]


@given(cases(), st.floats(-3, 3), st.floats(-3, 3))
def test_decompose_is_linear(case, a, b):
    d, shape, dtype, seed = case
    x, y = sample(shape, dtype, seed), sample(shape, dtype, seed + 1)
    lhs = d.decompose(a * x + b * y)
    rhs = [a * sx + b * sy for sx, sy in zip(d.decompose(x), d.decompose(y))]
    scale = abs(a) + abs(b) + 1e-3
    for l, r in zip(lhs, rhs):
        assert (l - r).abs().max().item() <= 50 * TOL[dtype] * scale * (1 + r.abs().max().item())


@given(cases())
def test_preview(case):
    d, shape, dtype, seed = case
    x = sample(shape, dtype, seed)
    stages = d.decompose(x)
    last = d.num_stages - 1
    assert rel_err(d.preview(stages, last), x) <= TOL[dtype]
    for upto in range(d.num_stages):
        full = d.preview(stages, upto)
        assert full.shape == stages[upto].shape, "the preview is at stage upto's resolution"
        assert torch.equal(d.preview(stages[: upto + 1], upto), full), "later stages must not matter"


def test_every_decomposition_constructs_without_arguments_and_is_a_decomposition():
    for cls, n in [(LaplacianPyramid, 2), (WaveletDecomposition, 2), (DCTDecomposition, 2), (IdentityDecomposition, 1)]:
        d = cls()
        assert isinstance(d, Decomposition)
        assert d.num_stages == n
        assert type(d).__name__ in repr(d)
    assert repr(LaplacianPyramid((4, 1), up="nearest")) == "LaplacianPyramid(factors=(4, 1), down='area', up='nearest')"
    assert "db2" in repr(WaveletDecomposition("db2")) and "bands=(1, 4)" in repr(DCTDecomposition(8, (1, 4)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "d", [LaplacianPyramid((4, 2, 1)), WaveletDecomposition("db2", levels=2), DCTDecomposition(8, (1, 4))], ids=repr
)
def test_device_and_dtype_are_preserved(d, device):
    for dtype in DTYPES:
        x = sample((2, 3, 16, 16), dtype, 0, device)
        stages = d.decompose(x)
        assert all(s.device == x.device and s.dtype == dtype for s in stages)
        y = d.recompose(stages)
        assert y.device == x.device and y.dtype == dtype
        assert rel_err(y.cpu(), x.cpu()) <= TOL[dtype]


@pytest.mark.parametrize(
    "d, shape",
    [
        (LaplacianPyramid(), (1, 2, 4, 6)),
        (LaplacianPyramid((3, 2, 1), down="bicubic", up="bicubic"), (1, 1, 6, 6)),
        (LaplacianPyramid((2, 1), temporal_factors=(2, 1), down="bilinear"), (1, 1, 2, 4, 2)),
        # A one-pixel-wide coarse stage: torch's antialias backward needs a workaround there.
        (LaplacianPyramid((4, 2, 1), down="bicubic", up="bilinear"), (1, 1, 12, 4)),
        (WaveletDecomposition(), (1, 2, 4, 6)),
        (WaveletDecomposition("db2", levels=2, num_stages=2), (1, 1, 8, 8)),
        (DCTDecomposition(), (1, 2, 4, 8)),
        (DCTDecomposition(4, (1, 2)), (1, 1, 2, 4, 4)),
        (IdentityDecomposition(), (1, 2, 3, 3)),
    ],
    ids=repr,
)
def test_gradcheck(d, shape):
    x = sample(shape, torch.float64, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tuple(d.decompose(t)), (x,))
    stages = [s.detach().requires_grad_() for s in d.decompose(x.detach())]
    assert torch.autograd.gradcheck(lambda *s: d.recompose(list(s)), tuple(stages))


# ---------------------------------------------------------------------------------------------
# Laplacian pyramid: the coarse stage is the configured downsampling, previews are too.


def reference_down(x, factor, temporal, mode):
    if x.ndim == 5:
        frames = x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *x.shape[-2:])
        y = reference_down(frames, factor, None, mode)
        y = y.reshape(x.shape[0], x.shape[2], x.shape[1], *y.shape[-2:]).permute(0, 2, 1, 3, 4)
        if temporal and temporal > 1:
            assert mode == "area"
            y = F.avg_pool3d(y, (temporal, 1, 1))
        return y
    if factor == 1:
        return x
    if mode == "area":
        return F.avg_pool2d(x, factor)
    size = (x.shape[-2] // factor, x.shape[-1] // factor)
    if size[1] == 1:  # torch's antialiased resize is wrong for a width of 1: resize the transpose
        return F.interpolate(x.mT, size=size[::-1], mode=mode, antialias=True, align_corners=False).mT
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


@given(cases(laplacians()))
def test_laplacian_previews_are_the_configured_downsampling(case):
    d, shape, dtype, seed = case
    if d.temporal_factors is not None and d.down != "area":
        d = LaplacianPyramid(d.factors, down="area", up=d.up, temporal_factors=d.temporal_factors)
    x = sample(shape, dtype, seed)
    stages = d.decompose(x)
    tf = d.temporal_factors or (None,) * d.num_stages
    ref0 = reference_down(x, d.factors[0], tf[0], d.down)
    assert torch.allclose(stages[0], ref0, rtol=0, atol=10 * TOL[dtype]), "the coarse stage is down(x, f_0)"
    for s in range(d.num_stages):
        ref = reference_down(x, d.factors[s], tf[s], d.down)
        assert (d.preview(stages, s) - ref).abs().max().item() <= 10 * TOL[dtype] * (1 + ref.abs().max().item())


def test_laplacian_one_pixel_wide_coarse_stage_is_right():
    # Hand-computed antialiased bilinear 4x2 -> 2x1: row weights (3, 3, 1) / 7 over the row means.
    x = torch.arange(8.0).reshape(1, 1, 4, 2)
    coarse = LaplacianPyramid((2, 1), down="bilinear").decompose(x)[0]
    assert torch.allclose(coarse.flatten(), torch.tensor([27 / 14, 71 / 14]))


def test_laplacian_detail_is_residual_of_upsampled_coarse():
    x = sample((2, 3, 8, 8), torch.float64, 0)
    d = LaplacianPyramid((2, 1), up="nearest")
    coarse, detail = d.decompose(x)
    up = coarse.repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert torch.allclose(detail, x - up)
    # Area-down then nearest-up: every 2x2 block of the detail sums to zero.
    assert F.avg_pool2d(detail, 2).abs().max() < 1e-12


def test_laplacian_video_is_per_frame_without_temporal_factors():
    d = LaplacianPyramid((4, 2, 1), down="bilinear", up="bicubic")
    v = sample((2, 3, 5, 8, 8), torch.float64, 1)
    per_frame = [d.decompose(v[:, :, t]) for t in range(5)]
    for s, stage in enumerate(d.decompose(v)):
        assert torch.allclose(stage, torch.stack([f[s] for f in per_frame], dim=2))


# ---------------------------------------------------------------------------------------------
# Wavelets: match PyWavelets (an independent implementation) band by band.


@pytest.mark.parametrize("wave, levels, num_stages", [("haar", 1, 2), ("haar", 3, 3), ("db2", 2, 2), ("db3", 2, 3)])
@pytest.mark.filterwarnings("ignore:Level value")  # pywt: boundary effects are expected here
def test_wavelet_stages_match_pywavelets(wave, levels, num_stages):
    import pywt

    d = WaveletDecomposition(wave, levels=levels, num_stages=num_stages)
    x = sample((1, 1, 24, 16), torch.float64, 2)
    stages = d.decompose(x)
    coeffs = pywt.wavedec2(x[0, 0].numpy(), wave, mode="periodization", level=levels)  # [cA_J, D_J, ..., D_1]
    r = [int(math.log2(f)) for f in d.factors]
    assert np.allclose(stages[0][0, 0].numpy(), coeffs[0] / 2 ** r[0], atol=1e-12)
    for s in range(1, d.num_stages):
        # Only the detail levels r_{s-1} .. r_s + 1 (D_j is coeffs[J - j + 1]), zero approximation.
        details = [coeffs[levels - j + 1] for j in range(r[s - 1], r[s], -1)]
        kept = [np.zeros_like(details[0][0]), *details]
        ref = pywt.waverec2(kept, wave, mode="periodization") / 2 ** r[s]
        assert np.allclose(stages[s][0, 0].numpy(), ref, atol=1e-12), f"stage {s}"


@pytest.mark.parametrize("levels, num_stages, shape", [(1, 2, (2, 3, 8, 12)), (3, 3, (1, 2, 3, 16, 8))])
def test_haar_closed_form_equals_pytorch_wavelets(levels, num_stages, shape):
    fast = WaveletDecomposition("haar", levels=levels, num_stages=num_stages)
    slow = WaveletDecomposition("haar", levels=levels, num_stages=num_stages)
    slow.closed_form = False
    assert fast.closed_form
    x = sample(shape, torch.float64, 5)
    for a, b in zip(fast.decompose(x), slow.decompose(x)):
        assert torch.allclose(a, b, atol=1e-13)
    stages = [sample(s, torch.float64, i) for i, s in enumerate(fast.stage_shapes(shape))]  # arbitrary stages
    assert torch.allclose(fast.recompose(stages), slow.recompose(stages), atol=1e-13)
    lap = LaplacianPyramid(fast.factors, down="area", up="nearest")
    for a, b in zip(fast.decompose(x), lap.decompose(x)):
        assert torch.allclose(a, b, atol=1e-13)
    small = x[:1, :1].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tuple(slow.decompose(t)), (small,))


def test_haar_coarse_stage_is_the_block_mean():
    x = sample((2, 3, 16, 8), torch.float32, 0)
    d = WaveletDecomposition(levels=3, num_stages=2)
    assert d.factors == (8, 1)
    assert torch.allclose(d.decompose(x)[0], F.avg_pool2d(x, 8), atol=1e-6)
    assert WaveletDecomposition(factors=(8, 2, 1))._levels_of_stages == (3, 1, 0)


def test_wavelet_stand_in_for_pkg_resources_works_without_setuptools():
    # Simulate setuptools >= 81 (no pkg_resources): the import still works, the DTCWT loader that
    # needs pkg_resources.resource_stream reads its data, and no stand-in is left behind.
    code = textwrap.dedent(
        """
        import sys, torch
        sys.modules["pkg_resources"] = None  # `import pkg_resources` now raises ImportError
        from dfm_ext.decompositions.wavelet import WaveletDecomposition
        d = WaveletDecomposition("db2")
        x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
        assert (d.recompose(d.decompose(x)) - x).abs().max() < 1e-12
        from pytorch_wavelets.dtcwt.coeffs import biort
        assert len(biort("near_sym_a")) == 4
        assert sys.modules["pkg_resources"] is None
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# DCT: bands match torch-dct's block transform; stage 0 is the block mean.


@given(cases(dcts()))
def test_dct_stages_hold_their_bands_of_torch_dct(case):
    import torch_dct

    d, shape, dtype, seed = case
    x = sample(shape, torch.float64, seed)
    b = d.block_size
    stages = d.decompose(x)
    frames = x if x.ndim == 4 else x[:, :, 0]
    blocks = frames.reshape(*frames.shape[:2], frames.shape[-2] // b, b, frames.shape[-1] // b, b)
    ref = torch_dct.dct_2d(blocks.transpose(3, 4), norm="ortho")  # [..., gh, gw, u, v]
    u = torch.arange(b)
    level = torch.maximum(u[:, None], u[None, :])
    lower = 0
    for s, k in enumerate((*d.bands, b)):
        st_ = stages[s] if x.ndim == 4 else stages[s][:, :, 0]
        sb = st_.reshape(*st_.shape[:2], st_.shape[-2] // k, k, st_.shape[-1] // k, k).transpose(3, 4)
        got = torch_dct.dct_2d(sb, norm="ortho") * (b / k)
        want = (ref * ((level >= lower) & (level < k)))[..., :k, :k]
        assert torch.allclose(got, want, atol=1e-10), f"stage {s}"
        lower = k
    if d.bands[0] == 1:
        assert torch.allclose(stages[0], F.avg_pool2d(x.flatten(1, -3) if x.ndim == 5 else x, b).reshape(stages[0].shape))


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LaplacianPyramid((2, 4, 1)), "strictly decreasing"),
        (lambda: LaplacianPyramid((2, 2, 1)), "strictly decreasing"),
        (lambda: LaplacianPyramid((4, 2)), "must be 1"),
        (lambda: LaplacianPyramid((0, 1)), "positive"),
        (lambda: LaplacianPyramid(2), "sequence of ints"),
        (lambda: LaplacianPyramid((2.0, 1)), "ints"),
        (lambda: LaplacianPyramid(down="nearest"), "'nearest'"),
        (lambda: LaplacianPyramid(up="lanczos"), "'lanczos'"),
        (lambda: LaplacianPyramid((4, 1), temporal_factors=(2, 2, 1)), "one entry per stage"),
        (lambda: LaplacianPyramid((4, 1), temporal_factors=(1, 2)), "must be 1"),
        (lambda: WaveletDecomposition("morlet"), "'morlet'"),
        (lambda: WaveletDecomposition("db99"), "'db99'"),
        (lambda: WaveletDecomposition("sym4"), "'sym4'"),
        (lambda: WaveletDecomposition(mode="constant"), "'constant'"),
        (lambda: WaveletDecomposition("db2", mode="symmetric"), "'symmetric'"),
        (lambda: WaveletDecomposition("db2", mode="zero"), "'zero'"),
        (lambda: WaveletDecomposition(levels=0), "levels"),
        (lambda: WaveletDecomposition(levels=2, num_stages=4), "num_stages"),
        (lambda: WaveletDecomposition(factors=(3, 1)), "powers of two"),
        (lambda: WaveletDecomposition(factors=(2, 4, 1)), "strictly decreasing"),
        (lambda: WaveletDecomposition(levels=1, factors=(2, 1)), "either"),
        (lambda: DCTDecomposition(block_size=1), "block_size"),
        (lambda: DCTDecomposition(bands=(4,)), r"\(4,\)"),
        (lambda: DCTDecomposition(8, bands=(2, 2)), "strictly increasing"),
        (lambda: DCTDecomposition(8, bands=()), "at least one"),
    ],
)
def test_bad_constructor_args(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


ALL = [
    LaplacianPyramid((4, 1)),
    WaveletDecomposition(levels=2),
    DCTDecomposition(4),
]


@pytest.mark.parametrize("d", ALL, ids=repr)
def test_bad_samples(d):
    with pytest.raises(ValueError, match=r"\(2, 3, 8\)"):
        d.decompose(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="6"):
        d.decompose(torch.randn(1, 1, 8, 6))  # not divisible by 4
    with pytest.raises(ValueError, match="fewer than"):
        d.decompose(torch.randn(1, 1, 2, 2))  # fewer pixels than the stages need
    with pytest.raises(TypeError, match="int64"):
        d.decompose(torch.ones(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="ndarray"):
        d.decompose(np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        d.stage_shapes((1, 8, 8))


@pytest.mark.parametrize("d", ALL, ids=repr)
def test_bad_stage_lists(d):
    stages = d.decompose(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=f"expected {d.num_stages} stages, got 1"):
        d.recompose(stages[:1])
    with pytest.raises(TypeError, match="list"):
        d.recompose(stages[0])
    wrong = [stages[0], torch.randn(2, 3, 8, 4), *stages[2:]]
    with pytest.raises(ValueError, match=r"stages\[1\] has shape \(2, 3, 8, 4\)"):
        d.recompose(wrong)
    with pytest.raises(ValueError, match="batch"):
        d.recompose([stages[0], stages[1][:1], *stages[2:]])
    with pytest.raises(ValueError, match="dtype"):
        d.recompose([stages[0], stages[1].double(), *stages[2:]])
    with pytest.raises(ValueError, match="upto"):
        d.preview(stages, d.num_stages)
    with pytest.raises(ValueError, match="needs stages 0..1"):
        d.preview(stages[:1], 1)


def test_spatio_temporal_pyramid_needs_a_video():
    d = LaplacianPyramid((2, 1), temporal_factors=(2, 1))
    with pytest.raises(ValueError, match="video"):
        d.decompose(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="time"):
        d.decompose(torch.randn(1, 1, 3, 4, 4))


def test_wavelet_rejects_sizes_below_the_filter_length():
    with pytest.raises(ValueError, match="filter length 6"):
        WaveletDecomposition("db3", levels=2).decompose(torch.randn(1, 1, 8, 8))
