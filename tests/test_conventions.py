"""Time conventions of the codebases wrap_dit wraps: proven or refused, never guessed.

facebookresearch DiT, SiT and LightningDiT share DiT's module names but read time differently
(DiT: integer step 999 = noise and epsilon output; SiT and LightningDiT: t in [0, 1] with t = 1
data and velocity output, through SiT's linear transport). The stand-ins below are written here,
tiny, with the original class names, module names and attribute names and each codebase's own
forward structure; "the model's own prediction" is each stand-in's forward under its own
convention, with paper time t (0 = noise, 1 = data) converted to it.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfm_ext
from dfm_ext import IdentityDecomposition, LaplacianPyramid, load_wrapped, wrap_dit
from dfm_ext.adapters import DiTFamilyAdapter

C, SIZE, PATCH, D, CLASSES = 4, 16, 2, 32, 10

# ------------------------------------------------------------------ stand-ins (written here)


class _PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(C, D, PATCH, stride=PATCH)
        self.grid_size = (SIZE // PATCH, SIZE // PATCH)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimestepEmbedder(nn.Module):
    """Sinusoidal features of the scalar the model is given, then an MLP (as all three codebases)."""

    def __init__(self, freq: int = 32) -> None:
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq // 2
        angle = t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half) / half)[None]
        return self.mlp(torch.cat([angle.cos(), angle.sin()], -1))


class _LabelEmbedder(nn.Module):
    def __init__(self, dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(CLASSES + 1, D)
        self.num_classes, self.dropout_prob = CLASSES, dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        return self.embedding_table(labels)


class _RoPE(nn.Module):
    """Rotates (q, k) feature pairs by a per-token angle: a stand-in for LightningDiT's ``feat_rope``."""

    def __init__(self, head_dim: int, tokens: int) -> None:
        super().__init__()
        freqs = 1.0 / 100 ** (torch.arange(head_dim // 2) / (head_dim // 2))
        angle = torch.arange(tokens)[:, None] * freqs[None]
        self.register_buffer("cos", angle.cos())
        self.register_buffer("sin", angle.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, -1)
        return torch.cat([a * self.cos - b * self.sin, a * self.sin + b * self.cos], -1)


class _Block(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(approximate="tanh"), nn.Linear(2 * D, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, feat_rope=None):
        b, n, _ = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if feat_rope is not None:
            q, k = feat_rope(q), feat_rope(k)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
        x = x + g1 * self.proj(a)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class _FinalLayer(nn.Module):
    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False)
        self.linear = nn.Linear(D, PATCH * PATCH * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class _Backbone(nn.Module):
    """The attribute layout the three codebases share; every weight random (a 'trained' model)."""

    def __init__(self, learn_sigma: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * C if learn_sigma else C
        self.x_embedder = _PatchEmbed()
        self.t_embedder = _TimestepEmbedder()
        self.y_embedder = _LabelEmbedder()
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.final_layer = _FinalLayer(self.out_channels)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        g = SIZE // PATCH
        x = x.reshape(x.shape[0], g, g, PATCH, PATCH, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_channels, SIZE, SIZE)

    def trunk(self, x, t, y, rope=None):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c) if rope is None else block(h, c, rope)
        return self.unpatchify(self.final_layer(h, c))


class DiT(_Backbone):
    """facebookresearch/DiT ``models.DiT``: ``t`` = integer step (999 = noise); returns epsilon and sigma."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(learn_sigma=True, seed=seed)

    def forward(self, x, t, y):
        return self.trunk(x, t, y)


class SiT(_Backbone):
    """willisma/SiT ``models.SiT``: ``t`` in [0, 1], t = 1 data; returns the velocity half."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(learn_sigma=True, seed=seed)

    def forward(self, x, t, y):
        return self.trunk(x, t, y).chunk(2, dim=1)[0]


class LightningDiT(_Backbone):
    """hustvl/LightningDiT ``models.lightningdit.LightningDiT``: SiT's time, RoPE passed to every block."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(learn_sigma=False, seed=seed)
        self.feat_rope = _RoPE(D // 2, self.x_embedder.num_patches)

    def forward(self, x, t=None, y=None):
        return self.trunk(x, t, y, rope=self.feat_rope)


DiT.__module__ = SiT.__module__ = "models"
LightningDiT.__module__ = "models.lightningdit"

# paper time t -> each model's own prediction, in the library's convention where the model has
# one: DiT's epsilon is taken as -epsilon (the default for "discrete", benchmarks/epsilon_init.py),
# SiT/LightningDiT give x - noise.
OWN = {
    DiT: ("discrete", lambda m, x, t, y: -m(x, 999.0 * (1.0 - t), y)[:, :C]),
    SiT: ("unit", lambda m, x, t, y: m(x, t, y)),
    LightningDiT: ("unit", lambda m, x, t, y: m(x, t, y)),
}
STAND_INS = list(OWN)


def _long(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


def _up(x: torch.Tensor, r: int) -> torch.Tensor:
    return x.repeat_interleave(r, -1).repeat_interleave(r, -2)


def _stage0_error(wrapped, base, own, two_stages: bool) -> float:
    """Max |wrapped stage 0 - the base model's own prediction| at random t, on one or two stages."""
    g = torch.Generator().manual_seed(7)
    y, t = _long(1, 7, 3), torch.rand(3, 2 if two_stages else 1, generator=g)
    with torch.no_grad():
        if two_stages:
            x0, x1 = torch.randn(3, C, SIZE // 2, SIZE // 2, generator=g), torch.randn(3, C, SIZE, SIZE, generator=g)
            out = wrapped([x0, x1], t, _long(0, 1, 1), y=y)[0]
            ref = F.avg_pool2d(own(base, _up(x0, 2), t[:, 0], y), 2)
        else:
            x = torch.randn(3, C, SIZE, SIZE, generator=g)
            out, ref = wrapped([x], t, _long(0, 0, 0), y=y)[0], own(base, x, t[:, 0], y)
    assert ref.abs().max() > 0.05  # a real signal, not zeros
    return float((out - ref).abs().max())


# ------------------------------------------------------------------ auto: proven or refused


@pytest.mark.parametrize("cls", STAND_INS, ids=lambda c: c.__name__)
def test_auto_refuses_models_that_only_share_dit_names(cls):
    base = cls().eval()
    before = copy.deepcopy(base.state_dict())
    embedder = base.t_embedder
    with pytest.raises(ValueError) as err:
        wrap_dit(base, LaplacianPyramid((2, 1)))
    msg = str(err.value)
    assert f"cannot tell how {cls.__name__} (module {cls.__module__}) reads time" in msg
    for call in ('time_convention="discrete"', 'time_convention="unit"', 'time_convention="x1000"'):
        assert f"wrap_dit(model, decomposition, {call})" in msg
    assert "facebookresearch DiT:" in msg and "SiT, LightningDiT:" in msg and "epsilon" in msg
    assert "'sigma'" in msg and "'timestep'" in msg and f"{cls.__name__}.dfm_time_convention" in msg
    # refused before anything was changed
    assert base.t_embedder is embedder and isinstance(base.x_embedder.proj, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    # the adapter chosen by name, or built without a convention, refuses the same way
    for adapter in ("dit", DiTFamilyAdapter(), DiTFamilyAdapter):
        with pytest.raises(ValueError, match="cannot tell how"):
            wrap_dit(base, IdentityDecomposition(), adapter=adapter)


@pytest.mark.parametrize("cls", STAND_INS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("two_stages", [False, True], ids=["identity", "pyramid"])
def test_explicit_convention_equals_the_models_own_prediction(cls, two_stages):
    convention, own = OWN[cls]
    base = cls().eval()
    d = LaplacianPyramid((2, 1)) if two_stages else IdentityDecomposition()
    wrapped = wrap_dit(copy.deepcopy(base), d, time_convention=convention).eval()
    assert wrapped.adapter.time_convention == convention
    assert _stage0_error(wrapped, base, own, two_stages) <= 1e-5
    # the same through an adapter instance, imported from where the docs say
    wrapped = wrap_dit(copy.deepcopy(base), d, adapter=DiTFamilyAdapter(time_convention=convention)).eval()
    assert _stage0_error(wrapped, base, own, two_stages) <= 1e-5
    # what the old default guess ("x1000") gave: far off, so the equality above has teeth
    wrong = "unit" if convention != "unit" else "x1000"
    wrapped = wrap_dit(copy.deepcopy(base), d, time_convention=wrong).eval()
    assert _stage0_error(wrapped, base, own, two_stages) > 0.05


def test_lightningdit_rope_reaches_the_blocks():
    """LightningDiT's blocks take `feat_rope`; without it the wrapped model would silently differ."""
    base = LightningDiT().eval()
    wrapped = wrap_dit(copy.deepcopy(base), IdentityDecomposition(), time_convention="unit").eval()
    no_rope = LightningDiT().eval()
    no_rope.feat_rope = None
    assert _stage0_error(wrapped, base, OWN[LightningDiT][1], False) <= 1e-5
    assert _stage0_error(wrapped, no_rope, OWN[LightningDiT][1], False) > 1e-3


def test_declared_convention_is_proof():
    class DeclaredSiT(SiT):
        dfm_time_convention = "unit"

    base = DeclaredSiT().eval()
    wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1))).eval()  # auto
    assert wrapped.adapter.time_convention == "unit"
    assert _stage0_error(wrapped, base, OWN[SiT][1], True) <= 1e-5
    # an instance attribute declares it too (e.g. set by a recipe's model factory)
    inst = DiT().eval()
    inst.dfm_time_convention = "discrete"
    wrapped = wrap_dit(copy.deepcopy(inst), IdentityDecomposition()).eval()
    assert _stage0_error(wrapped, inst, OWN[DiT][1], False) <= 1e-5


def _reference_dit() -> nn.Module:
    torch.manual_seed(0)
    base = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", hidden_size=32, input_size=SIZE, in_channels=C)).eval()
    with torch.no_grad():  # off the zero init (adaLN-Zero, zero head), like a trained model
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return base


def test_library_models_declare_their_convention():
    ref = _reference_dit()
    assert type(ref).dfm_time_convention == "x1000"
    wrapped = wrap_dit(copy.deepcopy(ref), IdentityDecomposition()).eval()
    assert wrapped.adapter.time_convention == "x1000"
    assert _stage0_error(wrapped, ref, lambda m, x, t, y: m(x, t, y), False) <= 1e-5
    video = dfm_ext.VideoDiT(dfm_ext.VideoDiTConfig.preset("tiny"))
    assert wrap_dit(video, IdentityDecomposition(), sample_shape=(16, 2, 8, 8)).adapter.time_convention == "x1000"


def test_contradictions_and_unknown_names_are_refused():
    ref = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", hidden_size=32))
    with pytest.raises(ValueError, match=r"conflicting time conventions for DiT: time_convention= 'unit', DiT.dfm_time_convention 'x1000'"):
        wrap_dit(ref, IdentityDecomposition(), time_convention="unit")
    with pytest.raises(ValueError, match=r"time_convention= 'unit', DiTFamilyAdapter\(time_convention=\) 'discrete'"):
        wrap_dit(SiT(), IdentityDecomposition(), adapter=DiTFamilyAdapter("discrete"), time_convention="unit")
    base = SiT()
    with pytest.raises(ValueError, match=r"unknown time_convention 'seconds'; choose one of \['discrete', 'shifted_timestep', 'sigma', 'timestep', 'unit', 'x1000'\]"):
        wrap_dit(base, IdentityDecomposition(), time_convention="seconds")
    with pytest.raises(ValueError, match="unknown time_convention 1000"):
        DiTFamilyAdapter(time_convention=1000)
    assert isinstance(base.x_embedder.proj, nn.Conv2d)  # untouched


def test_adapter_without_time_convention_refuses_the_argument():
    from test_wrap_dit import ToyAdapter, ToyDiT

    with pytest.raises(TypeError, match="adapter 'toy' takes no time_convention"):
        wrap_dit(ToyDiT(), IdentityDecomposition(), adapter=ToyAdapter(), time_convention="unit")


# ------------------------------------------------------------------ save -> load keeps the convention


def test_time_convention_survives_save_and_load(tmp_path):
    base = SiT(seed=1).eval()
    wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)), time_convention="unit").eval()
    with torch.no_grad():
        for p in wrapped.parameters():  # train-like: later stages no longer zero
            p.add_(0.01 * torch.randn_like(p))
    wrapped.save_pretrained(tmp_path / "sit")
    record = json.loads((tmp_path / "sit" / "dfm_config.json").read_text())
    assert record["adapter"] == {
        "name": "dit", "config": {"time_convention": "unit", "output_scale": 1.0}, "class": "dfm_ext.adapters.dit:DiTFamilyAdapter"
    }
    loaded = load_wrapped(tmp_path / "sit", base_model=SiT(seed=2)).eval()
    assert loaded.adapter.time_convention == "unit"
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(2, C, SIZE // 2, SIZE // 2, generator=g), torch.randn(2, C, SIZE, SIZE, generator=g)]
    t, y = torch.rand(2, 2, generator=g), _long(2, 5)
    with torch.no_grad():
        a, b = wrapped(stages, t, _long(1, 1), y=y), loaded(stages, t, _long(1, 1), y=y)
    assert all((u - v).abs().max() <= 1e-6 for u, v in zip(a, b))
    # a record without the convention is refused on load rather than guessed
    record["adapter"]["config"] = None
    (tmp_path / "sit" / "dfm_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="cannot tell how SiT"):
        load_wrapped(tmp_path / "sit", base_model=SiT(seed=2))


def test_reference_dit_records_its_declared_convention(tmp_path):
    wrapped = wrap_dit(dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", hidden_size=32)), IdentityDecomposition())
    wrapped.save_pretrained(tmp_path / "ref")
    record = json.loads((tmp_path / "ref" / "dfm_config.json").read_text())
    assert record["adapter"]["config"]["time_convention"] == "x1000"
    assert load_wrapped(tmp_path / "ref").adapter.time_convention == "x1000"


# ------------------------------------------------------------------ the documentation's table


def _readme_calls() -> dict[str, str]:
    """First cell -> the call in the last cell, for each row of the conventions table (docs/guides/wrap-dit.md)."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "wrap-dit.md").read_text()
    section = readme.split("## Conventions of the codebases you wrap\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in section.splitlines() if r.startswith("| ")]
    return {r[0]: r[-1].strip("`") for r in rows if r[-1].startswith("`wrap_dit(")}


@pytest.mark.parametrize("cls", STAND_INS, ids=lambda c: c.__name__)
def test_readme_calls_give_the_models_own_prediction(cls):
    row = {DiT: "facebookresearch DiT", SiT: "SiT (", LightningDiT: "LightningDiT ("}[cls]
    (call,) = [c for k, c in _readme_calls().items() if k.startswith(row)]
    base = cls().eval()
    scope = {"wrap_dit": wrap_dit, "model": copy.deepcopy(base), "decomposition": LaplacianPyramid((2, 1))}
    wrapped = eval(call, scope).eval()  # noqa: S307  (the documentation's own text, run as a reader would)
    assert _stage0_error(wrapped, base, OWN[cls][1], True) <= 1e-5


def test_readme_call_for_the_reference_dit():
    (call,) = [c for k, c in _readme_calls().items() if k.startswith("`dfm_ext.DiT`")]
    base = _reference_dit()
    scope = {"wrap_dit": wrap_dit, "model": copy.deepcopy(base), "decomposition": LaplacianPyramid((2, 1))}
    assert _stage0_error(eval(call, scope).eval(), base, lambda m, x, t, y: m(x, t, y), True) <= 1e-5  # noqa: S307


# ------------------------------------------------------------------ imports


def test_adapter_classes_import_from_the_package_without_diffusers():
    code = (
        "import sys\n"
        "from dfm_ext.adapters import DiTFamilyAdapter, VideoDiTAdapter\n"
        "from dfm_ext.adapters.dit import DiTFamilyAdapter as D\n"
        "assert DiTFamilyAdapter is D and issubclass(VideoDiTAdapter, D)\n"
        "assert 'diffusers' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        dfm_ext.adapters.Nope  # noqa: B018


def test_diffusers_family_takes_time_convention(tmp_path):
    pytest.importorskip("diffusers")
    from _tiny_diffusers import tiny_dit

    from dfm_ext.adapters import DiffusersDiTAdapter

    base = tiny_dit(tmp_path / "dit")
    assert wrap_dit(copy.deepcopy(base), IdentityDecomposition()).adapter.time_convention == "discrete"
    wrapped = wrap_dit(copy.deepcopy(base), IdentityDecomposition(), time_convention="timestep")
    assert isinstance(wrapped.adapter, DiffusersDiTAdapter) and wrapped.adapter.time_convention == "timestep"
    with pytest.raises(ValueError, match="was built with time_convention='discrete' but wrap_dit got time_convention='unit'"):
        wrap_dit(copy.deepcopy(base), IdentityDecomposition(), adapter=DiffusersDiTAdapter(), time_convention="unit")
