"""Atomic checkpoints: a crash while writing never leaves a 'latest' that names an incomplete folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfm_ext.recipes.engine.checkpoint import (
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from dfm_ext.recipes.engine.trainer import build_optimizer, warmup_lambda, OptimConfig


class FakeAccelerator:
    """Single-process stand-in for ``accelerate.Accelerator``: writes a few files, can crash mid-write."""

    is_main_process = True

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
        assert _complete(Path(input_dir))


def _complete(path: Path) -> bool:
    return all((path / n).is_file() for n in ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])


def test_save_prune_and_latest(tmp_path: Path) -> None:
    acc = FakeAccelerator()
    for step in (10, 20, 30, 40):
        save_checkpoint(acc, tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert find_latest(tmp_path) == tmp_path / step_dir_name(40)
    assert not list(tmp_path.glob("tmp-*"))


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_crash_mid_write_keeps_previous_latest(tmp_path: Path, crash_after: int) -> None:
    acc = FakeAccelerator()
    save_checkpoint(acc, tmp_path, 10, keep=3)
    acc.crash_after = crash_after
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(acc, tmp_path, 20, keep=3)
    latest = find_latest(tmp_path)
    assert latest == tmp_path / step_dir_name(10) and _complete(latest)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]  # the partial one is only a tmp-*
    acc.crash_after = None
    save_checkpoint(acc, tmp_path, 20, keep=3)  # the next save cleans the leftover
    assert find_latest(tmp_path) == tmp_path / step_dir_name(20)
    assert not list(tmp_path.glob("tmp-*")) and _complete(tmp_path / step_dir_name(20))


def test_resaving_a_step_is_refused(tmp_path: Path) -> None:
    acc = FakeAccelerator()
    path = save_checkpoint(acc, tmp_path, 10)
    before = (path / "model.safetensors").stat().st_ino
    with pytest.raises(FileExistsError, match="step-000010 already exists; refusing to write over it"):
        save_checkpoint(acc, tmp_path, 10)
    assert (path / "model.safetensors").stat().st_ino == before and not list(tmp_path.glob("tmp-*"))


def test_bad_latest_is_an_error(tmp_path: Path) -> None:
    assert find_latest(tmp_path) is None
    (tmp_path / "latest").write_text("step-000099\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_latest(tmp_path)
    with pytest.raises(ValueError):
        save_checkpoint(FakeAccelerator(), tmp_path, 1, keep=0)


def _ema_and_scheduler() -> tuple[torch.optim.swa_utils.AveragedModel, torch.optim.lr_scheduler.LambdaLR]:
    model = torch.nn.Linear(3, 2)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return ema, torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(10))


def test_extra_state_round_trip_without_pickle(tmp_path: Path) -> None:
    ema, sched = _ema_and_scheduler()
    with torch.no_grad():
        ema.module.weight.add_(1.0)
    ema.n_averaged.fill_(7)
    for _ in range(3):
        sched.optimizer.step()
        sched.step()
    path = save_checkpoint(FakeAccelerator(), tmp_path, 3, extra={"ema": ema, "scheduler": sched})

    ema2, sched2 = _ema_and_scheduler()
    load_checkpoint(FakeAccelerator(), path, extra={"ema": ema2, "scheduler": sched2})
    assert torch.equal(ema2.module.weight, ema.module.weight) and int(ema2.n_averaged) == 7
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()

    with pytest.raises(KeyError, match="'run'"):
        load_checkpoint(FakeAccelerator(), path, extra={"run": sched2})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(FakeAccelerator(), tmp_path / "step-000099", extra={"ema": ema2})


class _RunsCode:
    def __reduce__(self):  # unpickling this would call print; weights_only must refuse it
        return (print, ("executed",))


def test_extra_state_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = save_checkpoint(FakeAccelerator(), tmp_path, 1)
    torch.save({"scheduler": _RunsCode()}, path / "extra_state.pt")
    _, sched = _ema_and_scheduler()
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(FakeAccelerator(), path, extra={"scheduler": sched})
    (path / "extra_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="extra_state.pt is missing"):
        load_checkpoint(FakeAccelerator(), path, extra={"scheduler": sched})


def test_optimizer_groups_and_warmup() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.01))
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 3), (0.01, 1)]  # biases and norm weights are not decayed
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-8
    f = warmup_lambda(10)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10**6) == 1.0
