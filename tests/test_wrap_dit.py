"""wrap_dit: stage-0 equality at pretrained init, shapes, gradients, training, sampling, errors, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dfm_ext import (
    DCTDecomposition,
    DFMObjective,
    DFMSampler,
    DiT,
    DiTConfig,
    IdentityDecomposition,
    LaplacianPyramid,
    StageScheduler,
    StageTimestepSampler,
    WaveletDecomposition,
    load_wrapped,
    register_adapter,
    wrap_dit,
)
from dfm_ext.wrapping.adapter import multiscale_time_embed, unregister_adapter, widen_head, widen_patch_embed
from dfm_ext.adapters.dit import DiTFamilyAdapter
from dfm_ext.wrapping.embeddings import MultiScaleHead
from dfm_ext.models.dit import LabelEmbedder, PatchEmbed, TimestepEmbedder


def _dit(seed: int = 0, **kw) -> DiT:
    """A tiny DiT with every weight (including the zero-initialised ones) perturbed: a stand-in for a trained model."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig.preset("tiny", hidden_size=32, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _long(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


def _up(x: torch.Tensor, r: int) -> torch.Tensor:
    return x.repeat_interleave(r, -1).repeat_interleave(r, -2)


# ------------------------------------------------------------------ stage-0 equality at pretrained init


@pytest.mark.parametrize("factors", [(1,), (2, 1), (4, 2, 1)])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), current=st.integers(0, 2))
def test_finetune_stage0_equals_base_at_low_resolution(factors, seed, current):
    """The paper's finetune setup: a base trained at stage 0's resolution; stage 0 keeps its patch exactly."""
    s = len(factors)
    current = min(current, s - 1)
    base = _dit(input_size=8)
    decomposition = IdentityDecomposition() if s == 1 else LaplacianPyramid(factors)
    full = 8 * factors[0]
    wrapped = wrap_dit(copy.deepcopy(base), decomposition, sample_shape=(4, full, full)).eval()
    assert wrapped.packer.patch_sizes[0] == (2, 2) and wrapped.packer.grid == (4, 4)
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(3, *shape, generator=g) for shape in wrapped.stage_shapes]
    t = torch.rand(3, s, generator=g)
    y = torch.randint(0, 10, (3,), generator=g)
    with torch.no_grad():
        out = wrapped(stages, t, torch.full((3,), current), y=y)
        ref = base(stages[0], t[:, 0], y)
    assert (out[0] - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("factors", [(2, 1), (4, 2, 1)])
def test_smaller_stage0_patch_equals_base_on_upsampled_input(factors):
    """Stage 0 with a patch smaller than the pretrained one by r: equal to the base on the input
    nearest-upsampled by r, with its output area-downsampled by r (paper section E)."""
    base = _dit(input_size=16, patch_size=4)
    wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid(factors)).eval()
    r = 4 // wrapped.packer.patch_sizes[0][0]
    assert r > 1
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(2, *shape, generator=g) for shape in wrapped.stage_shapes]
    t, y = torch.rand(2, len(factors), generator=g), _long(3, 7)
    with torch.no_grad():
        out = wrapped(stages, t, _long(len(factors) - 1, 0), y=y)
        ref = F.avg_pool2d(base(_up(stages[0], r), t[:, 0], y), r)
    assert (out[0] - ref).abs().max() <= 1e-5


def test_same_resolution_identity_learn_sigma_and_rope():
    for kw in ({"learn_sigma": True}, {"rope": True}):
        base = _dit(**kw)
        wrapped = wrap_dit(copy.deepcopy(base), IdentityDecomposition()).eval()
        x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2, 1), _long(1, 2)
        with torch.no_grad():
            out = wrapped([x], t, _long(0, 0), y=y)[0]
            ref = base(x, t[:, 0], y)[:, :4]
        assert (out - ref).abs().max() <= 1e-5, kw


# ------------------------------------------------------------------ shapes, masking, gradients


@pytest.mark.parametrize(
    "decomposition,sample",
    [
        (IdentityDecomposition(), (4, 16, 16)),
        (LaplacianPyramid((2, 1)), (4, 16, 16)),
        (LaplacianPyramid((4, 2, 1)), (4, 32, 32)),
        (WaveletDecomposition(levels=1), (4, 16, 16)),
        (WaveletDecomposition(levels=2), (4, 32, 32)),
        (DCTDecomposition(block_size=2), (4, 16, 16)),
    ],
    ids=repr,
)
def test_shapes_for_each_decomposition(decomposition, sample):
    base = _dit(input_size=sample[1], patch_size=sample[1] // 8)
    wrapped = wrap_dit(base, decomposition)
    assert wrapped.packer.grid == (8, 8)
    x = torch.randn(2, *sample)
    stages = decomposition.decompose(x)
    s = decomposition.num_stages
    out = wrapped(stages, torch.rand(2, s), torch.full((2,), s - 1), y=_long(0, 1))
    assert [o.shape for o in out] == [st.shape for st in stages]


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16))
def test_masked_stages_are_ignored_and_return_zero(seed):
    base = _dit()
    wrapped = wrap_dit(base, LaplacianPyramid((2, 1)), init="scratch")
    with torch.no_grad():  # make the stage-1 slices non-zero so the test could fail
        for p in wrapped.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    x0, x1, x1b = (torch.randn(2, *s, generator=g) for s in (*wrapped.stage_shapes, wrapped.stage_shapes[1]))
    t = torch.rand(2, 2, generator=g)
    y, stage = _long(1, 2), _long(0, 0)
    with torch.no_grad():
        a = wrapped([x0, x1], t, stage, y=y)
        b = wrapped([x0, x1b], t * torch.tensor([1.0, 0.3]), stage, y=y)
    assert torch.equal(a[0], b[0]) and torch.count_nonzero(a[1]) == 0


def test_gradients_reach_every_stage_slice():
    base = _dit(input_size=8)
    wrapped = wrap_dit(base, LaplacianPyramid((4, 2, 1)), sample_shape=(4, 32, 32))
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, *s, generator=g) for s in wrapped.stage_shapes]
    out = wrapped(stages, torch.rand(4, 3, generator=g), _long(0, 1, 2, 2), y=_long(0, 1, 2, 3))
    sum(F.mse_loss(o, torch.randn_like(o)) for o in out).backward()
    embed, head, temb = base.x_embedder, base.final_layer.linear, base.t_embedder
    for s in range(3):
        assert embed.proj.weight.grad[:, embed.stage_slice(s)].abs().sum() > 0, s
        assert head.weight.grad[head.stage_slice(s)].abs().sum() > 0, s
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in temb.embedders[s].parameters()), s
    assert temb.stage_embed.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ training and sampling end to end


def test_dfm_training_drives_loss_down_on_a_fixed_batch():
    torch.manual_seed(0)
    base = DiT(DiTConfig.preset("tiny", input_size=8, hidden_size=64, class_dropout_prob=0.0))
    decomposition = LaplacianPyramid((2, 1))
    wrapped = wrap_dit(base, decomposition, sample_shape=(4, 16, 16)).train()
    g = torch.Generator().manual_seed(0)
    stages = decomposition.decompose(torch.randn(8, 4, 16, 16, generator=g))
    timesteps = StageTimestepSampler(2, probabilities=(0.5, 0.5)).sample(8, generator=g)
    noise = [torch.randn(x.shape, generator=g) for x in stages]
    y = torch.randint(0, 10, (8,), generator=g)
    objective = DFMObjective(2)
    opt = torch.optim.Adam(wrapped.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = objective(wrapped, stages, timesteps, noise=noise, y=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= losses[0] / 10, (losses[0], losses[-1])


def test_training_step_and_guided_sampling_end_to_end():
    torch.manual_seed(0)
    base = DiT(DiTConfig.preset("tiny", input_size=8, hidden_size=32))
    decomposition = LaplacianPyramid((2, 1))
    wrapped = wrap_dit(base, decomposition, sample_shape=(4, 16, 16))
    g = torch.Generator().manual_seed(0)
    stages = decomposition.decompose(torch.randn(4, 4, 16, 16, generator=g))
    ts = StageTimestepSampler(2).sample(4, generator=g)
    out = DFMObjective(2)(wrapped.train(), stages, ts, generator=g, y=_long(0, 1, 2, 3))
    out.loss.backward()
    torch.optim.AdamW(wrapped.parameters(), lr=1e-3).step()
    assert torch.isfinite(out.loss)
    sampler = DFMSampler(decomposition, StageScheduler(steps=(3, 2), thresholds=(0.9,)), guidance_scale=2.0)
    result = sampler.sample(wrapped.eval(), (2, 4, 16, 16), generator=g, y=_long(5, 6))
    assert result.x.shape == (2, 4, 16, 16) and torch.isfinite(result.x).all()
    assert [p.shape[-1] for p in result.previews] == [8, 16]
    null = wrapped.null_condition(y=_long(5, 6))
    assert torch.equal(null["y"], _long(10, 10))


# ------------------------------------------------------------------ other models and adapters


class ToyDiT(nn.Module):
    """Not a DiT-family model: different attribute names and a plain MLP trunk."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, stride=2)
        self.temb = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.out = nn.Linear(16, 2 * 2 * 3)

    def forward(self, x, t):  # t: [B] paper time
        h = self.patch(x).flatten(2).transpose(1, 2) + self.temb(t[:, None])[:, None]
        o = self.out(self.body(h)).reshape(x.shape[0], x.shape[2] // 2, x.shape[3] // 2, 2, 2, 3)
        return torch.einsum("nhwpqc->nchpwq", o).reshape(x.shape)


class ToyAdapter:  # the whole adapter a user writes for ToyDiT: well under 40 lines
    name = "toy"

    def matches(self, model):
        return isinstance(model, ToyDiT)

    def default_sample_shape(self, model):
        return (3, 16, 16)

    def token_grid(self, model, sample_shape):
        return (sample_shape[1] // 2, sample_shape[2] // 2)

    def install(self, model, packer, *, init, stage_embedding):
        model.patch = widen_patch_embed(model.patch, packer, init=init)
        model.temb = multiscale_time_embed(model.temb, 16, packer.num_stages, init=init,
                                           stage_embedding=stage_embedding, time_transform=lambda t: t[:, None])
        model.out = widen_head(model.out, packer, base_patch=2, order="pqc", init=init)

    def forward(self, model, packed, t, stage, **cond):
        h = model.patch(packed) + model.temb(t, stage)[:, None]
        return MultiScaleHead.to_grid(model.out(model.body(h)), packed.shape[2:])

    def null_condition(self, model, **cond):
        return dict(cond)


def test_user_adapter_registers_auto_selects_and_keeps_stage0():
    torch.manual_seed(0)
    base = ToyDiT()
    with pytest.raises(TypeError, match=r"ToyDiT.*register_adapter"):
        wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)))
    register_adapter(ToyAdapter)
    try:
        wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)), sample_shape=(3, 16, 16))
        assert wrapped.adapter.name == "toy" and wrapped.packer.patch_sizes == [(1, 1), (2, 2)]
        x0, x1, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16), torch.rand(2, 2)
        with torch.no_grad():
            out = wrapped([x0, x1], t, _long(1, 1))
            ref = F.avg_pool2d(base(_up(x0, 2), t[:, 0]), 2)
        assert (out[0] - ref).abs().max() <= 1e-5
    finally:
        unregister_adapter("toy")


class SiTLike(nn.Module):
    """Shares only DiT's attribute names; SiT-style time (the embedder sees t itself), no y_embedder generator."""

    def __init__(self):
        super().__init__()
        ref = DiT(DiTConfig.preset("tiny", hidden_size=32))
        self.x_embedder = PatchEmbed((16, 16), 2, 4, 32)
        self.t_embedder = TimestepEmbedder(32)
        self.y_embedder = LabelEmbedder(10, 32, 0.1)
        self.pos_embed = ref.pos_embed.clone()
        self.blocks, self.final_layer = ref.blocks, ref.final_layer
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, y):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c)
        o = self.final_layer(h, c).reshape(x.shape[0], 8, 8, 2, 2, 4)
        return torch.einsum("nhwpqc->nchpwq", o).reshape(x.shape)


def test_attribute_compatible_model_with_unit_time():
    base = SiTLike().eval()
    wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)), adapter=DiTFamilyAdapter("unit")).eval()
    x0, x1, t, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16, 16), torch.rand(2, 2), _long(1, 2)
    with torch.no_grad():
        out = wrapped([x0, x1], t, _long(0, 1), y=y)
        ref = F.avg_pool2d(base(_up(x0, 2), t[:, 0], y), 2)
    assert (out[0] - ref).abs().max() <= 1e-5


# ------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors():
    wrapped = wrap_dit(_dit(), LaplacianPyramid((2, 1)))
    x0, x1, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16, 16), _long(0, 1)
    with pytest.raises(ValueError, match=r"stages\[1\] has shape \(2, 4, 32, 32\), expected \[B, 4, 16, 16\]"):
        wrapped([x0, torch.randn(2, 4, 32, 32)], torch.rand(2, 2), _long(1, 1), y=y)
    with pytest.raises(ValueError, match=r"t must have shape \[B, S\] = \[2, 2\], got \(2,\)"):
        wrapped([x0, x1], torch.rand(2), _long(1, 1), y=y)
    with pytest.raises(ValueError, match=r"stage must have shape \[B\] = \[2\]"):
        wrapped([x0, x1], torch.rand(2, 2), _long(1), y=y)
    with pytest.raises(TypeError, match="stage must be an integer"):
        wrapped([x0, x1], torch.rand(2, 2), torch.ones(2), y=y)
    with pytest.raises(ValueError, match=r"stage values must be in \[0, 1\]"):
        wrapped([x0, x1], torch.rand(2, 2), _long(0, 2), y=y)
    with pytest.raises(ValueError, match="mask must have shape"):
        wrapped([x0, x1], torch.rand(2, 2), _long(0, 1), torch.ones(2, 3, dtype=torch.bool), y=y)
    with pytest.raises(TypeError, match="needs class labels"):
        wrapped([x0, x1], torch.rand(2, 2), _long(0, 1))
    # stage 0 at 4x4 cannot be patchified onto the model's 8x8 token grid
    with pytest.raises(ValueError, match=r"stage 0 of size \(4, 4\).*token grid \(8, 8\)"):
        wrap_dit(_dit(), LaplacianPyramid((4, 1)))
    with pytest.raises(TypeError, match=r"no DiT adapter recognises .*Sequential.*register_adapter"):
        wrap_dit(nn.Sequential(nn.Linear(2, 2)), IdentityDecomposition())
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        wrap_dit(_dit(), IdentityDecomposition(), adapter="nope")
    with pytest.raises(TypeError, match="lacks"):
        register_adapter(object())


# ------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    wrapped = wrap_dit(_dit(input_size=8), LaplacianPyramid((2, 1)), sample_shape=(4, 16, 16), init="scratch")
    with torch.no_grad():
        for p in wrapped.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrapped.save_pretrained(tmp_path / "m")
    loaded = load_wrapped(tmp_path / "m")
    assert repr(loaded.decomposition) == repr(wrapped.decomposition)
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(2, *s, generator=g) for s in wrapped.stage_shapes]
    args = (stages, torch.rand(2, 2, generator=g), _long(0, 1))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(wrapped.eval()(*args, y=_long(1, 2)), loaded.eval()(*args, y=_long(1, 2))))

    toy = wrap_dit(ToyDiT(), IdentityDecomposition(), adapter=ToyAdapter())
    register_adapter(ToyAdapter)
    try:
        toy.save_pretrained(tmp_path / "toy")
        with pytest.raises(ValueError, match="pass base_model"):
            load_wrapped(tmp_path / "toy")
        toy2 = load_wrapped(tmp_path / "toy", ToyDiT())
    finally:
        unregister_adapter("toy")
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2, 1)
    with torch.no_grad():
        assert torch.equal(toy([x], t, _long(0, 0))[0], toy2([x], t, _long(0, 0))[0])


def test_float64_stage0_equality():
    base = _dit(input_size=8).double()
    wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)), sample_shape=(4, 16, 16)).eval()
    x0, x1 = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t, y = torch.rand(2, 2, dtype=torch.float64), _long(1, 2)
    with torch.no_grad():
        out = wrapped([x0, x1], t, _long(1, 1), y=y)
        ref = base(x0, t[:, 0], y)
    assert out[0].dtype == torch.float64 and (out[0] - ref).abs().max() <= 1e-6
