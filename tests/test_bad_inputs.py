"""Bad input, every entry point: a clear error naming the offending value, before any compute.

Four tables of ``(entry point, bad value, expected exception type or exit status 2, substring the
message must contain)``: the Python API, the ``dfm-ext`` CLI, the recipe commands (run in process
through their ``main``) and files (checkpoints, wrapped models, specialisations, images).
A few cases run as real subprocesses; everything else stays in process and takes milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dfm_ext
from dfm_ext.models.dit import DiTConfig
from dfm_ext.recipes.demo import cli
from dfm_ext.recipes.demo.data import read_image
from dfm_ext.recipes.demo.report import read_png_folder
from dfm_ext.recipes.flux import task as flux_finetune
from dfm_ext.recipes.imagenet import task as imagenet
from dfm_ext.recipes.kinetics import task as kinetics
from dfm_ext.recipes.engine.config import ConfigError, apply_overrides, load_config, save_config
from dfm_ext.validation import parse_device

NAN = float("nan")
CUDA = torch.cuda.is_available()

# -- the Python API ---------------------------------------------------------------------------

API_CASES = [
    # (id, callable, exception type, substring)
    ("scheduler-steps-zero", lambda: dfm_ext.StageScheduler(steps=(0, 4), thresholds=(0.9,)), ValueError, "steps[0]"),
    ("scheduler-steps-float", lambda: dfm_ext.StageScheduler(steps=(2.5, 4), thresholds=(0.9,)), ValueError, "2.5"),
    ("scheduler-no-thresholds", lambda: dfm_ext.StageScheduler(steps=(30, 10), thresholds=()), ValueError, "2 stages need 1"),
    ("scheduler-threshold-1", lambda: dfm_ext.StageScheduler(steps=(30, 10), thresholds=(1.0,)), ValueError, "1.0"),
    ("scheduler-threshold-neg", lambda: dfm_ext.StageScheduler(steps=(30, 10), thresholds=(-0.1,)), ValueError, "-0.1"),
    ("scheduler-shift", lambda: dfm_ext.StageScheduler(shift=-1.0), ValueError, "-1.0"),
    ("sampler-guidance-nan", lambda: dfm_ext.DFMSampler(dfm_ext.LaplacianPyramid(factors=(2, 1)), dfm_ext.StageScheduler(), guidance_scale=NAN), ValueError, "nan"),
    ("sampler-method", lambda: dfm_ext.DFMSampler(dfm_ext.LaplacianPyramid(factors=(2, 1)), dfm_ext.StageScheduler(), method="rk4"), ValueError, "'rk4'"),
    ("sampler-stage-count", lambda: dfm_ext.DFMSampler(dfm_ext.LaplacianPyramid(factors=(4, 2, 1)), dfm_ext.StageScheduler()), ValueError, "decomposition 3"),
    ("timesteps-prob-sum", lambda: dfm_ext.StageTimestepSampler(2, probabilities=(0.5, 0.4)), ValueError, "(0.5, 0.4)"),
    ("timesteps-prob-len", lambda: dfm_ext.StageTimestepSampler(2, probabilities=(1.0,)), ValueError, "1 entries for 2 stages"),
    ("timesteps-scale-zero", lambda: dfm_ext.StageTimestepSampler(2, current=(0.0, 0.0)), ValueError, "(0.0, 0.0)"),
    ("timesteps-scale-neg", lambda: dfm_ext.StageTimestepSampler(2, earlier=(1.5, -1.0)), ValueError, "(1.5, -1.0)"),
    ("timesteps-mode", lambda: dfm_ext.StageTimestepSampler(2, mode="fancy"), ValueError, "'fancy'"),
    ("objective-weights-len", lambda: dfm_ext.DFMObjective(2, stage_weights=(1.0,)), ValueError, "one entry per stage (2)"),
    ("objective-masking", lambda: dfm_ext.DFMObjective(2, masking="yes"), ValueError, "'yes'"),
    ("laplacian-not-full-res", lambda: dfm_ext.LaplacianPyramid(factors=(4, 2)), ValueError, "(4, 2)"),
    ("laplacian-increasing", lambda: dfm_ext.LaplacianPyramid(factors=(1, 2, 1)), ValueError, "(1, 2, 1)"),
    ("laplacian-str", lambda: dfm_ext.LaplacianPyramid(factors="21"), TypeError, "'21'"),
    ("dct-block", lambda: dfm_ext.DCTDecomposition(block_size=1), ValueError, "got 1"),
    ("packer-patch-count", lambda: dfm_ext.ScalePacker([(4, 8, 8), (4, 16, 16)], [2]), ValueError, "1 patch sizes for 2 stages"),
    ("packer-not-divisible", lambda: dfm_ext.ScalePacker([(4, 8, 8)], [3]), ValueError, "not divisible by its patch size (3, 3)"),
    ("dit-depth-0", lambda: DiTConfig.preset("tiny", depth=0), ValueError, "depth must be a positive int, got 0"),
    ("dit-preset", lambda: DiTConfig.preset("XXL/2"), ValueError, "'XXL/2'"),
    ("parse-device-unknown", lambda: parse_device("tpu9"), ValueError, "'tpu9'"),
    ("overrides-unknown-key", lambda: apply_overrides(imagenet.ImageNetConfig(), ["sampling.stepz=[1]"]), ConfigError, "sampling.stepz"),
    ("overrides-type", lambda: apply_overrides(imagenet.ImageNetConfig(), ["train.steps=abc"]), ConfigError, "'abc'"),
    ("load-config-name", lambda: load_config(imagenet.ImageNetConfig, "imagenet_9000"), ConfigError, "'imagenet_9000'"),
]
if not CUDA:
    API_CASES.append(("parse-device-cuda-cpu-build", lambda: parse_device("cuda"), ValueError, "'cuda' is not available"))


@pytest.mark.parametrize(("fn", "exc", "needle"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_value(fn, exc, needle) -> None:
    with pytest.raises(exc) as e:
        fn()
    assert needle in str(e.value), str(e.value)


# -- the dfm-ext CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A demo output folder: ``run/config.yaml`` (the demo config, a tiny DiT, 3 classes) and ``run/final`` of
    its untrained model (no training: the cases fail before sampling)."""
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

    out = tmp_path_factory.mktemp("demo")
    cfg = load_config(ImageNetConfig, cli.CONFIG, ["model.overrides={hidden_size: 32, depth: 1, num_heads: 2}", "data.num_classes=3"])
    (out / "run").mkdir()
    save_config(cfg, out / "run" / "config.yaml")
    torch.manual_seed(0)
    ImageNetTask(cfg).build_model().save_pretrained(out / "run" / "final")
    return out


def _status(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return int(e.code)


# (id, argv with {ck} = the checkpoint and {tmp} = a temp folder, substring of stderr)
CLI_CASES = [
    ("sample-missing", ["sample", "--checkpoint", "{tmp}/nope", "--out", "{tmp}/g.png"], "nope"),
    ("sample-device-unknown", ["sample", "--checkpoint", "{ck}", "--device", "gpu0", "--out", "{tmp}/g.png"], "'gpu0'"),
    ("sample-steps-3", ["sample", "--checkpoint", "{ck}", "--steps", "5,5,5", "--out", "{tmp}/g.png"], "sampling.steps [5, 5, 5]"),
    ("sample-threshold-range", ["sample", "--checkpoint", "{ck}", "--threshold", "1.5", "--out", "{tmp}/g.png"], "1.5"),
    ("sample-threshold-count", ["sample", "--checkpoint", "{ck}", "--threshold", "0.9,0.5", "--out", "{tmp}/g.png"], "sampling.thresholds [0.9, 0.5]"),
    ("sample-plain-folder", ["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/g.png"], "holds no trained model: expected dfm_config.json"),
    ("sample-threshold-nan", ["sample", "--checkpoint", "{ck}", "--threshold", "nan", "--out", "{tmp}/g.png"], "nan"),
    ("sample-cfg-nan", ["sample", "--checkpoint", "{ck}", "--cfg-scale", "nan", "--out", "{tmp}/g.png"], "got nan"),
    ("sample-num-zero", ["sample", "--checkpoint", "{ck}", "--num", "0", "--out", "{tmp}/g.png"], "got 0"),
    ("eval-missing", ["eval", "--samples", "{tmp}/nope"], "nope"),
    ("eval-empty-folder", ["eval", "--samples", "{tmp}"], "no readable PNG samples in"),
    ("eval-device", ["eval", "--samples", "{tmp}", "--device", "gpu0"], "'gpu0'"),
    ("eval-cfg-nan", ["eval", "--samples", "{ck}", "--cfg-scale", "nan"], "got nan"),
    ("eval-split", ["eval", "--samples", "{tmp}", "--split", "val"], "'val'"),
    ("sample-num-huge", ["sample", "--checkpoint", "{ck}", "--num", "1000000000", "--out", "{tmp}/g.png"],
     "--num 1000000000 x 3 classes = 3000000000 samples, more than the 100000"),
    ("sample-out-under-file", ["sample", "--checkpoint", "{ck}", "--out", "{ck}/run/config.yaml/g.png"], "config.yaml' is a file, not a folder"),
    ("typo-option", ["sample", "--chekpoint", "{ck}"], "(--chekpoint is not an option: did you mean --checkpoint?)"),
    ("typo-option-value", ["sample", "--checkpoint", "{ck}", "--nmu=3"], "(--nmu is not an option: did you mean --num?)"),
    ("typo-command", ["sampel", "--checkpoint", "{ck}"], "(sampel is not a command: did you mean sample?)"),
    ("typo-demo-option", ["demo", "--step", "10"], "(--step is not an option: did you mean --steps?)"),
    ("no-prefix-matching", ["demo", "--sample-step", "4,2"], "unrecognized arguments: --sample-step"),
    # dfm-ext demo: each option is refused before any data is read or any step is timed
    ("demo-steps-3-stages", ["demo", "--sample-steps", "4,2,1"], "sampling.steps [4, 2, 1] needs one entry per stage (2 for decomposition.kind=laplacian)"),
    ("demo-steps-1-stage", ["demo", "--sample-steps", "4"], "sampling.steps [4]"),
    ("demo-steps-zero", ["demo", "--sample-steps", "0,4"], "'0,4'"),
    ("demo-steps-text", ["demo", "--sample-steps", "a,b"], "'a,b'"),
    ("demo-wavelet-steps", ["demo", "--decomposition", "wavelet", "--sample-steps", "4,2,1"], "(2 for decomposition.kind=wavelet)"),
    ("demo-cfg-nan", ["demo", "--cfg-scale", "nan"], "sampling.guidance_scale must be a finite number, got nan"),
    ("demo-cfg-inf", ["demo", "--cfg-scale", "inf"], "got inf"),
    ("demo-device-unknown", ["demo", "--device", "gpu0"], "'gpu0'"),
    ("demo-max-seconds", ["demo", "--max-train-seconds", "-5"], "train.max_train_seconds must be > 0 or null, got -5.0"),
    ("demo-batch-zero", ["demo", "--batch-size", "0"], "expected an integer >= 1, got 0"),
    ("demo-batch-huge", ["demo", "--batch-size", "100000"], "train.global_batch_size=100000 is larger than the dataset"),
    ("demo-num-eval", ["demo", "--num-eval", "-1"], "got -1"),
    ("demo-steps-text-int", ["demo", "--steps", "abc"], "'abc'"),
    ("demo-size", ["demo", "--size", "huge"], "'huge'"),
    ("demo-set-malformed", ["demo", "--set", "bogus"], "override 'bogus' must look like key.sub=value"),
    ("demo-set-value", ["demo", "--set", "optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
]
if not CUDA:
    CLI_CASES += [
        ("sample-device-cuda", ["sample", "--checkpoint", "{ck}", "--device", "cuda", "--out", "{tmp}/g.png"], "'cuda' is not available"),
        ("demo-device-cuda", ["demo", "--device", "cuda"], "'cuda' is not available"),
    ]


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_value(argv, needle, checkpoint: Path, tmp_path: Path, capsys) -> None:
    argv = [a.format(ck=checkpoint, tmp=tmp_path) for a in argv]
    if argv[0] == "demo":  # never the default outputs/demo of the working folder
        argv += ["--out", str(tmp_path / "demo"), "--no-progress"]
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "demo").exists()


def test_demo_sample_steps_fail_before_training(tmp_path: Path, capsys) -> None:
    """The issue's case: ``dfm-ext demo --sample-steps 4,2,1`` used to train 300 s and then fail."""
    t0 = time.perf_counter()
    assert _status(["demo", "--sample-steps", "4,2,1", "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sampling.steps [4, 2, 1]" in err
    assert not (tmp_path / "out").exists()


# -- the recipe commands -----------------------------------------------------------------------

IMAGENET = ["--config", "tiny", "data.root=/nonexistent/images", "vae.path=/nonexistent/vae"]
KINETICS = ["--config", "tiny", "data.root=/nonexistent/clips", "vae.path=/nonexistent/vae"]
FLUX = ["--config", "flux_tiny", "model.path=/nonexistent/flux", "data.source=/nonexistent/captions"]

RECIPE_CASES = [
    # imagenet: sampling
    ("in-steps-3", imagenet, ["sampling.steps=[4,2,1]"], "sampling.steps [4, 2, 1]"),
    ("in-steps-zero", imagenet, ["sampling.steps=[0,4]"], "steps[0]"),
    ("in-thresholds-none", imagenet, ["sampling.thresholds=[]"], "sampling.thresholds []"),
    ("in-thresholds-two", imagenet, ["sampling.thresholds=[0.9,0.5]"], "sampling.thresholds [0.9, 0.5]"),
    ("in-threshold-range", imagenet, ["sampling.thresholds=[1.5]"], "1.5"),
    ("in-threshold-zero", imagenet, ["sampling.thresholds=[0.0]"], "0.0"),
    ("in-guidance-nan", imagenet, ["sampling.guidance_scale=.nan"], "sampling.guidance_scale must be a finite number, got nan"),
    ("in-guidance-inf", imagenet, ["sampling.guidance_scale=.inf"], "got inf"),
    ("in-classes-high", imagenet, ["sampling.classes=[0,7]"], "sampling.classes [7]"),
    ("in-classes-neg", imagenet, ["sampling.classes=[-1]"], "[-1]"),
    ("in-classes-empty", imagenet, ["sampling.classes=[]"], "sampling.classes is empty"),
    ("in-num-images", imagenet, ["sampling.num_images=0"], "sampling.num_images must be >= 1, got 0"),
    ("in-method", imagenet, ["sampling.method=rk4"], "'rk4'"),
    ("in-metric-images", imagenet, ["sampling.metrics=[swd]", "sampling.metric_images=1"], "got 1"),
    ("in-metric-name", imagenet, ["sampling.metrics=[fid]"], "'fid'"),
    ("in-identity-steps", imagenet, ["decomposition.kind=identity"], "sampling.steps [6, 4]"),
    # imagenet: dfm
    ("in-prob-sum", imagenet, ["dfm.stage_probabilities=[0.5,0.4]"], "(0.5, 0.4)"),
    ("in-prob-len", imagenet, ["dfm.stage_probabilities=[1.0]"], "dfm.stage_probabilities"),
    ("in-prob-neg", imagenet, ["dfm.stage_probabilities=[1.2,-0.2]"], "-0.2"),
    ("in-weights-len", imagenet, ["dfm.stage_weights=[1.0]"], "dfm.stage_weights [1.0]"),
    ("in-weights-neg", imagenet, ["dfm.stage_weights=[1.0,-1.0]"], "-1.0"),
    ("in-current-scale", imagenet, ["dfm.current=[0.0,0.0]"], "dfm.current"),
    ("in-earlier-scale", imagenet, ["dfm.earlier=[1.5,-1.0]"], "dfm.earlier"),
    ("in-current-nan", imagenet, ["dfm.current=[.nan,1.0]"], "dfm.current"),
    ("in-label-dropout", imagenet, ["dfm.label_dropout=1.0"], "dfm.label_dropout must be in [0, 1), got 1.0"),
    ("in-timestep-mode", imagenet, ["dfm.timestep_mode=fancy"], "'fancy'"),
    # imagenet: train, optim, model, data
    ("in-batch-accum", imagenet, ["train.global_batch_size=7", "train.grad_accumulation=2"], "train.global_batch_size=7"),
    ("in-batch-zero", imagenet, ["train.global_batch_size=0"], "train.global_batch_size must be >= 1, got 0"),
    ("in-accum-zero", imagenet, ["train.grad_accumulation=0"], "train.grad_accumulation must be >= 1, got 0"),
    ("in-ema", imagenet, ["train.ema_decay=1.0"], "train.ema_decay"),
    ("in-lr-zero", imagenet, ["optim.lr=0"], "optim.lr must be > 0, got 0"),
    ("in-lr-neg", imagenet, ["optim.lr=-1e-4"], "-0.0001"),
    ("in-preset", imagenet, ["model.preset=XXL/2"], "'XXL/2'"),
    ("in-depth-0", imagenet, ["model.overrides={depth: 0}"], "depth must be a positive int, got 0"),
    ("in-heads", imagenet, ["model.overrides={num_heads: 3}"], "num_heads 3"),
    ("in-override-unknown", imagenet, ["model.overrides={depht: 2}"], "depht"),
    ("in-resolution", imagenet, ["data.resolution=30"], "data.resolution 30"),
    ("in-num-classes", imagenet, ["data.num_classes=0"], "data.num_classes must be >= 1, got 0"),
    ("in-unknown-key", imagenet, ["sampling.stepz=[1]"], "sampling.stepz"),
    ("in-type", imagenet, ["train.steps=abc"], "'abc'"),
    ("in-malformed", imagenet, ["sampling.steps"], "'sampling.steps'"),
    ("in-lora-rank", imagenet, ["specialize.kind=lora", "specialize.rank=0"], "specialize.rank must be >= 1, got 0"),
    # values that used to train silently wrong or fail late (issue 25)
    ("in-betas-high", imagenet, ["optim.betas=[0.9,1.5]"], "optim.betas [0.9, 1.5] must both be in [0, 1)"),
    ("in-betas-neg", imagenet, ["optim.betas=[-0.1,0.99]"], "optim.betas [-0.1, 0.99]"),
    ("in-eps-zero", imagenet, ["optim.eps=0"], "optim.eps must be > 0, got 0"),
    ("in-weight-decay-neg", imagenet, ["optim.weight_decay=-1"], "optim.weight_decay must be >= 0, got -1"),
    ("in-lr-inf", imagenet, ["optim.lr=.inf"], "optim.lr must be > 0, got inf"),
    ("in-seed-neg", imagenet, ["train.seed=-1"], "train.seed must be >= 0, got -1"),
    ("in-fp16-cpu", imagenet, ["train.mixed_precision=fp16", "train.cpu=true"], "train.mixed_precision=fp16 with train.cpu=true"),
    ("in-vae-scale-zero", imagenet, ["vae.scaling_factor=0"], "vae.scaling_factor must be a finite non-zero number or null, got 0.0"),
    ("in-vae-scale-nan", imagenet, ["vae.scaling_factor=.nan"], "vae.scaling_factor must be a finite non-zero number or null, got nan"),
    ("in-vae-shift-inf", imagenet, ["vae.shift_factor=.inf"], "vae.shift_factor must be a finite number or null, got inf"),
    ("in-max-skips-neg", imagenet, ["data.max_skips=-1"], "data.max_skips must be >= 0, got -1"),
    ("in-resolution-zero", imagenet, ["data.resolution=0"], "data.resolution must be >= 1, got 0"),
    ("in-downsample-zero", imagenet, ["vae.downsample=0"], "vae.downsample 0"),
    ("in-progress-prior", imagenet, ["dfm.allocation=progress", "dfm.stage_probabilities=[1,0]"],
     "dfm.stage_probabilities (the prior of dfm.allocation=progress)"),
    ("in-reducible-prior", imagenet, ["dfm.allocation=reducible", "dfm.stage_probabilities=[1,0]"],
     "dfm.stage_probabilities (the prior of dfm.allocation=reducible)"),
    ("in-allocation-name", imagenet, ["dfm.allocation=greedy"], "'greedy' is not one of ['fixed', 'progress', 'reducible']"),
    ("in-targets", imagenet, ["specialize.kind=full", "specialize.targets=[bogus]"], "bogus"),
    # kinetics
    ("k-steps-3", kinetics, ["sampling.steps=[4,2,1]"], "sampling.steps [4, 2, 1]"),
    ("k-thresholds", kinetics, ["sampling.thresholds=[]"], "sampling.thresholds []"),
    ("k-guidance-nan", kinetics, ["sampling.guidance_scale=.nan"], "got nan"),
    ("k-classes", kinetics, ["sampling.classes=[4]"], "sampling.classes [4]"),
    ("k-fps", kinetics, ["sampling.fps=0"], "sampling.fps must be > 0, got 0"),
    ("k-formats", kinetics, ["sampling.formats=[avi]"], "avi"),
    ("k-prob-sum", kinetics, ["dfm.stage_probabilities=[0.3,0.3]"], "(0.3, 0.3)"),
    ("k-scales-len", kinetics, ["dfm.scales=[1.0]"], "dfm.scales [1.0]"),
    ("k-scales-zero", kinetics, ["dfm.scales=[1.0,0.0]"], "dfm.scales [1.0, 0.0]"),
    ("k-current", kinetics, ["dfm.current=[0.0,-1.0]"], "dfm.current"),
    ("k-preset", kinetics, ["model.preset=huge"], "'huge'"),
    ("k-depth-0", kinetics, ["model.overrides={depth: 0}"], "got 0"),
    ("k-frames", kinetics, ["data.num_frames=10"], "data.num_frames 10"),
    ("k-batch", kinetics, ["train.global_batch_size=3", "train.grad_accumulation=2"], "train.global_batch_size=3"),
    ("k-resolution-zero", kinetics, ["data.resolution=0"], "data.resolution must be >= 1, got 0"),
    ("k-spatial-zero", kinetics, ["vae.spatial_downsample=0"], "vae.spatial_downsample must be >= 1, got 0"),
    ("k-temporal-zero", kinetics, ["vae.temporal_downsample=0"], "vae.temporal_downsample must be >= 1, got 0"),
    ("k-max-skips-neg", kinetics, ["data.max_skips=-1"], "data.max_skips must be >= 0, got -1"),
    ("k-vae-scale-zero", kinetics, ["vae.scaling_factor=0"], "vae.scaling_factor must be a finite non-zero number"),
    # flux
    ("f-steps-1", flux_finetune, ["sampling.steps=[4]"], "sampling.steps [4]"),
    ("f-thresholds", flux_finetune, ["sampling.thresholds=[0.9,0.9]"], "sampling.thresholds [0.9, 0.9]"),
    ("f-guidance-nan", flux_finetune, ["sampling.guidance_scale=.nan"], "got nan"),
    ("f-prompts", flux_finetune, ["sampling.prompts=[]"], "sampling.prompts is empty"),
    ("f-model-guidance", flux_finetune, ["model.guidance=.inf"], "model.guidance must be a finite number, got inf"),
    ("f-prob-sum", flux_finetune, ["dfm.stage_probabilities=[0.6,0.6]"], "(0.6, 0.6)"),
    ("f-batch", flux_finetune, ["train.global_batch_size=3", "train.grad_accumulation=2"], "train.global_batch_size=3"),
    ("f-lora-rank", flux_finetune, ["finetune.lora_rank=0"], "finetune.lora_rank must be >= 1, got 0"),
    ("f-betas", flux_finetune, ["optim.betas=[1.0,0.99]"], "optim.betas [1.0, 0.99]"),
    ("f-vae-scale-nan", flux_finetune, ["vae.scaling_factor=.nan"], "vae.scaling_factor must be a finite non-zero number"),
]
if not CUDA:
    RECIPE_CASES.append(("in-fp16-no-cuda", imagenet, ["train.mixed_precision=fp16", "train.cpu=false"], "fp16 needs a CUDA device"))
_BASE = {imagenet: IMAGENET, kinetics: KINETICS, flux_finetune: FLUX}


@pytest.mark.parametrize(("module", "overrides", "needle"), [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_recipe_bad_value(module, overrides, needle, capsys) -> None:
    assert module.main([*_BASE[module], *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err


def test_recipe_batch_vs_process_count(monkeypatch, capsys) -> None:
    """``accelerate launch`` sets WORLD_SIZE: 8 samples over 3 processes fail at start-up."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert imagenet.main(IMAGENET) == 2
    assert "train.global_batch_size=8 is not divisible by 3 process(es)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  steps: [1\n", "line 3"),  # an unclosed list
        ("train:\n\tsteps: 4\n", "YAML syntax error"),  # a tab
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("train:\n  steps: 0\n", "train.steps must be >= 1, got 0"),
    ],
    ids=["yaml-unclosed", "yaml-tab", "yaml-list", "yaml-value"],
)
def test_recipe_bad_yaml_file(text, needle, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert imagenet.main(["--config", str(path), "data.root=/x", "vae.path=/y"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-m", "dfm_ext.recipes.imagenet", *IMAGENET, "sampling.steps=[4,2,1]"], "sampling.steps [4, 2, 1]"),
        (["-m", "dfm_ext.recipes.demo", "demo", "--sample-steps", "4,2,1"], "sampling.steps [4, 2, 1]"),
    ],
    ids=["subprocess-recipe", "subprocess-cli"],
)
def test_subprocess_exit_status_2(argv, needle) -> None:
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr


# -- files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrapped_dir(tmp_path_factory) -> Path:
    from dfm_ext.models.dit import DiT, DiTConfig

    d = tmp_path_factory.mktemp("wrapped") / "w"
    torch.manual_seed(0)
    base = DiT(DiTConfig.preset("tiny", input_size=8, in_channels=3, num_classes=4))
    dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(3, 8, 8)).save_pretrained(d)
    return d


def _rmtree(d: Path) -> None:
    import shutil

    shutil.rmtree(d)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_json(path: Path, fn) -> None:
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


WRAPPED_CASES = [
    # (id, change to the copied folder, exception, substring; "{d}" is the folder)
    ("no-folder", lambda d: _rmtree(d), FileNotFoundError, "does not exist"),
    ("no-config", lambda d: (d / "dfm_config.json").unlink(), FileNotFoundError, "dfm_config.json is missing"),
    ("no-weights", lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors is missing"),
    ("bad-json", lambda d: (d / "dfm_config.json").write_text("{not json"), ValueError, "dfm_config.json is not valid JSON"),
    ("wrong-format", lambda d: _edit_json(d / "dfm_config.json", lambda r: r.update(format="other/9")), ValueError, "'other/9'"),
    ("missing-key", lambda d: _edit_json(d / "dfm_config.json", lambda r: r.pop("patch_sizes")), ValueError, "['patch_sizes']"),
    ("truncated", lambda d: _truncate(d / "model.safetensors"), ValueError, "model.safetensors is not a readable safetensors file"),
    ("garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), ValueError, "model.safetensors is not a readable"),
    ("shape-mismatch", lambda d: _edit_json(d / "dfm_config.json", lambda r: r["base"]["config"].update(hidden_size=128)),
     ValueError, "base.config.hidden_size=128; the file fits 64"),
    ("bad-base-config", lambda d: _edit_json(d / "dfm_config.json", lambda r: r["base"]["config"].update(depth=0)),
     ValueError, "depth must be a positive int, got 0"),
]


@pytest.mark.parametrize(("change", "exc", "needle"), [c[1:] for c in WRAPPED_CASES], ids=[c[0] for c in WRAPPED_CASES])
def test_load_wrapped_bad_file(change, exc, needle, wrapped_dir: Path, tmp_path: Path) -> None:
    d = _copy(wrapped_dir, tmp_path / "w")
    change(d)
    with pytest.raises(exc) as e:
        dfm_ext.load_wrapped(d)
    assert needle in str(e.value), str(e.value)
    if needle != "does not exist":
        assert str(d) in str(e.value)  # the message names the file


@pytest.fixture(scope="module")
def specialised_dir(tmp_path_factory) -> Path:
    from dfm_ext.models.dit import DiT, DiTConfig

    d = tmp_path_factory.mktemp("spec") / "s"
    torch.manual_seed(0)
    base = DiT(DiTConfig.preset("tiny", input_size=8, in_channels=3, num_classes=4))
    model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(3, 8, 8))
    dfm_ext.specialize(model, kind="lora", targets=["mlp"], rank=2)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def specialised_v1_dir(wrapped_dir: Path, tmp_path_factory) -> Path:
    """A specialisation saved beside an unspecialised model (save_specialization: stage_lora.json + weights)."""
    from dfm_ext.models.dit import DiT, DiTConfig

    d = _copy(wrapped_dir, tmp_path_factory.mktemp("spec1") / "s")
    torch.manual_seed(0)
    base = DiT(DiTConfig.preset("tiny", input_size=8, in_channels=3, num_classes=4))
    model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(3, 8, 8))
    dfm_ext.save_specialization(dfm_ext.specialize(model, kind="lora", targets=["mlp"], rank=2), d)
    return d


V2_SPEC_CASES = [
    ("no-weights", lambda d: (d / "stage_parameters.safetensors").unlink(), FileNotFoundError, "stage_parameters.safetensors, which is missing"),
    ("truncated", lambda d: _truncate(d / "stage_parameters.safetensors"), ValueError, "stage_parameters.safetensors"),
    ("no-kind", lambda d: _edit_json(d / "dfm_config.json", lambda r: r["specialization"].pop("kind")), ValueError, "['kind']"),
    ("unknown-layer", lambda d: _edit_json(d / "dfm_config.json", lambda r: r["specialization"].update(layers=["base.nope.fc1"])), ValueError, "base.nope.fc1"),
]


@pytest.mark.parametrize(("change", "exc", "needle"), [c[1:] for c in V2_SPEC_CASES], ids=[c[0] for c in V2_SPEC_CASES])
def test_load_wrapped_bad_specialization(change, exc, needle, specialised_dir: Path, tmp_path: Path) -> None:
    d = _copy(specialised_dir, tmp_path / "s")
    change(d)
    with pytest.raises(exc) as e:
        dfm_ext.load_wrapped(d)
    assert needle in str(e.value), str(e.value)


SPEC_CASES = [
    ("no-weights", lambda d: (d / "stage_parameters.safetensors").unlink(), FileNotFoundError, "stage_parameters.safetensors are missing"),
    ("no-record", lambda d: (d / "stage_lora.json").unlink(), FileNotFoundError, "stage_lora.json is missing"),
    ("bad-json", lambda d: (d / "stage_lora.json").write_text("{"), ValueError, "stage_lora.json"),
    ("truncated", lambda d: _truncate(d / "stage_parameters.safetensors"), ValueError, "stage_parameters.safetensors"),
    ("unknown-layer", lambda d: _edit_json(d / "stage_lora.json", lambda r: r.update(layers=["base.nope.fc1"])), ValueError, "base.nope.fc1"),
]


@pytest.mark.parametrize(("change", "exc", "needle"), [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_load_specialization_bad_file(change, exc, needle, specialised_v1_dir: Path, tmp_path: Path) -> None:
    d = _copy(specialised_v1_dir, tmp_path / "s")
    change(d)
    with pytest.raises(exc) as e:
        model = dfm_ext.load_wrapped(d)
        dfm_ext.load_specialization(model, d)
    assert needle in str(e.value), str(e.value)


RUN_CASES = [
    # (id, change to a copy of the demo output folder, substring)
    ("no-config-yaml", lambda d: (d / "run" / "config.yaml").unlink(), "config.yaml (its run's config"),
    ("bad-model-record", lambda d: (d / "run" / "final" / "dfm_config.json").write_text("{not json"), "dfm_config.json is not valid JSON"),
    ("no-model-record", lambda d: (d / "run" / "final" / "dfm_config.json").unlink(), "holds no trained model: expected dfm_config.json"),
    ("truncated", lambda d: _truncate(d / "run" / "final" / "model.safetensors"), "model.safetensors is not a readable safetensors file"),
    ("bad-config-yaml", lambda d: (d / "run" / "config.yaml").write_text("train: [1\n"), "YAML syntax error"),
    ("classes-disagree", lambda d: _edit_yaml(d / "run" / "config.yaml", "data", num_classes=5), "says data.num_classes=5 but the model"),
    ("latent-run", lambda d: _edit_yaml(d / "run" / "config.yaml", "vae", kind="diffusers"), "trains on VAE latents (vae.kind=diffusers)"),
]


def _edit_yaml(path: Path, section: str, **values) -> None:
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize(("change", "needle"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_sample_bad_run_folder(change, needle, checkpoint: Path, tmp_path: Path, capsys) -> None:
    import shutil

    d = Path(shutil.copytree(checkpoint, tmp_path / "demo"))
    change(d)
    for target in (d, d / "run", d / "run" / "final"):  # the demo folder, the run folder, its final/
        assert _status(["sample", "--checkpoint", str(target), "--out", str(tmp_path / "g.png")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "g.png").exists()


def test_sample_does_not_write_into_a_folder_of_other_files(checkpoint: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert _status(["sample", "--checkpoint", str(checkpoint), "--num", "1", "--steps", "1,1", "--out", str(tmp_path)]) == 2
    assert "holds other files (['notes.txt'])" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_sample_refuses_an_unwritable_out_before_drawing(checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A read-only --out (os.access as a read-only mount answers it, also for root) is refused before any sampling."""
    from dfm_ext.recipes.demo import report

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(report.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    monkeypatch.setattr(report, "generate", lambda *a, **k: pytest.fail("sampled before checking --out"))
    assert _status(["sample", "--checkpoint", str(checkpoint), "--out", str(locked / "g.png")]) == 2
    assert f"{str(locked)!r} is not writable" in capsys.readouterr().err


def test_sixteen_bit_png_brightness(tmp_path: Path) -> None:
    """A 16-bit grey PNG decodes to the brightness of its 8-bit version (it used to clip to white)."""
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(u8, mode="L").save(tmp_path / "a8.png")
    u16 = (u8.astype(np.uint16) * 257).astype(np.uint16)  # 255 * 257 = 65535
    Image.fromarray(u16).save(tmp_path / "b16.png")  # Pillow: uint16 -> mode I;16
    with Image.open(tmp_path / "b16.png") as im:
        assert im.mode in ("I;16", "I")  # really stored as 16 bit
    a, b = read_image(tmp_path / "a8.png"), read_image(tmp_path / "b16.png")
    assert a.shape == b.shape == (16, 16, 1)
    assert np.abs(a - b).max() <= 1 / 255 + 1e-6
    assert 0.4 < b.mean() < 0.6  # not white
    folder, _ = read_png_folder(tmp_path)
    assert torch.allclose(folder[0], folder[1], atol=2 / 255)


def test_eval_skips_and_counts_unreadable_images(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8), mode="L").save(tmp_path / f"{i:05d}.png")
    (tmp_path / "00003.png").write_bytes(b"not a png")
    data = (tmp_path / "00000.png").read_bytes()
    (tmp_path / "00004.png").write_bytes(data[: len(data) // 2])
    images, skipped = read_png_folder(tmp_path)
    assert images.shape == (3, 1, 32, 32)
    assert sorted(p.name for p in skipped) == ["00003.png", "00004.png"]
    # with a limit, reading goes on past the unreadable files
    assert read_png_folder(tmp_path, limit=2)[0].shape[0] == 2
