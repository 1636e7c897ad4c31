"""StageTimestepSampler / StageTimesteps: the training distribution of per-stage times."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext.process.timesteps import StageTimesteps, StageTimestepSampler, default_stage_probabilities


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@given(
    num_stages=st.integers(1, 4),
    batch=st.integers(1, 64),
    mode=st.sampled_from(["dfm", "tied", "uniform"]),
    seed=st.integers(0, 2**16),
)
def test_times_in_range_later_stages_zero_and_masked(num_stages: int, batch: int, mode: str, seed: int) -> None:
    ts = StageTimestepSampler(num_stages, mode=mode).sample(batch, generator=_gen(seed))
    assert ts.t.shape == (batch, num_stages) and ts.t.dtype == torch.float32
    assert ts.stage.shape == (batch,) and ts.stage.dtype == torch.long
    assert ts.mask.dtype == torch.bool
    assert bool(((ts.t >= 0) & (ts.t <= 1)).all())
    expected_mask = torch.arange(num_stages)[None, :] <= ts.stage[:, None]
    assert torch.equal(ts.mask, expected_mask)
    assert bool((ts.t[~ts.mask] == 0).all())
    # Active stages are strictly inside (0, 1) for the logit-normal (and almost surely for U(0, 1)).
    assert bool((ts.t[ts.mask] > 0).all())


@given(num_stages=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_earlier_stages_less_noisy_on_average(num_stages: int, seed: int) -> None:
    probs = [1.0 / num_stages] * num_stages
    ts = StageTimestepSampler(num_stages, probabilities=probs).sample(4096, generator=_gen(seed))
    current = ts.t.gather(1, ts.stage[:, None]).squeeze(1)
    earlier = ts.mask & (torch.arange(num_stages)[None, :] < ts.stage[:, None])
    # Means are sigmoid(0 + n) ~ 0.5 and sigmoid(1.5 + n) ~ 0.77: far apart at this batch size.
    assert ts.t[earlier].mean() > current.mean() + 0.15


@given(
    weights=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_stage_frequencies_match_probabilities(weights: list[int], seed: int) -> None:
    probs = [w / sum(weights) for w in weights]
    n = 20_000
    ts = StageTimestepSampler(len(probs), probabilities=probs).sample(n, generator=_gen(seed))
    counts = torch.bincount(ts.stage, minlength=len(probs)).double()
    for s, p in enumerate(probs):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[s].item() - n * p) <= 5 * sd + 1e-9, (s, counts.tolist(), probs)


def test_default_probabilities_paper_two_stage() -> None:
    assert StageTimestepSampler(2).probabilities == (0.9, 0.1)
    assert default_stage_probabilities(1) == (1.0,)
    p = default_stage_probabilities(5)
    assert p[0] == 0.9 and math.isclose(sum(p), 1.0) and len(set(p[1:])) == 1


@given(mode=st.sampled_from(["dfm", "tied", "uniform"]), seed=st.integers(0, 2**16))
def test_deterministic_under_generator(mode: str, seed: int) -> None:
    sampler = StageTimestepSampler(3, mode=mode)
    a = sampler.sample(32, generator=_gen(seed))
    b = sampler.sample(32, generator=_gen(seed), device="cpu")
    assert torch.equal(a.t, b.t) and torch.equal(a.stage, b.stage) and torch.equal(a.mask, b.mask)
    c = sampler.sample(32, generator=_gen(seed + 1))
    assert not torch.equal(a.t, c.t)


def test_logit_normal_parameters() -> None:
    ts = StageTimestepSampler(2, probabilities=(0.5, 0.5)).sample(20_000, generator=_gen(0))
    current = ts.t.gather(1, ts.stage[:, None]).squeeze(1)
    earlier = ts.t[:, 0][ts.stage == 1]
    # The median of sigmoid(loc + scale * n) is sigmoid(loc).
    assert abs(current.median().item() - 0.5) < 0.02
    assert abs(earlier.median().item() - torch.sigmoid(torch.tensor(1.5)).item()) < 0.02
    # logit of the samples is N(loc, scale)
    logit = torch.logit(current.double())
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1.0) < 0.05


def test_tied_mode_shares_current_time() -> None:
    ts = StageTimestepSampler(3, probabilities=(0.2, 0.3, 0.5), mode="tied").sample(256, generator=_gen(1))
    current = ts.t.gather(1, ts.stage[:, None])
    assert torch.equal(torch.where(ts.mask, current.expand_as(ts.t), torch.zeros(())), ts.t)


def test_uniform_mode_current_time_is_uniform() -> None:
    ts = StageTimestepSampler(1, mode="uniform").sample(20_000, generator=_gen(2))
    t = ts.t[:, 0]
    # U(0, 1) puts 10% below 0.1; the logit-normal(0, 1) only about 1.4%.
    assert abs((t < 0.1).double().mean().item() - 0.1) < 0.01
    assert abs(t.mean().item() - 0.5) < 0.01
    logit_normal = StageTimestepSampler(1).sample(20_000, generator=_gen(2)).t[:, 0]
    assert (logit_normal < 0.1).double().mean().item() < 0.03


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_stages": 2, "probabilities": (0.5, 0.4)}, "sum to 1"),
        ({"num_stages": 2, "probabilities": (1.0,)}, "1 entries for 2 stages"),
        ({"num_stages": 2, "probabilities": (1.2, -0.2)}, "non-negative"),
        ({"num_stages": 2, "probabilities": (float("nan"), 1.0)}, "finite"),
        ({"num_stages": 0}, "num_stages"),
        ({"num_stages": 2, "mode": "shared"}, "mode"),
        ({"num_stages": 2, "current": (0.0, 0.0)}, "positive scale"),
        ({"num_stages": 2, "earlier": (1.5,)}, "pair"),
    ],
)
def test_bad_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StageTimestepSampler(**kwargs)


def test_bad_batch_size_raises() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        StageTimestepSampler(2).sample(0)


def test_stage_timesteps_validation() -> None:
    t = torch.zeros(3, 2)
    stage = torch.zeros(3, dtype=torch.long)
    mask = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\)"):
        StageTimesteps(t, stage, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        StageTimesteps(torch.zeros(3), stage, mask)
    with pytest.raises(ValueError, match="stage must have shape"):
        StageTimesteps(t, torch.zeros(4, dtype=torch.long), mask)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        StageTimesteps(t, torch.full((3,), 2), mask)
    with pytest.raises(TypeError, match="torch.long"):
        StageTimesteps(t, stage.int(), mask)
    with pytest.raises(TypeError, match="torch.bool"):
        StageTimesteps(t, stage, mask.long())
    with pytest.raises(TypeError, match="floating point"):
        StageTimesteps(t.long(), stage, mask)
