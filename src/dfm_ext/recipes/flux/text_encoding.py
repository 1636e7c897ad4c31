"""The frozen parts of a FLUX folder (FLUX.1-dev layout, or a hub id): its VAE and its two text encoders.

As ``FluxPipeline`` does: CLIP (``text_encoder/``, ``tokenizer/``) padded to the tokenizer's
``model_max_length`` gives ``pooled_projections [B, P]`` (its ``pooler_output``); T5
(``text_encoder_2/``, ``tokenizer_2/``) padded to ``max_sequence_length`` gives
``encoder_hidden_states [B, L, D]``, without an attention mask (FLUX was trained on the padded sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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


@dataclass(frozen=True)
class TextEmbeddings:
    """Conditioning of a batch of prompts as ``FluxTransformer2DModel.forward`` takes it: T5 ``[B, L, D]``, CLIP ``[B, P]``."""

    encoder_hidden_states: Tensor
    pooled_projections: Tensor

    def __post_init__(self) -> None:
        t5, clip = self.encoder_hidden_states, self.pooled_projections
        if t5.ndim != 3 or clip.ndim != 2 or t5.shape[0] != clip.shape[0]:
            raise ValueError(f"expected T5 [B, L, D] and CLIP [B, P] with one B, got {tuple(t5.shape)} and {tuple(clip.shape)}")

    def as_kwargs(self) -> dict[str, Tensor]:
        return {"encoder_hidden_states": self.encoder_hidden_states, "pooled_projections": self.pooled_projections}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbeddings:
        return TextEmbeddings(self.encoder_hidden_states.to(device, dtype), self.pooled_projections.to(device, dtype))

    def where(self, drop: Tensor, empty: TextEmbeddings) -> TextEmbeddings:
        """Rows with ``drop[b]`` True replaced by ``empty`` (one row, broadcast): caption dropout."""
        if drop.shape != (self.pooled_projections.shape[0],) or drop.dtype != torch.bool:
            raise ValueError(f"drop must be a bool tensor [{self.pooled_projections.shape[0]}], got {drop.dtype} {tuple(drop.shape)}")
        t5 = torch.where(drop[:, None, None], empty.encoder_hidden_states.to(self.encoder_hidden_states), self.encoder_hidden_states)
        clip = torch.where(drop[:, None], empty.pooled_projections.to(self.pooled_projections), self.pooled_projections)
        return TextEmbeddings(t5, clip)


class FluxTextEncoder:
    """CLIP + T5 encoders and tokenizers (``AutoTokenizer``) of a FLUX folder or hub id, frozen, in eval mode."""

    def __init__(
        self, path: str, *, max_sequence_length: int = 512, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        check_local_subfolders(path, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        where = str(Path(path).expanduser()) if looks_local(path) else path
        self.path, self.max_sequence_length, self.device = path, int(max_sequence_length), torch.device(device)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer")
        self.t5_tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2")
        self.clip = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype).to(self.device).eval().requires_grad_(False)
        self.t5 = T5EncoderModel.from_pretrained(where, subfolder="text_encoder_2", torch_dtype=dtype).to(self.device).eval().requires_grad_(False)
        self._empty: TextEmbeddings | None = None

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """``prompts`` -> T5 ``[B, L, D]`` and pooled CLIP ``[B, P]`` (float32 on ``device``)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        prompts, pad = list(prompts), {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
        clip_ids = self.clip_tokenizer(prompts, max_length=self.clip_tokenizer.model_max_length, **pad).input_ids
        t5_ids = self.t5_tokenizer(prompts, max_length=self.max_sequence_length, **pad).input_ids
        pooled = self.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5 = self.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        return TextEmbeddings(t5.float(), pooled.float())

    def empty(self) -> TextEmbeddings:
        """Embeddings of the empty prompt ``[1, L, D]`` / ``[1, P]``: caption dropout and CFG's unconditional input."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty


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
