"""The study benchmark (benchmarks/study.py): its arms resume exactly (the reducible one also logs
its choices), the existing arms compute exactly what the harness computes, the --quick run and
the finetuning experiment resume, processes sharing one JSON keep each other's results, the queue
runs issue 28's groups first, and the report judges only what has run."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study as module

    return module


@pytest.fixture(scope="module")
def data():
    from dfm_ext.recipes.demo.data import load_skimage_crops

    return load_skimage_crops("train", channels=3, num=64)


def test_existing_arms_are_the_harness_bit_for_bit(study, data) -> None:
    # The study wraps the sampler and objective only for allocations that read per-sample losses;
    # the paper's DFM arm must stay exactly the harness's run (the committed study.json depends on it).
    from harness import Trainer

    cfg = replace(study.base_config(study.QUICK, 0, data.name), decomposition="laplacian")
    ours, theirs = study.StudyTrainer("DFM", cfg, data, study.signal_levels(data)), Trainer(cfg, data)
    assert not ours.per_sample
    for _ in range(5):
        ours.step(), theirs.step()
    for (k, a), b in zip(ours.model.state_dict().items(), theirs.model.state_dict().values()):
        assert torch.equal(a, b), k


def _straight_and_resumed(study, arm: str, data, first: int, then: int):
    """The arm trained ``first + then`` steps straight, and ``first`` steps, saved, loaded into a new
    trainer and ``then`` more; the two model states must be equal to the bit."""
    cfg = replace(study.base_config(study.QUICK, 0, data.name), decomposition="laplacian")
    levels = study.signal_levels(data)
    straight = study.StudyTrainer(arm, cfg, data, levels)
    for _ in range(first + then):
        straight.step()
    half = study.StudyTrainer(arm, cfg, data, levels)
    for _ in range(first):
        half.step()
    buf = io.BytesIO()
    torch.save(half.state(), buf)
    buf.seek(0)
    resumed = study.StudyTrainer(arm, cfg, data, levels)
    resumed.load(torch.load(buf, weights_only=True))
    for _ in range(then):
        resumed.step()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert straight.history["loss"] == resumed.history["loss"]
    assert torch.equal(straight.sampler.allocation.probabilities(), resumed.sampler.allocation.probabilities())
    return straight, resumed


def test_progress_arm_resumes_exactly(study, data) -> None:
    _straight_and_resumed(study, "DFM auto", data, 3, 3)


def test_reducible_arm_resumes_exactly_and_traces_its_choices(study, data) -> None:
    straight, resumed = _straight_and_resumed(study, "DFM reducible", data, 7, 5)
    assert straight.per_sample and straight.sampler.allocation.window == 2  # the quick run's windows
    assert torch.equal(straight.sampler.allocation.time_weights(), resumed.sampler.allocation.time_weights())
    assert straight.trace == resumed.trace and [e["step"] for e in straight.trace] == list(range(2, 13, 2))
    assert not torch.equal(straight.sampler.allocation.probabilities(), torch.tensor([0.9, 0.1], dtype=torch.float64))
    edges = study.time_bin_edges(straight.sampler)
    assert edges[1] == pytest.approx([0.3375, 0.5, 0.6625], abs=1e-4)  # quartiles of logit-normal (0, 1)


def test_queue_runs_issue_28_first_and_keeps_the_old_groups_on_the_old_datasets(study) -> None:
    q = study.queue(study.FULL)
    assert q[0] == ("opencv-digits", 0, study.CORE + study.CANDIDATES, 500)
    assert q[3] == ("fashion-mnist", 0, ("DFM reducible", "DFM eq4 p0=0.7"), 500)
    held_out = [i for i, g in enumerate(q) if g[0] in study.HELD_OUT]
    assert held_out[0] > q.index(("opencv-digits", 1, study.CORE, 2000))  # checked after the second seed of the core
    old_arms = {"DFM signal", "DFM auto", "DFM std", "DFM p0=0.7", "DFM eq4"}
    assert all(ds in study.OLD_DATASETS for ds, _, arms, _ in q if set(arms) & old_arms)
    issue28 = set(study.CORE) | set(study.CANDIDATES)
    assert all(set(arms) <= issue28 for _, _, arms, _ in q[:36])  # 12 (dataset, seed, arms) groups x 3 budgets
    assert q[36] == ("fashion-mnist", 0, study.MAIN, 500)  # then issue 16's groups (done to 2000: skipped)
    seen = {(ds, seed, arm, b) for ds, seed, arms, b in q for arm in arms}
    for ds in study.DATASETS:  # every issue-28 arm, both seeds, every budget up to 2000
        for arm in ("FM", "DFM", "DFM reducible", *study.CANDIDATES):
            for seed in (0, 1):
                assert all((ds, seed, arm, b) in seen for b in (500, 1000, 2000)), (ds, arm, seed)


def test_target_table_judges_only_cells_that_exist(study) -> None:
    def run(ds, arm, seed, swd, fd):
        evals = {str(b): {"swd": {"mean": swd, "per_level": {"32x32": swd}}, "fd_effnet": fd} for b in (1000, 2000)}
        return {"dataset": ds, "arm": arm, "seed": seed, "evals": evals}

    results = {"runs": {}}
    for ds in study.OLD_DATASETS + ("opencv-digits",):
        results["runs"][f"{ds}|FM|0"] = run(ds, "FM", 0, 100.0, 1000.0)
        results["runs"][f"{ds}|DFM|0"] = run(ds, "DFM", 0, 90.0, 900.0)
        results["runs"][f"{ds}|DFM reducible|0"] = run(ds, "DFM reducible", 0, 80.0, 820.0)
    lines = "\n".join(study.target_table(results))
    row = next(line for line in lines.splitlines() if line.startswith("| DFM reducible"))
    assert "0.82 / 0.91 (1)" in row and row.endswith("| yes |")  # held-out missing: not part of the verdict
    dfm = next(line for line in lines.splitlines() if line.startswith("| DFM |"))
    assert "0.90 / 1.00 (1)" in dfm and dfm.endswith("| no |")
    del results["runs"]["opencv-digits|DFM reducible|0"]
    row = next(line for line in "\n".join(study.target_table(results)).splitlines() if line.startswith("| DFM reducible"))
    assert row.endswith("| not all cells run |")


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


def test_sampler_probe_first_reproduces_the_study_then_resamples(study, tmp_path: Path, monkeypatch) -> None:
    """benchmarks/study_sampler_probe.py: its first setting is the study's own sampler, so on the
    study's saved state it must give exactly the score the study recorded; then each other setting
    is what the sampler is given."""
    import study_sampler_probe as probe

    from dfm_ext.recipes.demo.data import load_skimage_crops

    monkeypatch.setattr(study, "queue", lambda p: [("skimage-rgb", 0, ("FM", "DFM"), 4)])
    monkeypatch.setattr(study, "QUICK", replace(study.QUICK, eval_at=(4,), num_eval=16, num_swd_reference=32,
                                                chunk=2, batch_size=8, sample_steps=(3, 2)))  # fmt: skip
    monkeypatch.setattr(study, "load_split", lambda name, split, quick: load_skimage_crops(
        split, channels=3, num=64 if split == "train" else 32))  # fmt: skip
    monkeypatch.setattr(probe, "OTHER_SETTINGS", ((2, 3, 0.9), (3, 2, 0.5)))
    assert study.main(["--quick", "--no-fd", "--part", "budgets", "--out", str(tmp_path)]) == 0
    out = tmp_path / "probe.json"
    args = ["--quick", "--no-fd", "--dataset", "skimage-rgb", "--arms", "DFM", "--state", str(tmp_path), "--out", str(out)]
    seen, generate = [], study.generate
    monkeypatch.setattr(study, "generate", lambda tr, p, seed: seen.append((p.sample_steps, p.thresholds)) or generate(tr, p, seed))
    assert probe.main(args) == 0
    assert seen == [((3, 2), (0.9,)), ((2, 3), (0.9,)), ((3, 2), (0.5,))]
    cells = list(json.loads(out.read_text())["cells"].values())
    assert [(c["steps"], c["threshold"]) for c in cells] == [([3, 2], 0.9), ([2, 3], 0.9), ([3, 2], 0.5)]
    assert cells[0]["swd"] == cells[0]["study"]["swd"]  # the study's own sampler: the study's score, exactly
    assert cells[0]["fm"]["swd"] > 0 and cells[0]["step"] == 4
    before = out.read_text()
    assert probe.main(args) == 0 and out.read_text() == before  # done cells are not sampled again
    with pytest.raises(SystemExit):
        probe.main(["--quick", "--dataset", "skimage-rgb", "--arms", "FM", "--state", str(tmp_path)])
