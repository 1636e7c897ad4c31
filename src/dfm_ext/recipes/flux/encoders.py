"""The frozen parts of a FLUX folder: its VAE (pixels <-> latents) and text encoders (prompts -> embeddings).

Shared by the training task (:class:`~dfm_ext.recipes.flux.task.FluxTask`, which extends
:class:`FluxEncoders`) and the cache builder (:mod:`~dfm_ext.recipes.flux.cache`), which
therefore does not import the training module.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FluxEncoders"]


class FluxEncoders:
    """Lazily loaded VAE codec and CLIP/T5 encoders of ``cfg.model.path`` (a ``FluxFinetuneConfig``).

    The frozen parts run in ``model.frozen_dtype`` on CUDA and in float32 elsewhere (bf16
    matmuls are ~100x slower than fp32 on CPUs).
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._codec: Any = None
        self._text: Any = None
        self.empty_text: Any = None  # set from a cache; else encoded on first use

    def frozen_dtype(self, device: torch.device) -> torch.dtype:
        return getattr(torch, self.cfg.model.frozen_dtype) if torch.device(device).type == "cuda" else torch.float32

    def codec(self, device: torch.device) -> Any:
        """:class:`~dfm_ext.recipes.engine.latents.LatentCodec` of the VAE in ``vae.subfolder``."""
        if self._codec is None:
            from dfm_ext.recipes.engine.data import LatentCodec
            from dfm_ext.recipes.engine.latents import load_vae

            vae = self.cfg.vae
            model = load_vae(self.cfg.model.path, vae.subfolder, device=device, dtype=self.frozen_dtype(device))
            self._codec = LatentCodec(model, vae.scaling_factor, vae.shift_factor, sample=vae.sample_posterior)
        return self._codec

    def text_encoder(self, device: torch.device) -> Any:
        """:class:`~dfm_ext.recipes.flux.text_encoding.FluxTextEncoder` (T5 length ``data.max_sequence_length``)."""
        if self._text is None:
            from dfm_ext.recipes.flux.text_encoding import FluxTextEncoder

            self._text = FluxTextEncoder(
                self.cfg.model.path, max_sequence_length=self.cfg.data.max_sequence_length, device=device, dtype=self.frozen_dtype(device)
            )
        return self._text

    def empty(self, device: torch.device) -> Any:
        """The empty prompt's embeddings (caption dropout, classifier-free guidance)."""
        if self.empty_text is None:
            self.empty_text = self.text_encoder(device).empty()
        return self.empty_text.to(device)
