"""Typed configs: YAML files, inheritance, overrides, and clear errors before any compute."""

from __future__ import annotations

import doctest
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext.recipes.engine import checkpoint as checkpointing_mod
from dfm_ext.recipes.engine import config as config_mod
from dfm_ext.recipes.engine import data as data_mod
from dfm_ext.recipes.engine.config import ConfigError, config_dir, apply_overrides, config_to_dict, from_dict, load_config, resolve_config_path
from dfm_ext.recipes.imagenet.task import ImageNetConfig, main, parse_args


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    tag: str = "a"
    note: str | None = None
    steps: tuple[int, ...] = (30, 10)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    n: int = 1
    flag: bool = False
    extra: dict[str, int] = field(default_factory=dict)


def test_module_doctests() -> None:
    for mod in (config_mod, data_mod):  # the trainer's examples live in tests/test_engine_budget.py
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
    assert doctest.testmod(checkpointing_mod).failed == 0


def test_overrides_are_typed() -> None:
    cfg = apply_overrides(
        Outer(),
        ["inner.lr=3e-4", "n=5", "flag=true", "inner.tag=001", "inner.note=hello", "inner.steps=[40]", "extra.k=3"],
    )
    assert cfg.inner.lr == 3e-4 and isinstance(cfg.inner.lr, float)
    assert cfg.n == 5 and cfg.flag is True
    assert cfg.inner.tag == "001"  # a string field keeps the text as typed
    assert cfg.inner.note == "hello" and cfg.inner.steps == (40,)
    assert cfg.extra == {"k": 3}
    assert apply_overrides(cfg, ["inner.note=null"]).inner.note is None


@pytest.mark.parametrize(
    "override, match",
    [
        ("inner.lrr=1", "unknown config key 'inner.lrr'.*did you mean 'inner.lr'"),
        ("nn=1", "unknown config key 'nn'"),
        ("n=abc", "n: expected an integer"),
        ("n=1.5", "n: expected an integer"),
        ("flag=maybe", "flag: expected true or false"),
        ("inner.betas=[0.9]", "expected 2 values"),
        ("inner.lr=fast", "inner.lr: expected a number"),
        ("n", "must look like key.sub=value"),
        ("n.x=1", "is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Outer(), [override])


@given(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans())
def test_round_trip_through_dict(n: int, lr: float, flag: bool) -> None:
    cfg = apply_overrides(Outer(), [f"n={n}", f"inner.lr={lr!r}", f"flag={str(flag).lower()}"])
    assert cfg.n == n and cfg.inner.lr == pytest.approx(lr) and cfg.flag is flag
    assert from_dict(Outer, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["imagenet_512", "imagenet_1024", "imagenet_dit_b", "imagenet_512_fm", "tiny"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ImageNetConfig, name)
    assert isinstance(cfg, ImageNetConfig)


def test_paper_settings() -> None:
    c512 = load_config(ImageNetConfig, "imagenet_512")
    assert (c512.train.steps, c512.train.global_batch_size, c512.optim.lr, c512.optim.warmup_steps) == (500_000, 256, 1e-4, 10_000)
    assert c512.optim.betas == (0.9, 0.99) and c512.optim.eps == 1e-8 and c512.optim.weight_decay == 0.01
    assert c512.train.ema_decay == 0.9999 and c512.optim.grad_clip == 1.0 and c512.dfm.label_dropout == 0.1
    assert c512.model.preset == "XL/2" and c512.vae.latent_channels == 16
    assert c512.latent_size == 64 and c512.latent_size // c512.decomposition.factors[0] == 32  # 256 px stage 0
    c1024 = load_config(ImageNetConfig, "imagenet_1024")  # inherits from imagenet_512
    assert c1024.train.steps == 350_000 and c1024.latent_size == 128
    assert c1024.latent_size // c1024.decomposition.factors[0] == 32 and c1024.optim.lr == 1e-4
    b = load_config(ImageNetConfig, "imagenet_dit_b")
    assert b.model.preset == "B/2" and b.train.steps == 600_000
    fm = load_config(ImageNetConfig, "imagenet_512_fm")
    assert fm.decomposition.kind == "identity" and fm.sampling.steps == (40,)


def test_unknown_config_name() -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path("imagenet_513", config_dir(ImageNetConfig))


def test_yaml_unknown_key(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\ntrain:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'.*did you mean 'train.steps'"):
        load_config(ImageNetConfig, bad)


def test_cli_errors_before_compute(tmp_path, capsys) -> None:
    # Every one of these must fail in well under a second: no model, VAE or data is touched.
    assert main(["--config", "tiny", "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err
    assert main(["--config", "tiny", "train.steps=many", "data.root=x"]) == 2
    assert "train.steps: expected an integer" in capsys.readouterr().err
    assert main(["--config", "tiny", f"data.root={tmp_path / 'nope'}", f"vae.path={tmp_path}"]) == 2
    assert "data.root" in capsys.readouterr().err
    assert main(["--config", "tiny"]) == 2
    assert "set exactly one of data.root, data.latent_cache and data.factory, got none" in capsys.readouterr().err
    assert main(["--config", "tiny", "data.resolution=30", "data.root=x"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(["--config", "tiny", f"data.root={tmp_path}", f"vae.path={tmp_path / 'novae'}"]) == 2
    assert "vae" in capsys.readouterr().err.lower()


def test_parse_args_name() -> None:
    name, cfg = parse_args(["--config", "tiny", "data.root=/x", "train.steps=3"])
    assert name == "tiny" and cfg.train.steps == 3
