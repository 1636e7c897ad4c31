"""Periodic sample quality of the class-conditional image recipe (``sampling.metrics``).

Between ``sampling.metric_images`` samples (random classes, drawn in batches of
``sampling.num_images``) and as many training images spread evenly over the dataset:
``swd`` (:func:`dfm_ext.metrics.swd`) and ``fd_effnet`` (:func:`dfm_ext.metrics.fd_effnet`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["real_images", "sample_metrics"]


def real_images(task: Any, n: int, device: torch.device) -> Tensor:
    """``n`` images ``[n, 3, H, W]`` in ``[-1, 1]`` spread evenly over ``task.reference`` (decoded when cached)."""
    if task.reference is None:
        raise RuntimeError("sampling.metrics needs ImageNetTask.reference (the training dataset)")
    size = len(task.reference)
    items = [task.reference[(i * size) // n] for i in range(n)]
    if "pixels" in items[0]:
        return torch.stack([it["pixels"] for it in items])
    latents = torch.stack([it["latents"] for it in items]).to(device)
    return torch.cat([task.codec(device).decode(z) for z in latents.split(task.cfg.sampling.num_images)]).cpu()


@torch.no_grad()
def sample_metrics(task: Any, model: nn.Module, sampler: Any, device: torch.device) -> dict[str, float]:
    """The metrics of ``task.cfg.sampling.metrics`` for ``model`` sampled with ``sampler`` (an ``ImageNetTask``'s)."""
    from dfm_ext import metrics

    cfg = task.cfg.sampling
    n, b = cfg.metric_images, cfg.num_images
    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    fakes = []
    for start in range(0, n, b):
        m = min(b, n - start)
        labels = torch.randint(0, task.cfg.data.num_classes, (m,), generator=g, device=g.device).to(device)
        shape = (m, task.cfg.vae.latent_channels, task.cfg.latent_size, task.cfg.latent_size)
        z = sampler.sample(model, shape, generator=g, device=device, uncond={"y": torch.full_like(labels, task.null_class)}, y=labels).x
        fakes.append(task.codec(device).decode(z).cpu())
    fake = torch.cat(fakes)
    real = real_images(task, n, device)
    out: dict[str, float] = {}
    if "swd" in cfg.metrics:
        out["swd"] = metrics.swd(real, fake, progress_bar=False).mean
    if "fd_effnet" in cfg.metrics:
        out["fd_effnet"] = metrics.fd_effnet(real, fake, progress_bar=False, device=device)
    return out
