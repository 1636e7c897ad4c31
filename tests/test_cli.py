"""The ``dfm-ext`` command end to end: a tiny ``demo`` (the image recipe), then ``sample`` and ``eval`` from its run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dfm_ext.recipes.demo.cli import main

pytest.importorskip("dfm_ext.models.dit")
pytest.importorskip("dfm_ext.wrapping.wrapper")

TINY = ["--steps", "3", "--size", "tiny", "--dataset", "skimage", "--batch-size", "8",
        "--num-eval", "20", "--num-reference", "40", "--no-fd", "--no-progress", "--sample-steps", "4,2"]  # fmt: skip


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_demo_writes_every_file(demo_dir: Path, capsys) -> None:
    names = sorted(p.name for p in demo_dir.iterdir())
    assert names == ["loss.png", "metrics.json", "progressive.png", "run", "samples.png"]
    for name in ("samples.png", "progressive.png", "loss.png"):
        with Image.open(demo_dir / name) as im:
            im.verify()
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["dataset"] == "skimage" and metrics["decomposition"] == "laplacian"
    assert metrics["train_seconds"] > 0 and metrics["eval"]["num_fake"] == 20 and metrics["stopped_early"] is False
    assert set(metrics["eval"]["swd"]["per_level"]) == {"32x32", "16x16", "8x8"}
    assert set(metrics["estimate_seconds"]) == {"train", "sample"}
    # The image recipe's run folder: its config (the demo's, with the options applied) and final/ (EMA weights).
    run = demo_dir / "run"
    assert {"config.yaml", "final", "metrics.jsonl", "summary.json", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert sorted(p.name for p in (run / "final").iterdir()) == ["dfm_config.json", "model.safetensors"]
    config = (run / "config.yaml").read_text()
    assert "factory: dfm_ext.recipes.demo.report:training_set" in config and "steps: 3" in config and "kind: none" in config
    assert not [p for p in demo_dir.iterdir() if p.name.startswith(".")]
    with Image.open(demo_dir / "samples.png") as im:
        # 10 classes x 8 samples of 32 px, scaled 3x with a 2 px border: rows = classes.
        assert im.size == (8 * 34 * 3 + 6, 10 * 34 * 3 + 6)
    with Image.open(demo_dir / "progressive.png") as im:
        assert im.size[0] == 2 * 34 * 4 + 8  # the stage-0 preview (16x16, upscaled) next to the final sample


def test_sample_from_the_demo_checkpoint(demo_dir: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(demo_dir), "--num", "2", "--steps", "3,2"]
    assert main([*args, "--out", str(grid), "--cfg-scale", "2"]) == 0
    with Image.open(grid) as im:
        assert im.size == (2 * 34 * 3 + 6, 10 * 34 * 3 + 6)
    folder = tmp_path / "pngs"
    assert main([*args, "--out", str(folder)]) == 0
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert len(pngs) == 21 and pngs[0] == "00000_class0.png" and "grid.png" in pngs
    # ... which `eval` reads back and scores against the dataset.
    report = tmp_path / "eval.json"
    argv = ["eval", "--samples", str(folder), "--dataset", "skimage", "--num-reference", "40", "--no-fd"]
    assert main([*argv, "--out", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["num_fake"] == 20 and data["swd"]["mean"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--dataset", "cifar10"], "invalid choice: 'cifar10'"),
        (["demo", "--decomposition", "fourier"], "invalid choice: 'fourier'"),
        (["demo", "--steps", "0"], "expected an integer >= 1, got 0"),
        (["demo", "--step", "10"], "unrecognized arguments: --step"),  # no prefix matching
        (["sample", "--checkpoint", "x", "--steps", "30,a"], "expected positive integers like 30,10, got '30,a'"),
        (["eval"], "--samples"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_or_corrupt_checkpoint(tmp_path: Path, demo_dir: Path, capsys) -> None:
    assert main(["sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png")]) == 2
    assert "holds no trained model: expected dfm_config.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "final").mkdir(parents=True)
    (broken / "config.yaml").write_text((demo_dir / "run" / "config.yaml").read_text())
    (broken / "final" / "dfm_config.json").write_text((demo_dir / "run" / "final" / "dfm_config.json").read_text())
    (broken / "final" / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["sample", "--checkpoint", str(broken), "--out", str(tmp_path / "g.png")]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_wrong_step_count_for_the_decomposition(demo_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["sample", "--checkpoint", str(demo_dir / "run"), "--steps", "5,5,5", "--out", str(tmp_path / "g.png")]
    assert main(argv) == 2
    assert "sampling.steps [5, 5, 5] needs one entry per stage (2" in capsys.readouterr().err


def test_time_cap_says_the_numbers_are_not_representative(tmp_path: Path, capsys) -> None:
    out = tmp_path / "capped"
    assert main(["demo", "--out", str(out), *[a for a in TINY if a != "--no-progress"], "--steps", "50", "--max-train-seconds", "0.01"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and 1 <= metrics["steps"] < 50 and metrics["steps_requested"] == 50
    assert "not representative" in metrics["note"] and "NOT representative" in capsys.readouterr().out


def test_a_demo_run_again_resumes_its_run(demo_dir: Path, tmp_path: Path, capsys) -> None:
    """The run folder is the engine's: a demo run again with more steps continues from its last checkpoint."""
    import shutil

    out = Path(shutil.copytree(demo_dir, tmp_path / "again"))
    assert main(["demo", "--out", str(out), *TINY, "--set", "train.steps=5"]) == 0
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 5 and steps.count(3) == 1
    assert main(["demo", "--out", str(out), *TINY, "--set", "optim.lr=0.5"]) == 2  # another run: refused, nothing lost
    assert "cannot resume" in capsys.readouterr().err and (out / "run" / "final").is_dir()


def test_demo_compile_matches_eager(demo_dir: Path, tmp_path: Path) -> None:
    """``--compile`` (issue 15; the engine's train.compile) trains the same maths: same losses to 1e-4."""
    out = tmp_path / "compiled"
    assert main(["demo", "--out", str(out), *TINY, "--compile", "--compile-backend", "aot_eager"]) == 0
    eager = json.loads((demo_dir / "metrics.json").read_text())
    compiled = json.loads((out / "metrics.json").read_text())
    assert compiled["compile"] is True and eager["compile"] is False
    assert compiled["final_logged"]["loss"] == pytest.approx(eager["final_logged"]["loss"], rel=1e-4)
    assert compiled["eval"]["swd"]["mean"] == pytest.approx(eager["eval"]["swd"]["mean"], rel=1e-3)


def test_demo_compile_backend_is_checked_before_training(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "x"), *TINY, "--compile", "--compile-backend", "nope"]) == 2
    assert "compile_backend='nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()
