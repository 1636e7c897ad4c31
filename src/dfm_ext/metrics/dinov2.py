"""FDD (Frechet distance on DINOv2 features) with user-provided weights (nothing is downloaded).

The paper reports FDD next to FID (Stein et al. 2023 found DINOv2 features a more reliable basis).
Bring the network one of two ways:

- a local folder saved by ``transformers`` (``config.json`` + weights), e.g. a copy of
  ``facebook/dinov2-large``, loaded with ``Dinov2Model.from_pretrained(folder)``; the feature is the
  final-layer-normed CLS token (``pooler_output``), 1024-d for ViT-L/14;
- an ``nn.Module`` called as ``module(x) -> [B, D]``, e.g. the torch-hub ``dinov2_vitl14`` whose
  forward returns the normed CLS token.

Inputs: RGB (grey repeated), resized bicubic with antialiasing to ``resolution`` (224 = 16 x 16
patches of 14), ImageNet mean and standard deviation.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from dfm_ext.validation import parse_device
from ._images import IMAGENET_MEAN, IMAGENET_STD, ImageSource, to_network_input
from .frechet import FeatureStatistics, frechet_distance_from_images

__all__ = ["DINOv2Features", "fdd"]


class DINOv2Features(nn.Module):
    """DINOv2 CLS features ``[B, D]`` of ``[0, 1]`` images ``[B, 1 or 3, H, W]``.

    Args:
        model: a local ``transformers`` DINOv2 folder, or an ``nn.Module`` returning ``[B, D]``.
        resolution: input side; a multiple of the patch size (14) keeps every pixel in a token.
        device: where the network runs.

    Example:
        >>> import tempfile
        >>> from transformers import Dinov2Config, Dinov2Model
        >>> config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                       intermediate_size=64, image_size=28, patch_size=14)
        >>> folder = tempfile.mkdtemp()
        >>> Dinov2Model(config).save_pretrained(folder)
        >>> extractor = DINOv2Features(folder, resolution=28)
        >>> extractor(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        *,
        resolution: int = 224,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        checked = parse_device(device if device is not None else "cpu")  # before any weights are read
        if isinstance(model, (str, os.PathLike)):
            folder = os.fspath(model)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"no DINOv2 checkpoint folder at {folder!r}; FDD needs local weights (nothing is downloaded)"
                )
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise ValueError(f"{folder!r} has no config.json; expected a folder written by save_pretrained")
            from transformers import Dinov2Model

            self.network: nn.Module = Dinov2Model.from_pretrained(folder, local_files_only=True)
            self.huggingface = True
            self.name = f"dinov2-{os.path.basename(os.path.normpath(folder))}-{resolution}"
        elif isinstance(model, nn.Module):
            self.network = model
            self.huggingface = False
            self.name = f"dinov2-{type(model).__name__}-{resolution}"
        else:
            raise TypeError(f"model must be a checkpoint folder or an nn.Module, got {type(model).__name__}")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution = resolution
        self.device = checked
        self.network.to(self.device).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DINOv2Features:
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = to_network_input(
            images.to(self.device), resolution=self.resolution, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="bicubic"
        )
        if self.huggingface:
            return self.network(pixel_values=x).pooler_output
        features = self.network(x)
        if not isinstance(features, Tensor) or features.ndim != 2:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"the DINOv2 module must return [B, D] features, returned {shape}")
        return features


def fdd(
    real: ImageSource | FeatureStatistics,
    fake: ImageSource,
    *,
    model: str | os.PathLike | nn.Module | None = None,
    extractor: DINOv2Features | None = None,
    resolution: int = 224,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
    progress_bar: bool = True,
    device: str | torch.device | None = None,
) -> float:
    """FDD between two image sets with your DINOv2 weights (lower is better).

    Args:
        real: reference images (a tensor ``[N, C, H, W]`` or an iterable of batches) or their
            precomputed ``FeatureStatistics``.
        fake: generated images, same ``C, H, W`` as ``real``.
        model: a local ``transformers`` DINOv2 folder or an ``nn.Module`` (see ``DINOv2Features``).
        extractor: an already built ``DINOv2Features`` instead of ``model``.
        resolution: DINOv2 input side (224).
        value_range: the range the images come in, ``(-1, 1)`` or ``(0, 1)``.
        batch_size: batch size used to split tensor inputs.
        progress_bar: show a tqdm bar per set.
        device: where the network runs.
    """
    if extractor is None:
        if model is None:
            raise ValueError("fdd needs model (a local DINOv2 folder or module) or an extractor; nothing is downloaded")
        extractor = DINOv2Features(model, resolution=resolution, device=device)
    return frechet_distance_from_images(
        real, fake, extractor, value_range=value_range, batch_size=batch_size, progress_bar=progress_bar
    )
