"""VideoDiT (paper A.1): shapes, per-frame patches, 3-D RoPE, and wrap_dit through the video_dit adapter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm_ext import LaplacianPyramid, wrap_dit
from dfm_ext.models import _apply_rope
from dfm_ext.video_models import VideoDiT, VideoDiTConfig, rope_3d


def _video_dit(seed: int = 0, **kw) -> VideoDiT:
    """A tiny VideoDiT with every weight (zero-initialised ones too) perturbed: a stand-in for a trained model."""
    torch.manual_seed(seed)
    kw = {"hidden_size": 48, "num_heads": 2, "in_channels": 4, "num_classes": 5, "class_dropout_prob": 0.0, **kw}
    model = VideoDiT(VideoDiTConfig.preset("tiny", **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _long(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


@settings(max_examples=10)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    learn_sigma=st.booleans(),
)
def test_forward_shapes_any_video_size(b, t, gh, gw, learn_sigma):
    model = _video_dit(learn_sigma=learn_sigma)
    x = torch.randn(b, 4, t, 2 * gh, 2 * gw)
    with torch.no_grad():
        out = model(x, torch.rand(b), torch.randint(0, 5, (b,)))
    assert out.shape == (b, 8 if learn_sigma else 4, t, 2 * gh, 2 * gw)
    assert torch.isfinite(out).all()


def test_frames_are_patchified_independently():
    """Changing frame 1 changes only frame 1's tokens of the patch embedding (the trunk may mix them)."""
    model = _video_dit()
    x = torch.randn(2, 4, 3, 8, 8)
    x2 = x.clone()
    x2[:, :, 1] += torch.randn_like(x2[:, :, 1])
    with torch.no_grad():
        a, b = model.x_embedder(x), model.x_embedder(x2)
    per_frame = 16  # (8 / 2) ** 2 tokens per frame, frame-major
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    assert changed[per_frame : 2 * per_frame].all()
    assert not changed[:per_frame].any() and not changed[2 * per_frame :].any()


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), offset=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)))
def test_rope_3d_logits_depend_only_on_offsets(seed, offset):
    """<R(p) q, R(p') k> is unchanged when both positions move by the same (dt, dh, dw), and every
    axis matters (moving one token along any one axis changes it)."""
    head_dim, grid = 24, (4, 4, 4)
    cos, sin = rope_3d(head_dim, grid, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)

    def logit(pq: tuple[int, int, int], pk: tuple[int, int, int]) -> torch.Tensor:
        iq, ik = (p[0] * 16 + p[1] * 4 + p[2] for p in (pq, pk))
        rq = _apply_rope(q[None, None, None], cos[iq], sin[iq])
        rk = _apply_rope(k[None, None, None], cos[ik], sin[ik])
        return (rq * rk).sum()

    pq, pk = (0, 1, 0), (1, 0, 1)
    shift = lambda p: tuple(a + d for a, d in zip(p, offset))  # noqa: E731
    torch.testing.assert_close(logit(pq, pk), logit(shift(pq), shift(pk)), rtol=1e-10, atol=1e-10)
    for axis in range(3):
        moved = tuple(a + (1 if i == axis else 0) for i, a in enumerate(pk))
        assert (logit(pq, pk) - logit(pq, moved)).abs() > 1e-6, axis


def test_rope_3d_rejects_bad_head_dims_and_grids():
    with pytest.raises(ValueError, match="head dim"):
        rope_3d(10, (2, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        rope_3d(16, (2, 0, 2))
    with pytest.raises(ValueError, match="x must be"):
        _video_dit()(torch.randn(1, 4, 8, 8), torch.rand(1), _long(0))


@pytest.mark.parametrize("current", [0, 1])
def test_wrap_dit_stage0_equals_pretrained_video_dit(current):
    """Finetune setup: the base was trained at stage 0's resolution; with its own patch for stage 0
    (per-frame spatial Laplacian, 2 stages) the wrapped model reproduces it exactly."""
    base = _video_dit(input_size=(3, 8, 8))
    wrapped = wrap_dit(
        copy.deepcopy(base), LaplacianPyramid((2, 1)), sample_shape=(4, 3, 16, 16), patch_sizes=[(1, 2, 2), (1, 4, 4)]
    ).eval()
    assert wrapped.adapter.name == "video_dit"
    assert wrapped.packer.grid == (3, 4, 4)
    assert [tuple(s) for s in wrapped.stage_shapes] == [(4, 3, 8, 8), (4, 3, 16, 16)]
    g = torch.Generator().manual_seed(current)
    stages = [torch.randn(2, *s, generator=g) for s in wrapped.stage_shapes]
    t, y = torch.rand(2, 2, generator=g), _long(1, 4)
    with torch.no_grad():
        out = wrapped(stages, t, torch.full((2,), current), y=y)
        ref = base(stages[0], t[:, 0], y)
    assert (out[0] - ref).abs().max() <= 1e-5
    assert out[1].shape == stages[1].shape
    if current == 0:
        assert torch.count_nonzero(out[1]) == 0  # masked stage


def test_wrap_dit_default_patches_stage0_equals_base_on_upsampled_frames():
    """Default patches keep the full-resolution token grid, so stage 0 gets a patch half the
    pretrained one: equal to the base on each frame nearest-upsampled by 2, its output
    area-downsampled by 2 (paper section E)."""
    base = _video_dit(input_size=(3, 8, 8))
    wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)), sample_shape=(4, 3, 16, 16)).eval()
    assert wrapped.packer.patch_sizes == [(1, 1, 1), (1, 2, 2)] and wrapped.packer.grid == (3, 8, 8)
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(2, *s, generator=g) for s in wrapped.stage_shapes]
    t, y = torch.rand(2, 2, generator=g), _long(0, 3)
    with torch.no_grad():
        out = wrapped(stages, t, _long(1, 0), y=y)
        up = stages[0].repeat_interleave(2, -1).repeat_interleave(2, -2)
        ref = F.avg_pool3d(base(up, t[:, 0], y), (1, 2, 2))
    assert (out[0] - ref).abs().max() <= 1e-5


def test_gradients_reach_every_stage_slice():
    base = _video_dit(input_size=(2, 8, 8))
    wrapped = wrap_dit(base, LaplacianPyramid((2, 1)), sample_shape=(4, 2, 16, 16))
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(3, *s, generator=g) for s in wrapped.stage_shapes]
    out = wrapped(stages, torch.rand(3, 2, generator=g), _long(0, 1, 1), y=_long(0, 1, 2))
    sum(F.mse_loss(o, torch.randn_like(o)) for o in out).backward()
    embed, head, temb = base.x_embedder, base.final_layer.linear, base.t_embedder
    for s in range(2):
        assert embed.proj.weight.grad[:, embed.stage_slice(s)].abs().sum() > 0, s
        assert head.weight.grad[head.stage_slice(s)].abs().sum() > 0, s
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in temb.embedders[s].parameters()), s
    assert temb.stage_embed.weight.grad.abs().sum() > 0
