"""wrap_dit on the families of issue 17 (Sana, AuraFlow, Wan), their declarative spec and the public helpers.

Tiny models come from tests/_tiny_families.py: built from a config, saved with ``save_pretrained``
and loaded back with ``from_pretrained`` (the real-checkpoint path), once per module; each test
deep-copies them. Every comparison is against the base model's own forward, converted to the
paper's convention from the family's pipeline (``base_call``).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

pytest.importorskip("diffusers")

import _tiny_families as tiny  # noqa: E402

from dfm_ext import DFMObjective, DFMSampler, LaplacianPyramid, StageScheduler, StageTimestepSampler  # noqa: E402
from dfm_ext import specialize, wrap_dit  # noqa: E402
from dfm_ext.adapters import common  # noqa: E402
from dfm_ext.process.conventions import time_transform  # noqa: E402
from dfm_ext.specialization import checkpoint  # noqa: E402

FAMILIES = tuple(tiny.FAMILIES)
#: the block lists each family's own forward runs through gradient checkpointing
CHECKPOINTED = {
    "sana": ("transformer_blocks",),
    "auraflow": ("joint_transformer_blocks", "single_transformer_blocks"),
    "wan": ("blocks",),
    "lumina2": ("layers",),  # its refiners run plainly, in Lumina2's forward too
    "qwenimage": ("transformer_blocks",),
    "flux2": ("transformer_blocks", "single_transformer_blocks"),
    "ltx_video": ("transformer_blocks",),
    "hunyuandit": ("blocks",),  # its own forward never checkpoints; the wrapped one honours the flag
    "cogview4": ("transformer_blocks",),
    "chroma": ("transformer_blocks", "single_transformer_blocks"),
    "ovis_image": ("transformer_blocks", "single_transformer_blocks"),
    "longcat_image": ("transformer_blocks", "single_transformer_blocks"),
    "bria": ("transformer_blocks", "single_transformer_blocks"),
    "skyreels_v2": ("blocks",),
    "cogview3plus": ("transformer_blocks",),
    "sana_video": ("transformer_blocks",),
    "wan_vace": ("vace_blocks", "blocks"),
    "hunyuan_video": ("transformer_blocks", "single_transformer_blocks"),  # the text refiner runs plainly
    "mochi": ("transformer_blocks",),
    "hidream_image": ("double_stream_blocks", "single_stream_blocks"),
    "lumina_next": ("layers",),  # its own forward never checkpoints; the wrapped one honours the flag
    "allegro": ("transformer_blocks",),
    "cosmos": ("transformer_blocks",),
    "easyanimate": ("transformer_blocks",),
    "krea2": ("transformer_blocks",),  # its text fusion runs plainly, in Krea2's forward too
    "ernie_image": ("layers",),
    "nucleusmoe_image": ("transformer_blocks",),
    "ideogram4": ("layers",),
    "hunyuan_image": ("transformer_blocks", "single_transformer_blocks"),  # the text refiner runs plainly
    "latte": ("transformer_blocks", "temporal_transformer_blocks"),  # interleaved, one of each here
    "bria_fibo": ("transformer_blocks", "single_transformer_blocks"),
    "z_image": ("noise_refiner", "context_refiner", "layers"),
    "kandinsky5": ("text_transformer_blocks", "visual_transformer_blocks"),
    "hunyuan_video15": ("transformer_blocks",),  # the text refiner runs plainly
    "prx": ("blocks",),
    "motif_video": ("transformer_blocks", "single_transformer_blocks"),  # the decoder block last, as in Motif's forward
    "flux3": ("txt_mode_blocks", "mode_blocks.image", "single_transformer_blocks"),
    "bria_fibo2": ("noise_refiner", "layers"),  # the Perceiver runs plainly, in FIBO 2's forward too
}


class _Pristine(dict):
    """Each family's tiny model, built (saved and loaded back) the first time a test asks for it."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, fam: str) -> torch.nn.Module:
        self[fam] = tiny.FAMILIES[fam][0](self.root / fam)
        return self[fam]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, torch.nn.Module]:
    return _Pristine(tmp_path_factory.mktemp("tiny_families"))


def _fresh(pristine, fam: str) -> torch.nn.Module:
    return copy.deepcopy(pristine[fam])


def _native(fam: str) -> tuple[int, ...]:
    return tiny.FAMILIES[fam][2]


def _setup(fam: str, num_stages: int) -> tuple[tuple[int, ...], LaplacianPyramid, list]:
    """Full sample, decomposition and patch sizes with stage 0 at the native size and the model's own patch."""
    native = _native(fam)
    factors = {2: (2, 1), 3: (4, 2, 1)}[num_stages]
    f0 = factors[0]
    video = len(native) == 4
    sample = (native[0], native[1], native[2] * f0, native[3] * f0) if video else (native[0], native[1] * f0, native[2] * f0)
    p = 1 if fam in tiny.PATCH_ONE else 2  # the model's own spatial patch (Flux-style 2x2 folding counts as 2)
    patches = [(1, p * f0 // f, p * f0 // f) if video else p * f0 // f for f in factors]
    decomposition = LaplacianPyramid(factors=factors)  # spatial only, also for videos
    return sample, decomposition, patches


def _wrap(pristine, fam: str, num_stages: int = 2, **kw):
    sample, decomposition, patches = _setup(fam, num_stages)
    make = tiny.ADAPTERS.get(fam)  # a family whose adapter asks for a choice the model cannot show
    if make is not None:
        kw = {**kw, "adapter": make(time_convention=kw.pop("time_convention", None))}
    return wrap_dit(_fresh(pristine, fam), decomposition, sample_shape=sample, patch_sizes=patches, **kw)


def _inputs(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(batch, *s, generator=g) for s in model.stage_shapes]
    t = tiny.exact_times((batch, model.num_stages), g)  # k / 1024: no rounding between sigma and 1000 sigma
    return stages, t, g


# ----------------------------------------------------------------------------- stage 0 == pretrained


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("fam", FAMILIES)
def test_stage0_reproduces_the_pretrained_model(pristine, fam: str, num_stages: int) -> None:
    """adapter="auto" picks the family; stage 0 equals the base model's velocity to 1e-5, with every stage active."""
    model = _wrap(pristine, fam, num_stages)
    assert model.adapter.name == tiny.FAMILIES[fam][3]
    assert tuple(model.stage_shapes[0]) == _native(fam)
    stages, t, g = _inputs(model, 2, seed=1)
    cond = tiny.text_inputs(fam, 2, g)
    last = torch.full((2,), num_stages - 1, dtype=torch.long)
    with torch.no_grad():
        v = model(stages, t, last, **cond)
        expected = tiny.FAMILIES[fam][1](pristine[fam], stages[0], t[:, 0], cond)
    assert expected.abs().mean() > 0.05  # a real signal, not zeros
    assert (v[0] - expected).abs().max() <= 1e-5
    assert all(torch.equal(x, torch.zeros_like(x)) for x in v[1:])  # later heads start at zero


@pytest.mark.parametrize("fam", FAMILIES)
def test_a_wrong_time_convention_is_visible(pristine, fam: str) -> None:
    """The equality above can fail: the same model read with another convention is far off."""
    wrong = "sigma" if fam in ("lumina2", "lumina_next", "ideogram4", "z_image") else "unit"  # these read t itself ("unit")
    model = _wrap(pristine, fam, time_convention=wrong)
    stages, t, g = _inputs(model, 2, seed=1)
    cond = tiny.text_inputs(fam, 2, g)
    with torch.no_grad():
        v = model(stages, t, torch.zeros(2, dtype=torch.long), **cond)
        expected = tiny.FAMILIES[fam][1](pristine[fam], stages[0], t[:, 0], cond)
    assert (v[0] - expected).abs().max() > 1e-3


# ----------------------------------------------------------------------------- training and sampling


@pytest.mark.parametrize("fam", FAMILIES)
def test_thirty_adam_steps_reduce_the_loss(pristine, fam: str) -> None:
    model = _wrap(pristine, fam)
    g = torch.Generator().manual_seed(3)
    b = 2
    data = [torch.randn(b, *s, generator=g) for s in model.stage_shapes]
    noise = [torch.randn(b, *s, generator=g) for s in model.stage_shapes]
    times = StageTimestepSampler(2, probabilities=[0.5, 0.5]).sample(b, generator=g)
    cond = tiny.text_inputs(fam, b, g)
    objective = DFMObjective(2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = objective(model, data, times, noise=noise, **cond).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-5:]) < 0.7 * losses[0], losses


@pytest.mark.parametrize("fam", FAMILIES)
def test_sampler_with_text_conditioning_and_cfg(pristine, fam: str) -> None:
    model = _wrap(pristine, fam).eval()
    g = torch.Generator().manual_seed(4)
    cond = tiny.text_inputs(fam, 2, g)
    sample = _setup(fam, 2)[0]
    sampler = DFMSampler(model.decomposition, StageScheduler(steps=(2, 2), thresholds=(0.9,)), guidance_scale=3.0)
    with torch.no_grad():
        guided = sampler.sample(model, (2, *sample), generator=torch.Generator().manual_seed(5), **cond)
        plain = DFMSampler(model.decomposition, StageScheduler(steps=(2, 2), thresholds=(0.9,))).sample(
            model, (2, *sample), generator=torch.Generator().manual_seed(5), **cond
        )
    assert guided.x.shape == (2, *sample) and torch.isfinite(guided.x).all()
    assert not torch.allclose(guided.x, plain.x)  # CFG changed the result (the null condition is used)
    assert set(model.null_condition(**cond)) == set(cond)


# ----------------------------------------------------------------------------- specialisation


@pytest.mark.parametrize("fam", FAMILIES)
def test_per_stage_lora_is_exact_at_attach_and_covers_every_group(pristine, fam: str) -> None:
    model = _wrap(pristine, fam)
    stages, t, g = _inputs(model, 2, seed=6)
    cond = tiny.text_inputs(fam, 2, g)
    k = torch.tensor([0, 1])
    with torch.no_grad():
        before = model(stages, t, k, **cond)
    handle = specialize(model, kind="lora", targets="all", rank=2)
    with torch.no_grad():
        after = model(stages, t, k, **cond)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(before, after))
    # The family's layer groups reach its layers: every group selects something.
    expected = {"attn", "mlp", "mod", "cond", "proj"} - tiny.GROUPS_LEFT_OUT.get(fam, set())
    assert expected <= set(handle.layers.values()), sorted(set(handle.layers.values()))


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("fam", FAMILIES)
def test_save_pretrained_and_load_back(pristine, fam: str, tmp_path) -> None:
    from dfm_ext import DFMTransformer

    model = _wrap(pristine, fam)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # away from the init, so that loading matters
    model.save_pretrained(tmp_path / "w")
    loaded = DFMTransformer.from_pretrained(tmp_path / "w", base_model=_fresh(pristine, fam))
    stages, t, g = _inputs(model, 2, seed=7)
    cond = tiny.text_inputs(fam, 2, g)
    with torch.no_grad():
        a, b = model(stages, t, torch.tensor([0, 1]), **cond), loaded(stages, t, torch.tensor([0, 1]), **cond)
    assert loaded.adapter.name == model.adapter.name and loaded.adapter.config() == model.adapter.config()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_torch_save_of_a_model_with_a_scaled_time_convention(pristine) -> None:
    """Sana reads ``timestep_scale * 1000 (1 - t)``: the scaled convention pickles (no lambda)."""
    model = _wrap(pristine, "sana")
    transform = model.base.time_embed.emb.timestep_embedder.time_transform
    assert torch.allclose(transform(torch.tensor([0.25])), torch.tensor([750.0 * tiny.SANA_TIMESTEP_SCALE]))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    stages, t, g = _inputs(model, 2, seed=8)
    cond = tiny.text_inputs("sana", 2, g)
    with torch.no_grad():
        assert torch.equal(model(stages, t, torch.tensor([0, 1]), **cond)[0], loaded(stages, t, torch.tensor([0, 1]), **cond)[0])


def test_scaled_time_transform_pickles_and_checks_its_scale() -> None:
    f = pickle.loads(pickle.dumps(time_transform("timestep", scale=0.5)))
    assert torch.equal(f(torch.tensor([0.0, 1.0])), torch.tensor([500.0, 0.0]))
    with pytest.raises(ValueError, match="time scale must be a finite positive number, got -1"):
        time_transform("timestep", scale=-1)


# ----------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("fam", FAMILIES)
def test_gradient_checkpointing_is_honoured(pristine, fam: str, monkeypatch) -> None:
    """With the model's flag on, every block runs through its checkpoint function; gradients are unchanged."""
    model = _wrap(pristine, fam)
    stages, t, g = _inputs(model, 2, seed=9)
    cond = tiny.text_inputs(fam, 2, g)

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        sum(v.square().mean() for v in model(stages, t, torch.tensor([0, 1]), **cond)).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    calls = []
    if model.base._supports_gradient_checkpointing:
        model.base.enable_gradient_checkpointing()
        inner = model.base._gradient_checkpointing_func
        model.base._gradient_checkpointing_func = lambda block, *a: calls.append(block) or inner(block, *a)
    else:  # HunyuanDiT: diffusers refuses the switch; the flag still routes blocks through dfm_ext's checkpoint
        model.base.gradient_checkpointing = True
        monkeypatch.setattr(common, "checkpoint", lambda block, *a: calls.append(block) or checkpoint(block, *a))
    checkpointed = grads()
    blocks = [b for name in CHECKPOINTED[fam] for b in model.base.get_submodule(name)]
    assert calls == blocks and blocks
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


# ----------------------------------------------------------------------------- fixed positions and refusals


def test_three_stages_on_a_fixed_position_model_at_its_native_size_name_the_sample_shape_that_works(pristine) -> None:
    """AuraFlow's learned positions fix its token grid; at the native size stage 0 (2x2) cannot cover it (4x4)."""
    with pytest.raises(ValueError, match=r"sample_shape=\(4, 16, 16\) with patch_sizes=\[1, 2, 4\]"):
        wrap_dit(_fresh(pristine, "auraflow"), LaplacianPyramid(factors=(4, 2, 1)))
    # The suggestion works, and stage 0 is then the pretrained model on stage 0 upsampled by 2 (paper E).
    model = wrap_dit(_fresh(pristine, "auraflow"), LaplacianPyramid(factors=(4, 2, 1)), sample_shape=(4, 16, 16), patch_sizes=[1, 2, 4])
    assert model.packer.grid == (4, 4)


def test_the_reference_dit_gets_the_same_rule() -> None:
    """dfm_ext.DiT (a sin-cos table fixed at its 8x8 grid): the hint's sample shape wraps, on the native grid."""
    from dfm_ext import DiT, DiTConfig

    with pytest.raises(ValueError, match=r"native grid \(8, 8\).*sample_shape=\(4, 32, 32\) with patch_sizes=\[1, 2, 4\]"):
        wrap_dit(DiT(DiTConfig.preset("tiny")), LaplacianPyramid(factors=(4, 2, 1)))
    model = wrap_dit(DiT(DiTConfig.preset("tiny")), LaplacianPyramid(factors=(4, 2, 1)), sample_shape=(4, 32, 32), patch_sizes=[1, 2, 4])
    assert model.packer.grid == (8, 8)
    # Patch sizes that put the stages on another grid fail at the positions, saying what fits instead.
    with pytest.raises(ValueError, match=r"fixed positions for 64 tokens: keep these stages with patch_sizes=\[1, 2, 4\], or keep the patch sizes with a sample_shape 2 times as large"):
        wrap_dit(DiT(DiTConfig.preset("tiny")), LaplacianPyramid(factors=(4, 2, 1)), sample_shape=(4, 32, 32), patch_sizes=[2, 4, 8])


def test_a_grid_past_the_position_table_names_the_largest_sample(pristine) -> None:
    with pytest.raises(ValueError, match=r"fixed position table \(grid \(8, 8\)\).*at most \(16, 16\)"):
        wrap_dit(_fresh(pristine, "auraflow"), LaplacianPyramid(factors=(2, 1)), sample_shape=(4, 64, 64))


def test_sana_sprint_time_is_refused(tmp_path) -> None:
    from diffusers import SanaTransformer2DModel

    sprint = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=2, guidance_embeds=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="trigonometric consistency time"):
        wrap_dit(sprint, LaplacianPyramid(factors=(2, 1)), sample_shape=(4, 16, 16))


@pytest.mark.parametrize("fam", FAMILIES)
def test_bad_conditioning_is_refused(pristine, fam: str) -> None:
    model = _wrap(pristine, fam)
    stages, t, _ = _inputs(model, 2, seed=10)
    k = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match="unexpected conditioning"):
        model(stages, t, k, prompt="a cat", **tiny.text_inputs(fam, 2))
    key, width = tiny.text_key(fam)
    width = ", ".join(map(str, width)) if isinstance(width, tuple) else width
    shape = tiny.TEXT_SHAPE_IN_ERROR.get(fam, rf"\[2, (\*|3), {width}\]")
    with pytest.raises(ValueError, match=rf"{key} must have shape {shape}, got \(2, 3, 5\)"):
        model(stages, t, k, **{key: torch.randn(2, 3, 5)})


# ----------------------------------------------------------------------------- the declarative spec


def test_spec_values_are_checked_when_declared() -> None:
    from dfm_ext.adapters.spec import AdapterSpec

    base = dict(name="x", model_class="Nothing", patch_embed="p", time_embedder="t", head="h")
    with pytest.raises(ValueError, match="patch orders must be 'pqc' or 'cpq', got 'qpc'"):
        AdapterSpec(**base, patch_order="qpc")
    with pytest.raises(ValueError, match="unknown time_convention 'seconds'"):
        AdapterSpec(**base, time_convention="seconds")
    with pytest.raises(ValueError, match="positions must be one of .* got 'learned'"):
        AdapterSpec(**base, positions="learned")


def test_spec_model_class_by_module_path_and_adapter_overrides(pristine) -> None:
    from dfm_ext import DiT, DiTConfig
    from dfm_ext.adapters.sana import SanaAdapter
    from dfm_ext.adapters.spec import AdapterSpec, SpecAdapter

    class ByPath(SpecAdapter):
        spec = AdapterSpec(name="bypath", model_class="dfm_ext.models.dit:DiT", patch_embed="x_embedder.proj",
                           time_embedder="t_embedder", head="final_layer.linear")  # fmt: skip

    assert ByPath.name == "bypath" and ByPath().matches(DiT(DiTConfig.preset("tiny")))
    assert not ByPath().matches(pristine["sana"])
    adapter = SanaAdapter(time_scale=2.0)  # overrides config.timestep_scale
    assert adapter.config() == {"time_convention": "timestep", "output_scale": -1.0, "time_scale": 2.0}
    assert torch.equal(adapter.time_function(pristine["sana"])(torch.tensor([0.5])), torch.tensor([1000.0]))
    with pytest.raises(TypeError, match="time_scale must be a number, got 'big'"):
        SanaAdapter(time_scale="big")


def test_hidream_non_square_grid_is_padded_as_the_model_pads_it(pristine) -> None:
    """HiDream pads a non-square grid to max_resolution's tokens (kept in the softmax): stage 0 still equals its forward."""
    model = wrap_dit(_fresh(pristine, "hidream_image"), LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 16, 8), patch_sizes=[2, 4])
    assert model.packer.grid == (4, 2)
    stages, t, g = _inputs(model, 2, seed=11)
    cond = tiny.text_inputs("hidream_image", 2, g)
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)
        expected = tiny.FAMILIES["hidream_image"][1](pristine["hidream_image"], stages[0], t[:, 0], cond)
    assert (v[0] - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"has 72 tokens, more than .* max_resolution allows \(64\)"):
        big = wrap_dit(_fresh(pristine, "hidream_image"), LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 24, 12), patch_sizes=[1, 2])
        big(*_inputs(big, 2, seed=11)[:2], torch.ones(2, dtype=torch.long), **cond)


def test_allegro_asks_for_its_prediction_type(pristine) -> None:
    """The transformer cannot show epsilon vs v (its scheduler config can): adapter="auto" asks, listing the calls."""
    with pytest.raises(ValueError, match=r"prediction_type.*AllegroAdapter\(prediction='epsilon'\).*'v_prediction'"):
        wrap_dit(_fresh(pristine, "allegro"), LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 2, 16, 16))
    from dfm_ext.adapters import AllegroAdapter

    assert AllegroAdapter(prediction="epsilon").output_scale == -1.0
    with pytest.raises(ValueError, match="prediction must be one of"):
        AllegroAdapter(prediction="sample")


def test_hunyuan_video_image_to_video_variants_are_refused() -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    i2v = HunyuanVideoTransformer3DModel(
        in_channels=tiny.C, out_channels=tiny.C, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=12, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
        image_condition_type="token_replace",
    )  # fmt: skip
    with pytest.raises(ValueError, match="token_replace.*per-token time"):
        wrap_dit(i2v, LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 2, 16, 16))


def test_cosmos_padding_mask_weights_are_dropped_exactly(pristine, tmp_path) -> None:
    """With concat_padding_mask the pipelines pass a zero mask channel: the wrapped model equals the model without it."""
    from dfm_ext.adapters.cosmos import CosmosAdapter

    masked = tiny.tiny_cosmos(tmp_path / "masked", concat_padding_mask=True)
    plain = pristine["cosmos"]
    with torch.no_grad():  # the same weights, the mask channel's (the last of each (c, pt, p, q) block) aside
        masked.load_state_dict({**plain.state_dict(), "patch_embed.proj.weight": masked.patch_embed.proj.weight}, strict=True)
        masked.patch_embed.proj.weight[:, : plain.patch_embed.proj.in_features].copy_(plain.patch_embed.proj.weight)
    model = wrap_dit(masked, LaplacianPyramid(factors=(2, 1)), adapter=CosmosAdapter(parameterization="flow"),
                     sample_shape=(tiny.C, 2, 16, 16), patch_sizes=[(1, 2, 2), (1, 4, 4)])  # fmt: skip
    stages, t, g = _inputs(model, 2, seed=12)
    cond = tiny.text_inputs("cosmos", 2, g)
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)
        expected = tiny.FAMILIES["cosmos"][1](plain, stages[0], t[:, 0], cond)
    assert (v[0] - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"parameterization='flow'.*Cosmos-Predict2"):
        wrap_dit(_fresh(pristine, "cosmos"), LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 2, 16, 16))
    with pytest.raises(ValueError, match="Cosmos 1.0.*not supported"):
        wrap_dit(_fresh(pristine, "cosmos"), LaplacianPyramid(factors=(2, 1)), adapter=CosmosAdapter(parameterization="edm"),
                 sample_shape=(tiny.C, 2, 16, 16))  # fmt: skip


def test_krea2_layerwise_text_blocks_stay_shared_and_the_fold_is_checked(pristine) -> None:
    """Krea 2's layer-wise text fusion runs on [B L, layers, D] (rows are tokens): no group selects it."""
    from dfm_ext.adapters.krea2 import Krea2Adapter

    model = _wrap(pristine, "krea2")
    handle = specialize(model, kind="lora", targets="all", rank=2)
    assert any("refiner_blocks" in n for n in handle.layers) and not any("layerwise_blocks" in n for n in handle.layers)
    with pytest.raises(ValueError, match=r"in_channels=16 cannot take latents folded 3x3.*Krea2Adapter\(patch_size=\)"):
        Krea2Adapter(patch_size=3).check_model(pristine["krea2"])


@pytest.mark.parametrize("fam", ["ernie_image", "krea2"])
def test_stage_lora_of_a_reshaping_family_routes_by_sample(pristine, fam: str) -> None:
    """Families whose blocks reshape the batch (ERNIE-Image's sequence-first MLP, Krea 2's layer-wise text
    fusion): with stage 1's LoRA away from zero, a stage-0 sample's output does not see it."""
    model = _wrap(pristine, fam)
    specialize(model, kind="lora", targets="all", rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".stage_params.1." in name:
                p.normal_(0.0, 0.3)
    stages, t, g = _inputs(model, 2, seed=13)
    cond = tiny.text_inputs(fam, 2, g)
    with torch.no_grad():
        mixed = model(stages, t, torch.tensor([0, 1]), **cond)
        plain = model(stages, t, torch.tensor([0, 0]), **cond)
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(mixed, plain))
    assert not torch.allclose(mixed[0][1], plain[0][1], atol=1e-3)  # stage 1's LoRA reaches its sample


def test_ideogram4_null_condition_is_the_pipelines_image_only_branch(pristine) -> None:
    """Ideogram4Pipeline's negative branch runs the image tokens alone: the masked-out text gives the same output."""
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    model, base = _wrap(pristine, "ideogram4"), pristine["ideogram4"]
    stages, t, g = _inputs(model, 2, seed=14)
    null = model.null_condition(**tiny.text_inputs("ideogram4", 2, g))
    x, (b, c, h, w) = stages[0], stages[0].shape
    ids, segments, indicator = Ideogram4Pipeline._prepare_ids([0, 0], h // 2, w // 2, 0, x.device)
    tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 4 * c)
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **null)[0]
        out = base(tokens, t[:, 0], torch.zeros(b, tokens.shape[1], tiny.TEXT_DIM), ids, segments, indicator).sample
    assert (v - out.view(b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)).abs().max() <= 1e-5


def test_hunyuan_image_glyph_text_and_meanflow(tmp_path) -> None:
    """The ByT5 stream is joined as the model joins it (valid tokens first); the distilled meanflow variant is refused."""
    glyph = tiny.tiny_hunyuan_image(tmp_path / "glyph", text_embed_2_dim=tiny.POOLED_DIM)
    model = wrap_dit(copy.deepcopy(glyph), LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 16, 16), patch_sizes=[2, 4])
    stages, t, g = _inputs(model, 2, seed=15)
    cond = tiny.text_inputs("hunyuan_image", 2, g)
    cond["encoder_hidden_states_2"] = torch.randn(2, 2, tiny.POOLED_DIM, generator=g)
    cond["encoder_attention_mask_2"] = torch.tensor([[1, 1], [0, 1]])
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)[0]
        expected = tiny.FAMILIES["hunyuan_image"][1](glyph, stages[0], t[:, 0], cond)
    assert (v - expected).abs().max() <= 1e-5
    from diffusers import HunyuanImageTransformer2DModel

    meanflow = HunyuanImageTransformer2DModel.from_config({**dict(glyph.config), "text_embed_2_dim": None, "use_meanflow": True})
    with pytest.raises(ValueError, match="use_meanflow=True.*timestep_r.*flow map"):
        wrap_dit(meanflow, LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 16, 16))


def test_latte_refuses_per_stage_layers_in_its_reshaped_blocks_and_asks_for_its_prediction(pristine) -> None:
    """Latte's blocks see [B T, N, D] / [B N, T, D]: no attn/mlp group, and blocks forced per-stage are refused."""
    with pytest.raises(ValueError, match=r"prediction_type.*LatteAdapter\(prediction='epsilon'\)"):
        wrap_dit(_fresh(pristine, "latte"), LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 2, 16, 16))
    model = _wrap(pristine, "latte")
    with pytest.raises(ValueError, match=r"unknown target group\(s\) \['attn'\]"):
        specialize(model, kind="lora", targets="attn", rank=2)
    specialize(model, kind="lora", targets="attn", rank=2, patterns={"attn": [r"transformer_blocks\.\d+\.attn1\.to_q$"]})
    stages, t, g = _inputs(model, 2, seed=16)
    with pytest.raises(ValueError, match=r"\[B T, N, D\] and \[B N, T, D\].*specialise the groups the adapter declares"):
        model(stages, t, torch.tensor([0, 1]), **tiny.text_inputs("latte", 2, g))
    with pytest.raises(ValueError, match="video_length=2 frames: the sample must have 2 frames"):
        wrap_dit(_fresh(pristine, "latte"), LaplacianPyramid(factors=(2, 1)), adapter=tiny.ADAPTERS["latte"](),
                 sample_shape=(tiny.C, 3, 16, 16), patch_sizes=[(1, 2, 2), (1, 4, 4)])  # fmt: skip


def test_bria_fibo_do_patching_fold(pristine) -> None:
    """BriaFiboAdapter(patch_size=2) is the pipeline's do_patching=True: Flux's 2x2 pack of C / 4 latent channels."""
    from dfm_ext.adapters.bria_fibo import BriaFiboAdapter
    from dfm_ext.adapters.flux import flux_image_ids

    base = pristine["bria_fibo"]  # in_channels 4: latents of 1 channel folded 2x2
    model = wrap_dit(_fresh(pristine, "bria_fibo"), LaplacianPyramid(factors=(2, 1)), adapter=BriaFiboAdapter(patch_size=2),
                     sample_shape=(1, 32, 32), patch_sizes=[2, 4])  # fmt: skip
    stages, t, g = _inputs(model, 2, seed=17)
    cond = tiny.text_inputs("bria_fibo", 2, g)
    x = stages[0]
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)[0]
        out = base(tiny._pack(x), encoder_hidden_states=cond["encoder_hidden_states"], timestep=1000.0 - 1000.0 * t[:, 0],
                   text_encoder_layers=list(cond["text_encoder_layers"].unbind(1)), img_ids=flux_image_ids((8, 8)),
                   txt_ids=torch.zeros(tiny.TEXT_LEN, 3), joint_attention_kwargs={"attention_mask": torch.cat(
                       [cond["encoder_attention_mask"].bool(), torch.ones(2, 64, dtype=torch.bool)], 1)[:, None, None, :]}).sample  # fmt: skip
    assert (v + tiny._unpack(out, 16, 16)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"patch_size must be 1 \(do_patching=False\) or 2"):
        BriaFiboAdapter(patch_size=4)


def test_z_image_captions_of_different_padded_lengths_and_omni(pristine) -> None:
    """Z-Image pads each caption to a multiple of 32: a 33-token caption beside a 2-token one takes the batch mask
    (and shifts that sample's image positions); Z-Image Omni (SigLIP features, the omni sequence) is refused."""
    from diffusers import ZImageTransformer2DModel

    model, base = _wrap(pristine, "z_image"), pristine["z_image"]
    stages, t, g = _inputs(model, 2, seed=18)
    cond = {"encoder_hidden_states": torch.randn(2, 33, tiny.TEXT_DIM, generator=g), "encoder_attention_mask": torch.ones(2, 33, dtype=torch.bool)}
    cond["encoder_attention_mask"][1, 2:] = False
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)[0]
        expected = tiny.FAMILIES["z_image"][1](base, stages[0], t[:, 0], cond)
    assert (v - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="keeps no caption token"):
        model(stages, t, torch.ones(2, dtype=torch.long), **{**cond, "encoder_attention_mask": torch.zeros(2, 33, dtype=torch.bool)})
    omni = ZImageTransformer2DModel.from_config({**dict(base.config), "siglip_feat_dim": 8})
    with pytest.raises(ValueError, match=r"siglip_feat_dim=8 is Z-Image Omni"):
        wrap_dit(omni, LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 16, 16), patch_sizes=[2, 4])


def test_kandinsky5_visual_cond_scale_and_nabla(pristine, tmp_path) -> None:
    """Kandinsky 5's text-to-video input with visual_cond carries zero condition latents and mask: their weights are
    dropped exactly; the RoPE scale is asked for (the pipeline's choice), Nabla attention refused."""
    from diffusers import Kandinsky5Transformer3DModel

    cond_model = tiny.tiny_kandinsky5(tmp_path / "cond", visual_cond=True)
    model = wrap_dit(copy.deepcopy(cond_model), LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 2, 16, 16),
                     patch_sizes=[(1, 2, 2), (1, 4, 4)])  # fmt: skip
    stages, t, g = _inputs(model, 2, seed=19)
    cond = tiny.text_inputs("kandinsky5", 2, g)
    x = stages[0].permute(0, 2, 3, 4, 1)
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)[0]
        expected = tiny.FAMILIES["kandinsky5"][1](cond_model, stages[0], t[:, 0], cond)
        tokens = model.base.visual_embeddings.in_layer(model.packer.pack([stages[0], torch.zeros_like(stages[1])]))
        base_tokens = cond_model.visual_embeddings(torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[..., :1])], -1))
    assert (tokens - base_tokens.flatten(1, 3)).abs().max() <= 1e-6  # the dropped columns multiplied zeros
    # Kandinsky 5's attention rounds RoPE'd queries and keys to bfloat16 (also in float32), so the ulp-level difference
    # of the two sums above can flip a rounding: the outputs agree to that precision.
    assert (v - expected).abs().max() <= 1e-3
    with pytest.raises(ValueError, match=r"RoPE scale.*scale_factor=\(1, 2, 2\).*\(1, 3.16, 3.16\).*\(1, 1, 1\)"):
        model(stages, t, torch.ones(2, dtype=torch.long), **{**cond, "scale_factor": None})
    nabla = Kandinsky5Transformer3DModel.from_config({**dict(pristine["kandinsky5"].config), "attention_type": "nabla"})
    with pytest.raises(ValueError, match="attention_type='nabla'.*attention_type='regular'"):
        wrap_dit(nabla, LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 2, 16, 16))


def test_hunyuan_video15_glyph_text_and_meanflow(pristine) -> None:
    """HunyuanVideo 1.5's ByT5 glyph tokens join the Qwen tokens as the model joins them (valid first, padding zeroed);
    the null condition drops the glyph text as the pipeline's no-glyph prompt does; meanflow models are refused."""
    from diffusers import HunyuanVideo15Transformer3DModel

    model, base = _wrap(pristine, "hunyuan_video15"), pristine["hunyuan_video15"]
    stages, t, g = _inputs(model, 2, seed=20)
    cond = tiny.text_inputs("hunyuan_video15", 2, g)
    cond["encoder_hidden_states_2"] = torch.randn(2, 2, tiny.HV15_GLYPH_DIM, generator=g)
    cond["encoder_attention_mask_2"] = torch.tensor([[1, 1], [0, 1]])
    null = model.null_condition(**cond)
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)[0]
        expected = tiny.FAMILIES["hunyuan_video15"][1](base, stages[0], t[:, 0], cond)
        v_null = model(stages, t, torch.ones(2, dtype=torch.long), **null)[0]
        no_glyph = {k: v for k, v in null.items() if not k.endswith("_2")}
        expected_null = tiny.FAMILIES["hunyuan_video15"][1](base, stages[0], t[:, 0], no_glyph)
    assert (v - expected).abs().max() <= 1e-5 and (v_null - expected_null).abs().max() <= 1e-5
    meanflow = HunyuanVideo15Transformer3DModel.from_config({**dict(base.config), "use_meanflow": True})
    with pytest.raises(ValueError, match="use_meanflow=True.*timestep_r.*flow map"):
        wrap_dit(meanflow, LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 2, 16, 16))


def test_prx_asks_for_its_prediction_and_refuses_the_pixel_variant(pristine) -> None:
    """One PRX class serves PRXPipeline (velocity) and PRXPixelPipeline (x0): adapter="auto" asks; x0 and the pixel
    PRX-7B layout are refused with their reasons."""
    from diffusers import PRXTransformer2DModel

    from dfm_ext.adapters import PRXAdapter

    wrap = lambda model, adapter="auto": wrap_dit(model, LaplacianPyramid(factors=(2, 1)), adapter=adapter, sample_shape=(tiny.C, 16, 16))  # noqa: E731
    with pytest.raises(ValueError, match=r"PRXAdapter\(prediction='velocity'\).*PRXPipeline.*'sample'.*PRXPixelPipeline"):
        wrap(_fresh(pristine, "prx"))
    with pytest.raises(ValueError, match=r"predicts the clean image.*max\(sigma, 0.05\)"):
        wrap(_fresh(pristine, "prx"), PRXAdapter(prediction="sample"))
    pixel = PRXTransformer2DModel.from_config({**dict(pristine["prx"].config), "bottleneck_size": 8, "resolution_embeds": True})
    with pytest.raises(ValueError, match="pixel-space PRX-7B layout"):
        wrap(pixel, PRXAdapter(prediction="velocity"))
    with pytest.raises(ValueError, match="prediction must be one of"):
        PRXAdapter(prediction="epsilon")


def test_motif_video_asks_for_its_schedulers_prediction(pristine) -> None:
    """MotifVideoPipeline takes any scheduler and diffusers holds none of Motif-Video's configs: adapter="auto" asks."""
    from dfm_ext.adapters import MotifVideoAdapter

    shape = dict(sample_shape=(tiny.C, 2, 16, 16), patch_sizes=[(1, 2, 2), (1, 4, 4)])
    with pytest.raises(ValueError, match=r"MotifVideoAdapter\(prediction='flow_prediction'\).*1000 sigma, noise - x"):
        wrap_dit(_fresh(pristine, "motif_video"), LaplacianPyramid(factors=(2, 1)), **shape)
    with pytest.raises(ValueError, match="prediction='epsilon': only 'flow_prediction'"):
        wrap_dit(_fresh(pristine, "motif_video"), LaplacianPyramid(factors=(2, 1)), adapter=MotifVideoAdapter(prediction="epsilon"), **shape)


def test_flux3_flow_map_is_refused_and_the_text_reads_data_time(pristine) -> None:
    """A flow-map FLUX.3 (target_timestep) is refused; the text's modulation reads every stage at data time, so it does
    not move with the image's times."""
    from diffusers import Flux3Transformer2DModel

    flow_map = Flux3Transformer2DModel.from_config({**dict(pristine["flux3"].config), "flow_map": True})
    with pytest.raises(ValueError, match="flow_map=True.*target_timestep.*flow map"):
        wrap_dit(flow_map, LaplacianPyramid(factors=(2, 1)), sample_shape=(tiny.C, 16, 16), patch_sizes=[1, 2])
    model = _wrap(pristine, "flux3")
    seen = []
    model.base.single_stream_modulations["txt"].register_forward_hook(lambda m, a, out: seen.append(out))
    stages, t, g = _inputs(model, 2, seed=21)
    cond = tiny.text_inputs("flux3", 2, g)
    with torch.no_grad():
        model(stages, t, torch.ones(2, dtype=torch.long), **cond)
        model(stages, 1.0 - t, torch.ones(2, dtype=torch.long), **cond)
    assert torch.equal(seen[0], seen[1])


def test_bria_fibo2_unpadded_prompts_put_the_gist_first(pristine) -> None:
    """Without padding FIBO 2 runs [gist, image] (the suite's padded prompts run [image, gist]): stage 0 equals it too."""
    model, base = _wrap(pristine, "bria_fibo2"), pristine["bria_fibo2"]
    stages, t, g = _inputs(model, 2, seed=22)
    cond = {"encoder_hidden_states": torch.randn(2, tiny.FIBO2_BUNDLES, tiny.TEXT_LEN, tiny.TEXT_DIM, generator=g)}
    with torch.no_grad():
        v = model(stages, t, torch.ones(2, dtype=torch.long), **cond)[0]
        expected = tiny.FAMILIES["bria_fibo2"][1](base, stages[0], t[:, 0], cond)
    assert (v - expected).abs().max() <= 1e-5
