"""Models, batches and timed steps of ``gpu_check.py``: the reference DiT, wrapped with ``LaplacianPyramid((2, 1))``.

Arms (``kind``): ``base`` the unwrapped DiT trained with plain flow matching; ``wrapped``
(:func:`dfm_ext.wrap_dit` through :class:`dfm_ext.DFMObjective`); ``lora`` the wrapped DiT with
per-stage LoRA (:func:`dfm_ext.specialize` ``kind="lora"``, the recipes' default ``targets="mlp"``,
rank 16); ``ckpt`` the wrapped DiT with activation checkpointing (``DiT.enable_gradient_checkpointing``).
A training step is forward (bf16 autocast on CUDA, float32 on the CPU), loss, backward, AdamW step,
``zero_grad(set_to_none=True)`` (so gradients are not held through the next forward, as in the engine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KINDS", "Built", "autocast", "build", "dit_config", "make_step", "sync", "time_steps"]

KINDS = ("base", "wrapped", "lora", "ckpt")
LORA = {"kind": "lora", "targets": "mlp", "rank": 16}


def dit_config(preset: str, latent: int, *, num_classes: int = 1000) -> Any:
    from dfm_ext import DiTConfig

    return DiTConfig.preset(preset, input_size=latent, in_channels=4, num_classes=num_classes, class_dropout_prob=0.0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str) -> Any:
    # bf16 matmuls run at ~1 GFLOP/s on CPUs without AMX: the CPU runs stay float32.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


@dataclass
class Built:
    kind: str
    model: nn.Module
    cfg: Any
    stage_shapes: list[tuple[int, ...]] | None  # None: unwrapped
    lora_params: int = 0

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(kind: str, cfg: Any, device: str, *, seed: int = 0) -> Built:
    """One arm's model on ``device`` (initialised there when it can be: seconds saved for DiT-XL/2)."""
    from dfm_ext import DiT, LaplacianPyramid, specialize, wrap_dit

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def make() -> Built:
        torch.manual_seed(seed)
        base = DiT(cfg)
        if kind == "base":
            return Built(kind, base, cfg, None)
        if kind == "ckpt":
            base.enable_gradient_checkpointing()
        model = wrap_dit(base, LaplacianPyramid((2, 1)))
        lora = 0
        if kind == "lora":
            spec = specialize(model, **LORA)  # type: ignore[arg-type]
            lora = sum(p.numel() for p in spec.stage_parameters())
        return Built(kind, model, cfg, [tuple(s) for s in model.stage_shapes], lora)

    try:
        with torch.device(device):
            built = make()
    except Exception:  # noqa: BLE001 - a constructor that insists on the CPU: build there, then move
        built = make()
    built.model.to(device)
    return built


def make_step(built: Built, batch: int, device: str, *, compiled: bool = False, backend: str = "inductor", seed: int = 1,
              optimizer: torch.optim.Optimizer | None = None) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:  # fmt: skip
    """``step() -> loss`` (detached, on the device) for one batch of random latents and labels, and its AdamW."""
    from dfm_ext import DFMObjective, StageTimestepSampler

    model, cfg = built.model, built.cfg
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.image_size
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    if built.stage_shapes is None:
        t = torch.rand(batch, generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)

        def loss_fn() -> torch.Tensor:  # plain flow matching at the same token count (t = 1 is data)
            tt = t.view(-1, 1, 1, 1)
            return F.mse_loss(model(tt * x + (1 - tt) * noise, t, y).float(), x - noise)

    else:
        objective = DFMObjective(2)
        stages = [s.to(device) for s in model.decomposition.decompose(x)]  # type: ignore[operator, union-attr]
        # Sampled on the CPU, as the data pipeline does (its values are checked there).
        ts = StageTimestepSampler(2, probabilities=(0.5, 0.5)).sample(batch, generator=g, device=device)

        def loss_fn() -> torch.Tensor:
            return objective(model, stages, ts, y=y).loss

    model.train()
    opt = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=1e-4)
    fn = torch.compile(loss_fn, fullgraph=True, backend=backend) if compiled else loss_fn

    def step() -> torch.Tensor:
        with autocast(device):
            loss = fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def time_steps(step: Callable[[], torch.Tensor], device: str, *, warmup: int, steps: int) -> dict[str, Any]:
    """Warm up (compilation happens there), then time ``steps`` steps between two device syncs."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync(device)
    elapsed = time.perf_counter() - t0
    last = [float(v) for v in torch.stack(losses).cpu()]  # one host transfer, after timing
    return {
        "warmup_steps": warmup,
        "warmup_s": round(warm, 3),
        "timed_steps": steps,
        "seconds_per_step": elapsed / steps,
        "ms_per_step": round(1000 * elapsed / steps, 3),
        "losses_finite": all(math.isfinite(v) for v in last),
        "last_loss": last[-1],
    }
