"""DFMSampler: exactness on known velocity fields, Heun vs Euler, CFG, masking, previews, errors."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from dfm_ext.decompositions.identity import IdentityDecomposition
from dfm_ext.process.sampler import DFMSampler, SampleOutput
from dfm_ext.process.schedule import StageScheduler


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TwoScale:
    """A hand-written 2-stage decomposition: 2x2 block mean, and the residual at full resolution."""

    num_stages = 2

    def __repr__(self) -> str:  # stable test ids across pytest-xdist workers
        return "TwoScale()"

    def decompose(self, x: Tensor) -> list[Tensor]:
        coarse = F.avg_pool2d(x, 2)
        return [coarse, x - F.interpolate(coarse, scale_factor=2, mode="nearest")]

    def recompose(self, stages: Sequence[Tensor]) -> Tensor:
        return F.interpolate(stages[0], scale_factor=2, mode="nearest") + stages[1]

    def stage_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        b, c, h, w = shape
        return [(b, c, h // 2, w // 2), (b, c, h, w)]

    def preview(self, stages: Sequence[Tensor], upto: int) -> Tensor:
        return stages[0] if upto == 0 else self.recompose(stages)


def _decompositions() -> list:
    out = [(IdentityDecomposition(), (1,)), (TwoScale(), (2, 1))]
    try:
        from dfm_ext.decompositions.laplacian import LaplacianPyramid

        out += [(LaplacianPyramid(factors=(2, 1)), (2, 1)), (LaplacianPyramid(factors=(4, 2, 1)), (4, 2, 1))]
    except ImportError:  # pragma: no cover - while the decompositions are being built
        pass
    return out


def _other_decompositions() -> list:
    out = []
    for module, name in (("dfm_ext.decompositions.wavelet", "WaveletDecomposition"), ("dfm_ext.decompositions.dct", "DCTDecomposition")):
        try:
            out.append(getattr(importlib.import_module(module), name)())
        except ImportError:  # pragma: no cover - optional dependency missing
            pass
    return out


DECOMPOSITIONS = _decompositions()
OTHER_DECOMPOSITIONS = _other_decompositions()  # slower per call: checked once, not under hypothesis


def point_target_model(targets: list[Tensor]):
    """The exact flow to the point ``x1``: ``v_s = (x1_s - z_s) / (1 - t_s)`` per stage."""

    def model(stages, t, stage, mask, **cond):
        return [(x1 - z) / (1 - t[:, s]).view(-1, *[1] * (z.ndim - 1)) for s, (x1, z) in enumerate(zip(targets, stages))]

    return model


def gaussian_model(mu: float, sigma: float):
    """The exact FM velocity for data ``N(mu, sigma^2)`` and noise ``N(0, 1)``, per stage."""

    def model(stages, t, stage, mask, **cond):
        out = []
        for s, z in enumerate(stages):
            ts = t[:, s].double().view(-1, *[1] * (z.ndim - 1))
            var = ts**2 * sigma**2 + (1 - ts) ** 2
            out.append((mu + (ts * sigma**2 - (1 - ts)) / var * (z.double() - ts * mu)).to(z.dtype))
        return out

    return model


def _schedule(num_stages: int, steps: int = 4) -> StageScheduler:
    return StageScheduler(steps=(steps,) * num_stages, thresholds=(0.8,) * (num_stages - 1))


@pytest.mark.parametrize("decomposition, factors", DECOMPOSITIONS, ids=lambda d: repr(d)[:40])
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 6), batch=st.integers(1, 3))
def test_euler_lands_on_point_target(decomposition, factors, seed: int, steps: int, batch: int) -> None:
    _check_point_target(decomposition, seed, steps, batch)


@pytest.mark.parametrize("decomposition", OTHER_DECOMPOSITIONS, ids=lambda d: repr(d)[:40])
def test_euler_lands_on_point_target_other_decompositions(decomposition) -> None:
    _check_point_target(decomposition, seed=0, steps=3, batch=2)


def _check_point_target(decomposition, seed: int, steps: int, batch: int) -> None:
    s = decomposition.num_stages
    x1 = torch.randn(batch, 2, 8, 8, generator=_gen(seed))
    targets = decomposition.decompose(x1)
    sampler = DFMSampler(decomposition, _schedule(s, steps))
    out = sampler.sample(point_target_model(targets), tuple(x1.shape), generator=_gen(seed + 1))
    assert isinstance(out, SampleOutput)
    torch.testing.assert_close(out.x, x1, rtol=0, atol=1e-5)
    for got, want in zip(out.stages, targets):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Each preview decodes the clean estimate, which for this field is the target itself.
    assert len(out.previews) == s
    for k, preview in enumerate(out.previews):
        torch.testing.assert_close(preview, decomposition.preview(targets, k), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.previews[-1], out.x)


@pytest.mark.parametrize("decomposition, factors", DECOMPOSITIONS, ids=lambda d: repr(d)[:40])
def test_heun_beats_euler_on_gaussian_target(decomposition, factors) -> None:
    s = decomposition.num_stages
    mu, sigma = 1.5, 0.3
    shape = (4, 1, 8, 8)
    noise = [torch.randn(sh, generator=_gen(i)) for i, sh in enumerate(decomposition.stage_shapes(shape))]
    # The exact flow maps noise z to mu + sigma * z, stage by stage.
    exact = [mu + sigma * n for n in noise]
    errors = {}
    for method in ("euler", "heun"):
        sampler = DFMSampler(decomposition, _schedule(s, 8), method=method)
        out = sampler.sample(gaussian_model(mu, sigma), noise)
        errors[method] = max((a - b).abs().max().item() for a, b in zip(out.stages, exact))
    assert errors["heun"] < 0.1 * errors["euler"], errors
    assert errors["euler"] > 1e-3  # the comparison is not vacuous


def test_single_stage_matches_plain_flow_matching_loop() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))

    def model(stages, t, stage, mask):
        return [net(stages[0]) * (1 + t[:, :1, None, None])]

    n = 7
    noise = torch.randn(2, 3, 8, 8, generator=_gen(3))
    seen = []
    sampler = DFMSampler(IdentityDecomposition(), StageScheduler(steps=(n,), thresholds=()))
    out = sampler.sample(model, [noise], callback=lambda i, t, stages: seen.append((i, t.clone(), stages[0].clone())))

    ts = torch.linspace(0, 1, n + 1)
    x = noise.clone()
    with torch.no_grad():
        for i in range(n):
            v = net(x) * (1 + ts[i])
            x = x + (ts[i + 1] - ts[i]) * v
            assert seen[i][0] == i
            torch.testing.assert_close(seen[i][1], ts[i + 1 : i + 2])
            torch.testing.assert_close(seen[i][2], x)
    torch.testing.assert_close(out.x, x)
    assert len(seen) == n


class Recorder:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[dict] = []

    def __call__(self, stages, t, stage, mask, **cond):
        self.calls.append({"stages": [z.clone() for z in stages], "t": t.clone(), "stage": stage.clone(), "mask": mask.clone(), "cond": cond})
        return self.inner(stages, t, stage, mask, **cond)


def test_inactive_stages_fed_as_zeros_with_mask_off() -> None:
    d = TwoScale()
    sched = StageScheduler(steps=(3, 2), thresholds=(0.7,))
    rec = Recorder(lambda stages, t, stage, mask: [torch.ones_like(z) for z in stages])
    sampler = DFMSampler(d, sched)
    sampler.sample(rec, (2, 1, 4, 4), generator=_gen(0))
    times = sched.timesteps()
    active = sched.active_stage()
    assert len(rec.calls) == sched.num_steps
    for i, call in enumerate(rec.calls):
        k = int(active[i])
        assert torch.equal(call["stage"], torch.full((2,), k))
        assert torch.equal(call["mask"], (torch.arange(2) <= k).expand(2, 2))
        assert torch.equal(call["t"], times[i].expand(2, 2))
        if k == 0:
            assert bool((call["stages"][1] == 0).all())
        else:
            assert bool((call["stages"][1] != 0).any())


class Conditional(nn.Module):
    """Velocity depends on a label tensor ``y`` [B] and the stage; has a null condition."""

    def forward(self, stages, t, stage, mask, y):
        return [z * 0.1 * (s + 1) + y.view(-1, *[1] * (z.ndim - 1)).to(z.dtype) * (s + 1) for s, z in enumerate(stages)]

    def null_condition(self, y):
        return {"y": torch.zeros_like(y)}


def _guided_by_hand(model, weights, y, y_null):
    """u + w (c - u) from two separate calls, per stage."""

    def guided(stages, t, stage, mask, **cond):
        c = model(stages, t, stage, mask, y=y)
        u = model(stages, t, stage, mask, y=y_null)
        return [ui + w * (ci - ui) for ci, ui, w in zip(c, u, weights)]

    return guided


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_cfg_scale_one_is_conditional_model_in_one_pass(method: str) -> None:
    d, model = TwoScale(), Conditional()
    y = torch.tensor([1.0, -2.0])
    rec = Recorder(model)
    a = DFMSampler(d, _schedule(2), method=method, guidance_scale=1.0).sample(rec, (2, 1, 4, 4), generator=_gen(0), y=y)
    assert all(call["stages"][0].shape[0] == 2 for call in rec.calls), "no unconditional pass at scale 1"
    b = DFMSampler(d, _schedule(2), method=method).sample(lambda *a: model(*a, y=y), (2, 1, 4, 4), generator=_gen(0))
    assert torch.equal(a.x, b.x)


@pytest.mark.parametrize("weights", [(3.0, 3.0), (4.0, 1.5), (1.0, 2.0)])
def test_cfg_equals_two_separate_calls(weights) -> None:
    d, model = TwoScale(), Conditional()
    y = torch.tensor([1.0, -2.0])
    uncond = {"y": torch.tensor([0.5, 0.5])}
    scale = weights[0] if weights[0] == weights[1] else weights
    rec = Recorder(model)
    out = DFMSampler(d, _schedule(2), guidance_scale=scale).sample(rec, (2, 1, 4, 4), generator=_gen(0), uncond=uncond, y=y)
    # one batched call per step: cond first, uncond second
    assert all(torch.equal(c["cond"]["y"], torch.tensor([1.0, -2.0, 0.5, 0.5])) for c in rec.calls)
    hand = _guided_by_hand(model, weights, y, uncond["y"])
    ref = DFMSampler(d, _schedule(2)).sample(hand, (2, 1, 4, 4), generator=_gen(0))
    torch.testing.assert_close(out.x, ref.x)
    if weights[0] != weights[1]:
        # Conditional's stages evolve independently, so stage 1's own scale must leave stage 0 alone.
        uniform = DFMSampler(d, _schedule(2), guidance_scale=weights[0]).sample(
            model, (2, 1, 4, 4), generator=_gen(0), uncond=uncond, y=y
        )
        torch.testing.assert_close(uniform.stages[0], out.stages[0])
        assert not torch.allclose(uniform.stages[1], out.stages[1])


def test_cfg_uses_null_condition_or_complains() -> None:
    d, model = TwoScale(), Conditional()
    y = torch.tensor([1.0, -2.0])
    out = DFMSampler(d, _schedule(2), guidance_scale=2.0).sample(model, (2, 1, 4, 4), generator=_gen(0), y=y)
    ref = DFMSampler(d, _schedule(2)).sample(_guided_by_hand(model, (2.0, 2.0), y, torch.zeros(2)), (2, 1, 4, 4), generator=_gen(0))
    torch.testing.assert_close(out.x, ref.x)
    plain = lambda stages, t, stage, mask, y: model(stages, t, stage, mask, y)  # noqa: E731
    with pytest.raises(ValueError, match="null_condition"):
        DFMSampler(d, _schedule(2), guidance_scale=2.0).sample(plain, (2, 1, 4, 4), y=y)
    with pytest.raises(ValueError, match="keys"):
        DFMSampler(d, _schedule(2), guidance_scale=2.0).sample(model, (2, 1, 4, 4), y=y, uncond={"z": y})
    with pytest.raises(ValueError, match="shape"):
        DFMSampler(d, _schedule(2), guidance_scale=2.0).sample(model, (2, 1, 4, 4), y=y, uncond={"y": y[:1]})


def test_scales_are_undone() -> None:
    d = TwoScale()
    x1 = torch.randn(2, 1, 4, 4, generator=_gen(0))
    scales = torch.tensor([2.0, 0.25])
    standardised = [x / c for x, c in zip(d.decompose(x1), scales)]
    out = DFMSampler(d, _schedule(2), scales=scales).sample(point_target_model(standardised), (2, 1, 4, 4), generator=_gen(1))
    torch.testing.assert_close(out.x, x1, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.previews[0], d.decompose(x1)[0], rtol=0, atol=1e-5)


def test_deterministic_and_noise_list_equals_shape() -> None:
    d = TwoScale()
    model = Conditional()
    y = torch.tensor([1.0, 0.0])
    sampler = DFMSampler(d, _schedule(2))
    a = sampler.sample(model, (2, 1, 4, 4), generator=_gen(7), y=y)
    b = sampler.sample(model, (2, 1, 4, 4), generator=_gen(7), y=y)
    assert torch.equal(a.x, b.x)
    g = _gen(7)
    noise = [torch.randn(sh, generator=g) for sh in d.stage_shapes((2, 1, 4, 4))]
    c = sampler.sample(model, noise, y=y)
    assert torch.equal(a.x, c.x)
    assert not a.x.requires_grad


def test_bad_settings_and_model_outputs_raise() -> None:
    d = TwoScale()
    with pytest.raises(ValueError, match="method"):
        DFMSampler(d, method="rk4")
    with pytest.raises(ValueError, match="guidance_scale has 3 entries for 2 stages"):
        DFMSampler(d, guidance_scale=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="the scheduler has 1 stages, the decomposition 2"):
        DFMSampler(d, StageScheduler(steps=(10,), thresholds=()))
    with pytest.raises(TypeError, match="StageScheduler"):
        DFMSampler(d, scheduler=(30, 10))
    with pytest.raises(ValueError, match="scales"):
        DFMSampler(d, scales=[1.0, -1.0])
    sampler = DFMSampler(d, _schedule(2))
    with pytest.raises(ValueError, match="returned 1 stages, expected 2"):
        sampler.sample(lambda s, *a: s[:1], (2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"output for stage 0 has shape"):
        sampler.sample(lambda s, *a: [s[1], s[1]], (2, 1, 4, 4))
    with pytest.raises(ValueError, match="got 1 noise tensors for 2 stages"):
        sampler.sample(lambda s, *a: s, [torch.randn(2, 1, 2, 2)])
    with pytest.raises(TypeError, match="one tensor"):
        sampler.sample(lambda s, *a: s, torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(lambda s, *a: s, (2, 1, 0, 4))


def test_default_scheduler_is_paper_default() -> None:
    assert DFMSampler(TwoScale()).scheduler == StageScheduler(steps=(30, 10), thresholds=(0.9,))
    assert DFMSampler(IdentityDecomposition()).scheduler.steps == (40,)
