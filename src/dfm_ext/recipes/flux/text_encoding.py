"""The frozen parts of a FLUX folder (FLUX.1-dev layout, or a hub id): its VAE and its two text encoders.

The encoders are the library's :class:`FluxTextEncoder` (:mod:`dfm_ext.pipelines.flux`: CLIP pooled, T5 padded without
a mask, as ``FluxPipeline`` does), so that the recipe and ``DFMFluxPipeline`` encode prompts with the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dfm_ext.pipelines.flux import FluxTextEncoder, TextEmbeddings
from dfm_ext.recipes.engine.data import LatentCodec
from dfm_ext.recipes.engine.latents import load_vae, looks_local

__all__ = ["SUBFOLDERS", "FluxEncoders", "FluxTextEncoder", "TextEmbeddings", "check_local_subfolders"]

#: The subfolders of a FLUX.1-dev folder.
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def check_local_subfolders(path: str, names: Sequence[str]) -> None:
    """For a local FLUX-style folder, a ``FileNotFoundError`` naming the subfolders of ``names`` it lacks (hub ids pass)."""
    if not looks_local(path):
        return
    root = Path(path).expanduser()
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(root)!r} lacks the subfolder(s) {missing}; expected the FLUX.1-dev layout ({', '.join(SUBFOLDERS)})")


class FluxEncoders:
    """Lazily loaded VAE codec and text encoders of ``cfg.model.path`` (a ``FluxFinetuneConfig``), shared by the task
    and the cache builder. They run in ``model.frozen_dtype`` on CUDA, float32 elsewhere (CPU bf16 matmuls are slow)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._codec: Any = None
        self._text: FluxTextEncoder | None = None
        self.empty_text: TextEmbeddings | None = None  # set from a cache; else encoded on first use

    def frozen_dtype(self, device: torch.device) -> torch.dtype:
        return getattr(torch, self.cfg.model.frozen_dtype) if torch.device(device).type == "cuda" else torch.float32

    def codec(self, device: torch.device) -> Any:
        """The :class:`~dfm_ext.recipes.engine.data.LatentCodec` of the VAE in ``vae.subfolder``."""
        if self._codec is None:
            vae = self.cfg.vae
            model = load_vae(self.cfg.model.path, vae.subfolder, device=device, dtype=self.frozen_dtype(device))
            self._codec = LatentCodec(model, vae.scaling_factor, vae.shift_factor, sample=vae.sample_posterior)
        return self._codec

    def text_encoder(self, device: torch.device) -> FluxTextEncoder:
        if self._text is None:
            self._text = FluxTextEncoder(
                self.cfg.model.path, max_sequence_length=self.cfg.data.max_sequence_length, device=device, dtype=self.frozen_dtype(device)
            )
        return self._text

    def empty(self, device: torch.device) -> TextEmbeddings:
        """The empty prompt's embeddings (caption dropout, classifier-free guidance)."""
        if self.empty_text is None:
            self.empty_text = self.text_encoder(device).empty()
        return self.empty_text.to(device)
