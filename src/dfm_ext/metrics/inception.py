"""FID with user-provided InceptionV3 weights (nothing is downloaded).

Two ways to bring the network:

- a TorchScript file with the call convention of the ``pt_inception-2015-12-05`` detector used by
  the StyleGAN2-ADA / StyleGAN3 metric code: ``module(images, return_features=True) -> [B, 2048]``
  on RGB images with values in ``[0, 255]`` at any size (the script resizes to 299 and normalises
  itself). This is the usual way to get numbers close to the original TensorFlow FID. Images are
  quantised to 256 levels first, as the reference protocol compares saved PNGs.
- ``architecture=`` an ``nn.Module`` of your own (e.g. an InceptionV3 that returns its 2048-d pool
  features) plus its state dict (``.safetensors`` or a torch file, read with
  ``torch.load(weights_only=True)``). Inputs are resized (bilinear, antialiased) to ``resolution``
  and normalised to ``[-1, 1]`` (the TF Inception convention) unless ``mean``/``std`` say otherwise.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from dfm_ext.validation import parse_device
from ._images import ImageSource, load_state_dict_file, to_network_input
from .frechet import FeatureStatistics, frechet_distance_from_images

__all__ = ["InceptionV3Features", "fid"]


class InceptionV3Features(nn.Module):
    """InceptionV3 pool features ``[B, D]`` (``D = 2048`` for the real network) of ``[0, 1]`` images.

    Args:
        weights_path: a TorchScript file (when ``architecture`` is ``None``) or a state dict for
            ``architecture``.
        architecture: the network, returning ``[B, D]`` features; its weights come from ``weights_path``.
        resolution: input size for ``architecture`` (299 for InceptionV3); ignored for TorchScript.
        mean: per-channel mean subtracted from ``[0, 1]`` RGB inputs of ``architecture``.
        std: per-channel divisor after subtracting ``mean``.
        device: where the network runs.

    Example:
        >>> import tempfile, os
        >>> toy = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> path = os.path.join(tempfile.mkdtemp(), "toy.pt")
        >>> torch.save(toy.state_dict(), path)
        >>> extractor = InceptionV3Features(path, architecture=toy, resolution=32)
        >>> extractor(torch.rand(2, 3, 20, 20)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        *,
        architecture: nn.Module | None = None,
        resolution: int = 299,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        device = parse_device(device if device is not None else "cpu")
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no InceptionV3 weights at {path!r}; FID needs a local file (nothing is downloaded)"
            )
        self.torchscript = architecture is None
        if self.torchscript:
            try:
                self.network = torch.jit.load(path, map_location=device)
            except RuntimeError as err:
                raise ValueError(
                    f"{path!r} is not a TorchScript file; for a state dict pass architecture=<nn.Module>"
                ) from err
        else:
            if not isinstance(architecture, nn.Module):
                raise TypeError(f"architecture must be an nn.Module, got {type(architecture).__name__}")
            architecture.load_state_dict(load_state_dict_file(path), strict=True)
            self.network = architecture.to(device)
        self.network.eval()
        for parameter in self.network.parameters():  # ScriptModules refuse requires_grad_()
            parameter.requires_grad_(False)
        self.resolution = resolution
        self.mean, self.std = mean, std
        self.device = device
        self.name = "inception-v3" if self.torchscript else f"inception-v3-{resolution}"

    def train(self, mode: bool = True) -> InceptionV3Features:
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        images = images.to(self.device)
        if self.torchscript:
            rgb = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
            return self.network((rgb * 255).round(), return_features=True)
        x = to_network_input(images, resolution=self.resolution, mean=self.mean, std=self.std)
        return self.network(x)


def fid(
    real: ImageSource | FeatureStatistics,
    fake: ImageSource,
    *,
    weights_path: str | os.PathLike | None = None,
    architecture: nn.Module | None = None,
    extractor: InceptionV3Features | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
    progress_bar: bool = True,
    device: str | torch.device | None = None,
) -> float:
    """FID between two image sets with your InceptionV3 weights (lower is better).

    Args:
        real: reference images (a tensor ``[N, C, H, W]`` or an iterable of batches) or their
            precomputed ``FeatureStatistics``.
        fake: generated images, same ``C, H, W`` as ``real``.
        weights_path: TorchScript file or state dict (see ``InceptionV3Features``).
        architecture: the network for a state dict.
        extractor: an already built ``InceptionV3Features`` instead of ``weights_path``.
        value_range: the range the images come in, ``(-1, 1)`` or ``(0, 1)``.
        batch_size: batch size used to split tensor inputs.
        progress_bar: show a tqdm bar per set.
        device: where the network runs.
    """
    if extractor is None:
        if weights_path is None:
            raise ValueError("fid needs weights_path (a local InceptionV3 file) or an extractor; nothing is downloaded")
        extractor = InceptionV3Features(weights_path, architecture=architecture, device=device)
    return frechet_distance_from_images(
        real, fake, extractor, value_range=value_range, batch_size=batch_size, progress_bar=progress_bar
    )
