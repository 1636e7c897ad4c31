"""Checkpoints (engine/checkpoint.py, engine/parallel.py): atomic step folders, extra state without pickle, the EMA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfm_ext.recipes.engine.checkpoint import CorruptCheckpointError, list_checkpoints, step_dir_name, verify_manifest
from dfm_ext.recipes.engine.config import OptimConfig, TrainConfig
from dfm_ext.recipes.engine.parallel import DDP, EMA
from dfm_ext.recipes.engine.trainer import adamw, warmup_lambda


class FakeAccelerator:
    """Single-process stand-in for ``accelerate.Accelerator``: writes a few files, can crash mid-write."""

    is_main_process = True
    num_processes = 1
    process_index = 0

    def __init__(self) -> None:
        self.crash_after: int | None = None

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        out = Path(output_dir)
        out.mkdir(parents=True)
        for i, name in enumerate(["model.safetensors", "optimizer.bin", "random_states_0.pkl"]):
            if self.crash_after is not None and i >= self.crash_after:
                raise KeyboardInterrupt("simulated crash while writing")
            (out / name).write_text(name)

    def load_state(self, input_dir: str) -> None:
        self.loaded = input_dir


def _ddp(keep: int = 3) -> tuple[DDP, FakeAccelerator]:
    acc = FakeAccelerator()
    return DDP(acc, TrainConfig(keep_checkpoints=keep)), acc


def _save(ddp: DDP, root: Path, step: int, extra: dict | None = None) -> Path:
    return ddp.save(root, step, torch.nn.Linear(1, 1), None, extra or {})  # type: ignore[arg-type]


def test_save_prune_and_latest(tmp_path: Path) -> None:
    ddp, _ = _ddp(keep=2)
    for step in (10, 20, 30, 40):
        _save(ddp, tmp_path, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert (tmp_path / "latest").read_text().strip() == step_dir_name(40)
    assert not list(tmp_path.glob("tmp-*"))
    assert set(verify_manifest(tmp_path / step_dir_name(40))["files"]) == {"extra_state.pt", "model.safetensors", "optimizer.bin", "random_states_0.pkl"}


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_crash_mid_write_keeps_previous_latest(tmp_path: Path, crash_after: int) -> None:
    ddp, acc = _ddp()
    _save(ddp, tmp_path, 10)
    acc.crash_after = crash_after
    with pytest.raises(KeyboardInterrupt):
        _save(ddp, tmp_path, 20)
    assert (tmp_path / "latest").read_text().strip() == step_dir_name(10)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]  # the partial one is only a tmp-*
    with pytest.raises(CorruptCheckpointError, match="no complete.json"):
        verify_manifest(next(tmp_path.glob("tmp-*")))
    acc.crash_after = None
    _save(ddp, tmp_path, 20)  # the next save cleans the leftover
    assert (tmp_path / "latest").read_text().strip() == step_dir_name(20)
    assert not list(tmp_path.glob("tmp-*"))
    verify_manifest(tmp_path / step_dir_name(20))


def test_resaving_a_step_is_refused(tmp_path: Path) -> None:
    ddp, _ = _ddp()
    path = _save(ddp, tmp_path, 10)
    before = (path / "model.safetensors").stat().st_ino
    with pytest.raises(FileExistsError, match="step-000010 already exists; refusing to write over it"):
        _save(ddp, tmp_path, 10)
    assert (path / "model.safetensors").stat().st_ino == before and not list(tmp_path.glob("tmp-*"))
    with pytest.raises(ValueError, match="train.keep_checkpoints must be >= 1"):
        TrainConfig(keep_checkpoints=0)


def _ema_and_scheduler() -> tuple[EMA, torch.optim.lr_scheduler.LambdaLR]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return EMA(model, 0.9, module=True), torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(10))


def test_extra_state_round_trip_without_pickle(tmp_path: Path) -> None:
    ema, sched = _ema_and_scheduler()
    with torch.no_grad():
        ema.module.weight.add_(1.0)  # type: ignore[union-attr]
    ema.updates = 7
    for _ in range(3):
        sched.optimizer.step()
        sched.step()
    ddp, _ = _ddp()
    path = _save(ddp, tmp_path, 3, {"ema": ema, "scheduler": sched})

    ema2, sched2 = _ema_and_scheduler()
    ddp.load(path, torch.nn.Linear(1, 1), None, {"ema": ema2, "scheduler": sched2})  # type: ignore[arg-type]
    assert torch.equal(ema2.module.weight, ema.module.weight) and ema2.updates == 7  # type: ignore[union-attr]
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(CorruptCheckpointError, match=r"has no state for \['run'\]"):
        ddp.load(path, torch.nn.Linear(1, 1), None, {"run": sched2})  # type: ignore[arg-type]


class _RunsCode:
    def __reduce__(self):  # unpickling this would call print; weights_only must refuse it
        return (print, ("executed",))


def test_extra_state_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    ddp, _ = _ddp()
    path = _save(ddp, tmp_path, 1)
    torch.save({"scheduler": _RunsCode()}, path / "extra_state.pt")
    _, sched = _ema_and_scheduler()
    with pytest.raises(Exception, match="[Ww]eights only"):
        ddp.load(path, torch.nn.Linear(1, 1), None, {"scheduler": sched})  # type: ignore[arg-type]
    (path / "extra_state.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match="extra_state.pt is missing"):
        ddp.load(path, torch.nn.Linear(1, 1), None, {"scheduler": sched})  # type: ignore[arg-type]


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_torch_averaged_model(warmup: bool) -> None:
    """The engine's EMA (one foreach lerp, the step from the host) is torch's AveragedModel, bit for bit."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # with float and integer buffers
    decay = 0.9

    def warm(ema: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:  # torch's with our warmup
        d = min(decay, (1 + step) / (10 + step))
        if ema[0].is_floating_point():
            torch._foreach_lerp_(ema, cur, 1 - d)
        else:
            for e, c in zip(ema, cur):
                e.copy_(c)

    ref = AveragedModel(model, multi_avg_fn=warm if warmup else get_ema_multi_avg_fn(decay), use_buffers=True)
    if warmup:
        ref.n_averaged.fill_(1)
    ema = EMA(model, decay, warmup=warmup, module=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(4):
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ref.update_parameters(model)
        ema.update(model, step)
    for k, v in ref.module.state_dict().items():
        assert torch.equal(v, ema.module.state_dict()[k]), k  # type: ignore[union-attr]
    assert max(float((ema.module.state_dict()[k].float() - v.float()).abs().max()) for k, v in model.state_dict().items()) > 0  # type: ignore[union-attr]


def test_optimizer_groups_and_warmup() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = adamw(model, OptimConfig(lr=1e-4, weight_decay=0.01))
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 3), (0.01, 1)]  # biases and norm weights are not decayed
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-8
    f = warmup_lambda(10)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10**6) == 1.0
