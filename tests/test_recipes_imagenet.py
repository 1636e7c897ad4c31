"""The ImageNet recipe end to end on CPU: real photos, a tiny diffusers VAE, the tiny DiT.

Runs go through the real command lines (``python -m`` and ``accelerate launch -m``) in
subprocesses, so configs, YAML, data loading, VAE loading, checkpoints and resume are the
code paths users run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dfm_ext.recipes.imagenet.cache import main as build_cache_main
from dfm_ext.recipes.imagenet.task import main as imagenet_main
from _launch import launch_two_cpu_processes
from _recipe_fixtures import logged_losses as _losses
from _recipe_fixtures import recipe_env as _env
from _recipe_fixtures import tiny_argv, tiny_image_assets, wait_for_checkpoint

PY = sys.executable
STEPS = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tiny_image_assets(tmp_path_factory.mktemp("imagenet_assets"))
    # One truncated file and one non-image among the real photos: skipped and counted, not fatal.
    victim = sorted((root / "images" / "coffee").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:80])
    (root / "images" / "rocket" / "broken.png").write_text("not a png")
    return root


def _args(assets: Path, out: Path, *extra: str) -> list[str]:
    return tiny_argv(
        assets / "images", assets, out, STEPS,
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=2",
        f"train.sample_every={STEPS}",
        "train.progress=false",
        "optim.lr=3e-3",  # so that 12 steps show a clear fall of the loss
        "optim.warmup_steps=2",
        *extra,
    )  # fmt: skip


def _single(assets: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "dfm_ext.recipes.imagenet", *_args(assets, out, *extra)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res



def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def reference(assets: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    _single(assets, out)
    return out


def test_tiny_end_to_end(reference: Path) -> None:
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < 0.8 * first, losses
    sample = reference / "samples" / f"step-{STEPS:06d}.png"
    with Image.open(sample) as im:  # 4 rows (images) x 2 columns (stage-0 preview, final)
        assert im.width > 0 and im.height > im.width
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-000008", "step-000012"]
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        assert (ckpts / f"step-{STEPS:06d}" / name).is_file()
    assert (reference / "final" / "dfm_config.json").is_file()
    assert list((reference / "logs").rglob("events.out.tfevents*")), "no tensorboard events"
    cfg = (reference / "config.yaml").read_text()
    assert f"steps: {STEPS}" in cfg and "preset: tiny" in cfg
    summary = json.loads((reference / "summary.json").read_text())
    # Two unreadable files among 17; each is hit about once per epoch (96 reads = 5.6 epochs).
    assert summary["unique_bad_images"] == 2 and summary["skipped_images"] >= 2
    json.dumps(summary)


def test_sigkill_and_resume_replays_the_same_run(assets: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [PY, "-m", "dfm_ext.recipes.imagenet", *_args(assets, out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "checkpoints" / "latest"
    try:
        wait_for_checkpoint(proc, out)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest.read_text().strip()
    assert killed_at in ("step-000004", "step-000008")
    assert (out / "checkpoints" / killed_at / "model.safetensors").is_file()
    assert not (out / "final").exists()  # it really died before the end

    _single(assets, out)  # train.resume=auto picks up checkpoints/latest
    ref, res = _losses(reference), _losses(out)
    assert sorted(res) == sorted(ref)
    for step in ref:
        assert res[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, res[step], ref[step])
    _assert_close_weights(_weights(out), _weights(reference), atol=1e-6)


def test_two_processes_equal_one_with_accumulation(assets: Path, tmp_path: Path) -> None:
    ddp, single = tmp_path / "ddp", tmp_path / "accum"
    steps = ["train.steps=4", "train.sample_every=0", "train.checkpoint_every=4"]
    res = launch_two_cpu_processes("dfm_ext.recipes.imagenet", _args(assets, ddp, *steps), _env())
    assert res.returncode == 0, res.stderr[-3000:]
    _single(assets, single, *steps, "train.grad_accumulation=2")

    s_ddp = json.loads((ddp / "summary.json").read_text())
    s_one = json.loads((single / "summary.json").read_text())
    assert s_ddp["num_processes"] == 2 and s_one["num_processes"] == 1
    digests = s_ddp["param_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bitwise identical across ranks
    l_ddp, l_one = _losses(ddp), _losses(single)
    assert sorted(l_ddp) == [1, 2, 3, 4]
    for step in l_one:
        assert l_ddp[step] == pytest.approx(l_one[step], rel=1e-4, abs=1e-6)
    _assert_close_weights(_weights(ddp), _weights(single), atol=1e-5)


def test_latent_cache_build_and_train(assets: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    base = ["--config", "tiny", f"data.root={assets / 'images'}", f"vae.path={assets}"]
    assert build_cache_main([*base, "--out", str(cache), "--dtype", "float32", "--batch-size", "8"]) == 0
    index = json.loads((cache / "index.json").read_text())
    assert index["num_items"] == 15 and index["latent_shape"] == [4, 8, 8] and len(index["skipped_images"]) == 2
    assert (index["scaling_factor"], index["shift_factor"]) == (0.5, 0.1)
    capsys.readouterr()
    # A cache built for another resolution is refused before any compute.
    assert imagenet_main(["--config", "tiny", f"data.latent_cache={cache}", f"vae.path={assets}", "data.resolution=64"]) == 2
    assert "does not match the config" in capsys.readouterr().err
    # Labels beyond data.num_classes (the null class and above) are refused, not trained as unconditional.
    assert imagenet_main(["--config", "tiny", f"data.latent_cache={cache}", f"vae.path={assets}", "data.num_classes=2"]) == 2
    err = capsys.readouterr().err
    assert f"data.latent_cache={str(cache)!r} holds labels up to" in err and "but data.num_classes=2" in err, err
    # A global batch larger than the data is refused before the model is built.
    assert imagenet_main(["--config", "tiny", f"data.latent_cache={cache}", f"vae.path={assets}", "train.global_batch_size=16",
                          f"train.output_dir={tmp_path / 'big_batch'}"]) == 2  # fmt: skip
    assert "train.global_batch_size=16 is larger than the dataset (15 items)" in capsys.readouterr().err
    out = tmp_path / "from_cache"
    _single(
        assets, out, f"data.latent_cache={cache}", "data.root=null", "train.steps=3", "train.sample_every=3", "train.checkpoint_every=3",
        "sampling.metrics=[swd]", "sampling.metric_images=8",
    )  # fmt: skip
    assert sorted(_losses(out)) == [1, 2, 3] and (out / "samples" / "step-000003.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    swd = [r["swd"] for r in records if "swd" in r]
    assert len(swd) == 1 and swd[0] > 0  # periodic metrics on EMA samples vs decoded cached reals


def test_resume_with_changed_config_is_refused(assets: Path, reference: Path, capsys, tmp_path: Path) -> None:
    res = _single(assets, reference, "optim.lr=0.5", check=False)
    assert res.returncode != 0 and "cannot resume" in res.stderr


def test_flow_matching_baseline_task(assets: Path, tmp_path: Path) -> None:
    """decomposition.kind=identity turns the same recipe into plain Flow Matching (in process)."""
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.engine.data import ImageFolder, collate_items
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

    cfg = load_config(
        ImageNetConfig, "tiny",
        [f"data.root={assets / 'images'}", f"vae.path={assets}", "decomposition.kind=identity",
         "decomposition.factors=[1]", "sampling.steps=[4]", "sampling.thresholds=[]", "sampling.num_images=2"],
    )  # fmt: skip
    cfg.validate()
    task = ImageNetTask(cfg)
    assert task.decomposition.num_stages == 1
    torch.manual_seed(0)
    model = task.build_model()
    batch = collate_items([ImageFolder(assets / "images", 32)[(i, False)] for i in range(4)])
    out = task.loss(model, batch, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    out.loss.backward()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and set(out.logs) == {"loss_stage0"}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    task.evaluate(model, step=1, out_dir=tmp_path, device=torch.device("cpu"))
    assert (tmp_path / "samples" / "step-000001.png").is_file()


# ----------------------------------------------------------------------------- per-stage specialisation


def _trained_ema(out: Path, cfg_overrides: list[str], assets: Path) -> torch.nn.Module:
    """The EMA model of the last checkpoint, rebuilt independently of final/."""
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

    cfg = load_config(ImageNetConfig, "tiny", [f"data.root={assets / 'images'}", f"vae.path={assets}", *cfg_overrides])
    model = ImageNetTask(cfg).build_model()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    shadow = torch.load(out / "checkpoints" / latest / "extra_state.pt", weights_only=True)["ema"]["shadow"]
    model.load_state_dict({k: v for k, v in shadow.items() if k in model.state_dict()})  # the EMA of every weight and buffer
    return model.eval()


def test_full_specialisation_trains_exports_and_reloads(assets: Path, tmp_path: Path) -> None:
    import dfm_ext

    out = tmp_path / "full"
    spec = ["specialize.kind=full", "specialize.targets=[mlp]"]
    _single(assets, out, "train.steps=4", "train.sample_every=4", "train.checkpoint_every=4", *spec)
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert (out / "samples" / "step-000004.png").is_file()  # EMA sampling routed by stage
    final = out / "final"
    stage_params = load_file(str(final / "stage_parameters.safetensors"))
    assert stage_params and all(".mlp." in k and ".stage_params." in k for k in stage_params)
    assert not any("stage_params" in k for k in _weights(out))
    record = json.loads((final / "dfm_config.json").read_text())["specialization"]
    assert record["kind"] == "full" and record["stages"] == [0, 1]

    reloaded = dfm_ext.load_wrapped(final).eval()
    assert reloaded.specialization is not None and dfm_ext.load_specialization(reloaded, final) is reloaded.specialization
    ema = _trained_ema(out, spec, assets)
    # every stage's copies trained away from the shared weights they started equal to
    shared = _weights(out)
    for s in (0, 1):
        diffs = [float((v - shared[k.replace(f".stage_params.{s}.", ".")]).abs().max())
                 for k, v in stage_params.items() if f".stage_params.{s}." in k]  # fmt: skip
        assert diffs and max(diffs) > 0, s
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, *s, generator=g) for s in ema.stage_shapes]
    t, stage, y = torch.rand(4, 2, generator=g), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        expected, got = ema(stages, t, stage, y=y), reloaded(stages, t, stage, y=y)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_two_processes_with_per_stage_lora_agree(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora_ddp"
    extra = ["train.steps=4", "train.sample_every=0", "train.checkpoint_every=4", "specialize.kind=lora",
             "specialize.targets=[mlp,attn]", "specialize.rank=2"]  # fmt: skip
    res = launch_two_cpu_processes("dfm_ext.recipes.imagenet", _args(assets, out, *extra), _env())
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["param_sha256_per_rank"]
    assert summary["num_processes"] == 2 and summary["step"] == 4 and len(digests) == 2 and digests[0] == digests[1]
    stage_params = load_file(str(out / "final" / "stage_parameters.safetensors"))
    assert any(k.endswith("lora_B") and bool(v.abs().max() > 0) for k, v in stage_params.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["specialize.kind=half"], "specialize.kind"),
        (["specialize.kind=lora", "specialize.rank=0"], "specialize.rank must be >= 1, got 0"),
        (["specialize.kind=full", "specialize.targets=[mlp,mpl]"], "unknown group(s) ['mpl']"),
        (["specialize.kind=full", "decomposition.kind=identity", "decomposition.factors=[1]", "sampling.steps=[4]",
          "sampling.thresholds=[]"], ">= 2 stages"),
    ],
)  # fmt: skip
def test_bad_specialize_section_is_refused_before_compute(assets: Path, tmp_path: Path, capsys, overrides, message) -> None:
    out = tmp_path / "bad"
    argv = ["--config", "tiny", f"data.root={assets / 'images'}", f"vae.path={assets}", f"train.output_dir={out}"]
    assert imagenet_main([*argv, *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_run_without_specialize_section_still_resumes(assets: Path, reference: Path, tmp_path: Path) -> None:
    """A run started before the ``specialize`` section existed has none in its config.yaml."""
    import shutil

    import yaml

    out = tmp_path / "old"
    shutil.copytree(reference, out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["specialize"]
    cfg["train"]["output_dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    _single(assets, out, f"train.steps={STEPS + 1}", f"train.sample_every={STEPS + 1}")
    assert max(_losses(out)) == STEPS + 1
