"""The ImageNet recipe with a user's model factory: the time convention is asked for, never guessed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from dfm_ext.recipes.imagenet.task import main as imagenet_main
from dfm_ext.recipes.engine.cli import make_tiny_vae
from dfm_ext.recipes.imagenet.assets import make_image_folder

# A factory returning a model with the reference DiT's layout but no declared convention, as a
# user's SiT-style models.py would (DiT's attribute names, nothing that says how it reads t).
FACTORY = textwrap.dedent(
    """
    from dfm_ext.models.dit import DiT, DiTConfig

    class SiT(DiT):
        dfm_time_convention = None

    def make(cfg):
        return SiT(DiTConfig.preset("tiny", input_size=cfg.latent_size, in_channels=cfg.vae.latent_channels,
                                    num_classes=cfg.data.num_classes, class_dropout_prob=0.0))
    """
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tc_assets")
    make_image_folder(root / "images", per_class=2, size=40)
    make_tiny_vae(root)
    (root / "user_sit_factory.py").write_text(FACTORY)
    return root


def _run(assets: Path, out: Path, *extra: str) -> int:
    return imagenet_main([
        "--config", "tiny", f"data.root={assets / 'images'}", f"vae.path={assets}", f"train.output_dir={out}",
        "train.steps=2", "train.sample_every=0", "train.trackers=[]", "train.progress=false",
        "model.factory=user_sit_factory:make", *extra,
    ])  # fmt: skip


def test_factory_model_without_convention_is_refused_then_runs_with_one(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(assets))
    assert _run(assets, tmp_path / "a") == 2  # one line, before any step
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.time_convention" in err and "unit" in err and "discrete" in err
    assert _run(assets, tmp_path / "b", "model.time_convention=unit") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["step"] == 2


def test_unknown_time_convention_is_a_config_error(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(assets))
    assert _run(assets, tmp_path / "c", "model.time_convention=seconds") == 2
    err = capsys.readouterr().err
    assert "model.time_convention" in err and "seconds" in err
