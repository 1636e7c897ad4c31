"""bf16 autocast in the engine's training step (``accelerator.autocast()``) on CPU, against float32."""

from __future__ import annotations

import math

import pytest
import torch


def test_bf16_autocast_training_step_is_finite_and_within_2_percent_of_float32() -> None:
    from accelerate import Accelerator

    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.engine.trainer import step_generator
    from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask

    cfg = load_config(ImageNetConfig, "tiny", ["data.root=unused", "vae.path=unused"])
    task = ImageNetTask(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the output layers start at zero (adaLN-zero): move every weight, as training does
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = {"latents": torch.randn(8, 4, 8, 8, generator=g), "label": torch.randint(0, 4, (8,), generator=g)}
    device = torch.device("cpu")

    def step(autocast) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = task.loss(model, batch, generator=step_generator(0, 3, 0), device=device)
        assert out.loss.dtype == torch.float32  # the objective reduces in float32
        out.loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
        return float(out.loss.detach()), float(grad)

    fp32_loss, fp32_grad = step(torch.autocast("cpu", enabled=False))
    from accelerate.state import AcceleratorState

    # accelerate's state is a process-wide singleton: an engine run earlier in this process
    # (mixed_precision "no") would otherwise silently turn this bf16 request into float32.
    AcceleratorState._reset_state(reset_partial_state=True)
    bf16 = Accelerator(cpu=True, mixed_precision="bf16")
    with bf16.autocast():  # really bf16: the blocks' matmuls run in bfloat16
        probe = model.base.blocks[0].attn.qkv(torch.randn(2, 3, model.base.blocks[0].attn.qkv.in_features))
    assert probe.dtype == torch.bfloat16
    bf16_loss, bf16_grad = step(bf16.autocast())
    assert math.isfinite(bf16_loss) and math.isfinite(bf16_grad)
    assert bf16_loss != fp32_loss  # not silently float32
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.02), (bf16_loss, fp32_loss)
    assert bf16_grad == pytest.approx(fp32_grad, rel=0.05), (bf16_grad, fp32_grad)
    AcceleratorState._reset_state(reset_partial_state=True)
