"""Automatic stage allocation (dfm_ext.process.allocation), the sampler's per-stage current logit-normal,
and the study benchmark's --quick smoke run with its resume."""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dfm_ext.process.allocation import ProgressAllocation, make_allocation, signal_level_locations
from dfm_ext.process.timesteps import StageTimestepSampler

ROOT = Path(__file__).resolve().parents[1]


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


# ---- the study benchmark ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study as module

    return module


def test_study_trainer_resume_is_exact(study, tmp_path: Path) -> None:
    from dfm_ext.recipes.demo.data import load_skimage_crops

    data = load_skimage_crops("train", channels=3, num=64)
    levels = study.signal_levels(data)
    cfg = replace(study.base_config(study.QUICK, 0, data.name), decomposition="laplacian")
    straight = study.StudyTrainer("DFM auto", cfg, data, levels)
    for _ in range(6):
        straight.step()
    half = study.StudyTrainer("DFM auto", cfg, data, levels)
    for _ in range(3):
        half.step()
    buf = io.BytesIO()
    torch.save(half.state(), buf)
    buf.seek(0)
    resumed = study.StudyTrainer("DFM auto", cfg, data, levels)
    resumed.load(torch.load(buf, weights_only=True))
    for _ in range(3):
        resumed.step()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert straight.history["loss"] == resumed.history["loss"]
    assert torch.equal(straight.sampler.allocation.probabilities(), resumed.sampler.allocation.probabilities())


def test_study_quick_runs_and_resumes(study, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(study, "DATASETS", ("skimage-rgb",))
    monkeypatch.setattr(study, "queue", lambda p: [("skimage-rgb", 0, ("FM", "DFM shift"), 4)])
    monkeypatch.setattr(study, "QUICK", replace(study.QUICK, eval_at=(4,), num_eval=16, num_swd_reference=32,
                                                chunk=2, batch_size=8, sample_steps=(3, 2)))  # fmt: skip
    monkeypatch.setattr(study, "load_split", lambda name, split, quick: __import__("dfm_ext.recipes.demo.data", fromlist=["x"]).load_skimage_crops(
        split, channels=3, num=64 if split == "train" else 32))  # fmt: skip
    assert study.main(["--quick", "--no-fd", "--part", "budgets", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "study_quick.json").read_text())
    assert set(res["runs"]) == {"skimage-rgb|FM|0", "skimage-rgb|DFM shift|0"}
    assert res["runs"]["skimage-rgb|FM|0"]["evals"]["4"]["swd"]["mean"] > 0
    assert (tmp_path / "study_quick.md").read_text().count("DFM shift") >= 2
    assert (tmp_path / "study_grid_skimage-rgb_4.png").exists()
    before = (tmp_path / "study_quick.json").read_text()
    assert study.main(["--quick", "--no-fd", "--part", "budgets", "--out", str(tmp_path)]) == 0  # everything is done: nothing reruns
    after = json.loads((tmp_path / "study_quick.json").read_text())
    assert after["runs"] == json.loads(before)["runs"]


def test_study_finetune_quick_starts_exactly_from_the_pretrained_model(study, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(study, "QUICK", replace(study.QUICK, num_eval=8, num_swd_reference=16, chunk=2, batch_size=8,
                                                sample_steps=(2, 1)))  # fmt: skip
    assert study.main(["--quick", "--no-fd", "--part", "finetune", "--out", str(tmp_path)]) == 0
    ft = json.loads((tmp_path / "study_quick.json").read_text())["finetune"]
    assert ft["dfm_step0_max_abs_deviation"] < 1e-5  # wrap_dit(init="pretrained"): stage 0 is the 32 px model
    assert set(ft["runs"]) == {"FM", "DFM"} and set(ft["runs"]["DFM"]["evals"]) == {"0", "2", "4"}
    assert set(ft["runs"]["FM"]["evals"]["4"]["swd"]["per_level"]) == {"64x64", "32x32", "16x16", "8x8"}


def test_study_finetune_runs_other_dfm_arms_with_their_own_allocation(study, tmp_path: Path, monkeypatch, capsys) -> None:
    """``--finetune-arms``: a DFM arm with another p0 trains its own copy of the wrapped model."""
    monkeypatch.setattr(study, "QUICK", replace(study.QUICK, num_eval=8, num_swd_reference=16, chunk=2, batch_size=8,
                                                sample_steps=(2, 1)))  # fmt: skip
    base = ["--quick", "--no-fd", "--part", "finetune", "--out", str(tmp_path)]
    assert study.main(base + ["--finetune-arms", "FM"]) == 0
    fm_before = json.loads((tmp_path / "study_quick.json").read_text())["finetune"]["runs"]["FM"]
    assert study.main(base + ["--finetune-arms", "FM,DFM p0=0.5"]) == 0  # an arm added later
    runs = json.loads((tmp_path / "study_quick.json").read_text())["finetune"]["runs"]
    assert set(runs) == {"FM", "DFM p0=0.5"}
    assert runs["FM"] == fm_before  # the finished arm is neither trained nor evaluated again
    assert runs["DFM p0=0.5"]["evals"]["4"]["stage_probabilities"] == [0.5, 0.5]
    assert runs["FM"]["evals"]["4"]["stage_probabilities"] == [1.0]
    assert (tmp_path / "study_samples" / "finetune__DFM_p00.5__4_quick.png").exists()
    with pytest.raises(SystemExit):
        study.main(["--quick", "--part", "finetune", "--out", str(tmp_path), "--finetune-arms", "FM,DFM signal"])
    assert "need the stage signal levels" in capsys.readouterr().err


def test_resized_fm_head_and_embedding_are_the_32px_model_on_averaged_images(study) -> None:
    from dfm_ext.recipes.demo.data import load_skimage_crops

    data64 = load_skimage_crops("train", channels=3, size=64, num=8)
    torch.manual_seed(0)
    pre = study._dit(32, 4, study._downsample(data64), "tiny")
    fm = study.resized_fm(pre, data64, "tiny")
    x = data64.images[:2]
    emb64 = fm.x_embedder(x)
    emb32 = pre.x_embedder(torch.nn.functional.avg_pool2d(x, 2))
    assert torch.allclose(emb64, emb32, atol=1e-5)
    h = torch.randn(2, 64, fm.config.hidden_size)
    c = torch.randn(2, fm.config.hidden_size)
    out64 = fm.unpatchify(fm.final_layer(h, c), (8, 8))
    out32 = pre.unpatchify(pre.final_layer(h, c), (8, 8))
    assert torch.allclose(out64, out32.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6)


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


def test_study_processes_sharing_one_json_keep_each_others_evaluations(study, tmp_path: Path) -> None:
    """Two study processes (``--arms``) save into one JSON: neither may drop the other's runs or evals."""
    path = tmp_path / "study.json"
    a = study.load_results(path)
    b = study.load_results(path)
    a["runs"]["d|FM|0"] = {"evals": {"500": {"swd": 1}}}
    study.save_results(a, path)
    b["runs"]["d|DFM signal|0"] = {"evals": {"500": {"swd": 2}}}
    b["runs"]["d|FM|0"] = {"evals": {"1000": {"swd": 3}}}  # b knew an older copy of FM's run
    study.save_results(b, path)
    disk = study.load_results(path)
    assert disk["runs"]["d|DFM signal|0"]["evals"] == {"500": {"swd": 2}}
    assert disk["runs"]["d|FM|0"]["evals"] == {"500": {"swd": 1}, "1000": {"swd": 3}}


def test_study_finetune_and_budget_processes_keep_each_others_results(study, tmp_path: Path) -> None:
    """The ``--part finetune`` process and a ``--part budgets`` process share one JSON: the budgets
    process, which never had a ``finetune`` section, must not drop it when it saves."""
    path = tmp_path / "study.json"
    budgets = study.load_results(path)
    finetune = study.load_results(path)
    finetune["finetune"] = {"runs": {"FM": {"evals": {"0": {"swd": 1}}}}, "fm_resize": "nearest"}
    study.save_results(finetune, path)
    budgets["runs"]["d|FM|1"] = {"evals": {"500": {"swd": 2}}}
    study.save_results(budgets, path)
    finetune["finetune"]["runs"]["DFM"] = {"evals": {"0": {"swd": 3}}}
    study.save_results(finetune, path)
    budgets["finetune"] = {"runs": {"FM": {"evals": {"250": {"swd": 4}}}}}  # an older, partial copy
    study.save_results(budgets, path)
    disk = study.load_results(path)
    assert disk["runs"]["d|FM|1"]["evals"] == {"500": {"swd": 2}}
    assert disk["finetune"]["fm_resize"] == "nearest"
    assert disk["finetune"]["runs"]["FM"]["evals"] == {"0": {"swd": 1}, "250": {"swd": 4}}
    assert disk["finetune"]["runs"]["DFM"]["evals"] == {"0": {"swd": 3}}


def test_study_rejects_an_unknown_arm_before_any_work(study, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        study.main(["--quick", "--arms", "FM,DFM sigal"])
    assert exc.value.code == 2
    assert "'DFM sigal'" in capsys.readouterr().err


def test_convergence_ratio_interpolates_and_says_how_far_a_short_arm_ran(study) -> None:
    fm = {500: {"swd": 40.0}, 1000: {"swd": 30.0}, 2000: {"swd": 20.0}}
    # crosses FM's final 20.0 halfway between 1000 (24) and 2000 (16): step 1500
    got = study.convergence_ratio(fm, {1000: {"swd": 24.0}, 2000: {"swd": 16.0}}, "swd")
    assert got["steps"] == 1500 and got["ratio"] == 0.75 and not got["upper_bound"]
    # already below at its first evaluation: only an upper bound
    first = study.convergence_ratio(fm, {500: {"swd": 19.0}}, "swd")
    assert first["steps"] == 500 and first["upper_bound"]
    # an arm that stopped at 1000 above FM's value is not reached by 1000, not by FM's 2000
    short = study.convergence_ratio(fm, {500: {"swd": 35.0}, 1000: {"swd": 25.0}}, "swd")
    assert short["ratio"] is None and short["until"] == 1000 and short["fm_budget"] == 2000
