"""The demo as a config of the image recipe: its model per decomposition, its offline data, sampling."""

from __future__ import annotations

import pytest
import torch

from dfm_ext.recipes.demo.cli import CONFIG, DECOMPOSITIONS, SIZES
from dfm_ext.recipes.demo.data import ImageDataset
from dfm_ext.recipes.demo.report import InMemoryImages, generate, training_set
from dfm_ext.recipes.engine.config import load_config
from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

TINY = [f"model.overrides={SIZES['tiny']}", "data.num_classes=3"]


def _cfg(*overrides: str) -> ImageNetConfig:
    cfg = load_config(ImageNetConfig, CONFIG, [*TINY, *overrides])
    cfg.validate()
    return cfg


@pytest.mark.parametrize(
    ("name", "patches"),
    [("laplacian", [(2, 2), (4, 4)]), ("identity", [(4, 4)]), ("wavelet", [(2, 2), (4, 4)]), ("dct", [(1, 1), (4, 4)])],
)
def test_every_decomposition_lands_on_the_same_64_token_grid(name, patches) -> None:
    steps = ["sampling.steps=[40]", "sampling.thresholds=[]"] if name == "identity" else []
    model = ImageNetTask(_cfg(*DECOMPOSITIONS[name], *steps)).build_model()
    assert model.packer.grid == (8, 8) and [tuple(p) for p in model.packer.patch_sizes] == patches
    stages = model.decomposition.decompose(torch.randn(2, 1, 32, 32))
    out = model(stages, torch.rand(2, len(stages)), torch.full((2,), len(stages) - 1), y=torch.tensor([0, 3]))
    assert [o.shape for o in out] == [s.shape for s in stages]


def test_the_demo_model_is_the_documented_size() -> None:
    model = ImageNetTask(load_config(ImageNetConfig, CONFIG)).build_model()
    assert 1.2e6 < sum(p.numel() for p in model.parameters()) < 1.45e6  # "a 1.3 M-parameter DiT"


def _toy(n: int = 12, classes: int = 3, channels: int = 1) -> ImageDataset:
    images = torch.rand(n, channels, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return ImageDataset(images, torch.arange(n) % classes, tuple(f"c{i}" for i in range(classes)), "toy", "train")


def test_in_memory_images_are_keyed_like_the_batch_plan() -> None:
    data = InMemoryImages(_toy())
    item, mirrored = data[(5, False)], data[(5, True)]
    assert item["label"] == 2 and torch.equal(item["pixels"], _toy().images[5])
    assert torch.equal(mirrored["pixels"], item["pixels"].flip(-1))


def test_training_set_refuses_channels_or_classes_the_config_does_not_have(monkeypatch) -> None:
    from dfm_ext.recipes.demo import report

    monkeypatch.setattr(report, "load_split", lambda *a, **k: _toy(classes=4, channels=3))
    with pytest.raises(ValueError, match=r"toy has 3-channel images in 4 classes; set vae.latent_channels=3 and data.num_classes=4"):
        training_set(_cfg(), dataset="toy")


def test_label_dropout_uses_the_null_class() -> None:
    task = ImageNetTask(_cfg("dfm.label_dropout=0.5"))
    batch = task.collate([InMemoryImages(_toy())[(i, False)] for i in range(12)])
    labels = torch.cat([task.training_inputs(batch, generator=torch.Generator().manual_seed(s), device=torch.device("cpu"))[2] for s in range(4)])
    assert set(labels.tolist()) <= {0, 1, 2, 3} and (labels == 3).any() and (labels < 3).any()


def test_generate_shapes_previews_and_determinism() -> None:
    cfg = _cfg("sampling.steps=[3,2]")
    torch.manual_seed(0)
    model = ImageNetTask(cfg).build_model()
    labels = torch.tensor([0, 1, 2, 0, 1])
    kw = dict(guidance=2.0, batch_size=2)
    x, previews = generate(model, cfg, labels, generator=torch.Generator().manual_seed(0), **kw)
    assert x.shape == (5, 1, 32, 32)
    assert [tuple(p.shape) for p in previews] == [(5, 1, 16, 16), (5, 1, 32, 32)]
    assert torch.allclose(previews[-1], x, atol=1e-5)
    assert torch.equal(x, generate(model, cfg, labels, generator=torch.Generator().manual_seed(0), **kw)[0])
