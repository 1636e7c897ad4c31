"""FLUX's two text encoders: T5 token embeddings and pooled CLIP embeddings, as ``FluxPipeline`` makes them.

* CLIP (``text_encoder/`` + ``tokenizer/``): prompts padded/truncated to the tokenizer's
  ``model_max_length`` (77), ``pooler_output`` -> ``pooled_projections [B, P]`` (768 for FLUX).
* T5 (``text_encoder_2/`` + ``tokenizer_2/``): padded/truncated to ``max_sequence_length``
  (512 for FLUX.1-dev, 256 for schnell), last hidden state -> ``encoder_hidden_states [B, L, D]``
  (4096). No attention mask, as in the pipeline: FLUX was trained on the padded sequence.

Everything is loaded with ``from_pretrained`` from a local folder laid out like the FLUX.1-dev
repository or from a hub id (read from the local Hugging Face cache; nothing is downloaded when
``HF_HUB_OFFLINE=1``). Tokenizers go through ``AutoTokenizer``, so a CLIP/T5 tokenizer and any
``PreTrainedTokenizerFast`` saved in those folders load the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm_ext.recipes.engine.latents import looks_local

__all__ = ["FluxTextEncoder", "TextEmbeddings", "check_local_subfolders"]

SUBFOLDERS = {
    "transformer": "transformer",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "text_encoder_2": "text_encoder_2",
    "tokenizer_2": "tokenizer_2",
}


def check_local_subfolders(path: str, names: Sequence[str]) -> None:
    """For a local FLUX-style folder, check that each subfolder in ``names`` exists (hub ids pass).

    Raises:
        FileNotFoundError: naming the missing subfolders and what they should hold.
    """
    if not looks_local(path):
        return
    root = Path(path).expanduser()
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} lacks the subfolder(s) {missing}; expected the FLUX.1-dev layout "
            f"({', '.join(SUBFOLDERS.values())})"
        )


@dataclass(frozen=True)
class TextEmbeddings:
    """Conditioning of a batch of prompts, named as ``FluxTransformer2DModel.forward`` takes it.

    Attributes:
        encoder_hidden_states: T5 token embeddings ``[B, L, D]``.
        pooled_projections: pooled CLIP embeddings ``[B, P]``.
    """

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
    """CLIP + T5 encoders and tokenizers of a FLUX checkpoint, frozen, in eval mode.

    Args:
        path: a local folder (FLUX.1-dev layout) or a hub id.
        max_sequence_length: T5 tokens per prompt.
        device: where the encoders run.
        dtype: their weights' dtype (bfloat16 on GPU; float32 on CPU).

    Raises:
        FileNotFoundError: a local ``path`` lacks one of the four subfolders.
    """

    def __init__(
        self,
        path: str,
        *,
        max_sequence_length: int = 512,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        check_local_subfolders(path, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        where = str(Path(path).expanduser()) if looks_local(path) else path
        self.path, self.max_sequence_length, self.device = path, int(max_sequence_length), torch.device(device)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer")
        self.t5_tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2")
        self.clip = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype).to(self.device).eval()
        self.t5 = T5EncoderModel.from_pretrained(where, subfolder="text_encoder_2", torch_dtype=dtype).to(self.device).eval()
        self.clip.requires_grad_(False)
        self.t5.requires_grad_(False)
        self._empty: TextEmbeddings | None = None

    @property
    def t5_dim(self) -> int:
        return int(self.t5.config.d_model)

    @property
    def pooled_dim(self) -> int:
        return int(self.clip.config.hidden_size)  # CLIPTextModel's pooler_output width

    def metadata(self) -> dict[str, Any]:
        """What embeddings made by this encoder depend on (recorded in caches)."""
        return {"text_encoder_path": self.path, "max_sequence_length": self.max_sequence_length,
                "t5_dim": self.t5_dim, "pooled_dim": self.pooled_dim}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """``prompts`` -> T5 ``[B, L, D]`` and pooled CLIP ``[B, P]`` (float32 on ``device``)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        clip_ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        t5_ids = self.t5_tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = self.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5 = self.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        return TextEmbeddings(t5.float(), pooled.float())

    def empty(self) -> TextEmbeddings:
        """Embeddings of the empty prompt ``[1, L, D]`` / ``[1, P]``: caption dropout and CFG's unconditional input."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty
