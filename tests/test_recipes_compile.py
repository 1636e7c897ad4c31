"""``train.compile``: the engine trains the tiny ImageNet config with a compiled model forward.

The compiled run's losses equal the eager run's to 1e-5, and its checkpoint (keys without
``_orig_mod.``) resumes in an uncompiled run, which then continues exactly as the eager run.
Runs are in-process (``imagenet.main``) to keep them short; ``aot_eager`` traces forward and
backward without code generation (an inductor compile of the tiny engine run takes ~70 s on
this CPU; tests/test_compile.py compiles the training step with inductor, benchmarks/gpu_check.py
the engine run on a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from dfm_ext.recipes.imagenet.task import main as imagenet_main

from _recipe_fixtures import logged_losses, tiny_argv, tiny_image_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return tiny_image_assets(tmp_path_factory.mktemp("compile_assets"), per_class=3)


def _run(assets: Path, out: Path, steps: int, *extra: str) -> dict[int, float]:
    torch._dynamo.reset()
    counters.clear()
    argv = tiny_argv(
        assets / "images", assets, out, steps,
        "train.global_batch_size=4",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.sample_every=0",
        "train.trackers=[]",
        "train.progress=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        *extra,
    )  # fmt: skip
    assert imagenet_main(argv) == 0
    return logged_losses(out)


def test_compiled_training_equals_eager_and_resumes_uncompiled(assets: Path, tmp_path: Path) -> None:
    eager = _run(assets, tmp_path / "eager", 5)
    compiled = _run(assets, tmp_path / "compiled", 3, "train.compile=true", "train.compile_backend=aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # really compiled
    assert sorted(compiled) == [1, 2, 3]
    for s in (1, 2, 3):
        assert compiled[s] == pytest.approx(eager[s], abs=1e-5), (s, compiled, eager)

    ckpt = tmp_path / "compiled" / "checkpoints" / "step-000003"
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert keys == set(load_file(str(tmp_path / "eager" / "checkpoints" / "step-000003" / "model.safetensors")))
    assert not any("_orig_mod" in k for k in keys), sorted(keys)[:3]
    final = load_file(str(tmp_path / "compiled" / "final" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in final)

    # The same folder, uncompiled: resumes from the compiled run's step 3 and continues as eager did.
    resumed = _run(assets, tmp_path / "compiled", 5)
    assert counters["stats"]["unique_graphs"] == 0
    for s in (4, 5):
        assert resumed[s] == pytest.approx(eager[s], abs=1e-5), (s, resumed, eager)
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["step"] == 5


def test_unknown_compile_backend_is_refused_before_compute(assets: Path, tmp_path: Path, capsys) -> None:
    argv = ["--config", "tiny", f"data.root={assets / 'images'}", f"vae.path={assets}", f"train.output_dir={tmp_path / 'bad'}"]
    assert imagenet_main([*argv, "train.compile=true", "train.compile_backend=inductr"]) == 2
    err = capsys.readouterr().err
    assert "train.compile_backend='inductr'" in err and "inductor" in err
    assert not (tmp_path / "bad").exists()


_FSDP_RUNS = """
import json, sys
from pathlib import Path
from dfm_ext.recipes.imagenet.task import main
root, out = Path(sys.argv[1]), Path(sys.argv[2])
for name, extra in (("eager", []), ("compiled", ["train.compile=true", "train.compile_backend=eager"])):
    argv = ["--config", "tiny", f"data.root={root / 'images'}", f"vae.path={root}", f"train.output_dir={out / name}",
            "train.steps=2", "train.global_batch_size=4", "train.log_every=1", "train.sample_every=0",
            "train.trackers=[]", "train.progress=false", "optim.lr=3e-3", "optim.warmup_steps=1",
            "train.sharding=fsdp2", *extra]
    assert main(argv) == 0
"""


def test_compiled_fsdp2_training_equals_eager_fsdp2(assets: Path, tmp_path: Path) -> None:
    """Compile after fully_shard (one process, a world of one: the same code path as N ranks), with
    the sharded EMA; in a subprocess, as it starts a process group."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _FSDP_RUNS, str(assets), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = {}
    for name in ("eager", "compiled"):
        recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs if "loss" in r]
        assert json.loads((tmp_path / name / "summary.json").read_text())["parallelism"] == "FSDP2"
    assert len(losses["compiled"]) == 2
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-5)
    final = load_file(str(tmp_path / "compiled" / "final" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in final)
