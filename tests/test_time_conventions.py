"""dfm_ext.conventions: converters between t (0 = noise) and other codebases' conventions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext import conventions as tc

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(t=unit)
def test_sigma_round_trip(t: float) -> None:
    assert tc.sigma_to_t(tc.t_to_sigma(t)) == pytest.approx(t, abs=1e-15)
    assert tc.t_to_sigma(t) == pytest.approx(1 - t)


@given(t=unit, n=st.sampled_from([1000, 1001, 50, 2]))
def test_timestep_round_trip(t: float, n: int) -> None:
    ts = tc.t_to_timestep(t, n)
    assert 0 <= ts <= n
    assert tc.timestep_to_t(ts, n) == pytest.approx(t, abs=1e-12)


@given(t=unit, n=st.sampled_from([1000, 50, 2]))
def test_discrete_round_trip(t: float, n: int) -> None:
    k = tc.t_to_discrete(t, n)
    assert isinstance(k, int) and 0 <= k <= n - 1
    assert abs(tc.discrete_to_t(k, n) - t) <= 0.5 / (n - 1) + 1e-12
    assert tc.t_to_discrete(tc.discrete_to_t(k, n), n) == k


def test_discrete_tensor_round_trip_is_exact() -> None:
    k = torch.arange(1000)
    t = tc.discrete_to_t(k)
    assert t.dtype == torch.float32
    assert torch.equal(tc.t_to_discrete(t), k)
    assert tc.t_to_discrete(torch.tensor([0.0, 1.0])).tolist() == [999, 0]
    assert tc.t_to_discrete(torch.tensor(0.5)).dtype == torch.long


def test_known_values_and_direction() -> None:
    assert tc.t_to_sigma(0.0) == 1.0 and tc.t_to_sigma(1.0) == 0.0  # noise is sigma 1
    assert tc.t_to_timestep(0.0) == 1000.0 and tc.t_to_timestep(1.0) == 0.0
    assert tc.t_to_discrete(0.0) == 999 and tc.t_to_discrete(1.0) == 0
    x = torch.tensor([0.1, 0.9], dtype=torch.float64)
    torch.testing.assert_close(tc.t_to_timestep(x), torch.tensor([900.0, 100.0], dtype=torch.float64))


def test_matches_diffusers_flow_match_scheduler() -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(10)
    t = tc.sigma_to_t(sched.sigmas[:-1].double())
    torch.testing.assert_close(tc.t_to_timestep(t).float(), sched.timesteps.float(), rtol=0, atol=1e-3)


def test_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="t must lie"):
        tc.t_to_sigma(1.5)
    with pytest.raises(ValueError, match="t must lie"):
        tc.t_to_discrete(torch.tensor([-0.1, 0.5]))
    with pytest.raises(ValueError, match="sigma must lie"):
        tc.sigma_to_t(float("nan"))
    with pytest.raises(ValueError, match="timestep must lie"):
        tc.timestep_to_t(1001.0)
    with pytest.raises(ValueError, match="k must lie"):
        tc.discrete_to_t(1000)
    with pytest.raises(ValueError, match="whole numbers"):
        tc.discrete_to_t(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        tc.t_to_discrete(0.5, 1)
    with pytest.raises(TypeError):
        tc.t_to_sigma("0.5")  # type: ignore[arg-type]
