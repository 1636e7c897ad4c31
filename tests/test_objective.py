"""DFMObjective / dfm_loss / estimate_stage_scales: noising, masking, the masked per-stage loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from dfm_ext.decompositions.identity import IdentityDecomposition
from dfm_ext.process.objective import DFMLossOutput, DFMObjective, dfm_loss, estimate_stage_scales
from dfm_ext.process.timesteps import StageTimesteps, StageTimestepSampler


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stages(batch: int, num_stages: int, seed: int) -> list[Tensor]:
    g = _gen(seed)
    return [torch.randn(batch, 2, 2 * 2**s, 2 * 2**s, generator=g) for s in range(num_stages)]


class Recorder:
    """A model that records what it was given and returns fixed (or zero) outputs."""

    def __init__(self, outputs: list[Tensor] | None = None) -> None:
        self.outputs = outputs
        self.calls: list[dict] = []

    def __call__(self, stages, t, stage, mask, **cond):
        self.calls.append({"stages": [x.clone() for x in stages], "t": t, "stage": stage, "mask": mask, "cond": cond})
        if self.outputs is not None:
            return self.outputs
        return [torch.zeros_like(x) for x in stages]


@st.composite
def batches(draw: st.DrawFn):
    s = draw(st.integers(1, 3))
    b = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    stages = _stages(b, s, seed)
    ts = StageTimestepSampler(s, probabilities=[1 / s] * s).sample(b, generator=_gen(seed + 1))
    noise = [torch.randn(x.shape, generator=_gen(seed + 2 + i)) for i, x in enumerate(stages)]
    return stages, ts, noise


@given(batch=batches())
def test_masked_inputs_reach_model_as_zeros(batch) -> None:
    stages, ts, noise = batch
    rec = Recorder()
    out = DFMObjective(len(stages))(rec, stages, ts, noise=noise, y=torch.arange(ts.batch_size))
    call = rec.calls[0]
    assert torch.equal(call["t"], ts.t) and torch.equal(call["stage"], ts.stage) and torch.equal(call["mask"], ts.mask)
    assert torch.equal(call["cond"]["y"], torch.arange(ts.batch_size))
    for s, (x, n, seen) in enumerate(zip(stages, noise, call["stages"])):
        t = ts.t[:, s].view(-1, 1, 1, 1)
        expected = (t * x + (1 - t) * n) * ts.mask[:, s].view(-1, 1, 1, 1)
        torch.testing.assert_close(seen, expected)
        assert bool((seen[~ts.mask[:, s]] == 0).all())
        torch.testing.assert_close(out.target[s], x - n)


@given(batch=batches(), data=st.data())
def test_loss_ignores_masked_stages_and_depends_on_active_ones(batch, data) -> None:
    stages, ts, noise = batch
    objective = DFMObjective(len(stages))
    preds = [torch.randn_like(x) for x in stages]
    base = objective(Recorder(preds), stages, ts, noise=noise).loss
    s = data.draw(st.integers(0, len(stages) - 1))
    b = data.draw(st.integers(0, ts.batch_size - 1))
    changed = [p.clone() for p in preds]
    changed[s][b] += 3.0
    loss = objective(Recorder(changed), stages, ts, noise=noise).loss
    if ts.mask[b, s]:
        assert not torch.isclose(loss, base), "the loss must depend on every active stage"
    else:
        assert torch.equal(loss, base), "the loss must ignore masked stages"


@given(batch=batches())
def test_loss_value_matches_definition(batch) -> None:
    stages, ts, noise = batch
    weights = torch.linspace(0.5, 2.0, len(stages))
    preds = [torch.randn_like(x) for x in stages]
    out = DFMObjective(len(stages), stage_weights=weights)(Recorder(preds), stages, ts, noise=noise)
    err = torch.stack([((p - (x - n)) ** 2).flatten(1).mean(1) for p, x, n in zip(preds, stages, noise)], 1)
    m = ts.mask.float()
    torch.testing.assert_close(out.loss, (err * m * weights).sum(1).mean())
    for s in range(len(stages)):
        if m[:, s].sum() > 0:
            torch.testing.assert_close(out.per_stage[s], (err[:, s] * m[:, s]).sum() / m[:, s].sum())
        else:
            assert math.isnan(out.per_stage[s].item())
    assert not out.per_stage.requires_grad


def test_gradients_reach_active_stage_heads_only() -> None:
    class PerStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, stages, t, stage, mask):
            return [self.w[i] * x for i, x in enumerate(stages)]

    model = PerStage()
    stages = _stages(4, 2, 0)
    ts = StageTimesteps(torch.rand(4, 2) * torch.tensor([1.0, 0.0]), torch.zeros(4, dtype=torch.long),
                        torch.tensor([[True, False]] * 4))
    DFMObjective(2)(model, stages, ts, generator=_gen(0)).loss.backward()
    assert model.w.grad[0] != 0 and model.w.grad[1] == 0


def test_per_stage_is_nan_without_active_samples() -> None:
    stages = _stages(3, 2, 0)
    ts = StageTimesteps(torch.tensor([[0.5, 0.0]] * 3), torch.zeros(3, dtype=torch.long), torch.tensor([[True, False]] * 3))
    out = DFMObjective(2)(Recorder(), stages, ts, generator=_gen(0))
    assert not math.isnan(out.per_stage[0].item()) and math.isnan(out.per_stage[1].item())
    assert math.isfinite(out.loss.item())


def test_masking_modes() -> None:
    stages = _stages(2, 2, 0)
    noise = [torch.randn_like(x) for x in stages]
    ts = StageTimesteps(torch.tensor([[0.5, 0.0], [0.7, 0.2]]), torch.tensor([0, 1]), torch.tensor([[True, False], [True, True]]))
    preds = [torch.randn_like(x) for x in stages]
    outs = {}
    for masking in (True, "loss", False):
        rec = Recorder(preds)
        outs[masking] = DFMObjective(2, masking=masking)(rec, stages, ts, noise=noise)
        seen = rec.calls[0]
        if masking is True:
            assert torch.equal(seen["mask"], ts.mask)
            assert bool((seen["stages"][1][0] == 0).all())
        else:
            # no input masking: the not-yet-generated stage is pure noise (t = 0) and the model is told it is on
            assert bool(seen["mask"].all())
            torch.testing.assert_close(seen["stages"][1][0], noise[1][0])
    assert torch.equal(outs[True].loss, outs["loss"].loss)
    assert outs[False].loss > outs["loss"].loss  # the masked stage's error now counts
    with pytest.raises(ValueError, match="masking"):
        DFMObjective(2, masking="inputs")


def test_standardisation_divides_before_noising_and_is_saved() -> None:
    stages = _stages(2, 2, 0)
    noise = [torch.randn_like(x) for x in stages]
    ts = StageTimestepSampler(2, probabilities=(0.0, 1.0)).sample(2, generator=_gen(0))
    scales = torch.tensor([2.0, 0.5])
    objective = DFMObjective(2, scales=scales)
    rec = Recorder()
    out = objective(rec, stages, ts, noise=noise)
    for s in range(2):
        t = ts.t[:, s].view(-1, 1, 1, 1)
        torch.testing.assert_close(rec.calls[0]["stages"][s], t * stages[s] / scales[s] + (1 - t) * noise[s])
        torch.testing.assert_close(out.target[s], stages[s] / scales[s] - noise[s])
    state = objective.state_dict()
    assert torch.equal(state["scales"], scales)
    fresh = DFMObjective(2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(Recorder(), stages, ts, noise=noise).loss, out.loss)


def test_deterministic_under_generator_and_dfm_loss_matches() -> None:
    stages = _stages(4, 2, 0)
    ts = StageTimestepSampler(2).sample(4, generator=_gen(1))
    a = DFMObjective(2)(Recorder(), stages, ts, generator=_gen(5))
    b = dfm_loss(Recorder(), stages, ts, generator=_gen(5))
    assert isinstance(b, DFMLossOutput)
    assert torch.equal(a.loss, b.loss) and all(torch.equal(x, y) for x, y in zip(a.noisy, b.noisy))
    c = dfm_loss(Recorder(), stages, ts, generator=_gen(6))
    assert not torch.equal(a.loss, c.loss)


def test_bad_inputs_raise() -> None:
    stages = _stages(3, 2, 0)
    ts = StageTimestepSampler(2).sample(3, generator=_gen(0))
    objective = DFMObjective(2)
    with pytest.raises(ValueError, match="returned 1 stages, expected 2"):
        objective(lambda x, *a: [x[0]], stages, ts)
    with pytest.raises(ValueError, match=r"output for stage 1 has shape \(3, 2, 2, 2\)"):
        objective(lambda x, *a: [x[0], x[0]], stages, ts)
    with pytest.raises(TypeError, match="list of 2 tensors"):
        objective(lambda x, *a: x[0], stages, ts)
    with pytest.raises(ValueError, match=r"timesteps.t has shape \(4, 2\)"):
        objective(Recorder(), stages, StageTimestepSampler(2).sample(4))
    with pytest.raises(ValueError, match=r"timesteps.t has shape \(3, 3\)"):
        objective(Recorder(), stages, StageTimestepSampler(3).sample(3))
    with pytest.raises(TypeError, match="StageTimesteps"):
        objective(Recorder(), stages, (ts.t, ts.stage, ts.mask))
    with pytest.raises(ValueError, match="expected 2 stages, got 1"):
        objective(Recorder(), stages[:1], ts)
    with pytest.raises(ValueError, match=r"noise\[1\] has shape"):
        objective(Recorder(), stages, ts, noise=[torch.randn_like(stages[0])] * 2)
    with pytest.raises(ValueError, match="scales must have one entry per stage"):
        DFMObjective(2, scales=[1.0])
    with pytest.raises(ValueError, match="positive"):
        DFMObjective(2, scales=[1.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        DFMObjective(2, stage_weights=[1.0, -1.0])


def test_estimate_stage_scales() -> None:
    g = _gen(0)
    data = [(torch.randn(64, 1, 8, 8, generator=g) * 3 + 1, torch.zeros(64)) for _ in range(4)]
    scales = estimate_stage_scales(IdentityDecomposition(), data)
    assert scales.shape == (1,) and abs(scales.item() - 3.0) < 0.1
    full = torch.cat([x for x, _ in data])
    torch.testing.assert_close(scales, full.std(unbiased=False).reshape(1), rtol=1e-5, atol=0)
    first = estimate_stage_scales(IdentityDecomposition(), data, max_batches=1)
    torch.testing.assert_close(first, data[0][0].std(unbiased=False).reshape(1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="zero spread"):
        estimate_stage_scales(IdentityDecomposition(), torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="no data"):
        estimate_stage_scales(IdentityDecomposition(), [])


def test_estimate_stage_scales_laplacian() -> None:
    laplacian = pytest.importorskip("dfm_ext.decompositions.laplacian")
    pyr = laplacian.LaplacianPyramid(factors=(2, 1))
    x = torch.randn(16, 3, 16, 16, generator=_gen(0))
    scales = estimate_stage_scales(pyr, x)
    expected = torch.stack([s.std(unbiased=False) for s in pyr.decompose(x)])
    torch.testing.assert_close(scales, expected, rtol=1e-5, atol=0)
    # White noise: the coarse stage (2x2 block mean) has std 1/2.
    assert abs(scales[0].item() - 0.5) < 0.05
