"""Automatic stage allocation (dfm_ext.process.allocation), the sampler's per-stage current logit-normal
and the recipes' ``dfm.allocation`` key (the study benchmark's arms: tests/test_study.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from dfm_ext.process.allocation import ProgressAllocation, make_allocation, signal_level_locations
from dfm_ext.process.timesteps import StageTimestepSampler


def _feed(a: ProgressAllocation, n: int, fine_decreasing: bool = True) -> None:
    for i in range(n):
        fine = 1.0 / (1 + 0.05 * i) if fine_decreasing else 1.0
        a.update(torch.tensor([0.5, fine]))


def test_prior_until_warmup_then_progress_moves_probability() -> None:
    a = ProgressAllocation((0.9, 0.1), warmup=20, floor=0.05)
    _feed(a, 19)
    assert a.probabilities().tolist() == [0.9, 0.1]  # not warmed up: the prior exactly
    _feed(a, 200)
    p = a.probabilities()
    # stage 0's loss is flat (no progress), stage 1's keeps falling: stage 1 gets more than its prior.
    assert float(p[1]) > 0.1 and float(p[0]) >= 0.05 - 1e-12
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(a.progress()[0]) == 0.0 and float(a.progress()[1]) > 0


def test_plateau_everywhere_settles_without_oscillating() -> None:
    a = ProgressAllocation((0.9, 0.1), warmup=1, floor=0.05, rate=0.05)
    _feed(a, 2000, fine_decreasing=False)
    p, q = a.probabilities(), None
    a.update(torch.tensor([0.5, 1.0]))
    q = a.probabilities()
    assert (q - p).abs().max().item() < 1e-6  # settled, not flipping between prior and uniform
    # no progress anywhere: the fixed point of p = floor + (1 - 2 floor) * normalise(prior / p)
    target = 0.05 + 0.9 * (torch.tensor([0.9, 0.1], dtype=torch.float64) / q) / (torch.tensor([0.9, 0.1]) / q).sum()
    assert torch.allclose(q, target, atol=1e-6) and 0.5 < q[0].item() < 0.9


def test_more_samples_alone_do_not_earn_more_probability() -> None:
    # Both stages lose the same fraction of their loss per sample they get: progress per step is
    # proportional to the stage's probability. The per-sample rule must then move p towards the
    # prior's square root fixed point, not run away towards the stage that already has more.
    a = ProgressAllocation((0.5, 0.5), warmup=1, floor=0.0, rate=0.05)
    a._p = torch.tensor([0.8, 0.2], dtype=torch.float64)
    loss = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for _ in range(3000):
        loss = loss * (1 - 0.002 * a.probabilities())
        a.update(loss)
    p = a.probabilities()
    assert abs(p[0].item() - 0.5) < 0.05, p


def test_nan_stage_is_left_unchanged() -> None:
    a = ProgressAllocation((0.9, 0.1), warmup=1)
    a.update(torch.tensor([1.0, 2.0]))
    before = a.state_dict()
    a.update(torch.tensor([0.5, float("nan")]))
    after = a.state_dict()
    assert after["count"].tolist() == [2.0, 1.0]
    assert after["fast_avg"][1] == before["fast_avg"][1] and after["slow_avg"][1] == before["slow_avg"][1]


def test_update_and_probabilities_read_no_tensor_on_the_host(monkeypatch) -> None:
    # Any .item(), bool(t), float(t), int(t) or .tolist() would sync a GPU every step: forbid them all.
    a = ProgressAllocation((0.9, 0.1), warmup=1)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for i in range(5):
        a.update(torch.tensor([1.0, 0.5]) / (i + 1))
    p = a.probabilities()
    monkeypatch.undo()
    assert p.tolist() != [0.9, 0.1]  # warmed up, so it really went through the learned branch


def test_state_dict_round_trip_continues_exactly(tmp_path: Path) -> None:
    a = ProgressAllocation((0.8, 0.2), warmup=5)
    _feed(a, 30)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b = ProgressAllocation((0.8, 0.2), warmup=5)
    b.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    for x in (a, b):
        _feed(x, 10)
    assert torch.equal(a.probabilities(), b.probabilities())
    c = ProgressAllocation((0.8, 0.2), warmup=6)
    with pytest.raises(ValueError, match="warmup"):
        c.load_state_dict(a.state_dict())


def test_sampler_with_allocation_is_deterministic_and_resumable() -> None:
    def run(restore: dict | None = None, steps: int = 40) -> tuple[list, StageTimestepSampler]:
        s = StageTimestepSampler(2, allocation=ProgressAllocation((0.9, 0.1), warmup=3))
        if restore is not None:
            s.load_state_dict(restore)
        g = torch.Generator().manual_seed(0)
        draws = []
        for i in range(steps):
            ts = s.sample(8, generator=g)
            draws.append(ts.stage.clone())
            s.update(torch.tensor([1.0, 1.0 / (1 + i)]))
        return draws, s

    d1, s1 = run()
    d2, s2 = run()
    assert all(torch.equal(x, y) for x, y in zip(d1, d2))
    assert torch.equal(s1.allocation.probabilities(), s2.allocation.probabilities())
    fresh = StageTimestepSampler(2, allocation=ProgressAllocation((0.9, 0.1), warmup=3))
    fresh.load_state_dict(s1.state_dict())
    assert torch.equal(fresh.allocation.probabilities(), s1.allocation.probabilities())
    with pytest.raises(ValueError, match="fixed probabilities"):
        StageTimestepSampler(2).load_state_dict(s1.state_dict())


def test_per_stage_current_shifts_only_that_stage() -> None:
    base = StageTimestepSampler(2, probabilities=(0.5, 0.5))
    shifted = StageTimestepSampler(2, probabilities=(0.5, 0.5), current=[(0.0, 1.0), (3.0, 1.0)])
    a = base.sample(4000, generator=torch.Generator().manual_seed(1))
    b = shifted.sample(4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.stage, b.stage) and torch.equal(a.mask, b.mask)
    first = a.stage == 0
    assert torch.equal(a.t[first], b.t[first])  # stage 0 current: the same draws exactly
    fine = ~first
    assert torch.equal(a.t[fine][:, 0], b.t[fine][:, 0])  # the earlier stage's time is unchanged
    # logit of the fine stage's time moved by exactly the location shift
    shift = torch.logit(b.t[fine][:, 1].double()) - torch.logit(a.t[fine][:, 1].double())
    assert shift.mean().item() == pytest.approx(3.0, abs=1e-3)


def test_bad_options_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"current\[1\].*-1"):
        StageTimestepSampler(2, current=[(0.0, 1.0), (1.0, -1.0)])
    with pytest.raises(ValueError, match="3 stages, the sampler 2"):
        StageTimestepSampler(2, allocation=ProgressAllocation(num_stages=3))
    with pytest.raises(TypeError, match="probabilities"):
        StageTimestepSampler(2, allocation=object())
    with pytest.raises(ValueError, match="'bogus'"):
        make_allocation("bogus", 2)
    with pytest.raises(ValueError, match="floor"):
        ProgressAllocation((0.5, 0.5), floor=0.5)
    assert make_allocation(None, 2) is None and make_allocation("fixed", 2) is None
    a = make_allocation({"kind": "progress", "warmup": 7}, 2, prior=(0.7, 0.3))
    assert a.warmup == 7 and a.prior_values == (0.7, 0.3)


def test_signal_level_locations() -> None:
    locs = signal_level_locations(torch.tensor([0.57, 0.085]))
    assert locs[0] == 0.0 and locs[1] == pytest.approx(math.log(0.57 / 0.085), abs=1e-6)
    # the median time of the shifted logit-normal is where that stage's signal meets the noise,
    # relative to stage 0: sigmoid(logit(t0*) + loc_1) == t1*
    t0, t1 = 1 / 1.57, 1 / 1.085
    assert torch.sigmoid(torch.logit(torch.tensor(t0, dtype=torch.float64)) + locs[1]).item() == pytest.approx(t1)
    with pytest.raises(ValueError, match=r"\[0.5, 0.0\]"):
        signal_level_locations([0.5, 0.0])


# ---- the recipes' config key ---------------------------------------------------------------------


def test_recipe_config_key_builds_and_feeds_the_allocation(tmp_path: Path) -> None:
    from dfm_ext.recipes.engine.config import ConfigError, load_config
    from dfm_ext.recipes.engine.data import ImageFolder, collate_items
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask
    from dfm_ext.recipes.engine.cli import make_tiny_vae
    from dfm_ext.recipes.imagenet.assets import make_image_folder

    make_image_folder(tmp_path / "images", per_class=1, size=40)
    make_tiny_vae(tmp_path)
    base = [f"data.root={tmp_path / 'images'}", f"vae.path={tmp_path}"]
    cfg = load_config(ImageNetConfig, "tiny", [*base, "dfm.allocation=progress", "dfm.stage_probabilities=[0.7, 0.3]"])
    cfg.validate()
    task = ImageNetTask(cfg)
    alloc = task.timesteps.allocation
    assert isinstance(alloc, ProgressAllocation) and alloc.prior_values == (0.7, 0.3)
    torch.manual_seed(0)
    model = task.build_model()
    batch = collate_items([ImageFolder(tmp_path / "images", 32)[(i, False)] for i in range(4)])
    for i in range(2):
        task.loss(model, batch, generator=torch.Generator().manual_seed(i), device=torch.device("cpu"))
    assert float(alloc.state_dict()["count"].sum()) >= 2  # the task fed it every step
    assert load_config(ImageNetConfig, "tiny", base).dfm.allocation == "fixed"
    assert ImageNetTask(load_config(ImageNetConfig, "tiny", base)).timesteps.allocation is None
    with pytest.raises(ConfigError, match="bogus"):
        load_config(ImageNetConfig, "tiny", [*base, "dfm.allocation=bogus"])


def test_recipe_checkpoints_the_allocation_and_resume_continues_it(tmp_path: Path) -> None:
    """Through the recipe's CLI: the allocation's state rides in extra_state.pt, and a run stopped
    at step 4 and resumed to 8 continues it (stage 0 is active in every step, so its update count
    doubles; a lost state would restart it from 0)."""
    import os
    import subprocess

    from dfm_ext.recipes.engine.cli import make_tiny_vae
    from dfm_ext.recipes.imagenet.assets import make_image_folder

    make_image_folder(tmp_path / "images", per_class=2, size=40)
    make_tiny_vae(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "run"

    def run(steps: int) -> None:
        cmd = [sys.executable, "-m", "dfm_ext.recipes.imagenet", "--config", "tiny", f"data.root={tmp_path / 'images'}",
               f"vae.path={tmp_path}", f"train.output_dir={out}", f"train.steps={steps}", "train.log_every=1",
               "train.checkpoint_every=4", "train.sample_every=0", "train.progress=false", "train.trackers=[]",
               "dfm.allocation=progress"]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    run(4)
    run(8)
    at4 = torch.load(out / "checkpoints" / "step-000004" / "extra_state.pt", weights_only=True)["timesteps"]["allocation"]
    at8 = torch.load(out / "checkpoints" / "step-000008" / "extra_state.pt", weights_only=True)["timesteps"]["allocation"]
    assert at4["count"][0] > 0
    assert at8["count"][0] == 2 * at4["count"][0]

