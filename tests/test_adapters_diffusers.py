"""wrap_dit on the diffusers DiT families: DiT, PixArt, SD3, Flux, CogVideoX.

Tiny models come from tests/_tiny_diffusers.py (saved with save_pretrained and reloaded with
from_pretrained, the real-checkpoint path). Each family's pristine model is loaded once per
module and deep-copied per test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")

import _tiny_diffusers as tiny  # noqa: E402

from dfm_ext import IdentityDecomposition, LaplacianPyramid, wrap_dit  # noqa: E402
from dfm_ext.wrapping.embeddings import MultiScaleHead, MultiScalePatchEmbed, MultiScaleTimestepEmbed  # noqa: E402

FAMILIES = ("dit", "pixart", "sd3", "flux", "cogvideox")
ADAPTER_NAMES = {"dit": "diffusers_dit", "pixart": "pixart", "sd3": "sd3", "flux": "flux", "cogvideox": "cogvideox"}
C = tiny.LATENT_CHANNELS


# ----------------------------------------------------------------------------- base-model calls
# Each runs the *unwrapped* diffusers model on a stage-0 tensor in dfm_ext layout and returns its
# output converted explicitly to the paper's convention (velocity x - noise, t = 1 data), so the
# equality tests check the adapters' conversions as well. Timesteps are written ``a - a * t``, the
# same float expression the adapters use: ``a * (1 - t)`` differs by an ulp of ``a`` (6e-5 at
# a = 999), which the sinusoidal embedding turns into ~1e-5 output differences.


def _flux_pack(x: torch.Tensor) -> torch.Tensor:  # FluxPipeline._pack_latents
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_unpack(y: torch.Tensor, h: int, w: int) -> torch.Tensor:  # FluxPipeline._unpack_latents
    b, _, c4 = y.shape
    return y.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _base_dit(m, x, t, cond):  # DDPM timesteps 0..999, epsilon + learned sigma: -epsilon (the first C channels)
    return -m(x, timestep=999.0 - 999.0 * t, **cond).sample[:, :C]


def _base_pixart(m, x, t, cond):
    return -m(x, timestep=999.0 - 999.0 * t, **cond).sample[:, :C]


def _base_sd3(m, x, t, cond):  # timestep = 1000 sigma, sigma = 1 - t; predicts noise - x
    return -m(x, timestep=1000.0 - 1000.0 * t, **cond).sample


def _base_flux(m, x, t, cond):  # Flux multiplies sigma by 1000 itself; pre-packed 2x2 tokens
    from dfm_ext.adapters.flux import flux_image_ids

    h, w = x.shape[-2:]
    ids = flux_image_ids((h // 2, w // 2))
    txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
    out = m(_flux_pack(x), timestep=1 - t, guidance=torch.ones(x.shape[0]), img_ids=ids, txt_ids=txt_ids, **cond)
    return -_flux_unpack(out.sample, h, w)


def _base_cogvideox(m, x, t, cond):  # diffusers video layout is [B, F, C, H, W]
    return m(x.permute(0, 2, 1, 3, 4), timestep=999.0 - 999.0 * t, **cond).sample.permute(0, 2, 1, 3, 4)


@dataclass(frozen=True)
class Family:
    name: str
    base_call: Callable
    sample: tuple[int, ...]  # full-resolution sample twice the native size, so stage 0 is native
    native_patches: tuple  # stage 0 uses the model's own patch: stage-0 input == the base's input

    @property
    def video(self) -> bool:
        return len(self.sample) == 4


SPECS = {
    "dit": Family("dit", _base_dit, (C, 16, 16), (2, 4)),
    "pixart": Family("pixart", _base_pixart, (C, 16, 16), (2, 4)),
    "sd3": Family("sd3", _base_sd3, (C, 16, 16), (2, 4)),
    "flux": Family("flux", _base_flux, (C, 16, 16), (2, 4)),
    "cogvideox": Family("cogvideox", _base_cogvideox, (C, 2, 16, 16), ((1, 2, 2), (1, 4, 4))),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, torch.nn.Module]:
    root = tmp_path_factory.mktemp("tiny_diffusers")
    return {name: factory(root / name) for name, factory in tiny.FACTORIES.items()}


def _fresh(pristine, fam: str) -> torch.nn.Module:
    return copy.deepcopy(pristine[fam])


def _inputs(model, batch: int, seed: int, stage: int | None = None):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(batch, *s, generator=g) for s in model.stage_shapes]
    t = torch.rand(batch, model.num_stages, generator=g)
    k = torch.full((batch,), model.num_stages - 1 if stage is None else stage, dtype=torch.long)
    return stages, t, k, g


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("fam", FAMILIES)
def test_tiny_model_runs_forward(pristine, fam: str) -> None:
    spec, m = SPECS[fam], pristine[fam]
    g = torch.Generator().manual_seed(0)
    native = (spec.sample[0], *(d // 2 for d in spec.sample[1:])) if not spec.video else (C, 2, 8, 8)
    x = torch.randn(2, *native, generator=g)
    with torch.no_grad():
        out = spec.base_call(m, x, torch.rand(2, generator=g), tiny.text_inputs(fam, 2, g))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 0.01


@pytest.mark.parametrize("fam", FAMILIES)
def test_auto_picks_the_family_adapter(pristine, fam: str) -> None:
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=SPECS[fam].sample)
    assert model.adapter.name == ADAPTER_NAMES[fam]


# ----------------------------------------------------------------------------- pretrained equality


@pytest.mark.parametrize("mode", ["native", "upsampled"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_pretrained_init_reproduces_base_on_stage0(pristine, fam: str, mode: str) -> None:
    """Stage-0 output == the base model's output (converted to the paper's convention), max error 1e-5.

    ``native``: stage 0 uses the model's own patch, so the base sees the stage-0 tensor itself.
    ``upsampled`` (wrap_dit's default token grid, paper section E): stage 0 has half the patch,
    which equals the base on stage 0 nearest-upsampled by 2, its output area-downsampled by 2.
    """
    spec = SPECS[fam]
    ref = _fresh(pristine, fam)
    patches = list(spec.native_patches) if mode == "native" else None
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=spec.sample, patch_sizes=patches)
    stages, t, _, g = _inputs(model, 3, seed=1)
    cond = tiny.text_inputs(fam, 3, g)
    with torch.no_grad():
        v0 = model(stages, t, torch.zeros(3, dtype=torch.long), **cond)[0]
        # Stage 1 active too: at init its input, time and stage index must not change stage 0.
        v_all = model(stages, t, torch.ones(3, dtype=torch.long), **cond)
        x0 = stages[0]
        if mode == "native":
            expected = spec.base_call(ref, x0, t[:, 0], cond)
        else:
            up = x0.repeat_interleave(2, -1).repeat_interleave(2, -2)
            out = spec.base_call(ref, up, t[:, 0], cond)
            expected = F.avg_pool3d(out, (1, 2, 2)) if spec.video else F.avg_pool2d(out, 2)
    assert (v0 - expected).abs().max() <= 1e-5
    assert (v_all[0] - expected).abs().max() <= 1e-5
    assert torch.equal(v_all[1], torch.zeros_like(v_all[1]))  # zero-initialised stage-1 head


# ----------------------------------------------------------------------------- shapes


def _decompositions() -> list[tuple[str, object, object]]:
    """(id, decomposition, patch sizes) for every decomposition that exists, on 16x16 latents."""
    out: list[tuple[str, object, object]] = [
        ("laplacian2", LaplacianPyramid(factors=(2, 1)), None),
        ("laplacian3", LaplacianPyramid(factors=(4, 2, 1)), [1, 2, 4]),
    ]
    try:
        from dfm_ext import WaveletDecomposition

        out.append(("wavelet", WaveletDecomposition(), None))
    except ImportError:  # pragma: no cover - being written in parallel
        pass
    try:
        from dfm_ext import DCTDecomposition

        out.append(("dct", DCTDecomposition(block_size=2), None))
    except ImportError:  # pragma: no cover
        pass
    return out


DECOMPOSITIONS = _decompositions()


@pytest.mark.parametrize("fam", ["dit", "pixart", "sd3", "flux"])
@pytest.mark.parametrize("name,decomposition,patches", DECOMPOSITIONS, ids=[d[0] for d in DECOMPOSITIONS])
def test_image_families_shapes_for_each_decomposition(pristine, fam, name, decomposition, patches) -> None:
    model = wrap_dit(_fresh(pristine, fam), decomposition, sample_shape=(C, 16, 16), patch_sizes=patches)
    stages, t, k, g = _inputs(model, 2, seed=2)
    with torch.no_grad():
        v = model(stages, t, k, **tiny.text_inputs(fam, 2, g))
    assert [tuple(x.shape) for x in v] == [tuple(x.shape) for x in stages]
    assert all(torch.isfinite(x).all() for x in v)


@pytest.mark.parametrize("num_stages", [2, 3])
def test_cogvideox_shapes(pristine, num_stages: int) -> None:
    factors = (2, 1) if num_stages == 2 else (4, 2, 1)
    patches = None if num_stages == 2 else [1, 2, 4]
    model = wrap_dit(_fresh(pristine, "cogvideox"), LaplacianPyramid(factors=factors), sample_shape=(C, 2, 16, 16),
                     patch_sizes=patches)
    stages, t, k, g = _inputs(model, 2, seed=3)
    with torch.no_grad():
        v = model(stages, t, k, **tiny.text_inputs("cogvideox", 2, g))
    assert [tuple(x.shape) for x in v] == [tuple(x.shape) for x in stages]
    assert stages[0].shape[2] == 2  # [B, C, T, H, W]: frames kept, space decomposed


@settings(max_examples=12)  # each example wraps and runs a model (~0.3 s)
@given(
    fam=st.sampled_from(["dit", "pixart", "sd3", "flux"]),
    num_stages=st.integers(1, 3),
    side=st.sampled_from([8, 16]),
    batch=st.integers(1, 3),
    data=st.data(),
)
def test_masked_stages_are_zero_and_shapes_follow_the_stages(pristine, fam, num_stages, side, batch, data) -> None:
    """For any stage count/resolution: one velocity per stage, same shape; inactive stages give zero."""
    factors = tuple(2 ** (num_stages - 1 - i) for i in range(num_stages))
    decomposition = LaplacianPyramid(factors=factors) if num_stages > 1 else IdentityDecomposition()
    patches = [2**i for i in range(num_stages)]  # token grid = stage 0's resolution
    model = wrap_dit(_fresh(pristine, fam), decomposition, sample_shape=(C, side, side), patch_sizes=patches)
    stage = data.draw(st.lists(st.integers(0, num_stages - 1), min_size=batch, max_size=batch))
    stages, t, _, g = _inputs(model, batch, seed=4)
    k = torch.tensor(stage, dtype=torch.long)
    with torch.no_grad():
        v = model(stages, t, k, **tiny.text_inputs(fam, batch, g))
    assert [x.shape for x in v] == [x.shape for x in stages]
    for s in range(num_stages):
        off = k < s
        assert torch.equal(v[s][off], torch.zeros_like(v[s][off]))


def test_diffusers_dit_accepts_non_square_grids(pristine) -> None:
    """The diffusers forward unpatchifies with sqrt(num_tokens) and fails off-square; the wrapper does not."""
    base = _fresh(pristine, "dit")
    with pytest.raises(RuntimeError):
        base(torch.randn(1, C, 8, 16), timestep=torch.tensor([10]), class_labels=torch.tensor([1]))
    model = wrap_dit(base, LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 16))
    stages, t, k, _ = _inputs(model, 2, seed=5)
    with torch.no_grad():
        v = model(stages, t, k, class_labels=torch.tensor([1, 2]))
    assert [x.shape for x in v] == [x.shape for x in stages]


@pytest.mark.parametrize("mode", ["native", "upsampled"])
def test_cogvideox15_temporal_patch_reproduces_base(tmp_path, mode: str) -> None:
    """CogVideoX 1.5 layout (temporal patch 2, Linear patch embedding over (c, pt, p, q), RoPE)."""
    ref = tiny.tiny_cogvideox15(tmp_path / "m")
    base = tiny.tiny_cogvideox15(tmp_path / "m")
    patches = [(2, 2, 2), (2, 4, 4)] if mode == "native" else None
    model = wrap_dit(base, LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 2, 16, 16), patch_sizes=patches)
    stages, t, _, g = _inputs(model, 2, seed=16)
    text = torch.randn(2, 4, tiny.TEXT_DIM, generator=g)
    rope = tiny.cogvideox_rope(model.packer.grid)
    with torch.no_grad():
        v0 = model(stages, t, torch.zeros(2, dtype=torch.long), encoder_hidden_states=text, image_rotary_emb=rope)[0]
        x0 = stages[0] if mode == "native" else stages[0].repeat_interleave(2, -1).repeat_interleave(2, -2)
        out = ref(x0.permute(0, 2, 1, 3, 4), encoder_hidden_states=text, image_rotary_emb=rope,
                  timestep=999.0 - 999.0 * t[:, 0]).sample.permute(0, 2, 1, 3, 4)
        expected = out if mode == "native" else F.avg_pool3d(out, (1, 2, 2))
    assert (v0 - expected).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="image_rotary_emb"):
        model(stages, t, torch.zeros(2, dtype=torch.long), encoder_hidden_states=text)


# ----------------------------------------------------------------------------- gradients


def _multiscale_modules(base: torch.nn.Module):
    embeds = [m for m in base.modules() if isinstance(m, MultiScalePatchEmbed)]
    heads = [m for m in base.modules() if isinstance(m, MultiScaleHead)]
    times = [m for m in base.modules() if isinstance(m, MultiScaleTimestepEmbed)]
    return embeds, heads, times


@pytest.mark.parametrize("fam", FAMILIES)
def test_gradients_reach_every_stage(pristine, fam: str) -> None:
    spec = SPECS[fam]
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=spec.sample)
    stages, t, _, g = _inputs(model, 2, seed=6)
    k = torch.tensor([0, 1])  # both stage-index embeddings in use
    stages = [x.requires_grad_() for x in stages]
    v = model(stages, t, k, **tiny.text_inputs(fam, 2, g))
    targets = [torch.randn(x.shape, generator=g) for x in v]  # a zero-initialised head needs a non-zero target
    sum(((x - y).pow(2).mean() for x, y in zip(v, targets)), torch.zeros(())).backward()
    embeds, heads, times = _multiscale_modules(model.base)
    expected_times = 2 if fam == "dit" else 1  # tiny DiT: one embedder per block
    assert len(embeds) == 1 and len(heads) == 1 and len(times) == expected_times
    for s in range(2):
        # Input gradients: stage 0 only, since later stages' patch slices start at zero (so do their
        # input gradients) until their weights, checked next, have moved.
        if s == 0:
            assert stages[s].grad.abs().sum() > 0
        assert embeds[0].proj.weight.grad[:, embeds[0].stage_slice(s)].abs().sum() > 0
        assert heads[0].weight.grad[heads[0].stage_slice(s)].abs().sum() > 0
        for te in times:
            grads = [p.grad for p in te.embedders[s].parameters() if p.grad is not None]
            assert grads and sum(gr.abs().sum() for gr in grads) > 0, f"stage {s}'s timestep embedder gets no gradient"
            assert te.stage_embed.weight.grad[s].abs().sum() > 0


# ----------------------------------------------------------------------------- training


def _overfit(model, cond, steps: int, lr: float) -> tuple[float, float]:
    from dfm_ext import DFMObjective, StageTimestepSampler

    g = torch.Generator().manual_seed(7)
    b = 4
    data = [torch.randn(b, *s, generator=g) for s in model.stage_shapes]
    noise = [torch.randn(b, *s, generator=g) for s in model.stage_shapes]
    ts = StageTimestepSampler(model.num_stages, probabilities=[0.5, 0.5]).sample(b, generator=g)
    objective = DFMObjective(model.num_stages)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = objective(model, data, ts, noise=noise, **cond).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], min(losses[-10:])


@pytest.mark.parametrize("fam", ["dit", "flux", "sd3"])
def test_two_hundred_steps_fit_one_batch(pristine, fam: str) -> None:
    """Fixed batch, noise and times: the DFM loss falls by at least 10x (checks the whole path learns)."""
    torch.manual_seed(0)
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 8))
    cond = tiny.text_inputs(fam, 4, torch.Generator().manual_seed(8))
    if fam == "dit":
        cond["force_drop_ids"] = torch.zeros(4, dtype=torch.long)  # fixed batch: no random label dropout
    first, last = _overfit(model, cond, steps=200, lr=3e-3)
    assert last * 10 <= first, (first, last)


@pytest.mark.parametrize("fam", FAMILIES)
def test_train_step_then_sample_end_to_end(pristine, fam: str) -> None:
    from dfm_ext import DFMObjective, DFMSampler, StageScheduler, StageTimestepSampler

    spec = SPECS[fam]
    small = (C, 2, 8, 8) if spec.video else (C, 8, 8)
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=small)
    g = torch.Generator().manual_seed(9)
    cond = tiny.text_inputs(fam, 2, g)
    data = [torch.randn(2, *s, generator=g) for s in model.stage_shapes]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    out = DFMObjective(2)(model, data, StageTimestepSampler(2).sample(2, generator=g), generator=g, **cond)
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)
    model.eval()
    sampler = DFMSampler(model.decomposition, StageScheduler(steps=(3, 2), thresholds=(0.9,)), guidance_scale=2.0)
    with torch.no_grad():
        result = sampler.sample(model, (2, *small), generator=g, **cond)
    assert result.x.shape == (2, *small) and torch.isfinite(result.x).all()
    assert [p.shape for p in result.previews] == [torch.Size((2, *s)) for s in model.stage_shapes]


@pytest.mark.parametrize("fam", FAMILIES)
def test_bfloat16_models_run_forward_and_backward(pristine, fam: str) -> None:
    """Times stay float32 (the wrapper's choice); every embedder output is cast to the model's dtype."""
    small = (C, 2, 8, 8) if SPECS[fam].video else (C, 8, 8)
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=small).to(torch.bfloat16)
    stages, t, _, g = _inputs(model, 2, seed=17)
    stages = [x.bfloat16() for x in stages]
    cond = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tiny.text_inputs(fam, 2, g).items()}
    v = model(stages, t, torch.tensor([0, 1]), **cond)
    assert all(x.dtype == torch.bfloat16 and torch.isfinite(x).all() for x in v)
    v[0].float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- DiT label dropout / CFG


def test_dit_label_dropout_happens_once_per_sample(pristine) -> None:
    from dfm_ext.adapters.diffusers_dit import DiffusersDiTAdapter

    adapter = DiffusersDiTAdapter(label_dropout=0.5)
    model = wrap_dit(_fresh(pristine, "dit"), LaplacianPyramid(factors=(2, 1)), adapter=adapter, sample_shape=(C, 8, 8))
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in model.base.transformer_blocks)
    stages, t, k, _ = _inputs(model, 16, seed=10)
    labels = torch.arange(16) % 10
    model.train()  # dropout layers are p=0 in the tiny model, so train mode only affects labels
    with torch.no_grad():
        v_train = model(stages, t, k, class_labels=labels, generator=torch.Generator().manual_seed(11))
        dropped = torch.rand(16, generator=torch.Generator().manual_seed(11)) < 0.5
        model.eval()
        v_ref = model(stages, t, k, class_labels=torch.where(dropped, 10, labels))
        v_eval = model(stages, t, k, class_labels=labels)
    assert 0 < int(dropped.sum()) < 16
    for a, b in zip(v_train, v_ref):
        assert torch.equal(a, b)  # every block saw the same (once-dropped) label
    assert not torch.equal(v_train[0], v_eval[0])


def test_pixart_attention_mask_equals_dropping_the_masked_tokens(pristine) -> None:
    model = wrap_dit(_fresh(pristine, "pixart"), LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 8))
    stages, t, k, g = _inputs(model, 2, seed=18)
    text = torch.randn(2, 3, tiny.TEXT_DIM, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    with torch.no_grad():
        masked = model(stages, t, k, encoder_hidden_states=text, encoder_attention_mask=mask)
        shorter = model(stages, t, k, encoder_hidden_states=text[:, :2])
        full = model(stages, t, k, encoder_hidden_states=text)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(masked, shorter))
    assert not torch.allclose(masked[0], full[0], atol=1e-4)


def test_null_conditions(pristine) -> None:
    dit = wrap_dit(_fresh(pristine, "dit"), LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 8))
    assert dit.null_condition(class_labels=torch.tensor([1, 2]))["class_labels"].tolist() == [10, 10]
    flux = wrap_dit(_fresh(pristine, "flux"), LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 8))
    cond = tiny.text_inputs("flux", 2)
    null = flux.null_condition(**cond)
    assert set(null) == set(cond) and all(torch.equal(v, torch.zeros_like(v)) for v in null.values())


def test_flux_guidance_is_fixed_at_one_by_default_and_configurable(pristine) -> None:
    from dfm_ext.adapters.flux import FluxAdapter

    model = wrap_dit(_fresh(pristine, "flux"), LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 8))
    stages, t, k, g = _inputs(model, 2, seed=12)
    cond = tiny.text_inputs("flux", 2, g)
    with torch.no_grad():
        default = model(stages, t, k, **cond)
        one = model(stages, t, k, guidance=torch.ones(2), **cond)
        other = model(stages, t, k, guidance=3.5, **cond)
    assert all(torch.equal(a, b) for a, b in zip(default, one))
    assert not torch.equal(default[0], other[0])
    model.adapter = FluxAdapter(guidance=3.5)
    with torch.no_grad():
        assert torch.equal(model(stages, t, k, **cond)[0], other[0])


def test_save_and_load_wrapped_roundtrip(pristine, tmp_path) -> None:
    from dfm_ext import load_wrapped

    model = wrap_dit(_fresh(pristine, "sd3"), LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # move away from the init so that loading matters
    model.save_pretrained(tmp_path / "w")
    loaded = load_wrapped(tmp_path / "w", base_model=_fresh(pristine, "sd3"))
    stages, t, k, g = _inputs(model, 2, seed=13)
    cond = tiny.text_inputs("sd3", 2, g)
    with torch.no_grad():
        a, b = model(stages, t, k, **cond), loaded(stages, t, k, **cond)
    assert loaded.adapter.name == "sd3"
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fam,sample,match",
    [
        ("dit", (C, 15, 16), "not divisible"),
        ("pixart", (C, 8), r"\(C, H, W\)"),
        ("sd3", (C, 64, 64), "pos_embed_max_size"),
        ("flux", (C, 9, 8), "even"),
        ("cogvideox", (C, 8, 8), r"\(C, T, H, W\)"),
    ],
)
def test_sample_shapes_that_do_not_fit_the_model_are_refused(pristine, fam, sample, match) -> None:
    # One stage, so that the decomposition itself has nothing to refuse first.
    decomposition = IdentityDecomposition() if len(sample) in (3, 4) else LaplacianPyramid(factors=(2, 1))
    with pytest.raises(ValueError, match=match):
        wrap_dit(_fresh(pristine, fam), decomposition, sample_shape=sample)


@pytest.mark.parametrize("fam", FAMILIES)
def test_stage_tensors_of_the_wrong_size_are_refused(pristine, fam: str) -> None:
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=SPECS[fam].sample)
    stages, t, k, g = _inputs(model, 2, seed=14)
    stages[1] = stages[1][..., :-2]
    with pytest.raises(ValueError, match="stages\\[1\\]"):
        model(stages, t, k, **tiny.text_inputs(fam, 2, g))


def _bad_cond(fam: str) -> list[tuple[dict, type, str]]:
    good = tiny.text_inputs(fam, 2, torch.Generator().manual_seed(0))
    if fam == "dit":
        return [
            ({"class_labels": torch.tensor([1, 2, 3])}, ValueError, r"class_labels must have shape \[2\]"),
            ({"class_labels": torch.tensor([1, 11])}, ValueError, "class_labels must be in"),
            ({}, TypeError, "needs class labels"),
        ]
    bad_width = dict(good, encoder_hidden_states=torch.randn(2, 3, tiny.TEXT_DIM + 1))
    bad_batch = dict(good, encoder_hidden_states=torch.randn(3, 3, tiny.TEXT_DIM))
    cases = [
        (bad_width, ValueError, r"encoder_hidden_states must have shape"),
        (bad_batch, ValueError, r"encoder_hidden_states must have shape"),
        (dict(good, prompt="a cat"), TypeError, "unexpected conditioning"),
    ]
    if fam in ("sd3", "flux"):
        cases.append((dict(good, pooled_projections=torch.randn(2, tiny.POOLED_DIM - 1)), ValueError, "pooled_projections"))
        cases.append(({"encoder_hidden_states": good["encoder_hidden_states"]}, TypeError, "pooled_projections"))
    if fam == "cogvideox":  # sincos positions fix the text length
        cases.append((dict(good, encoder_hidden_states=torch.randn(2, 3, tiny.TEXT_DIM)), ValueError, r"\[2, 4, 12\]"))
    return cases


@pytest.mark.parametrize("fam,cond,error,match", [(f, *c) for f in FAMILIES for c in _bad_cond(f)])
def test_bad_conditioning_is_refused(pristine, fam, cond, error, match) -> None:
    model = wrap_dit(_fresh(pristine, fam), LaplacianPyramid(factors=(2, 1)), sample_shape=SPECS[fam].sample)
    stages, t, k, _ = _inputs(model, 2, seed=15)
    with pytest.raises(error, match=match):
        model(stages, t, k, **cond)


def test_calling_the_converted_diffusers_dit_directly_is_refused(pristine) -> None:
    model = wrap_dit(_fresh(pristine, "dit"), LaplacianPyramid(factors=(2, 1)), sample_shape=(C, 8, 8))
    with pytest.raises(ValueError, match="packed input"):
        model.base(torch.randn(1, C, 8, 8), timestep=torch.tensor([1]), class_labels=torch.tensor([1]))
    with pytest.raises(TypeError, match="call the DFMTransformer"):
        model.base.transformer_blocks[0].norm1.emb(torch.tensor([1.0]), torch.tensor([1]))
