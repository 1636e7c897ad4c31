"""StageScheduler: the inference schedule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext.process.schedule import StageScheduler, shift_time


@st.composite
def schedulers(draw: st.DrawFn) -> StageScheduler:
    s = draw(st.integers(1, 4))
    steps = tuple(draw(st.lists(st.integers(1, 12), min_size=s, max_size=s)))
    thresholds = tuple(draw(st.lists(st.floats(0.01, 0.99), min_size=s - 1, max_size=s - 1)))
    shift = draw(st.one_of(st.none(), st.floats(0.2, 6.0)))
    return StageScheduler(steps, thresholds, shift=shift)


@given(sched=schedulers())
def test_schedule_invariants(sched: StageScheduler) -> None:
    t = sched.timesteps(dtype=torch.float64)
    n, s = sched.num_steps, sched.num_stages
    assert t.shape == (n + 1, s)
    assert n == sum(sched.steps)
    assert bool((t[0] == 0).all())
    assert bool((t[-1] == 1).all()), "every stage ends at exactly 1"
    assert bool((t.diff(dim=0) >= 0).all()), "monotone per stage"
    assert bool(((t >= 0) & (t <= 1)).all())
    active = sched.active_stage()
    assert active.shape == (n,) and active.dtype == torch.long
    assert torch.bincount(active, minlength=s).tolist() == list(sched.steps), "step counts exact"
    ends = sched.boundaries
    for k in range(s):
        start = ends[k - 1] if k else 0
        assert bool((t[: start + 1, k] == 0).all()), f"stage {k} is 0 until its segment starts"
        assert bool((t[start + 1 :, k] > 0).all()), f"stage {k} leaves 0 at the first step of its segment"
        assert bool((t[start:, :k].diff(dim=0) >= 0).all())
        if k < s - 1:
            # the stage joins exactly when the previous one is at its threshold
            assert t[ends[k], k].item() == sched.thresholds[k]
            assert t[ends[k], k + 1].item() == 0.0 and t[ends[k] + 1, k + 1].item() > 0.0
        # step i moves exactly the stages 0..active[i]
        moved = t.diff(dim=0)[start : ends[k]] > 0
        assert bool(moved[:, : k + 1].all()) and not bool(moved[:, k + 1 :].any())
    assert torch.equal(active, torch.repeat_interleave(torch.arange(s), torch.tensor(sched.steps)))


@given(sched=schedulers())
def test_earlier_stages_keep_remaining_noise_proportional(sched: StageScheduler) -> None:
    t = sched.timesteps(dtype=torch.float64)
    ends = sched.boundaries
    for k in range(1, sched.num_stages):
        rows = t[ends[k - 1] : ends[k] + 1]
        newest = 1 - rows[:, k]
        for j in range(k):
            earlier = 1 - rows[:, j]
            torch.testing.assert_close(earlier, earlier[0] * newest, rtol=0, atol=1e-12)


@given(n=st.integers(1, 200))
def test_single_stage_is_linear_flow_matching(n: int) -> None:
    sched = StageScheduler(steps=(n,), thresholds=())
    torch.testing.assert_close(sched.timesteps(dtype=torch.float64)[:, 0], torch.linspace(0, 1, n + 1, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(sched.timesteps()[:, 0], torch.linspace(0, 1, n + 1))
    assert sched.timesteps().dtype == torch.float32


def test_two_stage_paper_default() -> None:
    sched = StageScheduler()
    assert (sched.steps, sched.thresholds, sched.num_steps, sched.num_stages) == ((30, 10), (0.9,), 40, 2)
    t = sched.timesteps(dtype=torch.float64)
    torch.testing.assert_close(t[:31, 0], torch.linspace(0, 0.9, 31, dtype=torch.float64))
    assert bool((t[:31, 1] == 0).all())
    torch.testing.assert_close(t[30:, 1], torch.linspace(0, 1, 11, dtype=torch.float64))
    torch.testing.assert_close(t[30:, 0], torch.linspace(0.9, 1, 11, dtype=torch.float64))
    assert StageScheduler.default(2) == sched
    assert StageScheduler.default(1).timesteps().shape == (41, 1)
    assert StageScheduler.default(3).steps == (30, 10, 10)


def test_shift_matches_sd3_formula() -> None:
    shift = 3.0
    sched = StageScheduler(steps=(10,), thresholds=(), shift=shift)
    sigma = 1 - torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = 1 - shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(sched.timesteps(dtype=torch.float64)[:, 0], expected)
    assert torch.equal(StageScheduler((5, 3), (0.8,), shift=1.0).timesteps(), StageScheduler((5, 3), (0.8,)).timesteps())
    # shift > 1 spends more steps at high noise (small t)
    assert bool((sched.timesteps()[1:-1, 0] < torch.linspace(0, 1, 11)[1:-1]).all())
    with pytest.raises(ValueError, match="shift"):
        shift_time(torch.zeros(1), 0.0)


def test_pure_function_of_settings() -> None:
    a, b = StageScheduler((4, 2, 3), (0.6, 0.8)), StageScheduler((4, 2, 3), (0.6, 0.8))
    assert torch.equal(a.timesteps(), b.timesteps()) and a == b
    assert torch.equal(a.timesteps(), a.timesteps())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": (30, 10), "thresholds": ()}, "need 1 thresholds"),
        ({"steps": (30,), "thresholds": (0.9,)}, "need 0 thresholds"),
        ({"steps": (30, 0), "thresholds": (0.9,)}, r"steps\[1\]"),
        ({"steps": (30, -1), "thresholds": (0.9,)}, r"steps\[1\]"),
        ({"steps": (30, 2.5), "thresholds": (0.9,)}, r"steps\[1\]"),
        ({"steps": (), "thresholds": ()}, "at least one"),
        ({"steps": (30, 10), "thresholds": (1.0,)}, "strictly between"),
        ({"steps": (30, 10), "thresholds": (0.0,)}, "strictly between"),
        ({"steps": (3, 3, 3), "thresholds": (0.5, 1.5)}, r"thresholds\[1\]"),
        ({"steps": (30, 10), "thresholds": (0.9,), "shift": -1.0}, "shift"),
    ],
)
def test_bad_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StageScheduler(**kwargs)
