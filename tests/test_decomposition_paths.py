"""Every decomposition through every entry point builds what is configured and reloads exactly.

Entry points: the recipe config (``decomposition:`` section, 2 training steps of ``tiny``),
``dfm-ext demo --decomposition`` (+ ``dfm-ext sample`` from its checkpoint), and
``save_pretrained`` -> ``load_wrapped``. Each has one real subprocess; the rest run in process
through the same functions the command lines call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dfm_ext
from dfm_ext import DiT, DiTConfig, LaplacianPyramid, decomposition_config, decomposition_from_config, load_wrapped, wrap_dit
from dfm_ext.decompositions.factory import config_from_record

# (id, factory config): Laplacian 2 and 3 stages, wavelets with factors, DCT, identity.
CASES = [
    ("laplacian2", {"kind": "laplacian", "factors": [2, 1]}),
    ("laplacian3", {"kind": "laplacian", "factors": [4, 2, 1], "up": "bicubic"}),
    ("haar", {"kind": "wavelet", "wave": "haar", "factors": [4, 1]}),
    ("db2", {"kind": "wavelet", "wave": "db2", "factors": [4, 2, 1]}),
    ("dct", {"kind": "dct", "block_size": 4, "bands": [1, 2]}),
    ("identity", {"kind": "identity"}),
]
IDS = [c[0] for c in CASES]
CONFIGS = dict(CASES)


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _expected(config: dict) -> dict:
    """The canonical config (every field of the kind) of what ``config`` describes."""
    return decomposition_config(decomposition_from_config(config))


# ---------------------------------------------------------------------------------- the factory


@pytest.mark.parametrize("name", IDS)
def test_factory_round_trip_is_exact(name: str) -> None:
    d = decomposition_from_config(CONFIGS[name])
    cfg = decomposition_config(d)
    assert {k: v for k, v in cfg.items() if k in CONFIGS[name]} == CONFIGS[name]  # nothing dropped or changed
    again = decomposition_from_config(json.loads(json.dumps(cfg)))
    assert type(again) is type(d) and repr(again) == repr(d) and decomposition_config(again) == cfg
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(d.decompose(x), again.decompose(x)))


def test_factory_refuses_fields_of_other_kinds_and_bad_values() -> None:
    with pytest.raises(ValueError, match=r"'factors' does not apply to kind='dct'; its fields are block_size, bands"):
        decomposition_from_config({"kind": "dct", "factors": [4, 1]})
    with pytest.raises(ValueError, match=r"unknown kind 'pyramid'; choose one of laplacian, wavelet, dct, identity"):
        decomposition_from_config({"kind": "pyramid"})
    with pytest.raises(ValueError, match=r"either factors or levels/num_stages.*factors=\[4, 1\], levels=2"):
        decomposition_from_config({"kind": "wavelet", "factors": [4, 1], "levels": 2})
    with pytest.raises(ValueError, match=r"powers of two.*\(3, 1\)"):
        decomposition_from_config({"kind": "wavelet", "factors": [3, 1]})
    with pytest.raises(TypeError, match="not a built-in decomposition"):
        decomposition_config(type("Custom", (), {"num_stages": 1})())


def test_records_without_a_config_are_custom_decompositions() -> None:
    """Only ``save_pretrained``'s ``config`` rebuilds a decomposition (no reader for layouts no release wrote)."""
    assert config_from_record({"class": "my.pkg:Mine", "repr": "Mine()", "config": None}) is None
    lap = {"class": "dfm_ext.decompositions.laplacian:LaplacianPyramid", "config": {"kind": "laplacian", "factors": [2, 1]}}
    assert decomposition_config(decomposition_from_config(config_from_record(lap)))["factors"] == [2, 1]


# ---------------------------------------------------------------------- save_pretrained -> load


@pytest.mark.parametrize("name", IDS)
def test_save_pretrained_load_wrapped(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    d = decomposition_from_config(CONFIGS[name])
    base = DiT(DiTConfig.preset("tiny", input_size=16, patch_size=4, hidden_size=32, depth=1, in_channels=4))
    wrapped = wrap_dit(base, d, init="scratch").eval()
    with torch.no_grad():
        for p in wrapped.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrapped.save_pretrained(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "dfm_config.json").read_text())["decomposition"]
    assert record["config"] == _expected(CONFIGS[name])
    loaded = load_wrapped(tmp_path / "m").eval()
    assert repr(loaded.decomposition) == repr(d) and decomposition_config(loaded.decomposition) == record["config"]
    g = torch.Generator().manual_seed(1)
    stages = d.decompose(torch.randn(2, 4, 16, 16, generator=g))
    s = d.num_stages
    args = (stages, torch.rand(2, s, generator=g), torch.full((2,), s - 1))
    with torch.no_grad():
        a, b = wrapped(*args, y=torch.tensor([1, 2])), loaded(*args, y=torch.tensor([1, 2]))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ---------------------------------------------------------------------------------- the recipe

# Latent 16 x 16 on a 4 x 4 token grid, so stages at 1/4 resolution still cover the grid.
RECIPE = ["data.resolution=64", "model.overrides={patch_size: 4, hidden_size: 32, depth: 1}", "train.steps=2",
          "train.sample_every=0", "train.checkpoint_every=2", "train.log_every=1", "train.progress=false",
          "train.trackers=[none]", "optim.warmup_steps=1"]  # fmt: skip


def _recipe_overrides(name: str) -> list[str]:
    config = CONFIGS[name]
    out = [f"decomposition.{k}={json.dumps(v)}" for k, v in config.items()]
    if config["kind"] in ("dct", "identity"):
        out.append("decomposition.factors=null" if config["kind"] == "dct" else "decomposition.factors=[1]")
    s = decomposition_from_config(config).num_stages
    steps = [2] * s
    return [*out, f"sampling.steps={steps}", f"sampling.thresholds={[0.9] * (s - 1)}"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from _recipe_fixtures import tiny_image_assets

    return tiny_image_assets(tmp_path_factory.mktemp("paths_assets"), per_class=2)


def _check_recipe_run(out: Path, name: str) -> None:
    from safetensors.torch import load_model

    from dfm_ext.recipes.engine.config import from_dict
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

    expected = _expected(CONFIGS[name])
    saved = yaml.safe_load((out / "config.yaml").read_text())["decomposition"]
    assert {k: saved[k] for k in expected} == expected  # config.yaml says what was built
    cfg = from_dict(ImageNetConfig, yaml.safe_load((out / "config.yaml").read_text()))
    loaded = load_wrapped(out / "final").eval()
    assert decomposition_config(loaded.decomposition) == expected
    # The recipe's own model construction, with the final weights, gives identical outputs.
    torch.manual_seed(0)
    rebuilt = ImageNetTask(cfg).build_model().eval()
    load_model(rebuilt, str(out / "final" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    stages = loaded.decomposition.decompose(torch.randn(2, 4, 16, 16, generator=g))
    s = len(stages)
    args = (stages, torch.rand(2, s, generator=g), torch.full((2,), s - 1))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(*args, y=torch.tensor([0, 1])), rebuilt(*args, y=torch.tensor([0, 1]))))


@pytest.mark.parametrize("name", IDS)
def test_recipe_builds_the_configured_decomposition(name: str, assets: Path, tmp_path: Path) -> None:
    from dfm_ext.recipes.imagenet.task import main

    out = tmp_path / "run"
    argv = ["--config", "tiny", f"data.root={assets / 'images'}", f"vae.path={assets}", f"train.output_dir={out}",
            *RECIPE, *_recipe_overrides(name)]  # fmt: skip
    if name == "db2":  # the real command line once (the entry a user runs)
        res = subprocess.run([sys.executable, "-m", "dfm_ext.recipes.imagenet", *argv], env=_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        assert main(argv) == 0
    _check_recipe_run(out, name)


def test_recipe_refuses_a_field_of_another_kind_before_compute() -> None:
    from dfm_ext.recipes.engine.config import ConfigError, load_config
    from dfm_ext.recipes.imagenet.task import ImageNetConfig

    with pytest.raises(ConfigError, match=r"decomposition.wave=db2 applies to kind=wavelet, not kind=laplacian"):
        load_config(ImageNetConfig, "tiny", ["decomposition.wave=db2"])
    with pytest.raises(ConfigError, match=r"decomposition.factors=\[4, 1\] applies to kind=laplacian/wavelet, not kind=dct"):
        load_config(ImageNetConfig, "tiny", ["decomposition.kind=dct", "decomposition.factors=[4, 1]"])
    with pytest.raises(ConfigError, match=r"kind=dct: block_size must be >= 2.*got 1"):
        load_config(ImageNetConfig, "tiny", ["decomposition.kind=dct", "decomposition.block_size=1"])
    cfg = load_config(ImageNetConfig, "tiny", ["decomposition.kind=wavelet", "decomposition.levels=2"])
    assert cfg.decomposition.factors == (4, 2, 1) and cfg.decomposition.levels is None  # written as built


def test_old_run_configs_still_resume() -> None:
    """A config.yaml from before (only ``kind`` and ``factors``) matches the same run now."""
    from dfm_ext.recipes.engine.config import config_to_dict, load_config
    from dfm_ext.recipes.engine.config import config_diff
    from dfm_ext.recipes.imagenet.task import ImageNetConfig

    defaults = config_to_dict(ImageNetConfig())
    for overrides, old in [
        ([], {"kind": "laplacian", "factors": [2, 1]}),
        (["decomposition.kind=identity", "decomposition.factors=[1]"], {"kind": "identity", "factors": [1]}),
    ]:
        new = config_to_dict(load_config(ImageNetConfig, "tiny", overrides))
        stored = {**new, "decomposition": old}
        assert config_diff(stored, new, defaults) == []


# ------------------------------------------------------------------------------------ the demo

DEMO = ["--size", "tiny", "--steps", "2", "--num-eval", "0", "--no-fd", "--dataset", "skimage", "--batch-size", "4",
        "--sample-steps", "1,1", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("kind", ["laplacian", "wavelet", "dct", "identity"])
def test_demo_run_holds_and_reloads_the_decomposition(kind: str, tmp_path: Path) -> None:
    from PIL import Image

    from dfm_ext.recipes.demo.cli import main
    from dfm_ext.recipes.demo.report import generate, load_run
    from dfm_ext.recipes.engine.viz import to_uint8

    out = tmp_path / "demo"
    if kind == "dct":  # the real console script once
        res = subprocess.run([sys.executable, "-m", "dfm_ext.recipes.demo", "demo", "--out", str(out), "--decomposition", kind, *DEMO],
                             env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        assert main(["demo", "--out", str(out), "--decomposition", kind, *DEMO]) == 0
    expected = _expected({"kind": kind})
    run = load_run(out)
    assert decomposition_config(run.model.decomposition) == expected
    assert decomposition_config(run.config.decomposition.build()) == expected  # the run's config.yaml says what was built
    # dfm-ext sample from the run equals sampling the reloaded model directly.
    assert main(["sample", "--checkpoint", str(out), "--num", "1", "--out", str(tmp_path / "s")]) == 0
    labels = torch.arange(run.config.data.num_classes)
    images, _ = generate(run.model, run.config, labels, guidance=run.config.sampling.guidance_scale, generator=torch.Generator().manual_seed(0))
    for i, arr in enumerate(to_uint8(images)):
        with Image.open(tmp_path / "s" / f"{i:05d}_class{i}.png") as im:
            assert np.array_equal(np.asarray(im).reshape(arr.shape), arr)


# ------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(name: str, dtype: torch.dtype) -> None:
    """bf16/fp16 in, same dtype out, equal to the float32 computation cast (no half-precision maths)."""
    d = decomposition_from_config(CONFIGS[name])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    stages = d.decompose(x)
    ref = d.decompose(x.float())
    assert all(s.dtype == dtype and torch.equal(s, r.to(dtype)) for s, r in zip(stages, ref))
    wide = [s.float() for s in stages]
    out = d.recompose(stages)
    assert out.dtype == dtype and torch.equal(out, d.recompose(wide).to(dtype))
    for upto in range(d.num_stages):
        p = d.preview(stages, upto)
        assert p.dtype == dtype and torch.equal(p, d.preview(wide, upto).to(dtype))


# ------------------------------------------------------------------------- inside mixed precision

AUTOCAST_CONFIGS = {
    **CONFIGS,
    "db2": {"kind": "wavelet", "wave": "db2", "factors": [2, 1]},
    "dct-bands": {"kind": "dct", "block_size": 4, "bands": [1, 2]},
    "laplacian-3": {"kind": "laplacian", "factors": [4, 2, 1]},
}


@pytest.mark.parametrize("name", sorted(AUTOCAST_CONFIGS))
def test_decompositions_are_exact_inside_bf16_autocast(name: str) -> None:
    """A mixed-precision training step decomposes inside autocast: stages stay float32 and exact."""
    d = decomposition_from_config(AUTOCAST_CONFIGS[name])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stages = d.decompose(x)
        back, preview = d.recompose(stages), d.preview(stages, 0)
    assert all(s.dtype == torch.float32 for s in stages) and back.dtype == preview.dtype == torch.float32
    assert float((back - x).abs().max() / x.abs().max()) <= 1e-6
    for s, ref in zip(stages, d.decompose(x)):
        assert torch.equal(s, ref)  # the same numbers as outside autocast


def test_the_per_stage_error_is_float32_inside_bf16_autocast() -> None:
    """The model runs in bf16 under autocast; the DFM error and loss are still computed in float32."""
    torch.manual_seed(0)
    base = DiT(DiTConfig.preset("tiny", input_size=16, in_channels=4, num_classes=4, class_dropout_prob=0.0))
    model = wrap_dit(base, LaplacianPyramid(factors=(2, 1)), sample_shape=(4, 16, 16))
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    times = dfm_ext.StageTimestepSampler(2).sample(4, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stages = model.decomposition.decompose(x)
        out = dfm_ext.DFMObjective(2)(model, stages, times, generator=torch.Generator().manual_seed(3), y=torch.arange(4))
        assert model(stages, times.t, times.stage, times.mask, y=torch.arange(4))[0].dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in out.per_stage)
