"""The saved-model format: one atomic folder, one config (the one format: no release wrote another)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dfm_ext
from dfm_ext import DiT, DiTConfig, DFMObjective, DFMSampler, LaplacianPyramid, StageScheduler, load_wrapped, wrap_dit
from dfm_ext.fileio import atomic_directory, atomic_write_text
from dfm_ext.wrapping.wrapper import DFMTransformer



def _model(seed: int = 0, **kw) -> DFMTransformer:
    torch.manual_seed(seed)
    base = DiT(DiTConfig.preset("tiny", input_size=8, in_channels=3, num_classes=4))
    model = wrap_dit(base, LaplacianPyramid(factors=(2, 1)), sample_shape=(3, 8, 8), **kw)
    with torch.no_grad():  # the zero-initialised stage-1 layers random, so that every weight matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _inputs(model: DFMTransformer):
    g = torch.Generator().manual_seed(1)
    stages = [torch.randn(3, *s, generator=g) for s in model.stage_shapes]
    return stages, torch.rand(3, 2, generator=g), torch.tensor([0, 1, 1]), {"y": torch.tensor([0, 1, 3])}


def _same(a: DFMTransformer, b: DFMTransformer) -> None:
    stages, t, k, cond = _inputs(a)
    with torch.no_grad():
        for x, y in zip(a(stages, t, k, **cond), b(stages, t, k, **cond)):
            assert torch.equal(x, y)


def _specialise(model: DFMTransformer, kind: str) -> None:
    spec = dfm_ext.specialize(model, kind=kind, targets="mlp", rank=2 if kind == "lora" else None)
    with torch.no_grad():
        for p in spec.stage_parameters():
            p.add_(0.05 * torch.randn_like(p))


# --------------------------------------------------------------------------- the current format


@pytest.mark.parametrize("kind", [None, "lora", "full"])
def test_one_config_round_trip(kind: str | None, tmp_path: Path) -> None:
    model = _model(stage_scales=[0.5, 2.0])
    if kind:
        _specialise(model, kind)
    out = tmp_path / "m"
    model.save_pretrained(out)
    record = json.loads((out / "dfm_config.json").read_text())
    assert record["format"] == "dfm_ext.wrapped/2" and record["stage_scales"] == [0.5, 2.0]
    assert record["adapter"]["config"]["time_convention"] == "x1000"
    assert record["decomposition"]["config"]["kind"] == "laplacian"
    assert record["base"]["class"] == "dfm_ext.models.dit:DiT"
    files = {p.name for p in out.iterdir()}
    if kind is None:
        assert record["specialization"] is None and files == {"dfm_config.json", "model.safetensors"}
    else:
        assert record["specialization"]["kind"] == kind and record["specialization"]["weights"] == "stage_parameters.safetensors"
        assert files == {"dfm_config.json", "model.safetensors", "stage_parameters.safetensors"}
    loaded = DFMTransformer.from_pretrained(out).eval()
    assert torch.equal(loaded.stage_scales, torch.tensor([0.5, 2.0]))
    assert (loaded.specialization is None) == (kind is None)
    _same(model, loaded)


def test_save_is_atomic_and_refuses_foreign_files(tmp_path: Path, monkeypatch) -> None:
    first, second = _model(0), _model(1)
    target = tmp_path / "m"
    first.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left
    second.save_pretrained(target)  # replacing a saved folder works
    _same(second, load_wrapped(target).eval())
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        second.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"


def test_fileio_atomic_helpers(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "d") as d:
        (d / "half").write_text("x")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_writes_get_the_modes_of_a_plain_write(tmp_path: Path) -> None:
    """Not mkstemp's 0600 / mkdtemp's 0700: what open() and mkdir() make under the umask (a team can read a run)."""
    import os
    import stat

    (tmp_path / "plain").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    atomic_write_text(tmp_path / "atomic", "x")
    with atomic_directory(tmp_path / "atomic_dir") as tmp:
        atomic_write_text(tmp / "f", "x")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic") == mode(tmp_path / "plain")
    assert mode(tmp_path / "atomic_dir") == mode(tmp_path / "plain_dir")
    assert mode(tmp_path / "atomic_dir" / "f") == mode(tmp_path / "plain")


def test_extra_files_travel_with_the_model(tmp_path: Path) -> None:
    model = _model()
    out = tmp_path / "m"
    model.save_pretrained(out, extra_files={"notes.bin": b"\x00\x01"})
    assert (out / "notes.bin").read_bytes() == b"\x00\x01"
    assert json.loads((out / "dfm_config.json").read_text())["extra_files"] == ["notes.bin"]
    model.save_pretrained(out)  # its own extra file does not block a replacement
    with pytest.raises(ValueError, match="model.safetensors"):
        model.save_pretrained(tmp_path / "n", extra_files={"model.safetensors": b""})


# --------------------------------------------------------------------------- stage scales default


def test_objective_and_sampler_default_to_the_models_scales() -> None:
    scaled = _model(stage_scales=[0.5, 2.0])
    plain = _model()
    assert plain.stage_scales is None and "stage_scales" not in plain.state_dict()
    stages, _, _, cond = _inputs(scaled)
    ts = dfm_ext.StageTimestepSampler(2).sample(3, generator=torch.Generator().manual_seed(0))

    def loss(objective, model):
        return objective(model, stages, ts, generator=torch.Generator().manual_seed(0), **cond).loss

    explicit = loss(DFMObjective(2, scales=[0.5, 2.0]), plain)
    assert torch.equal(loss(DFMObjective(2), scaled), explicit)
    assert not torch.equal(loss(DFMObjective(2), plain), explicit)
    assert torch.equal(loss(DFMObjective(2, scales=[1.0, 1.0]), scaled), loss(DFMObjective(2), plain))  # given wins

    sampler = lambda **kw: DFMSampler(LaplacianPyramid(factors=(2, 1)), StageScheduler(steps=(2, 2), thresholds=(0.5,)), **kw)
    run = lambda s, m: s.sample(m, (3, 3, 8, 8), generator=torch.Generator().manual_seed(0), **cond).x
    assert torch.equal(run(sampler(), scaled), run(sampler(scales=[0.5, 2.0]), plain))
    ddp_like = torch.nn.Module()
    ddp_like.module = scaled  # DDP keeps the model as .module
    assert dfm_ext.process.objective.model_stage_scales(ddp_like) is scaled.stage_scales
    with pytest.raises(ValueError, match="stage_scales"):
        wrap_dit(DiT(DiTConfig.preset("tiny", input_size=8, in_channels=3)), LaplacianPyramid(factors=(2, 1)),
                 sample_shape=(3, 8, 8), stage_scales=[1.0, -1.0])


# --------------------------------------------------------------------------- older layouts
