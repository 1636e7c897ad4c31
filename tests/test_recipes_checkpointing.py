"""Atomic checkpoints: a crash while writing never leaves a 'latest' that names an incomplete folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfm_ext.recipes.checkpointing import find_latest, list_checkpoints, save_checkpoint, step_dir_name
from dfm_ext.recipes.engine import build_optimizer, warmup_lambda, OptimConfig


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


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    acc = FakeAccelerator()
    save_checkpoint(acc, tmp_path, 10)
    save_checkpoint(acc, tmp_path, 10)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]


def test_bad_latest_is_an_error(tmp_path: Path) -> None:
    assert find_latest(tmp_path) is None
    (tmp_path / "latest").write_text("step-000099\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_latest(tmp_path)
    with pytest.raises(ValueError):
        save_checkpoint(FakeAccelerator(), tmp_path, 1, keep=0)


def test_optimizer_groups_and_warmup() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.01))
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 3), (0.01, 1)]  # biases and norm weights are not decayed
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-8
    f = warmup_lambda(10)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10**6) == 1.0
