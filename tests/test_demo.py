"""The demo's pieces: model building per decomposition, training, EMA, sampling, checkpoints."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("dfm_ext.models.dit")
pytest.importorskip("dfm_ext.wrapping.wrapper")

from _old_demo_checkpoint import write_old_demo_checkpoint, write_raw_old_checkpoint  # noqa: E402

from dfm_ext.recipes.demo.legacy import CheckpointError  # noqa: E402
from dfm_ext.recipes.demo.data import ImageDataset  # noqa: E402
from dfm_ext.recipes.demo.run import (  # noqa: E402
    DemoConfig,
    DemoTask,
    build_model,
    generate,
    load_demo_checkpoint,
    make_sampler,
    model_config,
    save_demo_checkpoint,
    train,
)

TINY = DemoConfig(size="tiny", steps=4, batch_size=8, warmup=1, max_train_seconds=None, num_eval=0)


def _data(n: int = 32, classes: int = 3) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    return ImageDataset(images, torch.arange(n) % classes, tuple(f"c{i}" for i in range(classes)), "toy", "train")


@pytest.mark.parametrize(
    ("name", "patches"),
    [("laplacian", [[2, 2], [4, 4]]), ("identity", [[4, 4]]), ("wavelet", [[2, 2], [4, 4]]), ("dct", [[1, 1], [4, 4]])],
)
def test_every_decomposition_lands_on_the_same_64_token_grid(name, patches) -> None:
    cfg = replace(TINY, decomposition=name)
    mc = model_config(cfg, (1, 32, 32), 3)
    assert mc["patch_sizes"] == patches and mc["dit"]["patch_size"] == 4
    model = build_model(mc)
    assert model.packer.grid == (8, 8)
    stages = model.decomposition.decompose(torch.randn(2, 1, 32, 32))
    out = model(stages, torch.rand(2, len(stages)), torch.full((2,), len(stages) - 1), y=torch.tensor([0, 3]))
    assert [o.shape for o in out] == [s.shape for s in stages]


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown decomposition 'fourier'"):
        DemoConfig(decomposition="fourier")
    with pytest.raises(ValueError, match="unknown model size"):
        DemoConfig(size="huge")
    with pytest.raises(ValueError, match="specialize must be None, 'full' or 'lora', got 'moe'"):
        DemoConfig(specialize="moe")
    with pytest.raises(ValueError, match="has 2 stages"):
        make_sampler("laplacian", (10, 10, 10), (0.9,), 1.0)
    # Flow matching gets the same total step budget in its single stage.
    assert make_sampler("identity", (30, 10), (0.9,), 1.0).scheduler.steps == (40,)


def test_training_is_seeded_and_learns() -> None:
    data = _data()
    a = train(replace(TINY, steps=3), data, progress=False)
    assert math.isfinite(a.seconds) and a.seconds > 0
    b = train(replace(TINY, steps=3), data, progress=False)
    assert a.history["loss"] == b.history["loss"] and a.steps == 3
    c = train(replace(TINY, steps=3, seed=1), data, progress=False)
    assert a.history["loss"] != c.history["loss"]
    # Per-stage logs: NaN exactly when no sample of the batch had the stage active.
    assert len(a.history["stage_0"]) == 3 and all(math.isfinite(v) for v in a.history["stage_0"])
    # A few dozen steps on 8 fixed images reduce the loss (the objective trains the model).
    tiny = ImageDataset(data.images[:8], data.labels[:8], data.class_names, "toy", "train")
    res = train(replace(TINY, steps=60, lr=3e-3, warmup=5), tiny, progress=False)
    first, last = sum(res.history["loss"][:10]) / 10, sum(res.history["loss"][-10:]) / 10
    assert last < 0.8 * first


def test_time_budget_stops_training_early(tmp_path) -> None:
    res = train(replace(TINY, steps=1000, max_train_seconds=1e-9), _data(), run_dir=tmp_path / "run", progress=False)
    assert res.steps == 1 and len(res.history["loss"]) == 1
    # The stopped step is the run's last: checkpointed and saved like a full run's.
    assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir() and (tmp_path / "run" / "final").is_dir()


def test_label_dropout_uses_the_null_class(monkeypatch) -> None:
    seen = []
    original = DemoTask.loss

    def spy(self, model, batch, **kw):
        forward = self.objective.forward

        def record(m, stages, ts, **okw):
            seen.append(okw["y"].clone())
            return forward(m, stages, ts, **okw)

        self.objective.forward = record
        return original(self, model, batch, **kw)

    monkeypatch.setattr(DemoTask, "loss", spy)
    train(replace(TINY, label_dropout=0.5), _data(), progress=False)
    labels = torch.cat(seen)
    assert set(labels.tolist()) <= {0, 1, 2, 3} and (labels == 3).any() and (labels < 3).any()


def test_engine_ema_warms_up_like_the_old_demo_ema(tmp_path) -> None:
    """The engine's ``train.ema_warmup``: after 2 steps the EMA is ``lerp(lerp(w0, w1, 0.9), w2, 1 - 2/11)``
    (decay ``min(d, (1 + n) / (10 + n))``, the initial weights counting as the first average),
    computed here from the run's own step checkpoints (weights w1, w2) and the seeded init w0."""
    from safetensors.torch import load_file

    from dfm_ext.wrapping.io import load_wrapped

    data = _data()
    cfg = replace(TINY, steps=2, ema_decay=0.999)
    run = tmp_path / "run"
    mc = model_config(cfg, data.image_shape, data.num_classes)
    torch.manual_seed(cfg.seed)
    w0 = build_model(mc).state_dict()
    train(replace(cfg, steps=1), data, run_dir=tmp_path / "one", progress=False)
    w1 = load_file(str(tmp_path / "one" / "checkpoints" / "step-000001" / "model.safetensors"))
    train(cfg, data, run_dir=run, progress=False)
    w2 = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
    ema = load_wrapped(run / "final").state_dict()
    name = next(k for k in w0 if k.endswith("weight") and not torch.equal(w1[k], w2[k]))
    expected = torch.lerp(torch.lerp(w0[name], w1[name], 0.9), w2[name], 1 - 2 / 11)
    torch.testing.assert_close(ema[name], expected, rtol=0, atol=1e-7)


def test_generate_shapes_previews_and_determinism() -> None:
    mc = model_config(TINY, (1, 32, 32), 3)
    torch.manual_seed(0)
    model = build_model(mc)
    labels = torch.tensor([0, 1, 2, 0, 1])
    kw = dict(steps=(3, 2), thresholds=(0.9,), cfg_scale=2.0, batch_size=2)
    x, previews = generate(model, mc, labels, generator=torch.Generator().manual_seed(0), **kw)
    assert x.shape == (5, 1, 32, 32)
    assert [tuple(p.shape) for p in previews] == [(5, 1, 16, 16), (5, 1, 32, 32)]
    assert torch.allclose(previews[-1], x, atol=1e-5)
    y, _ = generate(model, mc, labels, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(x, y)


def test_demo_checkpoint_round_trip(tmp_path) -> None:
    data = _data()
    mc = model_config(TINY, data.image_shape, data.num_classes)
    torch.manual_seed(0)
    model = build_model(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # zero-initialised heads would hide a bad load
    d = save_demo_checkpoint(tmp_path / "ck", model, mc, TINY, data)
    loaded, config = load_demo_checkpoint(d)
    assert config["model"] == mc and config["data"]["class_names"] == ["c0", "c1", "c2"]
    stages = model.decomposition.decompose(torch.randn(2, 1, 32, 32))
    args = (stages, torch.rand(2, 2), torch.ones(2, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(model.eval()(*args, y=torch.tensor([1, 2])),
                                                 loaded(*args, y=torch.tensor([1, 2]))))  # fmt: skip
    # The new layout: load_wrapped alone rebuilds the model; demo.json holds the sampling options.
    assert sorted(p.name for p in d.iterdir()) == ["demo.json", "dfm_config.json", "model.safetensors"]
    from dfm_ext.wrapping.io import load_wrapped

    alone = load_wrapped(d).eval()
    assert all(torch.equal(a, b) for a, b in zip(alone(*args, y=torch.tensor([1, 2])), loaded(*args, y=torch.tensor([1, 2]))))
    assert config["train"]["cfg_scale"] == TINY.cfg_scale and config["train"]["sample_steps"] == [30, 10]


def test_old_demo_checkpoint_still_loads(tmp_path) -> None:
    """A checkpoint in the released layout (config.json + model.safetensors, format
    ``dfm_ext.recipes.demo.legacy``, kind ``dfm_ext.recipes.demo.run``), written by hand, loads and samples."""
    from dfm_ext.recipes.demo.cli import main

    data = _data()
    mc = model_config(TINY, data.image_shape, data.num_classes)
    mc["decomposition"] = "laplacian"  # checkpoints before the full decomposition record held the kind only
    torch.manual_seed(0)
    model = build_model(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    train_cfg = {"cfg_scale": 2.0, "eval_cfg_scale": 1.0, "sample_steps": [3, 2], "thresholds": [0.9]}
    d = write_old_demo_checkpoint(tmp_path / "old", model, mc, train_cfg, ["c0", "c1", "c2"])
    loaded, config = load_demo_checkpoint(d)
    assert config["kind"] == "dfm_ext.recipes.demo.run" and config["train"]["sample_steps"] == [3, 2]
    stages = model.decomposition.decompose(torch.randn(2, 1, 32, 32))
    args = (stages, torch.rand(2, 2), torch.ones(2, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(model.eval()(*args, y=torch.tensor([1, 2])), loaded(*args, y=torch.tensor([1, 2]))))
    assert main(["sample", "--checkpoint", str(d), "--num", "1", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    # A checkpoint of something else, or weights that do not fit, are refused by name.
    write_raw_old_checkpoint(tmp_path / "other", {"w": torch.ones(1)}, {"kind": "other"})
    with pytest.raises(CheckpointError, match="not a demo model"):
        load_demo_checkpoint(tmp_path / "other")
    write_raw_old_checkpoint(tmp_path / "bad", {"w": torch.ones(1)}, config)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_demo_checkpoint(tmp_path / "bad")


def test_specialised_demo_trains_and_checkpoints(tmp_path) -> None:
    """``specialize="full"`` (the ablations' Table 1d arm): stage weights train and survive a checkpoint."""
    data = _data()
    cfg = replace(TINY, steps=6, specialize="full", specialize_targets=("mlp",))
    res = train(cfg, data, progress=False)
    stage_params = {n: p for n, p in res.ema.named_parameters() if ".stage_params." in n}
    assert stage_params and all(".mlp." in n for n in stage_params)
    assert all(math.isfinite(v) for v in res.history["loss"])
    mc = model_config(cfg, data.image_shape, data.num_classes)
    assert mc["specialize"] == {"kind": "full", "targets": ["mlp"], "rank": None}
    assert "specialize" not in model_config(TINY, data.image_shape, data.num_classes)  # old configs unchanged
    with torch.no_grad():
        for p in res.ema.parameters():
            p.add_(0.01 * torch.randn_like(p))  # zero-initialised heads would hide a bad load
    loaded, _ = load_demo_checkpoint(save_demo_checkpoint(tmp_path / "ck", res.ema, mc, cfg, data))
    stages = res.ema.decomposition.decompose(torch.randn(2, 1, 32, 32))
    args = (stages, torch.rand(2, 2), torch.tensor([0, 1]))
    assert all(torch.equal(a, b) for a, b in zip(res.ema.eval()(*args, y=torch.tensor([1, 2])),
                                                 loaded(*args, y=torch.tensor([1, 2]))))  # fmt: skip
