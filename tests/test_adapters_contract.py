"""The contract between dfm_ext and a user's model: what is called, what is refused, and how it reloads (issue 27).

Stand-ins for the original DiT / SiT / LightningDiT come from tests/test_conventions.py (the
original class, module and attribute names); the diffusers models from tests/_tiny_families.py.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from dfm_ext import IdentityDecomposition, LaplacianPyramid, load_wrapped, wrap_dit
from dfm_ext.adapters import DiTFamilyAdapter
from dfm_ext.process.conventions import TimeConvention, check_time_convention, time_transform
from dfm_ext.wrapping.timestep_embed import MultiScaleTimestepEmbed, StageInputTimeEmbed

from test_conventions import SiT, LightningDiT, _LabelEmbedder  # the stand-ins with the original names

K = torch.tensor([0, 1])


def _sit(**kw) -> nn.Module:
    return wrap_dit(SiT(), LaplacianPyramid((2, 1)), time_convention="unit", **kw)


def _stages(model, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, *s, generator=g, dtype=dtype) for s in model.stage_shapes], torch.rand(2, model.num_stages, generator=g)


# ----------------------------------------------------------------------------- time conventions


def test_time_conventions_are_named_parameterised_picklable_and_json() -> None:
    tc = TimeConvention("shifted_timestep", max_shift=0.5)
    assert tc.needs_grid and tc.to_config() == {"name": "shifted_timestep", "max_shift": 0.5}
    assert pickle.loads(pickle.dumps(tc)) == tc and TimeConvention.from_config(tc.to_config()) == tc
    assert check_time_convention("timestep") == "timestep" and TimeConvention("timestep", scale=1.0) == "timestep"
    t = torch.tensor([0.0, 0.5, 1.0])
    # CogView4 at 1024 px (64 x 64 tokens, mu = 3.25): sigma 0.5 is timestep 235, not 500 (issue 27).
    assert torch.allclose(TimeConvention("shifted_timestep")(t, grid=(64, 64)), torch.tensor([1000.0, 1000 * 0.5 / (0.5 + 3.25 * 0.5), 0.0]))
    with pytest.raises(ValueError, match="depends on the token grid"):
        TimeConvention("shifted_timestep")(t)
    assert not TimeConvention("shifted_timestep", mu=1.0).needs_grid  # a fixed shift does not read the grid
    with pytest.raises(ValueError, match=r"takes the parameters \['scale'\], not \['mu'\]"):
        TimeConvention("timestep", mu=1.0)
    with pytest.raises(ValueError, match="base_shift must be a finite number, got 'a'"):
        TimeConvention("shifted_timestep", base_shift="a")
    assert torch.equal(time_transform({"name": "timestep", "scale": 0.5})(t), torch.tensor([500.0, 250.0, 0.0]))


def test_a_parameterised_convention_is_saved_and_restored(tmp_path) -> None:
    tc = TimeConvention("timestep", scale=0.25)
    model = _sit_with(tc)
    model.save_pretrained(tmp_path / "m")
    loaded = load_wrapped(tmp_path / "m", base_model=SiT())
    assert loaded.adapter.time_convention == {"name": "timestep", "scale": 0.25}
    stages, t = _stages(model)
    with torch.no_grad():
        assert torch.equal(model(stages, t, K, y=K)[0], loaded(stages, t, K, y=K)[0])


def _sit_with(tc) -> nn.Module:
    return wrap_dit(SiT(), LaplacianPyramid((2, 1)), time_convention=tc)


# ----------------------------------------------------------------------------- time embedders of any shape


class _Features(nn.Module):
    """Parameter-free time features, one row per modulation vector: [B] -> [B, M, 3] (Chroma's featuriser's shape)."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.m = m

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(self.m, dtype=t.dtype)[None, :, None].expand(t.shape[0], -1, 1)
        tt = t[:, None, None].expand(-1, self.m, 1)
        return torch.cat([tt.sin(), tt.cos(), idx], -1)


class _Approximator(nn.Module):
    """Every modulation vector at once from the features: [B, M, 3] -> [B, M, D] (Chroma's approximator's shape)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.in_proj = nn.Linear(3, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.in_proj(x)))


def test_a_stage_embedding_is_added_along_the_last_axis_only_also_when_b_equals_m() -> None:
    """Issue 27: with B == M the stage embedding [B, D] used to be added along M (off by 1.89)."""
    torch.manual_seed(0)
    emb = MultiScaleTimestepEmbed.from_embedder(nn.Sequential(_Features(m=2), _Approximator()), 8, 2)
    assert emb.embed_shape == (2, 8)
    with torch.no_grad():
        emb.stage_embed.weight.normal_()
    t, stage = torch.rand(2, 2), torch.tensor([0, 1])
    with torch.no_grad():
        out = emb(t, stage)
        expected = emb.embedders[0](t[:, 0]) + emb.embedders[1](t[:, 1]) + emb.stage_embed.weight[stage][:, None, :]
    assert torch.equal(out, expected)


def test_embedder_shapes_are_checked_when_wrapping_and_on_every_call() -> None:
    with pytest.raises(ValueError, match=r"last axis must be the hidden size 16"):
        MultiScaleTimestepEmbed.from_embedder(nn.Linear(1, 8), 16, 2, time_transform=lambda t: t[:, None])
    emb = MultiScaleTimestepEmbed([nn.Linear(1, 8), nn.Sequential(nn.Linear(1, 16), nn.Unflatten(1, (2, 8)))], 8, 2,
                                  time_transform=lambda t: t[:, None])  # fmt: skip
    with pytest.raises(ValueError, match=r"stage 1's timestep embedder gave \(3, 2, 8\), expected \[B, \*E\] = \[3, 8\]"):
        emb(torch.rand(3, 2), torch.zeros(3, dtype=torch.long))


def test_a_shared_time_network_is_exact_at_stage_0_and_costs_its_input_width_per_stage() -> None:
    torch.manual_seed(0)
    features, net = _Features(m=4), _Approximator()
    reference = copy.deepcopy(net)
    emb = StageInputTimeEmbed(features, net, "in_proj", num_stages=3)
    t, stage = torch.rand(5, 3), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        assert torch.equal(emb(t, stage), reference(features(t[:, 0])))  # bit for bit
    extra = sum(p.numel() for n, p in emb.named_parameters() if ".extra." in n)
    assert extra == (2 * 3 + 3) * 8  # (S - 1) F + S inputs (times F = 3, stage one-hot) to H = 8
    (emb(t, stage).square().sum()).backward()
    assert net.in_proj.extra.weight.grad.abs().sum() > 0  # the later stages and the stage index learn


# ----------------------------------------------------------------------------- CogView4 and Chroma


def test_cogview4_stage_0_is_exact_at_two_resolutions_and_the_shift_matters(tmp_path) -> None:
    pytest.importorskip("diffusers")
    import _tiny_families as tiny

    base = tiny.tiny_cogview4(tmp_path / "cv4")
    errors, gaps = {}, {}
    for side in (16, 32):  # stage 0 at 8x8 (4x4 tokens, mu 0.44) and 16x16 (8x8 tokens, mu 0.63)
        model = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)), sample_shape=(4, side, side), patch_sizes=[2, 4])
        stages, t = _stages(model, seed=side)
        cond = tiny.text_inputs("cogview4", 2, torch.Generator().manual_seed(1))
        with torch.no_grad():
            v0 = model(stages, t, K, **cond)[0]
            own = tiny.FAMILIES["cogview4"][1](base, stages[0], t[:, 0], cond)
            unshifted = -base(stages[0], timestep=1000.0 - 1000.0 * t[:, 0], **cond).sample  # reading sigma as 1000 sigma
        errors[side], gaps[side] = float((v0 - own).abs().max()), float((v0 - unshifted).abs().max())
    print(f"CogView4 stage-0 max error: {errors}; reading 1000 sigma instead: {gaps}")
    assert all(e <= 1e-5 for e in errors.values()) and all(g > 0.05 for g in gaps.values())


def test_chroma_shares_its_approximator_between_stages(tmp_path) -> None:
    pytest.importorskip("diffusers")
    import _tiny_families as tiny

    base = tiny.tiny_chroma(tmp_path / "chroma")
    approximator = sum(p.numel() for p in base.distilled_guidance_layer.parameters())
    model = wrap_dit(copy.deepcopy(base), LaplacianPyramid((4, 2, 1)), sample_shape=(4, 32, 32), patch_sizes=[2, 4, 8])
    time_path = model.base.distilled_guidance_layer
    assert isinstance(time_path, StageInputTimeEmbed)
    added = sum(p.numel() for p in time_path.parameters()) - approximator
    assert added == (2 * 16 + 3) * 32  # two extra stages' 16 features and the 3-way stage index, into hidden 32
    stages, t = _stages(model, seed=3)
    t = tiny.exact_times(t.shape, torch.Generator().manual_seed(4))
    cond = tiny.text_inputs("chroma", 2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        v0 = model(stages, t, torch.tensor([2, 1]), **cond)[0]
        own = tiny.FAMILIES["chroma"][1](base, stages[0], t[:, 0], cond)
    print(f"Chroma stage-0 max error (3 stages): {float((v0 - own).abs().max())}")
    assert float((v0 - own).abs().max()) <= 1e-5


# ----------------------------------------------------------------------------- adapters chosen by name, unknown models


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 8, 2, stride=2)


def test_an_explicit_adapter_runs_matches_and_says_what_is_missing() -> None:
    with pytest.raises(TypeError, match=r"adapter 'dit' does not fit .*MyNet: its matches\(model\) is False"):
        wrap_dit(MyNet(), IdentityDecomposition(), adapter="dit")
    near = SiT()
    del near.y_embedder  # DiT's names but no label embedder
    with pytest.raises(TypeError, match=r"adapter 'dit' does not fit .*SiT: it lacks a label embedder y_embedder"):
        wrap_dit(near, IdentityDecomposition(), adapter=DiTFamilyAdapter("unit"))
    with pytest.raises(TypeError) as err:
        wrap_dit(near, IdentityDecomposition())
    msg = str(err.value)
    assert "adapter 'dit' would fit but the model lacks a label embedder y_embedder" in msg
    assert "dfm_ext.adapters.AdapterSpec" in msg and "docs/guides/adapters.md" in msg
    pytest.importorskip("diffusers")
    with pytest.raises(TypeError, match="adapter 'sana' does not fit"):
        wrap_dit(SiT(), IdentityDecomposition(), adapter="sana")


class UserAdapter(DiTFamilyAdapter):
    """A user's adapter, not registered: load_wrapped finds it by its recorded class, or gets it as adapter=."""

    name = "users_dit"


def test_a_custom_adapter_reloads_by_class_or_by_argument(tmp_path) -> None:
    model = wrap_dit(SiT(), LaplacianPyramid((2, 1)), adapter=UserAdapter("unit"))
    model.save_pretrained(tmp_path / "m")
    stages, t = _stages(model)
    loaded = load_wrapped(tmp_path / "m", base_model=SiT())  # imported from its recorded module
    assert type(loaded.adapter) is UserAdapter and loaded.adapter.time_convention == "unit"
    UserAdapter.__module__, module = "__main__", UserAdapter.__module__  # as if defined in a script
    try:
        model.save_pretrained(tmp_path / "main")
        with pytest.raises(ValueError, match=r"saved with adapter 'users_dit' \(class __main__:UserAdapter\).*adapter=MyAdapter"):
            load_wrapped(tmp_path / "main", base_model=SiT())
        loaded = load_wrapped(tmp_path / "main", base_model=SiT(), adapter=UserAdapter)
    finally:
        UserAdapter.__module__ = module
    with torch.no_grad():
        assert torch.equal(model(stages, t, K, y=K)[0], loaded(stages, t, K, y=K)[0])
    with pytest.raises(ValueError, match="saved with adapter 'users_dit', but load_wrapped got adapter 'dit'"):
        load_wrapped(tmp_path / "m", base_model=SiT(), adapter="dit")


def test_a_base_class_from_main_reloads_by_structure(tmp_path) -> None:
    class MySiT(SiT):
        pass

    MySiT.__module__ = "__main__"
    model = wrap_dit(MySiT(), LaplacianPyramid((2, 1)), time_convention="unit")
    model.save_pretrained(tmp_path / "m")

    class Other(SiT):  # the same class imported under another module name
        pass

    Other.__qualname__, Other.__name__ = MySiT.__qualname__, "MySiT"
    loaded = load_wrapped(tmp_path / "m", base_model=Other())
    stages, t = _stages(model)
    with torch.no_grad():
        assert torch.equal(model(stages, t, K, y=K)[0], loaded(stages, t, K, y=K)[0])
    with pytest.raises(ValueError, match=r"base_model is a .*:LightningDiT, the saved base is __main__:.*MySiT"):
        load_wrapped(tmp_path / "m", base_model=LightningDiT())


# ----------------------------------------------------------------------------- what the library calls, bad input


def test_bad_labels_and_data_get_errors_naming_the_argument() -> None:
    model = _sit()
    stages, t = _stages(model)
    with pytest.raises(TypeError, match=r"y must be a torch integer tensor \[B\], got numpy.ndarray \(use torch.as_tensor\(y\)\)"):
        model(stages, t, K, y=np.array([1, 2]))
    with pytest.raises(TypeError, match="y must be a torch integer tensor .* got dtype torch.float32"):
        model(stages, t, K, y=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"y: class labels must lie in \[0, 9\] \(or 10, the null class\), got \[3, 11\]"):
        model(stages, t, K, y=torch.tensor([3, 11]))
    with pytest.raises(TypeError, match=r"stages\[0\] is torch.float64 but the model's parameters are torch.float32"):
        model([x.double() for x in stages], t, K, y=K)


class _TwoArgLabels(_LabelEmbedder):
    def forward(self, labels, train):  # no force_drop_ids
        return self.embedding_table(labels)


def test_a_label_embedder_without_force_drop_ids_gets_the_null_class() -> None:
    base = SiT()
    base.y_embedder = _TwoArgLabels(dropout_prob=0.1)
    model = wrap_dit(base, LaplacianPyramid((2, 1)), time_convention="unit")
    stages, t = _stages(model)
    with torch.no_grad():
        dropped = model(stages, t, K, y=torch.tensor([3, 4]), force_drop_ids=torch.tensor([1, 0]))[0]
        null = model(stages, t, K, y=torch.tensor([10, 4]))[0]
    assert torch.equal(dropped, null)


def test_lightningdits_use_checkpoint_flag_is_honoured(monkeypatch) -> None:
    from dfm_ext.adapters import common
    from dfm_ext.specialization import checkpoint

    base = LightningDiT()
    base.use_checkpoint = True  # LightningDiT's constructor argument, kept as an attribute
    model = wrap_dit(base, LaplacianPyramid((2, 1)), time_convention="unit")
    calls = []
    monkeypatch.setattr(common, "checkpoint", lambda block, *a: calls.append(block) or checkpoint(block, *a))
    stages, t = _stages(model)
    model(stages, t, K, y=K)[0].square().mean().backward()
    assert calls == list(model.base.blocks)


class PicklableSiT(SiT):
    """SiT's stand-in from an importable module (torch.save pickles the base model's class)."""


PicklableSiT.__module__ = __name__


def test_a_wrapped_model_with_a_convention_pickles() -> None:
    model = wrap_dit(PicklableSiT(), LaplacianPyramid((2, 1)), time_convention=TimeConvention("timestep", scale=0.5))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    stages, t = _stages(model)
    with torch.no_grad():
        assert torch.equal(model(stages, t, K, y=K)[0], loaded(stages, t, K, y=K)[0])
