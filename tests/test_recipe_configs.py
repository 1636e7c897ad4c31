"""Every config shipped under the recipes starts: 2 optimiser steps through the command a user runs.

Each YAML keeps its structure (number of stages and factors, decomposition kind, the model's patch
size and positions, specialisation, finetuning mode, checkpointing) and only shrinks what costs time:
the model's width and depth, the resolution (the latent keeps its ratio to the coarsest stage), the
run's length, the VAE (the tiny offline ones, with their downsampling) and the sample counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _recipe_fixtures import tiny_image_assets

ROOT = Path(__file__).resolve().parents[1] / "src" / "dfm_ext" / "recipes"
CONFIGS = sorted(f"{p.parent.parent.name}/{p.stem}" for p in ROOT.glob("*/configs/*.yaml"))
SMALL = {"hidden_size": 32, "depth": 1, "num_heads": 2}
RUN = ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=2", "train.log_every=1", "train.trackers=[]",
       "train.num_workers=0", "train.cpu=true", "train.mixed_precision=no", "train.progress=false", "optim.warmup_steps=1"]  # fmt: skip


def _dict(d: dict) -> str:
    return yaml.safe_dump(dict(d), default_flow_style=True).strip()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return tiny_image_assets(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    pytest.importorskip("av")
    from dfm_ext.recipes.kinetics.assets import make_tiny_video_vae, make_video_folder

    root = tmp_path_factory.mktemp("videos")
    make_video_folder(root / "videos", per_class=1, frames=12, height=40)
    make_tiny_video_vae(root)
    return root


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from dfm_ext.recipes.flux.assets import make_captioned_images, make_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    make_tiny_flux(root / "flux")
    make_captioned_images(root / "images", per_photo=2)
    return root


def _stages_and_factor(cfg) -> tuple[int, int]:  # noqa: ANN001
    return cfg.num_stages, max(cfg.decomposition.factors or (1,))


def _imagenet(name: str, images: Path, out: Path) -> list[str]:
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.imagenet.task import ImageNetConfig

    cfg = load_config(ImageNetConfig, name)
    s, f = _stages_and_factor(cfg)
    latent = 8 * f  # the coarsest stage stays 8 x 8 whatever the factors
    return [
        "--config", name, f"data.root={images / 'images'}", f"vae.path={images}", "vae.downsample=4", "vae.latent_channels=4",
        f"data.resolution={4 * latent}", "data.num_classes=4", f"model.overrides={_dict({**cfg.model.overrides, **SMALL})}",
        f"sampling.steps={[2] * s}", "sampling.num_images=2", "sampling.metrics=[]", "sampling.classes=null",
        "train.global_batch_size=4", f"train.output_dir={out}", *RUN,
    ]  # fmt: skip


def _kinetics(name: str, videos: Path, out: Path) -> list[str]:
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.kinetics.task import CONFIG_ALIASES, KineticsConfig

    cfg = load_config(KineticsConfig, CONFIG_ALIASES.get(name, name))
    s, f = _stages_and_factor(cfg)
    return [
        "--config", name, f"data.root={videos / 'videos'}", f"vae.path={videos}", "vae.spatial_downsample=4",
        "vae.temporal_downsample=4", "vae.latent_channels=4", "data.num_frames=9", f"data.resolution={32 * f}",
        "data.num_classes=4", "data.frame_stride=1", f"model.overrides={_dict({**cfg.model.overrides, **SMALL})}",
        f"sampling.steps={[2] * s}", "sampling.num_videos=2", "sampling.formats=[png]", "sampling.classes=null",
        "dfm.scale_estimation_clips=2", "train.global_batch_size=4", f"train.output_dir={out}", *RUN,
    ]  # fmt: skip


def _flux(name: str, flux: Path, out: Path) -> list[str]:
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.flux.config import FluxFinetuneConfig

    cfg = load_config(FluxFinetuneConfig, name)
    return [
        "--config", name, f"model.path={flux / 'flux'}", f"data.source={flux / 'images'}", "data.resolutions=[32, 48]",
        "data.bucket_multiple=16", "data.min_area_fraction=0.0", "data.max_sequence_length=8", "vae.downsample=4",
        "sampling.height=32", "sampling.width=32", f"sampling.steps={[2] * cfg.num_stages}", "train.global_batch_size=2",
        f"train.output_dir={out}", *RUN,
    ]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_trains_two_steps(config: str, request, tmp_path: Path, capsys) -> None:
    recipe, name = config.split("/")
    out = tmp_path / "run"
    if recipe == "demo":
        from dfm_ext.recipes.demo.cli import main

        argv = ["demo", "--out", str(tmp_path / "demo"), "--size", "tiny", "--steps", "2", "--num-eval", "0", "--no-fd",
                "--no-progress", "--sample-steps", "2,2", "--batch-size", "8", "--dataset", "skimage"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        out = tmp_path / "demo" / "run"
    else:
        import importlib

        build = {"imagenet": _imagenet, "kinetics": _kinetics, "flux": _flux}[recipe]
        assets = request.getfixturevalue({"imagenet": "images", "kinetics": "videos", "flux": "flux"}[recipe])
        status = importlib.import_module(f"dfm_ext.recipes.{recipe}").main(build(name, assets, out))
        assert status == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["last_loss"] == summary["last_loss"]  # not NaN
    assert (out / "final").is_dir() and (out / "checkpoints" / "step-000002").is_dir()


def test_the_library_names_the_token_grid_the_stages_need() -> None:
    """wrap_dit of a DiT-XL/2 on 128 x 128 latents with factors [4, 1] says which patch size fits (4), and it does."""
    import dfm_ext

    def dit(patch: int) -> dfm_ext.DiT:
        return dfm_ext.DiT(dfm_ext.DiTConfig.preset("XL/2", input_size=128, in_channels=16, rope=True, depth=1, patch_size=patch))

    with pytest.raises(ValueError, match=r"patch size 4 for samples \(128, 128\)"):
        dfm_ext.wrap_dit(dit(2), dfm_ext.LaplacianPyramid((4, 1)))
    wrapped = dfm_ext.wrap_dit(dit(4), dfm_ext.LaplacianPyramid((4, 1)))
    assert wrapped.packer.grid == (32, 32) and [tuple(p) for p in wrapped.packer.patch_sizes] == [(1, 1), (4, 4)]
