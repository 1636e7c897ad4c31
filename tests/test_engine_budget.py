"""The engine's time budget (``train.max_train_seconds``) costs no per-step collective or host read.

Several processes agree on the budget only at log/checkpoint steps, inside the one reduction of
flags those steps make anyway. The runs here are one real process whose accelerator reports a
world of two (accelerate's collectives return their input in a single process), so the loop
takes its multi-process path; the reductions it makes are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dfm_ext.recipes.engine.config import OptimConfig, TrainConfig
from dfm_ext.recipes.engine.trainer import StepLoss, Trainer, TrainTask, is_check_step


class _Toy(TrainTask):
    def build_model(self) -> nn.Module:
        return nn.Linear(2, 1)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        return StepLoss(((model(batch["x"].to(device)) - 1.0) ** 2).mean())



class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, Any]:
        return {"x": torch.full((2,), float(key[0]) / 16)}


@dataclass
class _Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


class _TwoRanks:
    """The real (one-process) accelerator, reporting two processes and counting ``reduce`` calls."""

    num_processes = 2

    def __init__(self, accelerator: Any) -> None:
        self._accelerator = accelerator
        self.reduced: list[tuple[int, ...]] = []

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        self.reduced.append(tuple(tensor.shape))
        return self._accelerator.reduce(tensor, reduction)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)


def _fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: float | None) -> tuple[int, list[tuple[int, ...]]]:
    views: list[_TwoRanks] = []
    real = Trainer._accelerator

    def two_ranks(self: Trainer) -> _TwoRanks:
        views.append(_TwoRanks(real(self)))
        return views[-1]

    monkeypatch.setattr(Trainer, "_accelerator", two_ranks)
    train = TrainConfig(
        steps=6, global_batch_size=4, mixed_precision="no", ema_decay=None, output_dir=str(tmp_path / f"run-{budget}"),
        checkpoint_every=6, log_every=3, sample_every=0, trackers=[], num_workers=0, cpu=True, progress=False,
        sharding="none", max_train_seconds=budget,
    )  # fmt: skip
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    result = Trainer(_Toy(), _Items(), _Config(train, optim), name="toy").fit()
    return result.step, views[0].reduced


def test_budget_adds_no_collective_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old engine: one extra ``reduce`` (and ``.item()``) per step with a budget and world > 1."""
    steps, without = _fit(tmp_path, monkeypatch, None)
    steps_b, with_budget = _fit(tmp_path, monkeypatch, 1e9)
    assert steps == steps_b == 6
    assert with_budget == without  # same reductions, same shapes: the budget rides on the flags
    assert len(without) == 2 * 2  # per check step (3 and 6): the flags and the loss window


def test_two_processes_stop_at_the_first_check_step_past_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps, _ = _fit(tmp_path, monkeypatch, 1e-9)  # spent after step 1; decided at step 3 (log_every)
    assert steps == 3


def test_check_steps() -> None:
    train = TrainConfig(steps=7, log_every=2, checkpoint_every=3)
    assert [s for s in range(1, 8) if is_check_step(s, train, over_budget=False, world=4)] == [2, 3, 4, 6, 7]
    assert [s for s in range(1, 8) if is_check_step(s, train, over_budget=True, world=4)] == [2, 3, 4, 6, 7]
    assert [s for s in range(1, 8) if is_check_step(s, train, over_budget=True, world=1)] == list(range(1, 8))
