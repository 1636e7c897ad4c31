"""Class-conditional image generation (ImageNet, and the demo's offline sets): ``python -m dfm_ext.recipes.imagenet``."""

from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask, main

__all__ = ["ImageNetConfig", "ImageNetTask", "main"]
