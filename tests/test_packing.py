"""ScalePacker: exact pack/unpack, and summed per-stage patch convs == one linear map on packed channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext.decompositions.dct import DCTDecomposition
from dfm_ext.decompositions.laplacian import LaplacianPyramid
from dfm_ext.wrapping.packing import ScalePacker, patch_sizes_for_grid
from dfm_ext.decompositions.wavelet import WaveletDecomposition


@st.composite
def layouts(draw):
    """Stage shapes (without batch) and patch sizes that share one token grid."""
    video = draw(st.booleans())
    num_stages = draw(st.integers(1, 4))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    if video:
        grid = (draw(st.integers(1, 2)), *grid)
    shapes, patches = [], []
    for _ in range(num_stages):
        ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        channels = draw(st.integers(1, 3))
        if video:
            pt = draw(st.integers(1, 2))
            patch = (pt, ph, pw) if pt > 1 or draw(st.booleans()) else (ph, pw)
            full = (pt, ph, pw) if len(patch) == 3 else (1, ph, pw)
        else:
            patch = ph if ph == pw and draw(st.booleans()) else (ph, pw)
            full = (ph, pw)
        shapes.append((channels, *(g * p for g, p in zip(grid, full))))
        patches.append(patch)
    return shapes, patches, grid


def randn(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@given(layouts(), st.integers(1, 3))
def test_pack_then_unpack_is_the_identity(layout, batch):
    shapes, patches, grid = layout
    packer = ScalePacker(shapes, patches)
    assert packer.grid == grid
    stages = [randn((batch, *s), seed=i) for i, s in enumerate(shapes)]
    packed = packer.pack(stages)
    assert packed.shape == (batch, packer.packed_channels, *grid)
    assert packer.num_tokens == torch.Size(grid).numel()
    assert packer.packed_channels == sum(packer.stage_channels)
    unpacked = packer.unpack(packed)
    assert all(torch.equal(a, b) for a, b in zip(unpacked, stages))
    # and the other way round: unpack then pack is the identity on packed tensors
    y = randn(packed.shape, seed=7)
    assert torch.equal(packer.pack(packer.unpack(y)), y)


@given(layouts(), st.integers(1, 2), st.integers(1, 5))
def test_summed_patch_convs_equal_one_linear_map_on_packed_channels(layout, batch, dim):
    """sum_s Conv(kernel = stride = p_s)(x_s) == 1x1 conv of pack(x) with the concatenated weights.

    This is what lets wrap_dit widen one patch embedding instead of adding per-stage embedders.
    """
    shapes, patches, grid = layout
    packer = ScalePacker(shapes, patches)
    stages = [randn((batch, *s), seed=i) for i, s in enumerate(shapes)]
    conv = F.conv3d if len(grid) == 3 else F.conv2d
    expected = 0
    weights = []
    for s, (x, p) in enumerate(zip(stages, packer.patch_sizes)):
        w = randn((dim, x.shape[1], *p), seed=100 + s)
        expected = expected + conv(x, w, stride=p)
        weights.append(w.reshape(dim, -1))  # (c, i, j) order, like the packed channels
    w_packed = torch.cat(weights, dim=1).reshape(dim, packer.packed_channels, *([1] * len(grid)))
    got = conv(packer.pack(stages), w_packed)
    assert torch.allclose(got, expected, atol=1e-10)
    # The same map as a Linear layer over tokens (channels last).
    tokens = packer.pack(stages).flatten(2).transpose(1, 2)
    assert torch.allclose((tokens @ torch.cat(weights, 1).T).transpose(1, 2).reshape(expected.shape), expected)


@given(layouts(), st.integers(1, 2))
def test_widened_output_projection_unpacks_to_per_stage_heads(layout, batch):
    """A per-stage head ``Linear(D, C_s * prod(p_s))`` unpatchified == slice of one widened head, unpacked."""
    shapes, patches, grid = layout
    packer = ScalePacker(shapes, patches)
    dim = 4
    h = randn((batch, dim, *grid), seed=1)
    heads = [randn((n, dim), seed=10 + s) for s, n in enumerate(packer.stage_channels)]
    widened = torch.einsum("od,bd...->bo...", torch.cat(heads, 0), h)
    for s, out in enumerate(packer.unpack(widened)):
        alone = packer.unpack_stage(torch.einsum("od,bd...->bo...", heads[s], h), s)
        assert torch.allclose(out, alone, rtol=0, atol=1e-12)


def test_pack_stage_matches_pixel_unshuffle():
    packer = ScalePacker([(3, 4, 6), (3, 8, 12)], [1, 2])
    x = randn((2, 3, 8, 12))
    assert torch.equal(packer.pack_stage(x, 1), F.pixel_unshuffle(x, 2))
    assert torch.equal(packer.unpack_stage(F.pixel_unshuffle(x, 2), 1), x)


@pytest.mark.parametrize(
    "decomposition, shape, grid",
    [
        (LaplacianPyramid((4, 1)), (2, 4, 32, 16), (8, 4)),
        (LaplacianPyramid((4, 2, 1)), (1, 3, 16, 16), (4, 4)),
        (WaveletDecomposition(levels=2, num_stages=2), (1, 4, 16, 32), (4, 8)),
        (DCTDecomposition(8, (1, 4)), (1, 4, 16, 16), (2, 2)),
        (LaplacianPyramid((2, 1)), (1, 4, 3, 8, 8), (3, 4, 4)),
    ],
    ids=repr,
)
def test_decomposition_stages_pack_onto_one_grid(decomposition, shape, grid):
    stage_shapes = [s[1:] for s in decomposition.stage_shapes(shape)]
    packer = ScalePacker(stage_shapes, patch_sizes_for_grid(stage_shapes, grid))
    stages = decomposition.decompose(randn(shape))
    assert packer.pack(stages).shape[2:] == grid
    assert torch.allclose(decomposition.recompose(packer.unpack(packer.pack(stages))), randn(shape))


def test_patch_sizes_for_grid():
    assert patch_sizes_for_grid([(4, 8, 8), (4, 32, 16)], (4, 4)) == [(2, 2), (8, 4)]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        patch_sizes_for_grid([(4, 8, 8)], (3, 4))
    with pytest.raises(ValueError, match="dims"):
        patch_sizes_for_grid([(4, 8, 8)], (2, 4, 4))


def test_bad_inputs():
    with pytest.raises(ValueError, match="token grid"):
        ScalePacker([(4, 8, 8), (4, 16, 16)], [1, 1])
    with pytest.raises(ValueError, match="2 patch sizes for 1 stages"):
        ScalePacker([(4, 8, 8)], [1, 2])
    with pytest.raises(ValueError, match="not divisible"):
        ScalePacker([(4, 9, 8)], [2])
    with pytest.raises(ValueError, match="at least one"):
        ScalePacker([], [])
    with pytest.raises(ValueError, match="all be"):
        ScalePacker([(4, 8, 8), (4, 2, 8, 8)], [1, 1])
    with pytest.raises(TypeError, match="patch size"):
        ScalePacker([(4, 8, 8)], [True])
    packer = ScalePacker([(4, 8, 8), (4, 16, 16)], [1, 2])
    a, b = randn((2, 4, 8, 8)), randn((2, 4, 16, 16))
    with pytest.raises(ValueError, match="list of 2 stages, got 1"):
        packer.pack([a])
    with pytest.raises(ValueError, match="got a tensor"):
        packer.pack(a)
    with pytest.raises(ValueError, match="batch size"):
        packer.pack([a, b[:1]])
    with pytest.raises(ValueError, match=r"stage 1 has shape \(2, 4, 8, 8\)"):
        packer.pack([a, a])
    with pytest.raises(ValueError, match=r"expected \[B, 20, 8, 8\]"):
        packer.unpack(randn((2, 21, 8, 8)))
