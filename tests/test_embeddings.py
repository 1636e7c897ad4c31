"""Multi-scale embeddings: packed linear == summed convs, pretrained-init identities, views, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext.wrapping.embeddings import MultiScaleHead, MultiScalePatchEmbed, MultiScaleTimestepEmbed
from dfm_ext.models.dit import TimestepEmbedder
from dfm_ext.wrapping.packing import ScalePacker


def _up(x: torch.Tensor, r: int) -> torch.Tensor:
    return x.repeat_interleave(r, -1).repeat_interleave(r, -2)


@given(
    num_stages=st.integers(1, 3),
    channels=st.integers(1, 3),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_packed_linear_equals_sum_of_stage_convs(num_stages, channels, grid, seed):
    g = torch.Generator().manual_seed(seed)
    patches = [2**s for s in range(num_stages)]
    shapes = [(channels, grid[0] * p, grid[1] * p) for p in patches]
    packer = ScalePacker(shapes, patches)
    embed = MultiScalePatchEmbed.from_packer(packer, hidden_size=8)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.randn(embed.proj.weight.shape, generator=g))
        embed.proj.bias.copy_(torch.randn(8, generator=g))
    stages = [torch.randn(2, *s, generator=g) for s in shapes]
    ref = sum(F.conv2d(x, embed.stage_weight(s), stride=patches[s]) for s, x in enumerate(stages))
    ref = (ref + embed.proj.bias[:, None, None]).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(packer.pack(stages)), ref, atol=1e-4, rtol=1e-4)


@given(p0=st.integers(1, 2), r=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_from_conv_subblock_sum_equals_upsampled_input(p0, r, seed):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(3, 6, kernel_size=p0 * r, stride=p0 * r)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(6, generator=g))
    embed = MultiScalePatchEmbed.from_conv(conv, [3, 3], [p0, 2 * p0])
    x0 = torch.randn(2, 3, 4 * p0, 4 * p0, generator=g)
    x1 = torch.randn(2, 3, 8 * p0, 8 * p0, generator=g)
    ref = conv(_up(x0, r)).flatten(2).transpose(1, 2)
    packed = torch.cat([x0.reshape(2, 3, 4, p0, 4, p0).permute(0, 1, 3, 5, 2, 4).reshape(2, -1, 4, 4),
                        torch.zeros(2, 3 * 4 * p0 * p0, 4, 4)], 1)
    torch.testing.assert_close(embed(packed), ref, atol=1e-4, rtol=1e-4)
    # the later stage starts at zero, so its input does not matter at init
    packer = ScalePacker([(3, 4 * p0, 4 * p0), (3, 8 * p0, 8 * p0)], [p0, 2 * p0])
    torch.testing.assert_close(embed(packer.pack([x0, x1])), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", ["cpq", "pqc"])
def test_from_linear_patch_embed_orders(order):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=2, stride=2)
    w = conv.weight.detach()  # [D, C, p, q]
    flat = w.reshape(5, -1) if order == "cpq" else w.permute(0, 2, 3, 1).reshape(5, -1)
    lin = torch.nn.Linear(12, 5)
    with torch.no_grad():
        lin.weight.copy_(flat)
        lin.bias.copy_(conv.bias)
    a = MultiScalePatchEmbed.from_conv(conv, [3], [2])
    b = MultiScalePatchEmbed.from_conv(lin, [3], [2], in_order=order)
    x = torch.randn(2, 12, 3, 3, generator=g)
    torch.testing.assert_close(a(x), b(x))


def test_stage_weight_is_a_view():
    embed = MultiScalePatchEmbed([2, 2], [1, 2], 4)
    with torch.no_grad():
        embed.stage_weight(1).fill_(3.0)
    assert torch.all(embed.proj.weight[:, 2:] == 3.0) and not torch.any(embed.proj.weight[:, :2] == 3.0)
    head = MultiScaleHead(4, [2, 2], [1, 2])
    with torch.no_grad():
        head.stage_weight(0).fill_(7.0)
    assert torch.all(head.weight[:2] == 7.0)


def _dit_unpatchify(tokens: torch.Tensor, grid: int, p: int, c: int) -> torch.Tensor:
    x = tokens.reshape(tokens.shape[0], grid, grid, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, grid * p, grid * p)


@given(p0=st.integers(1, 2), r=st.integers(1, 2), sigma=st.booleans(), seed=st.integers(0, 2**16))
def test_head_from_linear_matches_area_downsampled_base_output(p0, r, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    c, grid, d, bp = 3, 3, 8, p0 * r
    base = torch.nn.Linear(d, bp * bp * c * (2 if sigma else 1))
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g))
        base.bias.copy_(torch.randn(base.bias.shape, generator=g))
    head = MultiScaleHead.from_linear(base, [c, c], [p0, 2 * p0], base_patch=bp, order="pqc")
    packer = ScalePacker([(c, grid * p0, grid * p0), (c, 2 * grid * p0, 2 * grid * p0)], [p0, 2 * p0])
    tokens = torch.randn(2, grid * grid, d, generator=g)
    stage0, stage1 = packer.unpack(MultiScaleHead.to_grid(head(tokens), (grid, grid)))
    full = _dit_unpatchify(base(tokens), grid, bp, c * (2 if sigma else 1))[:, :c]
    torch.testing.assert_close(stage0, F.avg_pool2d(full, r) if r > 1 else full, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(stage1) == 0


def test_head_cpq_order():
    base = torch.nn.Linear(4, 2 * 2 * 3)
    head = MultiScaleHead.from_linear(base, [3], [2], base_patch=2, order="cpq")
    torch.testing.assert_close(head.weight, base.weight)


@given(t=st.lists(st.floats(0, 1), min_size=3, max_size=3), stage=st.integers(0, 2))
def test_timestep_embed_pretrained_equals_stage0(t, stage):
    torch.manual_seed(0)
    base = TimestepEmbedder(16)
    emb = MultiScaleTimestepEmbed.from_embedder(base, 16, 3, time_transform=lambda x: 1000 * x)
    tt = torch.tensor([t, t])
    out = emb(tt, torch.full((2,), stage))
    torch.testing.assert_close(out, base(1000 * tt[:, 0]), atol=1e-6, rtol=1e-6)
    assert emb.embedders[0] is base


def test_timestep_embed_scratch_and_errors():
    torch.manual_seed(0)
    base = TimestepEmbedder(16)
    emb = MultiScaleTimestepEmbed.from_embedder(base, 16, 2, init="scratch")
    assert emb.embedders[0] is not base
    t = torch.rand(4, 2)
    assert not torch.allclose(emb(t, torch.zeros(4, dtype=torch.long)), base(t[:, 0]))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        emb(torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="stage"):
        emb(t)
    with pytest.raises(ValueError, match="init"):
        MultiScaleTimestepEmbed.from_embedder(base, 16, 2, init="zeros")  # type: ignore[arg-type]


def test_patch_embed_errors():
    embed = MultiScalePatchEmbed([2, 2], [1, 2], 4)
    with pytest.raises(ValueError, match=r"\[B, 10, \*grid\]"):
        embed(torch.randn(1, 9, 3, 3))
    conv = torch.nn.Conv2d(2, 4, 2, stride=2)
    with pytest.raises(ValueError, match="multiple"):
        MultiScalePatchEmbed.from_conv(conv, [2, 2], [3, 6])
    with pytest.raises(ValueError, match="kernel"):
        MultiScalePatchEmbed([2], [2], 4).load_stage_kernel_(0, torch.randn(4, 3, 2, 2))
    with pytest.raises(TypeError, match="Conv2d/Conv3d/Linear"):
        MultiScalePatchEmbed.from_conv(torch.nn.ReLU(), [2], [1])
