"""Reference models: the DiT of Peebles & Xie (image) and its video extension, with DiT's module names."""

from dfm_ext.models.dit import DiT, DiTConfig
from dfm_ext.models.video_dit import VideoDiT, VideoDiTConfig

__all__ = ["DiT", "DiTConfig", "VideoDiT", "VideoDiTConfig"]
