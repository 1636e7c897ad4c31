"""The benchmarks' harness (``benchmarks/harness.py``) trains the demo's model with the library's objective.

The harness is frozen (committed benchmark results were measured with it; its random stream is its
own, one generator for the whole run), while ``dfm-ext demo`` trains through the recipes' engine
(per-step generators). What they must share is the model and the maths: the same initial weights
for the same seed, and the same DFM loss for the same inputs and draws.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dfm_ext.recipes.demo.cli import CONFIG
from dfm_ext.recipes.demo.data import ImageDataset
from dfm_ext.recipes.engine.config import load_config
from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import DemoConfig, Trainer  # noqa: E402


def _data(n: int = 16, classes: int = 10) -> ImageDataset:
    images = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return ImageDataset(images, torch.arange(n) % classes, tuple(f"c{i}" for i in range(classes)), "toy", "train")


def test_harness_trains_the_demo_model_with_the_demo_loss() -> None:
    torch.manual_seed(0)
    demo = ImageNetTask(load_config(ImageNetConfig, CONFIG))
    engine_model = demo.build_model()
    harness = Trainer(DemoConfig(steps=2, batch_size=8, max_train_seconds=None, num_eval=0), _data())
    a, b = engine_model.state_dict(), harness.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same model, same init

    x, y = _data().images[:8], torch.arange(8)
    ts = demo.timesteps.sample(8, generator=torch.Generator().manual_seed(1))
    losses = [obj(m, m.decomposition.decompose(x), ts, generator=torch.Generator().manual_seed(2), y=y).loss
              for obj, m in ((demo.objective, engine_model), (harness.objective, harness.model))]  # fmt: skip
    assert torch.equal(losses[0], losses[1])
    harness.step()
    harness.step()
    assert harness.steps_done == 2 and all(torch.isfinite(torch.tensor(v)) for v in harness.history["loss"])
