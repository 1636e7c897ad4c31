"""ReducibleAllocation (issue 28): stage probabilities and current-time placement from where the
loss still falls, driven through StageTimestepSampler in a closed loop with a toy learner whose
per-sample loss depends on how many samples each stage (and time bin) has had."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dfm_ext.process.allocation import make_allocation
from dfm_ext.process.reducible import ReducibleAllocation, stage_errors
from dfm_ext.process.objective import DFMObjective
from dfm_ext.process.timesteps import StageTimestepSampler

FAST = {"warmup": 20, "window": 10, "windows": 4}


class ToyLearner:
    """Per-sample loss of stage ``s`` in time bin ``j`` is ``loss(s, j, n)``, where ``n[s, j]``
    counts the samples that cell has had so far, plus Gaussian noise."""

    def __init__(self, loss, num_stages: int = 2, bins: int = 4, noise: float = 0.0, seed: int = 0) -> None:
        self.loss, self.bins, self.noise = loss, bins, noise
        self.n = torch.zeros(num_stages, bins, dtype=torch.float64)
        self.g = torch.Generator().manual_seed(seed)

    def errors(self, sampler: StageTimestepSampler, ts) -> torch.Tensor:
        bins = sampler.time_bins(ts, self.bins)
        s = sampler.num_stages
        e = torch.empty(ts.batch_size, s, dtype=torch.float64)
        for b in range(ts.batch_size):
            k, j = int(ts.stage[b]), int(bins[b])
            e[b] = self.loss(k, j, self.n)
            self.n[k, j] += 1
        return e + self.noise * torch.randn(e.shape, generator=self.g, dtype=torch.float64)


def run(sampler: StageTimestepSampler, learner: ToyLearner, steps: int, batch: int = 64, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ts = sampler.sample(batch, generator=g)
        sampler.update(torch.full((sampler.num_stages,), float("nan")), timesteps=ts, errors=learner.errors(sampler, ts))


def test_a_stage_whose_loss_stops_falling_loses_probability() -> None:
    # stage 0 is flat, stage 1 keeps falling: stage 1 must gain far beyond its prior of 0.1 ...
    a = ReducibleAllocation((0.9, 0.1), **FAST)
    s = StageTimestepSampler(2, allocation=a)
    run(s, ToyLearner(lambda k, j, n: 1.0 if k == 0 else 0.2 + 0.8 * torch.exp(-n[1].sum() / 20000), noise=0.01), 300)
    assert float(a.probabilities()[1]) > 0.8
    # ... and the other way round: stage 1 flat, stage 0 falling: stage 1 goes to the floor.
    b = ReducibleAllocation((0.5, 0.5), **FAST)
    s = StageTimestepSampler(2, allocation=b)
    run(s, ToyLearner(lambda k, j, n: 1.0 if k == 1 else 0.2 + 0.8 * torch.exp(-n[0].sum() / 20000), noise=0.01), 300)
    assert float(b.probabilities()[1]) < 0.15  # from 0.5; the floor is 0.05
    assert float(b.probabilities().sum()) == pytest.approx(1.0, abs=1e-12)


def test_equal_gain_per_sample_keeps_the_prior_whatever_the_sample_counts() -> None:
    # Both stages lose the same amount per sample they get; stage 0 gets 9x the samples, so its
    # loss falls 9x faster per step. Judged per step it would keep taking more (rich get richer);
    # judged per sample neither stage is worth more, and p stays at the prior (no sqrt(prior)
    # drift as ProgressAllocation's, no pull to equal shares either).
    a = ReducibleAllocation((0.9, 0.1), time_bins=1, **FAST)
    s = StageTimestepSampler(2, allocation=a)
    run(s, ToyLearner(lambda k, j, n: 1.0 - 2e-5 * n[k].sum(), bins=1), 300)
    assert a.calls == 300
    assert torch.allclose(a.probabilities(), torch.tensor([0.9, 0.1], dtype=torch.float64), atol=0.02)


def test_the_stage_that_buys_more_per_sample_gains_and_gives_back_as_it_catches_up() -> None:
    # loss_s = 1 / sqrt(1 + n_s / 1000): both stages alike, but stage 1 starts with 1/9 of the
    # samples, so its gain per sample is far larger: p_1 must rise well above its prior 0.1; as
    # its samples catch up its gain falls and p_1 comes back down, never running to a floor.
    a = ReducibleAllocation((0.9, 0.1), time_bins=1, **FAST)
    s = StageTimestepSampler(2, allocation=a)
    learner = ToyLearner(lambda k, j, n: 1.0 / (1 + n[k].sum() / 1000) ** 0.5, bins=1)
    p1 = []
    for i in range(6):
        run(s, learner, 100, seed=i)
        p1.append(float(a.probabilities()[1]))
    assert max(p1) > 0.3 and p1[-1] < max(p1) and min(p1[1:]) > a.floor + 0.05, p1


def test_time_weights_move_to_the_bin_whose_loss_falls_and_keep_the_floor_elsewhere() -> None:
    a = ReducibleAllocation((0.5, 0.5), time_bins=4, time_floor=0.5, **FAST)
    s = StageTimestepSampler(2, probabilities=(0.5, 0.5), allocation=a)
    # every cell flat except stage 1's last time bin (times nearest the data)
    run(s, ToyLearner(lambda k, j, n: 1.0 if (k, j) != (1, 3) else 0.1 + 0.9 * torch.exp(-n[1, 3] / 5000), noise=0.005), 300)
    w = a.time_weights()
    assert torch.allclose(w.sum(1), torch.ones(2, dtype=torch.float64))
    assert float(w[1, 3]) > 0.55  # from its 0.25 base share towards the most it can have, 1 - 3 * 0.5 / 4
    assert bool((w[1, :3] >= 0.5 / 4 - 1e-12).all() and (w[1, :3] < 0.16).all())  # the others near their floor
    assert float(a.probabilities()[1]) > 0.8  # the only cell that learns is stage 1's
    # the sampler draws stage 1's current times accordingly
    ts = s.sample(40000, generator=torch.Generator().manual_seed(5))
    fine = ts.stage == 1
    freq = torch.bincount(s.time_bins(ts, 4)[fine], minlength=4).double() / fine.sum()
    assert torch.allclose(freq, w[1], atol=0.02)


def test_placed_times_are_the_base_draws_with_uniform_weights_and_follow_the_weights_otherwise() -> None:
    a = ReducibleAllocation((0.5, 0.5), time_bins=4)
    placed = StageTimestepSampler(2, probabilities=(0.5, 0.5), current=[(0.0, 1.0), (1.0, 0.5)], allocation=a)
    base = StageTimestepSampler(2, probabilities=(0.5, 0.5), current=[(0.0, 1.0), (1.0, 0.5)])
    x = placed.sample(2000, generator=torch.Generator().manual_seed(3))
    y = base.sample(2000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x.stage, y.stage) and torch.equal(x.mask, y.mask)
    assert torch.allclose(x.t, y.t, atol=1e-6)  # the same random numbers, an identity warp
    a._w = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    z = placed.sample(200000, generator=torch.Generator().manual_seed(4))
    bins = placed.time_bins(z, 4)
    for k in (0, 1):
        m = z.stage == k
        assert torch.allclose(torch.bincount(bins[m], minlength=4).double() / m.sum(), a._w[k], atol=0.01)
    # "uniform" mode: the base is U(0, 1) and its quartile bins are [0, .25), ...
    u = StageTimestepSampler(2, probabilities=(0.5, 0.5), mode="uniform", allocation=a)
    z = u.sample(100000, generator=torch.Generator().manual_seed(6))
    cur = z.t.gather(1, z.stage[:, None])[:, 0]
    assert abs(float((cur[z.stage == 1] >= 0.75).double().mean()) - 0.7) < 0.01


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor on the host (a GPU sync): .item()/bool()/float() and nonzero."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_host_read_in_update_and_none_added_to_sample() -> None:
    a = ReducibleAllocation((0.9, 0.1), **FAST)
    s = StageTimestepSampler(2, allocation=a)
    fixed = StageTimestepSampler(2)
    learner = ToyLearner(lambda k, j, n: 1.0 / (1 + 1e-3 * n[k].sum()), noise=0.01)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(60):
        ts = s.sample(32, generator=g)
        batches.append((ts, learner.errors(s, ts)))
    per_stage = torch.tensor([0.5, 0.5])
    with _HostReads() as reads:  # update: window closes and reallocations included (60 > 20 + 4 * 10)
        for ts, e in batches:
            s.update(per_stage, timesteps=ts, errors=e)
    assert reads.count == 0
    assert a.calls == 60 and not torch.equal(a.time_weights(), torch.full((2, 4), 0.25, dtype=torch.float64))
    # sample(): StageTimesteps checks values on the host for CPU tensors in eager mode (by design,
    # dfm_ext.validation); the allocation's placement must not add a single read to that.
    with _HostReads() as with_alloc:
        s.sample(32, generator=torch.Generator().manual_seed(1))
    with _HostReads() as without:
        fixed.sample(32, generator=torch.Generator().manual_seed(1))
    assert with_alloc.count == without.count


def _drive(a: ReducibleAllocation, steps: int, start: int = 0) -> list[torch.Tensor]:
    s = StageTimestepSampler(2, allocation=a)
    draws = []
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        ts = s.sample(16, generator=g)
        draws.append(ts.t)
        e = torch.rand(16, 2, generator=g, dtype=torch.float64) * 0.1 + 1.0 / (1 + 0.01 * i) ** torch.tensor([0.5, 1.0])
        s.update(torch.zeros(2), timesteps=ts, errors=e)
    return draws


def test_state_round_trips_bitwise_and_the_run_continues_exactly() -> None:
    straight = ReducibleAllocation((0.8, 0.2), **FAST)
    first = _drive(straight, 37)  # stops mid-window, after reallocations began
    buf = io.BytesIO()
    torch.save(straight.state_dict(), buf)
    buf.seek(0)
    resumed = ReducibleAllocation((0.8, 0.2), **FAST)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for key, value in straight.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.state_dict()[key]), key
    a, b = _drive(straight, 40, start=37), _drive(resumed, 40, start=37)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(straight.probabilities(), resumed.probabilities())
    assert torch.equal(straight.time_weights(), resumed.time_weights())
    assert not torch.equal(straight.probabilities(), torch.tensor([0.8, 0.2], dtype=torch.float64))  # it did move
    again = _drive(ReducibleAllocation((0.8, 0.2), **FAST), 77)  # deterministic: the same run twice
    assert all(torch.equal(x, y) for x, y in zip(first + a, again))
    with pytest.raises(ValueError, match="window"):
        ReducibleAllocation((0.8, 0.2), warmup=20, window=11, windows=4).load_state_dict(straight.state_dict())
    with pytest.raises(ValueError, match="'progress'"):
        straight.load_state_dict({"kind": "progress"})


def test_stage_errors_are_the_objectives_per_sample_terms() -> None:
    torch.manual_seed(0)
    stages = [torch.randn(6, 3, 4, 4), torch.randn(6, 3, 8, 8)]
    ts = StageTimestepSampler(2, probabilities=(0.5, 0.5)).sample(6, generator=torch.Generator().manual_seed(1))

    def model(noisy, t, stage, mask, **cond):
        return [0.5 * z for z in noisy]

    out = DFMObjective(2)(model, stages, ts, generator=torch.Generator().manual_seed(2))
    e = stage_errors(out)
    assert e.shape == (6, 2) and not e.requires_grad
    m = ts.mask.double()
    expected = (e.double() * m).sum(0) / m.sum(0)
    assert torch.allclose(expected.float(), out.per_stage, equal_nan=True, atol=1e-6)
    assert torch.allclose(out.loss.double(), (e.double() * m).sum(1).mean(), atol=1e-6)


def test_bad_input_names_the_value() -> None:
    with pytest.raises(ValueError, match="time_bins.*0"):
        ReducibleAllocation((0.5, 0.5), time_bins=0)
    with pytest.raises(ValueError, match="windows.*1"):
        ReducibleAllocation((0.5, 0.5), windows=1)
    with pytest.raises(ValueError, match="time_floor.*0"):
        ReducibleAllocation((0.5, 0.5), time_floor=0.0)
    with pytest.raises(ValueError, match=r"below floor=0.05"):
        ReducibleAllocation((0.99, 0.01))
    with pytest.raises(ValueError, match="rate.*1.5"):
        ReducibleAllocation((0.5, 0.5), rate=1.5)
    a = ReducibleAllocation((0.5, 0.5))
    with pytest.raises(ValueError, match=r"\[B\].*\(4,\), \(3,\)"):
        a.update(None, stage=torch.zeros(4, dtype=torch.long), bins=torch.zeros(3, dtype=torch.long), errors=torch.zeros(4))
    s = StageTimestepSampler(2, allocation=a)
    ts = s.sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="stage_errors"):
        s.update(torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[4, 2\].*\(4, 3\)"):
        s.update(torch.zeros(2), timesteps=ts, errors=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="num_bins.*0"):
        s.time_bins(ts, 0)
    built = make_allocation({"kind": "reducible", "time_bins": 2, "window": 5}, 2, prior=(0.7, 0.3))
    assert isinstance(built, ReducibleAllocation) and built.num_time_bins == 2 and built.prior_values == (0.7, 0.3)
    assert isinstance(make_allocation("reducible", 3), ReducibleAllocation)
