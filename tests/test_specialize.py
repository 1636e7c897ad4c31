"""Per-stage parameter specialisation: identity at attach, routing, gradients, merge, I/O, peft export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dfm_ext.specialization import (
    GROUPS,
    StageSpecialization,
    export_peft_lora,
    load_stage_parameters,
    merge,
    save_stage_parameters,
    specialize,
)

HIDDEN = 16
C = 3


# ---------------------------------------------------------------------------------------------
# a tiny DiT with the reference module names that obeys the DFM model contract


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, 2 * d)
        self.mlp.fc2 = nn.Linear(2 * d, d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        q, k, v = self.attn.qkv(h).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm(x))))


class ToyDiT(nn.Module):
    """``forward(stages, t [B, S], stage [B], mask=None, y=None) -> list``; all stages 8x8, patch 2."""

    def __init__(self, num_stages: int = 2, depth: int = 2, d: int = HIDDEN) -> None:
        super().__init__()
        self.num_stages = num_stages
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C * num_stages, d, kernel_size=2, stride=2)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(num_stages, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(5, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final_layer.linear = nn.Linear(d, 4 * C * num_stages)
        self.final_layer.norm = nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, stages, t, stage, mask=None, y=None):
        if mask is not None:
            stages = [s * mask[:, i, None, None, None] for i, s in enumerate(stages)]
        x = self.x_embedder.proj(torch.cat(stages, 1)).flatten(2).transpose(1, 2)
        c = self.t_embedder.mlp(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        out = self.final_layer.linear(self.final_layer.norm(x) * (1 + scale) + shift)
        b = out.shape[0]
        out = out.transpose(1, 2).reshape(b, -1, 4, 4)
        out = nn.functional.pixel_shuffle(out, 2)
        return list(out.chunk(self.num_stages, dim=1))


def _inputs(batch: int, num_stages: int = 2, seed: int = 0, stage: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(batch, C, 8, 8, generator=g) for _ in range(num_stages)]
    t = torch.rand(batch, num_stages, generator=g)
    st_ = torch.tensor(stage) if stage is not None else torch.randint(0, num_stages, (batch,), generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    return stages, t, st_, y


def _toy(num_stages: int = 2, seed: int = 0) -> ToyDiT:
    torch.manual_seed(seed)
    return ToyDiT(num_stages).eval()


def _randomize_stage_params(spec: StageSpecialization, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in spec.stage_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max().detach()) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_specialised_model_moves_with_to(kind: str) -> None:
    # Regression: per-stage layers once shadowed nn.Module._apply, so .to()/.double() raised.
    model = _toy()
    spec = specialize(model, kind=kind, targets="all", rank=4 if kind == "lora" else None)
    _randomize_stage_params(spec)
    stages, t, stage, y = _inputs(4, stage=[0, 1, 1, 0])
    with torch.no_grad():
        ref = model(stages, t, stage, y=y)
        model.double()
        out = model([s.double() for s in stages], t.double(), stage, y=y)
    assert all(p.dtype == torch.float64 for p in spec.stage_parameters())
    assert _max_diff([o.float() for o in out], ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# identity at attach time


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("group", ["mod", "proj", "cond", "attn", "mlp", "all"])
def test_unchanged_at_attach_toy(kind: str, group: str) -> None:
    model = _toy()
    stages, t, stage, y = _inputs(6, stage=[0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        before = model(stages, t, stage, y=y)
        spec = specialize(model, kind=kind, targets=group, rank=4 if kind == "lora" else None)
        after = model(stages, t, stage, y=y)
    assert spec.layers and (group == "all" or set(spec.layers.values()) == {group})
    assert _max_diff(before, after) <= 1e-6


def test_groups_found_in_reference_names() -> None:
    spec = specialize(_toy(), kind="lora", targets="all", rank=2)
    by_group: dict[str, set[str]] = {}
    for name, g in spec.layers.items():
        by_group.setdefault(g, set()).add(name)
    assert by_group["proj"] == {"x_embedder.proj", "final_layer.linear"}
    assert by_group["cond"] == {"t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.embedding_table"}
    assert by_group["mod"] == {"blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"}
    assert by_group["attn"] == {f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")}
    assert by_group["mlp"] == {f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("fc1", "fc2")}
    assert set(by_group) == set(GROUPS)


# ---------------------------------------------------------------------------------------------
# routing: mixed batch == per-stage batches, outputs and gradients


def _loss(out: list[torch.Tensor], w: list[torch.Tensor]) -> torch.Tensor:
    return sum((o * ww).sum() for o, ww in zip(out, w))


@settings(max_examples=6)
@given(
    stage=st.lists(st.integers(0, 2), min_size=2, max_size=6),
    kind=st.sampled_from(["lora", "full"]),
    targets=st.sampled_from(["all", "mlp", ("attn", "cond"), ("proj", "mod")]),
)
def test_mixed_batch_equals_separate_runs(stage: list[int], kind: str, targets) -> None:
    model = _toy(num_stages=3)
    spec = specialize(model, kind=kind, targets=targets, rank=3 if kind == "lora" else None)
    _randomize_stage_params(spec)
    stages, t, st_, y = _inputs(len(stage), num_stages=3, stage=stage)
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(s.shape, generator=g) for s in stages]
    params = [p for p in model.parameters()]

    out = model(stages, t, st_, y=y)
    grads = torch.autograd.grad(_loss(out, w), params, allow_unused=True)

    sep_out = [torch.zeros_like(o) for o in out]
    sep_grads = [torch.zeros_like(p) for p in params]
    for s in sorted(set(stage)):
        idx = (st_ == s).nonzero().squeeze(1)
        o = model([x[idx] for x in stages], t[idx], st_[idx], y=y[idx])
        for full, part in zip(sep_out, o):
            full[idx] = part.detach()
        gs = torch.autograd.grad(_loss(o, [ww[idx] for ww in w]), params, allow_unused=True)
        for acc, gg in zip(sep_grads, gs):
            if gg is not None:
                acc += gg
    assert _max_diff(out, sep_out) <= 1e-5
    for p, a, b in zip(params, grads, sep_grads):
        a = torch.zeros_like(p) if a is None else a
        # Sums over the batch in another order: float32 rounding grows with the gradient's size.
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * (1.0 + float(b.abs().max()))), "gradient differs"


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradients_reach_only_present_stages_and_not_frozen_shared(kind: str) -> None:
    model = _toy(num_stages=3)
    spec = specialize(model, kind=kind, targets="all", rank=2 if kind == "lora" else None, train="stage")
    _randomize_stage_params(spec)
    stages, t, stage, y = _inputs(4, num_stages=3, stage=[2, 0, 2, 0])
    sum(o.square().sum() for o in model(stages, t, stage, y=y)).backward()
    stage_ids = {id(p) for p in spec.stage_parameters()}
    for name, p in model.named_parameters():
        if id(p) not in stage_ids:
            assert not p.requires_grad and p.grad is None, name
    for s, present in ((0, True), (1, False), (2, True)):
        ps = spec.stage_parameters(s)
        assert ps
        if present:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
        else:  # absent from the batch: still in the graph, with exact zero gradients (both kinds)
            assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in ps)


def test_train_all_keeps_shared_trainable() -> None:
    model = _toy()
    specialize(model, kind="lora", targets="mlp", rank=2, train="all")
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("merged_stage", [0, 1])
def test_merge_equals_specialised_on_stage(kind: str, merged_stage: int) -> None:
    model = _toy()
    base_keys = set(model.state_dict())
    spec = specialize(model, kind=kind, targets="all", rank=3 if kind == "lora" else None, stages=[1] if kind == "full" else None, train="stage")
    _randomize_stage_params(spec)
    stages, t, _, y = _inputs(3)
    stage = torch.full((3,), merged_stage)
    plain = spec.merge(merged_stage)
    with torch.no_grad():
        ref = model(stages, t, stage, y=y)
        got = plain(stages, t, stage, y=y)
        got_other = plain(stages, t, 1 - stage, y=y)  # an expert ignores the routing
    assert _max_diff(ref, got) <= 1e-5
    assert _max_diff(got, got_other) == 0.0
    assert set(plain.state_dict()) == base_keys
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules() if m is not plain and not list(m.children()))
    assert all(p.requires_grad for p in plain.parameters())  # restored from before specialize
    # the original model is still specialised and still routes
    with pytest.raises(RuntimeError, match="without a stage"):
        model.blocks[0].mlp.fc1(torch.randn(2, HIDDEN))


def test_merge_inplace() -> None:
    model = _toy()
    spec = specialize(model, kind="lora", targets="mlp", rank=2)
    _randomize_stage_params(spec)
    stages, t, _, y = _inputs(2)
    stage = torch.tensor([1, 1])
    with torch.no_grad():
        ref = model(stages, t, stage, y=y)
    out = merge(model, 1, inplace=True)
    assert out is model and type(model.blocks[0].mlp.fc1) is nn.Linear
    with torch.no_grad():
        assert _max_diff(ref, model(stages, t, stage, y=y)) <= 1e-5
    specialize(model, kind="full", targets="mlp")  # can be specialised again


# ---------------------------------------------------------------------------------------------
# parameter counts and errors


@pytest.mark.parametrize("rank", [1, 4])
def test_parameter_counts(rank: int) -> None:
    model = _toy()
    lora = specialize(model, kind="lora", targets=("mlp", "cond", "proj"), rank=rank, alpha=2.0)
    d = HIDDEN
    assert lora.rank == rank and lora.alpha == 2.0
    mlp = 2 * rank * ((d + 2 * d) + (2 * d + d))  # two blocks, fc1 and fc2, A [r, in] + B [out, r]
    cond = rank * (2 + d) + rank * (d + d) + rank * (5 + d)  # t mlp.0, mlp.2, embedding table
    proj = rank * (C * 2 * 4 + d) + rank * (d + 4 * C * 2)  # conv A [r, in, 2, 2] + B [out, r, 1, 1]; head
    assert lora.parameters_per_group == {"mlp": 2 * mlp, "cond": 2 * cond, "proj": 2 * proj}
    assert lora.parameters_per_stage == mlp + cond + proj

    full = specialize(_toy(), kind="full", targets="mlp", stages=[1])
    per_layer = (d * 2 * d + 2 * d) + (2 * d * d + d)
    assert full.parameters_per_group == {"mlp": 2 * per_layer} and full.num_parameters == 2 * per_layer
    assert full.rank is None and full.stages == (1,)


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="unknown target group"):
        specialize(_toy(), targets="ffn")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        specialize(_toy(), kind="lora", rank=0)
    with pytest.raises(ValueError, match="rank and alpha"):
        specialize(_toy(), kind="full", rank=4)
    with pytest.raises(ValueError, match="kind"):
        specialize(_toy(), kind="dora")
    with pytest.raises(ValueError, match="stages must be"):
        specialize(_toy(), stages=[2])
    with pytest.raises(ValueError, match="train"):
        specialize(_toy(), train="base")
    with pytest.raises(ValueError, match="matched no"):
        specialize(_toy(), targets="x", patterns={"x": [r"nothing_here"]})

    class NoStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(2, 2))

        def forward(self, x):
            return self.mlp(x)

    with pytest.raises(ValueError, match="no 'stage' argument"):
        specialize(NoStage(), num_stages=2)
    with pytest.raises(ValueError, match="infer num_stages"):
        specialize(NoStage(), consume_stage=True)

    model = _toy()
    specialize(model, targets="mlp", rank=2)
    with pytest.raises(ValueError, match="already specialised"):
        specialize(model, targets="attn", rank=2)
    stages, t, _, y = _inputs(2)
    with pytest.raises(ValueError, match=r"stage values must be in \[0, 1\]"):
        model(stages, t, torch.tensor([0, 2]), y=y)
    with pytest.raises(TypeError, match="integer tensor"):
        model(stages, t, torch.tensor([0.0, 1.0]), y=y)
    with pytest.raises(RuntimeError, match="ran without a stage"):
        model(stages, t, None, y=y)
    with pytest.raises(ValueError, match="stage must be in"):
        merge(model, 2)


def test_mixed_stages_need_batch_leading_dim() -> None:
    class Reshaping(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 4))

        def forward(self, x, stage):
            return self.mlp(x.flatten(0, 1)).view_as(x)  # [B, N, D] -> [B*N, D]

    model = Reshaping()
    specialize(model, targets="mlp", rank=2, num_stages=2)
    x = torch.randn(2, 3, 4)
    model(x, torch.tensor([1, 1]))  # a single-stage batch is fine for any layout
    with pytest.raises(ValueError, match="leading dimension must be B"):
        model(x, torch.tensor([0, 1]))


def test_predicate_and_patterns() -> None:
    spec = specialize(_toy(), targets=lambda name, m: name.endswith("fc2"), rank=2)
    assert set(spec.layers) == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"} and set(spec.layers.values()) == {"custom"}
    spec = specialize(_toy(), targets="first", patterns={"first": [r"^blocks\.0\."]}, kind="full")
    assert all(n.startswith("blocks.0.") for n in spec.layers) and len(spec.layers) == 5
    with pytest.raises(TypeError, match="only nn.Linear"):
        specialize(_toy(), targets=lambda name, m: name == "blocks.0.norm")


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_load_roundtrip_and_mismatch(tmp_path: Path) -> None:
    model = _toy()
    spec = specialize(model, kind="lora", targets="all", rank=3)
    _randomize_stage_params(spec)
    path = tmp_path / "stages.safetensors"
    spec.save(path)
    stages, t, stage, y = _inputs(4, stage=[0, 1, 0, 1])
    with torch.no_grad():
        ref = model(stages, t, stage, y=y)

    other = _toy()
    specialize(other, kind="lora", targets="all", rank=3, generator=torch.Generator().manual_seed(9))
    load_stage_parameters(other, path)
    with torch.no_grad():
        assert _max_diff(ref, other(stages, t, stage, y=y)) == 0.0

    wrong_rank = _toy()
    specialize(wrong_rank, kind="lora", targets="all", rank=2)
    with pytest.raises(ValueError, match="rank"):
        load_stage_parameters(wrong_rank, path)
    fewer = _toy()
    specialize(fewer, kind="lora", targets="mlp", rank=3)
    with pytest.raises(ValueError, match="unexpected"):
        load_stage_parameters(fewer, path)
    wider = ToyDiT(2, d=24)
    specialize(wider, kind="lora", targets="all", rank=3)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_stage_parameters(wider, path)
    with pytest.raises(ValueError, match="not specialised"):
        save_stage_parameters(_toy(), tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------------------------
# per-stage LoRA exported to peft/diffusers format and loaded with load_lora_adapter


def test_flux_stage_lora_exports_to_diffusers(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from _tiny_diffusers import text_inputs, tiny_flux

    import copy

    base = tiny_flux(tmp_path / "base", seed=0)
    model = copy.deepcopy(base)
    spec = specialize(model, kind="lora", targets=("attn", "mlp"), rank=4, alpha=8.0, num_stages=2, consume_stage=True)
    assert any(".attn.to_q" in n for n in spec.layers) and any(".ff.net" in n for n in spec.layers)
    _randomize_stage_params(spec, scale=0.3)

    g = torch.Generator().manual_seed(0)
    batch = 2
    inputs = dict(
        hidden_states=torch.randn(batch, 16, 16, generator=g),
        timestep=torch.rand(batch, generator=g),
        guidance=torch.ones(batch),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(3, 3),
        **text_inputs("flux", batch, generator=g),
    )
    with torch.no_grad():
        ref = model(**inputs, stage=torch.tensor([1, 1])).sample
        other = model(**inputs, stage=torch.tensor([0, 0])).sample
        with spec.route(1):
            assert torch.equal(model(**inputs).sample, ref)
    assert float((ref - other).abs().max()) > 1e-3

    path = spec.export_peft(1, tmp_path / "stage1")
    config = json.loads((path.parent / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    base.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer", adapter_name="stage1")
    with torch.no_grad():
        got = base(**inputs).sample
    assert float((got - ref).abs().max()) <= 1e-5


def test_export_errors(tmp_path: Path) -> None:
    full = _toy()
    specialize(full, kind="full", targets="mlp")
    with pytest.raises(ValueError, match="kind='lora'"):
        export_peft_lora(full, 1, tmp_path / "nope")
    lora = _toy()
    specialize(lora, kind="lora", targets="mlp", stages=[1], rank=2)
    with pytest.raises(ValueError, match="owns no parameters"):
        export_peft_lora(lora, 0, tmp_path / "nope")
    with pytest.raises(ValueError, match="does not start with"):
        export_peft_lora(lora, 1, tmp_path / "nope", strip="model.")


# ---------------------------------------------------------------------------------------------
# wrapped models: the reference DiT and the diffusers DiT / Flux adapters


def _wrapped(family: str, cache: dict, tmp_path_factory) -> nn.Module:
    import copy

    from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit

    if family not in cache:
        if family == "reference":
            torch.manual_seed(0)
            cache[family] = DiT(DiTConfig.preset("tiny", class_dropout_prob=0.0))
        else:
            pytest.importorskip("diffusers")
            from _tiny_diffusers import FACTORIES

            cache[family] = FACTORIES[family](tmp_path_factory.mktemp(family))
    return wrap_dit(copy.deepcopy(cache[family]), LaplacianPyramid(factors=(2, 1))).eval()


def _wrapped_cond(family: str, batch: int) -> dict:
    if family == "reference":
        return {"y": torch.arange(batch) % 10}
    from _tiny_diffusers import text_inputs

    return text_inputs(family, batch, generator=torch.Generator().manual_seed(3))


_BASES: dict = {}


@pytest.mark.parametrize("family", ["reference", "dit", "flux"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_wrapped_unchanged_at_attach(family: str, kind: str, tmp_path_factory) -> None:
    import copy

    wrapped = _wrapped(family, _BASES, tmp_path_factory)
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(3, *s, generator=g) for s in wrapped.stage_shapes]
    t, stage, cond = torch.rand(3, 2, generator=g), torch.tensor([0, 1, 1]), _wrapped_cond(family, 3)
    with torch.no_grad():
        before = wrapped(stages, t, stage, **cond)
    for group in ["mod", "proj", "cond", "attn", "mlp", "all"]:
        model = copy.deepcopy(wrapped)
        with torch.no_grad():
            spec = specialize(model, kind=kind, targets=group, rank=4 if kind == "lora" else None)
            after = model(stages, t, stage, **cond)
        assert group == "all" or set(spec.layers.values()) == {group}
        assert group != "all" or set(spec.layers.values()) == set(GROUPS), spec.layers
        assert _max_diff(before, after) <= 1e-6, (group, _max_diff(before, after))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_wrapped_reference_mixed_batch_matches_separate_and_merge(kind: str, tmp_path_factory) -> None:
    model = _wrapped("reference", _BASES, tmp_path_factory)
    spec = specialize(model, kind=kind, targets="all", rank=4 if kind == "lora" else None)
    _randomize_stage_params(spec, scale=0.05)
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, *s, generator=g) for s in model.stage_shapes]
    t, stage, cond = torch.rand(4, 2, generator=g), torch.tensor([1, 0, 1, 0]), _wrapped_cond("reference", 4)
    params = list(model.parameters())
    out = model(stages, t, stage, **cond)
    grads = torch.autograd.grad(sum(o.square().sum() for o in out), params, allow_unused=True)
    sep = [torch.zeros_like(p) for p in params]
    for s in (0, 1):
        idx = (stage == s).nonzero().squeeze(1)
        o = model([x[idx] for x in stages], t[idx], stage[idx], y=cond["y"][idx])
        assert _max_diff([x[idx] for x in out], o) <= 1e-5
        for acc, gg in zip(sep, torch.autograd.grad(sum(x.square().sum() for x in o), params, allow_unused=True)):
            if gg is not None:
                acc += gg
        plain = spec.merge(s)
        with torch.no_grad():
            assert _max_diff(plain([x[idx] for x in stages], t[idx], stage[idx], y=cond["y"][idx]), o) <= 1e-5
    for p, a, b in zip(params, grads, sep):
        assert torch.allclose(torch.zeros_like(p) if a is None else a, b, atol=1e-4)


def test_public_names() -> None:
    import dfm_ext

    assert dfm_ext.specialize is specialize and dfm_ext.StageSpecialization is StageSpecialization


# ---------------------------------------------------------------------------------------------
# save_specialization / load_specialization: the export next to a saved wrapped model


@pytest.mark.parametrize(("kind", "targets", "rank", "alpha"), [("full", "mlp", None, None), ("lora", ["mlp", "attn"], 3, 5.0)])
def test_specialization_export_round_trip(kind: str, targets, rank, alpha, tmp_path_factory, tmp_path: Path) -> None:
    import copy

    import dfm_ext
    from dfm_ext import load_wrapped

    model = _wrapped("reference", _BASES, tmp_path_factory)
    model.stage_specialization = specialize(model, kind=kind, targets=targets, rank=rank, alpha=alpha)
    _randomize_stage_params(model.stage_specialization, scale=0.05)
    # the handle survives a deepcopy (the engine's EMA) and points at the copy
    ema = copy.deepcopy(model)
    assert ema.stage_specialization.model is ema and ema.stage_specialization.layers == model.stage_specialization.layers
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, *s, generator=g) for s in model.stage_shapes]
    t, stage, cond = torch.rand(4, 2, generator=g), torch.tensor([1, 0, 1, 0]), _wrapped_cond("reference", 4)
    with torch.no_grad():
        expected = ema(stages, t, stage, **cond)

    ema.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "dfm_config.json").read_text())["specialization"]
    assert record["weights"] == "stage_parameters.safetensors" and not (tmp_path / "stage_lora.json").exists()
    assert (record["kind"], record["rank"], record["alpha"], record["stages"]) == (kind, rank, alpha, [0, 1])
    assert set(record["layers"]) == set(model.stage_specialization.layers)
    # the shared weights alone: an unspecialised model loads them strictly
    from safetensors.torch import load_file

    assert not any("stage_params" in k for k in load_file(str(tmp_path / "model.safetensors")))

    fresh = load_wrapped(tmp_path).eval()  # re-applies the specialisation
    spec = dfm_ext.load_specialization(fresh, tmp_path)  # the handle load_wrapped made
    assert spec is fresh.specialization
    assert spec is not None and (spec.kind, spec.rank, spec.alpha) == (kind, rank, alpha)
    with torch.no_grad():
        got = fresh(stages, t, stage, **cond)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    # an unspecialised export: nothing to load
    plain = _wrapped("reference", _BASES, tmp_path_factory)
    plain.save_pretrained(tmp_path / "plain")
    assert dfm_ext.load_specialization(load_wrapped(tmp_path / "plain"), tmp_path / "plain") is None


def test_specialization_export_prefix_and_errors(tmp_path_factory, tmp_path: Path) -> None:
    from dfm_ext.specialization import load_specialization, save_specialization

    class Holder(nn.Module):
        def __init__(self, wrapped: nn.Module) -> None:
            super().__init__()
            self.wrapped = wrapped
            self.num_stages = wrapped.num_stages

        def forward(self, stages, t, stage, mask=None, **cond):
            return self.wrapped(stages, t, stage, mask, **cond)

    holder = Holder(_wrapped("reference", _BASES, tmp_path_factory))
    spec = specialize(holder, kind="lora", targets="mlp", rank=2)
    _randomize_stage_params(spec)
    with pytest.raises(ValueError, match="strip_prefix"):
        save_specialization(spec, tmp_path / "bad", strip_prefix="other.")
    save_specialization(spec, tmp_path, strip_prefix="wrapped.")
    record = json.loads((tmp_path / "stage_lora.json").read_text())
    assert all(not n.startswith("wrapped.") for n in record["layers"])
    again = Holder(_wrapped("reference", _BASES, tmp_path_factory))
    loaded = load_specialization(again, tmp_path, add_prefix="wrapped.")
    assert loaded is not None
    for a, b in zip(spec.stage_parameters(), loaded.stage_parameters()):
        assert torch.equal(a, b)

    def fresh() -> nn.Module:
        return Holder(_wrapped("reference", _BASES, tmp_path_factory))

    # a layer the model does not have (no prefix added: names are relative to ``wrapped``)
    with pytest.raises(ValueError, match=r"stage_lora\.json names .* layer\(s\)"):
        load_specialization(fresh(), tmp_path)
    # corrupt and malformed records, each error names the file
    record_path = tmp_path / "stage_lora.json"
    good = record_path.read_text()
    for text, message in [
        ("{not json", "cannot read"),
        (json.dumps([1, 2]), "not a JSON object"),
        (json.dumps({**record, "kind": "half"}), "kind must be"),
        (json.dumps({k: v for k, v in record.items() if k != "layers"}), "missing key"),
        (json.dumps({**record, "rank": "2"}), "rank must be an int"),
        (json.dumps({**record, "rank": 4}), "differs from the model's"),
    ]:
        record_path.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            load_specialization(fresh(), tmp_path, add_prefix="wrapped.")
        assert "stage_lora.json" in str(info.value) or "stage_parameters.safetensors" in str(info.value)
    record_path.write_text(good)
    weights = tmp_path / "stage_parameters.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="stage_parameters.safetensors"):
        load_specialization(fresh(), tmp_path, add_prefix="wrapped.")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="stage_parameters.safetensors"):
        load_specialization(fresh(), tmp_path, add_prefix="wrapped.")
    weights.write_bytes(blob)
    record_path.unlink()
    with pytest.raises(FileNotFoundError, match="stage_lora.json"):
        load_specialization(fresh(), tmp_path, add_prefix="wrapped.")


def test_specialization_export_names_are_public() -> None:
    import dfm_ext
    from dfm_ext.specialization import load_specialization, save_specialization

    assert dfm_ext.save_specialization is save_specialization and dfm_ext.load_specialization is load_specialization


# ---------------------------------------------------------------------------------------------
# the parameters a step uses never depend on the batch's stage values (data-parallel ranks agree)


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("stage", [[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], ids=["all0", "all1", "mixed"])
def test_every_stage_parameter_takes_part_whatever_the_batch(kind: str, stage: list[int]) -> None:
    """A single-stage batch once ran only that stage's parameters, a mixed one all of them: two
    data-parallel ranks drawing such batches used different parameter sets in the same step."""
    model = _toy()
    spec = specialize(model, kind=kind, targets="all", rank=2 if kind == "lora" else None)
    _randomize_stage_params(spec)
    stages, t, st, y = _inputs(4, stage=stage)
    sum(o.square().sum() for o in model(stages, t, st, y=y)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    for s in range(2):
        if s not in stage:  # absent from the batch: exact zero gradients
            assert all(float(p.grad.abs().max()) == 0 for p in spec.stage_parameters(s))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_ddp_without_find_unused_parameters_trains_any_stage_mix(kind: str) -> None:
    """DDP with ``find_unused_parameters=False`` (it raises when a step leaves a parameter unused)
    over single-stage and mixed batches, on a gloo world of one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0]) if own else dist.new_group([dist.get_rank()])
        model = _toy().train()
        specialize(model, kind=kind, targets="all", rank=2 if kind == "lora" else None)
        ddp = DDP(model, process_group=group, find_unused_parameters=False)
        for stage in ([0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]):
            stages, t, st, y = _inputs(4, stage=stage)
            # on the old routing, the forward after a single-stage batch raised "Expected to have
            # finished reduction in the prior iteration ..." (stage parameters left unused)
            sum(o.square().mean() for o in ddp(stages, t, st, y=y)).backward()
            model.zero_grad(set_to_none=True)
    finally:
        if own:
            dist.destroy_process_group()
