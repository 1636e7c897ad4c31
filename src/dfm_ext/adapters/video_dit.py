"""Adapter for video DiTs with DiT's module names and a per-frame ``Conv3d`` patch embedding.

It covers :class:`dfm_ext.models.video_dit.VideoDiT` and any model built like it:
``x_embedder.proj`` a ``Conv3d`` with kernel = stride = ``(1, p, p)`` (frames patchified
independently), ``t_embedder``, ``y_embedder`` (with ``num_classes``), ``blocks``,
``final_layer.linear`` (``(p, q, c)`` output order) and a ``rope_for_grid(grid, device, dtype)``
method for 3-D positions. The time convention is settled as in the image adapter:
``time_convention=`` or the model's ``dfm_time_convention`` (``VideoDiT`` declares ``"x1000"``). Stages are packed onto the token grid ``(T, H / p, W / p)``
frame-major, the model's own token order, so everything after the patch embedding is the
image adapter's (:class:`~dfm_ext.adapters.dit.DiTFamilyAdapter`) code path.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .common import check_stage0_channels
from .dit import DiTFamilyAdapter

__all__ = ["ADAPTER", "VideoDiTAdapter"]


class VideoDiTAdapter(DiTFamilyAdapter):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for DiT-named video models (see the module docstring)."""

    name = "video_dit"

    @staticmethod
    def _matches_proj(proj: Any) -> bool:
        """Whether ``x_embedder.proj`` is a per-frame ``Conv3d`` (temporal kernel 1)."""
        return isinstance(proj, nn.Conv3d) and proj.kernel_size[0] == 1

    @staticmethod
    def _proj(model: nn.Module) -> nn.Conv3d:  # type: ignore[override]
        proj = getattr(model.x_embedder, "proj", None)
        if not isinstance(proj, nn.Conv3d):
            raise TypeError(f"{type(model).__name__}.x_embedder has no Conv3d .proj (already wrapped?)")
        if proj.kernel_size[0] != 1:
            raise ValueError(f"{type(model).__name__} merges frames (temporal patch {proj.kernel_size[0]}); expected 1")
        return proj

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        proj = self._proj(model)
        grid = getattr(model.x_embedder, "grid_size", None)
        if grid is None or len(grid) != 3:
            raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass sample_shape=(C, T, H, W)")
        p = proj.kernel_size
        return (proj.in_channels, int(grid[0]), int(grid[1]) * p[1], int(grid[2]) * p[2])

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(sample_shape) != 4:
            raise ValueError(f"{type(model).__name__} takes videos; sample_shape must be (C, T, H, W), got {sample_shape}")
        p = self._proj(model).kernel_size
        if sample_shape[2] % p[1] or sample_shape[3] % p[2]:
            raise ValueError(f"sample_shape {sample_shape} is not divisible by the model's patch {tuple(p)}")
        return (sample_shape[1], sample_shape[2] // p[1], sample_shape[3] // p[2])

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        proj = self._proj(model)
        if len(packer.grid) != 3:
            raise ValueError(f"{type(model).__name__} takes videos; got a token grid {packer.grid}")
        check_stage0_channels(packer, init, proj.in_channels)
        convention = self.bind(model).time_convention  # refuses before touching the model
        self._install_modules(model, proj, packer, convention, init=init, stage_embedding=stage_embedding)


ADAPTER = VideoDiTAdapter()
