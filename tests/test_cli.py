"""The ``dfm-ext`` command end to end: a tiny ``demo``, then ``sample`` and ``eval`` from its checkpoint."""

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
    assert names == ["checkpoint", "loss.png", "metrics.json", "progressive.png", "samples.png"]
    for name in ("samples.png", "progressive.png", "loss.png"):
        with Image.open(demo_dir / name) as im:
            im.verify()
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["dataset"] == "skimage" and metrics["decomposition"] == "laplacian"
    assert metrics["train_seconds"] > 0 and metrics["eval"]["num_fake"] == 20
    assert set(metrics["eval"]["swd"]["per_level"]) == {"32x32", "16x16", "8x8"}
    # The engine's final/ (save_pretrained: load_wrapped alone rebuilds it) plus the demo's options.
    assert sorted(p.name for p in (demo_dir / "checkpoint").iterdir()) == ["demo.json", "dfm_config.json", "model.safetensors"]
    assert not [p for p in demo_dir.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    with Image.open(demo_dir / "samples.png") as im:
        # 10 classes x 8 samples of 32 px, scaled 3x with a 2 px border: rows = classes.
        assert im.size == (8 * 34 * 3 + 6, 10 * 34 * 3 + 6)
    with Image.open(demo_dir / "progressive.png") as im:
        assert im.size[0] == 2 * 34 * 4 + 8  # the stage-0 preview (16x16, upscaled) next to the final sample


def test_sample_from_the_demo_checkpoint(demo_dir: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(demo_dir / "checkpoint"), "--num", "2", "--steps", "3,2"]
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
        (["demo", "--steps", "0"], "expected a positive integer"),
        (["sample", "--checkpoint", "x", "--steps", "30,a"], "comma-separated integers"),
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
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("demo.json", "dfm_config.json"):
        (broken / name).write_text((demo_dir / "checkpoint" / name).read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["sample", "--checkpoint", str(broken), "--out", str(tmp_path / "g.png")]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_wrong_step_count_for_the_decomposition(demo_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["sample", "--checkpoint", str(demo_dir / "checkpoint"), "--steps", "5,5,5", "--out", str(tmp_path / "g.png")]
    assert main(argv) == 2
    assert "has 2 stages" in capsys.readouterr().err


def test_demo_compile_matches_eager(demo_dir: Path, tmp_path: Path) -> None:
    """``--compile`` (issue 15; the engine's train.compile) trains the same maths: same losses to 1e-4."""
    out = tmp_path / "compiled"
    assert main(["demo", "--out", str(out), *TINY, "--compile", "--compile-backend", "aot_eager"]) == 0
    eager = json.loads((demo_dir / "metrics.json").read_text())
    compiled = json.loads((out / "metrics.json").read_text())
    assert compiled["compile"] is True and eager["compile"] is False
    assert compiled["final_loss_ema100"] == pytest.approx(eager["final_loss_ema100"], rel=1e-4)
    assert compiled["eval"]["swd"]["mean"] == pytest.approx(eager["eval"]["swd"]["mean"], rel=1e-3)


def test_demo_compile_backend_is_checked_before_training(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "x"), *TINY, "--compile", "--compile-backend", "nope"]) == 2
    assert "compile_backend='nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()
