"""No host reads in a training or sampling step (tests/_host_sync.py counts them on this CPU machine).

Each step below runs with the library's value checks on their accelerator route; a value read
back to the host (``.item()``, ``bool(t)``, ``tolist()``, ``nonzero`` ...) would be a device sync
per step on a GPU. The tests assert there are none, and that the detector does see one.
"""

from __future__ import annotations

import pytest
import torch

import dfm_ext
from _host_sync import count_host_reads


def _model(specialize: str | None = None) -> dfm_ext.DFMTransformer:
    torch.manual_seed(0)
    base = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=16, in_channels=4, num_classes=10, class_dropout_prob=0.0))
    model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(4, 16, 16))
    if specialize:
        dfm_ext.specialize(model, kind=specialize, targets="all", rank=2 if specialize == "lora" else None)
    return model


def test_the_detector_sees_reads(monkeypatch) -> None:
    x = torch.randn(3)
    with count_host_reads(monkeypatch) as reads:
        float(x.sum()), bool((x > 0).any()), x.tolist(), x.nonzero(), torch.equal(x, x)  # noqa: B018
    assert len(reads) == 5, reads.report()
    assert "test_host_sync.py" in reads.found[0][1]
    model = _model()
    with count_host_reads(monkeypatch) as reads:  # the library's value checks: their device route
        dfm_ext.StageTimestepSampler(2).sample(4, generator=torch.Generator().manual_seed(0))
        with pytest.raises(RuntimeError, match=r"t must lie in \[0, 1\]"):  # an async assert, raised on the CPU
            model([torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 16, 16)], torch.full((1, 2), 2.0), torch.zeros(1, dtype=torch.long), y=torch.zeros(1, dtype=torch.long))
    assert len(reads) == 0, reads.report()


@pytest.mark.parametrize("allocation", ["fixed", "progress", "reducible"])
@pytest.mark.parametrize("specialize", [None, "lora", "full"])
def test_a_training_step_reads_nothing_back(monkeypatch, allocation: str, specialize: str | None) -> None:
    from dfm_ext.process.allocation import make_allocation
    from dfm_ext.process.reducible import stage_errors

    model = _model(specialize)
    alloc = None if allocation == "fixed" else make_allocation(allocation, 2, prior=(0.9, 0.1))
    times = dfm_ext.StageTimestepSampler(2, allocation=alloc)
    objective = dfm_ext.DFMObjective(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 4, 16, 16), torch.randint(0, 10, (8,))
    with count_host_reads(monkeypatch) as reads:
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            ts = times.sample(8, generator=g)
            out = objective(model, model.decomposition.decompose(x), ts, generator=g, y=y)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if allocation == "reducible":
                times.update(out.per_stage, timesteps=ts, errors=stage_errors(out))
            else:
                times.update(out.per_stage)
    assert len(reads) == 0, reads.report()


@pytest.mark.parametrize("specialize", [None, "lora"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_a_sampling_run_reads_nothing_back(monkeypatch, specialize: str | None, method: str) -> None:
    model = _model(specialize).eval()
    sampler = dfm_ext.DFMSampler(model.decomposition, dfm_ext.StageScheduler(steps=(3, 2), thresholds=(0.9,)), method=method,
                                 guidance_scale=2.0)  # fmt: skip
    y = torch.tensor([1, 2, 3])
    with count_host_reads(monkeypatch) as reads:
        out = sampler.sample(model, (3, 4, 16, 16), generator=torch.Generator().manual_seed(0), uncond={"y": torch.full((3,), 10)}, y=y)
    assert out.x.shape == (3, 4, 16, 16) and len(reads) == 0, reads.report()


def _routes(monkeypatch) -> list:
    """Every route the specialised models make (spied on StageContext.make_route)."""
    from dfm_ext.specialization.routing import StageContext

    seen: list = []
    real = StageContext.make_route
    monkeypatch.setattr(StageContext, "make_route", lambda self, stage: seen.append(real(self, stage)) or seen[-1])
    return seen


@pytest.mark.parametrize("specialize", ["lora", "full"])
def test_host_drawn_stages_take_the_grouped_route_without_reads(monkeypatch, specialize: str) -> None:
    """The stage drawn on the host (stage_generator) reaches the routing as host counts on the accelerator
    route too (value checks forced onto their device route), and gives the masked route's loss and gradients."""
    import numpy as np

    from dfm_ext.specialization.state import stage_context

    model = _model(specialize)
    times = dfm_ext.StageTimestepSampler(2, probabilities=(0.5, 0.5))
    objective = dfm_ext.DFMObjective(2)
    x, y = torch.randn(8, 4, 16, 16), torch.randint(0, 10, (8,))
    results = []
    for grouped in (True, False):
        stage_context(model).read_counts = grouped
        routes = _routes(monkeypatch)
        g = torch.Generator().manual_seed(0)
        with count_host_reads(monkeypatch) as reads:
            ts = times.sample(8, generator=g, stage_generator=np.random.default_rng(1))
            out = objective(model, model.decomposition.decompose(x), ts, generator=g, y=y)
            out.loss.backward()
        assert len(reads) == 0, reads.report()
        assert {r.counts is not None for r in routes} == {grouped}, [r.counts for r in routes]
        assert 0 < int(ts.stage.sum()) < 8  # a mixed batch: both stages' rows
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_host_drawn_stages_do_not_depend_on_the_device_generator() -> None:
    import numpy as np

    times = dfm_ext.StageTimestepSampler(3, probabilities=(0.6, 0.3, 0.1))
    a = times.sample(4096, generator=torch.Generator().manual_seed(0), stage_generator=np.random.default_rng(5))
    b = times.sample(4096, generator=torch.Generator().manual_seed(9), stage_generator=np.random.default_rng(5))
    assert torch.equal(a.stage, b.stage) and not torch.equal(a.t, b.t)
    freq = torch.bincount(a.stage, minlength=3).double() / 4096
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.03, rtol=0)


def test_sampling_routes_by_host_stage(monkeypatch) -> None:
    model = _model("lora").eval()
    routes = _routes(monkeypatch)
    sampler = dfm_ext.DFMSampler(model.decomposition, dfm_ext.StageScheduler(steps=(2, 1), thresholds=(0.9,)), guidance_scale=2.0)
    with count_host_reads(monkeypatch) as reads:
        sampler.sample(model, (2, 4, 16, 16), generator=torch.Generator().manual_seed(0), uncond={"y": torch.full((2,), 10)}, y=torch.tensor([1, 2]))
    assert len(reads) == 0, reads.report()
    assert routes and all(r.counts is not None and max(r.counts) == r.batch for r in routes)  # the grouped route, one stage


# ---- the engine's step (Trainer._step) under the detector ----------------------------------------------------

_ENGINE = ["train.global_batch_size=4", "train.log_every=3", "train.checkpoint_every=4", "train.sample_every=4",
           "train.trackers=[]", "train.progress=false", "train.ema_decay=0.9", "specialize.kind=lora", "specialize.rank=2",
           "specialize.targets=[all]", "dfm.allocation=progress", "model.gradient_checkpointing=true"]  # fmt: skip


@pytest.fixture(scope="module")
def engine_assets(tmp_path_factory):
    from _recipe_fixtures import tiny_image_assets

    return tiny_image_assets(tmp_path_factory.mktemp("sync_assets"), per_class=2)


def test_the_engine_step_reads_nothing_back_ddp(engine_assets, tmp_path) -> None:
    """One process (DDP's world of one, accelerate's plain model): EMA, per-stage LoRA with the host-drawn stage,
    an adaptive allocation, activation checkpointing; log, checkpoint and sample steps in between."""
    from _engine_sync import counting_steps
    from _recipe_fixtures import tiny_argv
    from dfm_ext.recipes.imagenet.task import main

    with counting_steps() as steps:
        assert main(tiny_argv(engine_assets / "images", engine_assets, tmp_path / "run", 6, *_ENGINE)) == 0
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6]
    _no_reads_but_the_vae_load(steps)


def _no_reads_but_the_vae_load(steps: list) -> None:
    """No read in any step; the first step loads the VAE (on first use: its weight initialisation reads values, once)."""
    (first, found), *rest = steps
    assert first == 1 and all(where.endswith(" load_vae") for _, where in found), found
    assert all(not found for _, found in rest), rest


def test_the_engine_step_reads_nothing_back_fsdp2_on_two_ranks(engine_assets, tmp_path) -> None:
    """FSDP2 sharded over both ranks, through train.sharding=hsdp (a (1, 2) mesh: one replica of two shards, the
    processes per node), with gradient accumulation (a reduce-scatter per micro-batch) and a sharded checkpoint."""
    import json
    import os

    from _launch import launch_two_cpu_processes
    from _recipe_fixtures import recipe_env, tiny_argv

    tests = os.path.dirname(__file__)
    env = {**recipe_env(), "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = tiny_argv(engine_assets / "images", engine_assets, tmp_path / "run", 5, *_ENGINE, "train.sharding=hsdp", "train.grad_accumulation=2")
    res = launch_two_cpu_processes("_engine_sync", [str(tmp_path / "steps"), "--", *args], env)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"steps.{rank}.json").read_text())
        assert record["status"] == 0 and [s for s, _ in record["steps"]] == [1, 2, 3, 4, 5]
        _no_reads_but_the_vae_load(record["steps"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["parallelism"] == "FSDP2"
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / "sharded.json").is_file()


def test_the_detector_fails_the_old_averaged_model_ema(monkeypatch) -> None:
    """torch's AveragedModel (the DDP path's EMA before issue 26) reads its device step counter back every update."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.Linear(4, 4)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    with count_host_reads(monkeypatch) as reads:
        for _ in range(3):
            ema.update_parameters(model)
    assert len(reads) >= 3 and all("swa_utils" in where or "test_host_sync" in where for _, where in reads.found), reads.report()


def test_the_collective_timeout_and_the_fused_optimiser(monkeypatch) -> None:
    """train.timeout_minutes reaches the process group (accelerate's InitProcessGroupKwargs); the recipes' AdamW is fused."""
    from datetime import timedelta
    from pathlib import Path

    import accelerate
    from accelerate.utils import InitProcessGroupKwargs

    from dfm_ext.recipes.engine.config import OptimConfig, TrainConfig
    from dfm_ext.recipes.engine.trainer import Trainer, adamw

    seen: dict = {}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: seen.update(kwargs))
    trainer = Trainer.__new__(Trainer)
    trainer.train, trainer.output_dir = TrainConfig(timeout_minutes=7, cpu=True), Path("unused")
    trainer.task = type("T", (), {"find_unused_parameters": False})()
    trainer._accelerator()
    assert [h.timeout for h in seen["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)] == [timedelta(minutes=7)]
    assert adamw(torch.nn.Linear(3, 3), OptimConfig()).defaults["fused"] is True
