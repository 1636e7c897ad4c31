"""Never silently wrong: bad values at the API give clear errors; masked stages cannot poison the loss.

Every check here runs on CPU tensors, where the library reads values on the host (dfm_ext.validation);
tests/test_compile.py checks that the same checks add no graph break (and so no device sync) to
the training and sampling steps.
"""

from __future__ import annotations

import math

import pytest
import torch

import dfm_ext

from dfm_ext import (
    DFMObjective,
    DFMSampler,
    DiT,
    DiTConfig,
    LaplacianPyramid,
    StageScheduler,
    StageTimesteps,
    StageTimestepSampler,
    wrap_dit,
)
from dfm_ext.validation import check_value, float_sequence


def _tiny_wrapped(seed: int = 0):
    torch.manual_seed(seed)
    model = wrap_dit(DiT(DiTConfig.preset("tiny", hidden_size=32, depth=1, class_dropout_prob=0.0)), LaplacianPyramid((2, 1)))
    with torch.no_grad():  # stage 1's slices start at zero; give every path a signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- StageTimesteps

_STAGE = torch.tensor([0, 1])
_MASK = torch.tensor([[True, False], [True, True]])


@pytest.mark.parametrize(
    ("t", "message"),
    [
        ([[1.5, 0.0], [0.5, 0.5]], r"t must lie in \[0, 1\], got \[\[1.5"),
        ([[0.5, 0.0], [-0.1, 0.5]], r"t must lie in \[0, 1\], got .*-0.1"),
        ([[0.5, 0.0], [float("nan"), 0.5]], r"t must be finite, got .*nan"),
        ([[0.5, 0.0], [float("inf"), 0.5]], r"t must be finite, got .*inf"),
    ],
)
def test_stage_timesteps_rejects_bad_times(t, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StageTimesteps(torch.tensor(t), _STAGE, _MASK)


@pytest.mark.parametrize(
    "mask",
    [
        [[True, True], [True, True]],  # stage 0 with stage 1 active
        [[True, False], [True, False]],  # stage 1 with itself inactive
        [[False, False], [True, True]],  # nothing active
    ],
)
def test_stage_timesteps_rejects_a_mask_that_disagrees_with_stage(mask) -> None:
    with pytest.raises(ValueError, match=r"mask must be True exactly for stages s <= stage\[b\].*for stage \[0, 1\]"):
        StageTimesteps(torch.tensor([[0.5, 0.0], [0.5, 0.5]]), _STAGE, torch.tensor(mask))


def test_stage_timesteps_accepts_its_own_samples_and_the_edges() -> None:
    ts = StageTimestepSampler(3, probabilities=(0.4, 0.3, 0.3)).sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ts.mask, torch.arange(3)[None] <= ts.stage[:, None])
    StageTimesteps(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), _STAGE, _MASK)  # closed interval
    ts.to("cpu")


# ----------------------------------------------------------------------------- masking by selection


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("masking", [True, "loss"])
def test_non_finite_data_in_a_masked_stage_does_not_reach_the_loss(bad: float, masking) -> None:
    """Regression: masking multiplied by the mask, and 0 * NaN = NaN gave a NaN loss."""
    model = _tiny_wrapped()
    g = torch.Generator().manual_seed(1)
    stages = model.decomposition.decompose(torch.randn(2, 4, 16, 16, generator=g))
    ts = StageTimesteps(torch.tensor([[0.3, 0.0], [0.6, 0.2]]), _STAGE, _MASK)
    noise = [torch.randn(x.shape, generator=g) for x in stages]
    y = torch.tensor([3, 7])

    def loss_and_grads(stage1_of_sample0: float):
        poisoned = [x.clone() for x in stages]
        poisoned[1][0] = stage1_of_sample0  # sample 0 is at stage 0: its stage 1 is masked
        model.zero_grad(set_to_none=True)
        out = DFMObjective(2, masking=masking)(model, poisoned, ts, noise=noise, y=y)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    bad_out, bad_grads = loss_and_grads(bad)
    zero_out, zero_grads = loss_and_grads(0.0)
    assert math.isfinite(bad_out.loss.item())
    assert all(bool(torch.isfinite(gr).all()) for gr in bad_grads)
    assert torch.equal(bad_out.loss, zero_out.loss)
    assert torch.equal(bad_out.per_stage, zero_out.per_stage)
    assert len(bad_grads) == len(zero_grads) > 0
    for a, b in zip(bad_grads, zero_grads):
        assert torch.equal(a, b)
    for a, b in zip(bad_out.noisy, zero_out.noisy):  # the model saw the same inputs
        assert torch.equal(a, b)


def test_wrapped_model_selects_masked_stages_out() -> None:
    model = _tiny_wrapped().eval()
    g = torch.Generator().manual_seed(2)
    stages = model.decomposition.decompose(torch.randn(2, 4, 16, 16, generator=g))
    t = torch.tensor([[0.3, 0.0], [0.6, 0.2]])
    poisoned = [stages[0], stages[1].clone()]
    poisoned[1][0] = float("nan")
    zeroed = [stages[0], stages[1].clone()]
    zeroed[1][0] = 0.0
    with torch.no_grad():
        out = model(poisoned, t, _STAGE, _MASK, y=torch.tensor([1, 2]))
        ref = model(zeroed, t, _STAGE, _MASK, y=torch.tensor([1, 2]))
    for a, b in zip(out, ref):
        assert bool(torch.isfinite(a).all())
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the wrapped forward


def test_wrapped_forward_rejects_bad_times_and_stages() -> None:
    model = _tiny_wrapped().eval()
    stages = [torch.zeros(2, *s) for s in model.stage_shapes]
    y = torch.tensor([1, 2])
    t = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\] \(0 = noise, 1 = data\), got \[\[500.0"):
        model(stages, t * 1000, _STAGE, y=y)  # a DDPM-style timestep passed as flow time
    with pytest.raises(ValueError, match=r"t must be finite, got .*nan"):
        model(stages, torch.tensor([[0.5, float("nan")], [0.5, 0.5]]), _STAGE, y=y)
    with pytest.raises(ValueError, match=r"stage values must be in \[0, 1\], got \[0, 2\]"):
        model(stages, t, torch.tensor([0, 2]), y=y)


# ----------------------------------------------------------------------------- class labels


@pytest.mark.parametrize("label", [-1, 11, 1000])
def test_class_labels_out_of_range_give_a_clear_error(label: int) -> None:
    """Regression: out-of-range labels hit nn.Embedding's bare 'index out of range in self'."""
    base = DiT(DiTConfig.preset("tiny", hidden_size=32, depth=1))  # 10 classes, 10 = null
    y = torch.tensor([3, label])
    with pytest.raises(ValueError, match=rf"class labels must lie in \[0, 9\] \(or 10, the null class\), got \[3, {label}\]"):
        base(torch.zeros(2, 4, 16, 16), torch.rand(2), y)
    model = _tiny_wrapped()
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 9\]"):
        model([torch.zeros(2, *s) for s in model.stage_shapes], torch.rand(2, 2), _STAGE, y=y)


def test_null_class_label_is_accepted() -> None:
    base = DiT(DiTConfig.preset("tiny", hidden_size=32, depth=1))
    assert base(torch.zeros(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 10])).shape == (2, 4, 16, 16)


# ----------------------------------------------------------------------------- strings and scalars


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: StageTimestepSampler(2, probabilities="ab"), "probabilities"),
        (lambda: StageTimestepSampler(2, probabilities=1.0), "probabilities"),
        (lambda: StageTimestepSampler(2, current=("a", 1.0)), "current"),
        (lambda: StageScheduler(steps=(30, 10), thresholds=0.9), "thresholds"),
        (lambda: StageScheduler(steps=(30, 10), thresholds="0.9"), "thresholds"),
        (lambda: StageScheduler(steps="ab", thresholds=()), "steps"),
        (lambda: StageScheduler(steps=(4,), thresholds=(), shift="3"), "shift"),
        (lambda: DFMSampler(LaplacianPyramid((2, 1)), guidance_scale="ab"), "guidance_scale"),
        (lambda: DFMSampler(LaplacianPyramid((2, 1)), scales="ab"), "scales"),
        (lambda: DFMObjective(2, stage_weights="ab"), "stage_weights"),
        (lambda: DFMObjective(2, scales=2.0), "scales"),
        (lambda: DiTConfig(input_size="32"), "input_size"),
    ],
)
def test_strings_and_scalars_for_sequences_name_the_argument(build, name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name}(\[\d\])? must be"):
        build()


def test_wrap_dit_sequence_arguments_name_themselves() -> None:
    with pytest.raises(TypeError, match="sample_shape must be a sequence"):
        wrap_dit(DiT(DiTConfig.preset("tiny")), LaplacianPyramid((2, 1)), sample_shape="4x16x16")
    with pytest.raises(TypeError, match="patch_sizes must be a sequence"):
        wrap_dit(DiT(DiTConfig.preset("tiny")), LaplacianPyramid((2, 1)), patch_sizes="12")


def test_float_sequence_accepts_sequences_of_numbers() -> None:
    assert float_sequence((1, 0.5), "w") == (1.0, 0.5)
    assert float_sequence(torch.tensor([0.25, 0.75]), "w") == (0.25, 0.75)
    with pytest.raises(TypeError, match=r"w\[1\] must be a number, got True"):
        float_sequence([1.0, True], "w")
    with pytest.raises(ValueError, match=r"w\[0\] must be finite"):
        float_sequence([float("nan")], "w")
    with pytest.raises(ValueError, match="w must have 3 entries"):
        float_sequence([1.0], "w", length=3)


def test_check_value_on_the_host_names_the_values() -> None:
    x = torch.tensor([1, 5])
    check_value((x < 9).all(), "x must be < 9", x.tolist)
    with pytest.raises(ValueError, match=r"^x must be < 3, got \[1, 5\]$"):
        check_value((x < 3).all(), "x must be < 3", x.tolist)


# ----------------------------------------------------------------------------- wrap_dit twice


def test_wrap_dit_refuses_an_already_wrapped_model() -> None:
    model = wrap_dit(DiT(DiTConfig.preset("tiny")), LaplacianPyramid((2, 1)))
    with pytest.raises(TypeError, match=r"already wrapped \(a DFMTransformer over 2 stages"):
        wrap_dit(model, LaplacianPyramid((2, 1)))
    with pytest.raises(TypeError, match=r"DiT was already modified by wrap_dit \(x_embedder is a MultiScalePatchEmbed\)"):
        wrap_dit(model.base, LaplacianPyramid((2, 1)))


def test_sampler_step_rejects_a_bad_stage() -> None:
    sampler = DFMSampler(LaplacianPyramid((2, 1)), StageScheduler((2, 2), (0.9,)))
    with pytest.raises(ValueError, match=r"stage must be an int in \[0, 1\], got 2"):
        sampler.step(lambda *a, **k: None, [torch.zeros(1, 1, 4, 4)] * 2, torch.zeros(2), torch.ones(2), 2)


def test_sampling_values_are_named_before_any_step() -> None:
    """Issue 25: an integer dtype, the meta device and noise on it were raw torch errors."""
    torch.manual_seed(0)
    base = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=16, in_channels=4, num_classes=10))
    model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid((2, 1)), sample_shape=(4, 16, 16)).eval()
    sampler = dfm_ext.DFMSampler(model.decomposition, dfm_ext.StageScheduler(steps=(2, 1), thresholds=(0.9,)))
    y = torch.tensor([1])
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype.*torch.int64"):
        sampler.sample(model, (1, 4, 16, 16), dtype=torch.long, y=y)
    with pytest.raises(ValueError, match="device='meta' holds no values"):
        sampler.sample(model, (1, 4, 16, 16), device="meta", y=y)
    with pytest.raises(ValueError, match=r"noise\[0\] is on the meta device"):
        sampler.sample(model, [torch.empty(1, 4, 8, 8, device="meta"), torch.empty(1, 4, 16, 16, device="meta")], y=y)


def test_any_sample_shape_on_fixed_positions_is_refused_at_wrap_time() -> None:
    fixed = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=16, in_channels=4))
    with pytest.raises(ValueError, match="any_sample_shape=True needs positions that follow the token grid.*fixed position table"):
        dfm_ext.wrap_dit(fixed, dfm_ext.LaplacianPyramid((2, 1)), any_sample_shape=True)
    rope = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=16, in_channels=4, rope=True))
    assert dfm_ext.wrap_dit(rope, dfm_ext.LaplacianPyramid((2, 1)), any_sample_shape=True).any_sample_shape


@pytest.mark.parametrize("scale", [0.0, float("nan"), float("inf"), True])
def test_adapter_output_scale_must_be_finite_and_non_zero(scale) -> None:
    from dfm_ext.adapters import DiTFamilyAdapter

    with pytest.raises(ValueError, match="output_scale must be a finite non-zero number"):
        DiTFamilyAdapter(time_convention="unit", output_scale=scale)


def test_allocation_update_with_the_wrong_number_of_stages_names_it() -> None:
    from dfm_ext.process.allocation import make_allocation

    sampler = dfm_ext.StageTimestepSampler(2, allocation=make_allocation("progress", 2, prior=(0.9, 0.1)))
    with pytest.raises(ValueError, match=r"per_stage_loss must be \[S\] = \[2\] \(one loss per stage\), got \(3,\)"):
        sampler.update(torch.zeros(3))


def test_a_registered_adapter_for_a_missing_package_does_not_break_auto() -> None:
    """Its matches() imports a package that is not installed: skipped with a warning naming it, the model still wraps."""
    from dfm_ext.wrapping.adapter import register_adapter, unregister_adapter

    class NeedsAMissingPackage:
        name = "needs_missing"

        def matches(self, model):
            import dfm_ext_not_a_real_package  # noqa: F401

        default_sample_shape = token_grid = install = forward = null_condition = None

    register_adapter(NeedsAMissingPackage())
    try:
        base = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=8, in_channels=3, num_classes=4))
        with pytest.warns(UserWarning, match=r"adapter 'needs_missing' was skipped: its matches\(\) raised ModuleNotFoundError"):
            model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(3, 8, 8))
        assert model.adapter.name == "dit"
    finally:
        unregister_adapter("needs_missing")
