"""Activation checkpointing: the reference DiT, wrapped models and every tiny diffusers family.

With checkpointing on, the loss and every gradient equal those of the plain run (1e-6), the
checkpoint function runs once per block (counted by patching ``torch.utils.checkpoint``), and a
per-stage specialised model keeps its stage routing in the backward recompute.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint

from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit
from dfm_ext.specialization import specialize
from dfm_ext.models.video_dit import VideoDiT, VideoDiTConfig


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts calls of ``torch.utils.checkpoint.checkpoint`` (diffusers' and ours both go through it)."""
    seen: list[int] = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return seen


def _loss_and_grads(model: torch.nn.Module, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a: tuple, b: tuple) -> None:
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, atol=1e-6, rtol=0), (la, lb)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        err = float((ga[n] - gb[n]).abs().max())
        assert err <= 1e-6, f"{n}: gradient differs by {err}"


def _toggle(model: torch.nn.Module, on: bool) -> None:
    (model.enable_gradient_checkpointing if on else model.disable_gradient_checkpointing)()


def test_reference_dit_checkpointing_same_gradients(calls: list[int]) -> None:
    torch.manual_seed(0)
    model = DiT(DiTConfig.preset("tiny", num_classes=3, class_dropout_prob=0.0))
    for p in model.parameters():  # DiT zero-inits its output and modulation: perturb so all grads flow
        p.data.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    size = model.config.input_size
    x, t, y = torch.randn(3, 4, size, size, generator=g), torch.rand(3, generator=g), torch.tensor([0, 2, 1])

    def run():
        return model(x, t, y).square().mean()

    assert model.gradient_checkpointing is False
    plain = _loss_and_grads(model, run)
    assert calls == []
    _toggle(model, True)
    ckpt = _loss_and_grads(model, run)
    assert len(calls) == model.config.depth
    _assert_same(plain, ckpt)
    with torch.no_grad():  # inference: nothing to recompute, blocks run plainly
        model(x, t, y)
    assert len(calls) == model.config.depth
    _toggle(model, False)
    model(x, t, y)
    assert len(calls) == model.config.depth


@pytest.mark.parametrize("video", [False, True], ids=["dit", "video_dit"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "stage_lora"])
def test_wrapped_reference_dit_checkpointing_same_gradients(calls: list[int], video: bool, lora: bool) -> None:
    torch.manual_seed(0)
    if video:
        base = VideoDiT(VideoDiTConfig.preset("tiny", num_classes=3, class_dropout_prob=0.0))
    else:
        base = DiT(DiTConfig.preset("tiny", num_classes=3, class_dropout_prob=0.0))
    model = wrap_dit(base, LaplacianPyramid(factors=(2, 1)), init="scratch")
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    if lora:  # the stage route must be re-installed for the recompute in backward
        spec = specialize(model, kind="lora", targets="all", rank=2)
        for p in spec.stage_parameters():
            p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    stages = [torch.randn(3, *s, generator=g) for s in model.stage_shapes]
    t, stage, y = torch.rand(3, 2, generator=g), torch.tensor([0, 1, 0]), torch.tensor([0, 2, 1])

    def run():
        return sum(o.square().mean() for o in model(stages, t, stage, y=y))

    plain = _loss_and_grads(model, run)
    _toggle(model.base, True)
    ckpt = _loss_and_grads(model, run)
    assert len(calls) == len(model.base.blocks)
    _assert_same(plain, ckpt)


pytest.importorskip("diffusers")
import _tiny_diffusers as tiny  # noqa: E402

FAMILIES = ("dit", "pixart", "sd3", "flux", "cogvideox")
SAMPLES = {"cogvideox": (tiny.LATENT_CHANNELS, 2, 16, 16)}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, torch.nn.Module]:
    root = tmp_path_factory.mktemp("tiny_diffusers_ckpt")
    return {name: tiny.FACTORIES[name](root / name) for name in FAMILIES}


def _blocks(base: torch.nn.Module) -> int:
    return sum(len(getattr(base, n, ())) for n in ("transformer_blocks", "single_transformer_blocks"))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "stage_lora"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_diffusers_family_checkpointing_same_gradients(pristine, calls: list[int], fam: str, lora: bool) -> None:
    torch.manual_seed(0)
    sample = SAMPLES.get(fam, (tiny.LATENT_CHANNELS, 16, 16))
    model = wrap_dit(copy.deepcopy(pristine[fam]), LaplacianPyramid(factors=(2, 1)), sample_shape=sample)
    for p in model.parameters():  # zero-initialised heads and embeddings: perturb so all grads flow
        p.data.add_(0.02 * torch.randn_like(p))
    if lora:
        spec = specialize(model, kind="lora", targets="mlp", rank=2)
        for p in spec.stage_parameters():
            p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    stages = [torch.randn(2, *s, generator=g) for s in model.stage_shapes]
    t, stage = torch.rand(2, 2, generator=g), torch.tensor([0, 1])
    cond = tiny.text_inputs(fam, 2, g)

    def run():
        return sum(o.square().mean() for o in model(stages, t, stage, **cond))

    plain = _loss_and_grads(model, run)
    assert calls == []
    model.base.enable_gradient_checkpointing()
    ckpt = _loss_and_grads(model, run)
    assert len(calls) == _blocks(model.base) > 0
    _assert_same(plain, ckpt)


def test_imagenet_recipe_model_gradient_checkpointing(calls: list[int]) -> None:
    """The recipe key ``model.gradient_checkpointing`` reaches the DiT the engine trains."""
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

    assert ImageNetConfig().model.gradient_checkpointing is False
    cfg = load_config(ImageNetConfig, "tiny", ["model.gradient_checkpointing=true"])
    model = ImageNetTask(cfg).build_model()
    assert model.base.gradient_checkpointing is True
    stages = [torch.randn(2, *s) for s in model.stage_shapes]
    out = model(stages, torch.rand(2, model.num_stages), torch.tensor([0, 1]), y=torch.tensor([0, 1]))
    sum(o.square().mean() for o in out).backward()
    assert len(calls) == len(model.base.blocks)
