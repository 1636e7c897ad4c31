"""FSDP2 sharded training (``train.sharding=fsdp2``) on two CPU ranks (gloo), against 2-rank DDP.

Every run is the ``tiny`` ImageNet config for 10 steps through the real command line
(``accelerate launch -m dfm_ext.recipes.imagenet``), as in ``test_recipes_imagenet.py``. The
sharded checkpoints are read back into full tensors with :func:`load_full_state`, so the
comparison does not go through the code that wrote them.

One exception to "weights equal to 1e-5": the key bias of each attention (``qkv.bias[d:2d]``).
Softmax is invariant to a bias added to every key, so its true gradient is exactly zero and
what autograd returns is rounding noise (~1e-10) that AdamW normalises into steps of the size
of the learning rate; DDP and FSDP sum the noise in different orders, so those entries differ
by up to ~3e-5 while the model's outputs do not depend on them at all. The test checks those
entries at 1e-4 and the two models' outputs at 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _launch import ACCELERATE, free_port, launch_two_cpu_processes
from _recipe_fixtures import logged_losses as _losses
from _recipe_fixtures import recipe_env as _env
from _recipe_fixtures import tiny_argv, tiny_image_assets, wait_for_checkpoint

STEPS = 10
LORA = ["specialize.kind=lora", "specialize.targets=[mlp,attn]", "specialize.rank=2",
        # both stages in every global batch (DDP skips the update of a stage absent from the whole
        # batch, FSDP2 gives it a zero gradient), while single ranks still miss a stage at times
        "dfm.stage_probabilities=[0.5,0.5]"]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return tiny_image_assets(tmp_path_factory.mktemp("fsdp_assets"))


def _args(assets: Path, out: Path, *extra: str) -> list[str]:
    return tiny_argv(
        assets / "images", assets, out, STEPS, "train.log_every=1", "train.checkpoint_every=4", "train.keep_checkpoints=2",
        f"train.sample_every={STEPS}", "train.progress=false", "train.trackers=[]", "optim.lr=3e-3",
        "optim.warmup_steps=2", *extra,
    )  # fmt: skip


def _run(assets: Path, out: Path, *extra: str) -> Path:
    res = launch_two_cpu_processes("dfm_ext.recipes.imagenet", _args(assets, out, *extra), _env())
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _task(assets: Path, *overrides: str):
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

    return ImageNetTask(load_config(ImageNetConfig, "tiny", [f"data.root={assets / 'images'}", f"vae.path={assets}", *overrides]))


def _ddp_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ckpt = out / "checkpoints" / f"step-{STEPS:06d}"
    model = load_file(str(ckpt / "model.safetensors"))
    ema = torch.load(ckpt / "extra_state.pt", weights_only=True)["ema"]["shadow"]
    return model, {k: v for k, v in ema.items() if k in model}


def _sharded_state(out: Path, template: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    from dfm_ext.recipes.engine.parallel import load_full_state

    return load_full_state(out / "checkpoints" / f"step-{STEPS:06d}", template, key=key)


def _key_bias(name: str, t: torch.Tensor) -> slice | None:
    if name.endswith("attn.qkv.bias"):
        d = t.shape[0] // 3
        return slice(d, 2 * d)
    return None


def _assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].clone(), b[k].clone()
        kb = _key_bias(k, x)
        if kb is not None:  # see the module docstring
            torch.testing.assert_close(x[kb], y[kb], atol=1e-4, rtol=0, msg=k)
            x[kb] = y[kb] = 0
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=k)


def _outputs(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    model.load_state_dict(state)
    model.eval()
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, *s, generator=g) for s in model.stage_shapes]
    t, stage, y = torch.rand(4, 2, generator=g), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        return model(stages, t, stage, y=y)


def _pixels(out: Path) -> np.ndarray:
    with Image.open(out / "samples" / f"step-{STEPS:06d}.png") as im:
        return np.asarray(im).astype(np.int16)


@pytest.fixture(scope="module")
def runs(assets: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_runs")
    return {
        "ddp": _run(assets, root / "ddp", "train.sharding=none"),
        "fsdp": _run(assets, root / "fsdp", "train.sharding=fsdp2"),
    }


@pytest.fixture(scope="module")
def lora_runs(assets: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_lora_runs")
    return {
        "ddp": _run(assets, root / "ddp", "train.sharding=none", *LORA),
        "fsdp": _run(assets, root / "fsdp", "train.sharding=fsdp2", *LORA),
    }


@pytest.mark.parametrize("variant", ["plain", "lora"])
def test_fsdp2_equals_ddp_weights_ema_and_samples(assets: Path, runs, lora_runs, variant: str) -> None:
    pair, extra = (runs, []) if variant == "plain" else (lora_runs, LORA)
    ddp, fsdp = pair["ddp"], pair["fsdp"]
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["parallelism"] == "FSDP2" and summary["step"] == STEPS
    ckpt = fsdp / "checkpoints" / f"step-{STEPS:06d}"
    assert (ckpt / "sharded.json").is_file() and (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard file per rank

    ddp_model, ddp_ema = _ddp_state(ddp)
    fsdp_model, fsdp_ema = _sharded_state(fsdp, ddp_model, "model"), _sharded_state(fsdp, ddp_ema, "ema")
    _assert_weights_equal(ddp_model, fsdp_model)
    _assert_weights_equal(ddp_ema, fsdp_ema)
    # the EMA really averages (it is not a copy of the weights)
    assert max(float((ddp_ema[k] - ddp_model[k]).abs().max()) for k in ddp_model) > 1e-3
    # final/ holds the full EMA weights in the one model format, as DDP writes them
    ddp_final, fsdp_final = load_file(str(ddp / "final" / "model.safetensors")), load_file(str(fsdp / "final" / "model.safetensors"))
    _assert_weights_equal(ddp_final, fsdp_final)
    _assert_weights_equal({k: fsdp_ema[k] for k in fsdp_final}, fsdp_final)
    model = _task(assets, *extra).build_model()
    for a, b in zip(_outputs(model, ddp_model), _outputs(model, fsdp_model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # in-training sampling under FSDP (EMA weights, all ranks) draws the images DDP draws
    assert np.abs(_pixels(ddp) - _pixels(fsdp)).max() <= 1
    ld, lf = _losses(ddp), _losses(fsdp)
    assert sorted(lf) == list(range(1, STEPS + 1))
    for s in ld:
        assert lf[s] == pytest.approx(ld[s], rel=1e-5, abs=1e-6), s
    if variant == "lora":
        import dfm_ext

        assert (fsdp / "final" / "stage_parameters.safetensors").is_file()
        reloaded = dfm_ext.load_wrapped(fsdp / "final")
        assert dfm_ext.load_specialization(reloaded, fsdp / "final") is not None


def test_sigkill_and_resume_from_sharded_checkpoint(assets: Path, lora_runs, tmp_path: Path) -> None:
    """Both ranks killed after the step-4 checkpoint; resume=auto ends where the uninterrupted run did."""
    out = tmp_path / "killed"
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "dfm_ext.recipes.imagenet",
        *_args(assets, out, "train.sharding=fsdp2", *LORA),
    ]  # fmt: skip
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    try:
        wait_for_checkpoint(proc, out)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
    finally:
        proc.wait(timeout=60)
    killed_at = latest.read_text().strip()
    assert killed_at in ("step-000004", "step-000008")
    assert not (out / "final").exists()

    _run(assets, out, "train.sharding=fsdp2", *LORA)
    ref = lora_runs["fsdp"]
    template, _ = _ddp_state(lora_runs["ddp"])
    for key in ("model", "ema"):
        a, b = _sharded_state(ref, template, key), _sharded_state(out, template, key)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{key}: {k}")
    ref_final, res_final = load_file(str(ref / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    for k in ref_final:
        torch.testing.assert_close(ref_final[k], res_final[k], atol=1e-6, rtol=0, msg=k)
    lr, lo = _losses(ref), _losses(out)
    for s in lr:
        assert lo[s] == pytest.approx(lr[s], rel=1e-5, abs=1e-6), s


def test_resuming_a_sharded_checkpoint_without_sharding_is_refused(assets: Path, runs, tmp_path: Path, capsys) -> None:
    from dfm_ext.recipes.imagenet.task import main

    ckpt = runs["fsdp"] / "checkpoints" / f"step-{STEPS:06d}"
    out = tmp_path / "plain"
    argv = _args(assets, out, "train.sharding=none", f"train.resume={ckpt}", f"train.steps={STEPS + 1}")
    assert main(argv) == 2
    assert "is a sharded (FSDP2) checkpoint; resume it with train.sharding=fsdp2" in capsys.readouterr().err


FAMILIES = ("reference", "dit", "pixart", "sd3", "flux", "cogvideox")


def test_every_family_shards_with_per_stage_lora(tmp_path: Path) -> None:
    """Two torchrun ranks per family: outputs, gradients, optimiser + EMA, checkpoint round trip, sampling."""
    import sys

    pytest.importorskip("diffusers")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    script = Path(__file__).with_name("_fsdp_families.py")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), str(tmp_path), ",".join(FAMILIES)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((tmp_path / "result-0.json").read_text())
    assert sorted(report) == sorted(FAMILIES)
    for fam, r in report.items():
        assert r["blocks"] >= 1, fam
        assert r["grad_names_differ"] == 0, fam  # every LoRA got its gradient though each rank used one stage
        assert r["outputs"] < 1e-5 and r["grads"] < 1e-5 and r["sample"] < 1e-5, (fam, r)
        assert r["weights"] < 1e-5 and r["ema"] < 1e-5, (fam, r)
        assert r["swap_restores"] == 0 and r["ckpt_weights"] == 0 and r["ckpt_ema"] == 0, (fam, r)
        assert r["ckpt_n_averaged"] == 2 and r["ckpt_next_step"] == 0, (fam, r)


def test_transformer_blocks_names_the_model_lists_when_none_is_found() -> None:
    from dfm_ext.recipes.engine.parallel import transformer_blocks

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"no transformer block list named one of \['blocks'.*ModuleLists are \['layers'\]"):
        transformer_blocks(model)
