"""Text-to-image with a DFM-wrapped FLUX (``FluxTransformer2DModel``), the diffusers way: ``DFMFluxPipeline``.

``DFMFluxPipeline.from_pretrained(final, flux="FLUX.1-dev")`` loads the wrapped transformer a FLUX finetuning run
exported (``final/``: ``dfm_config.json`` + ``model.safetensors``) and the frozen parts of the FLUX folder it was
finetuned from (``vae/``, ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``);
:meth:`DFMFluxPipeline.save_pretrained` writes all of it as one folder in the FLUX.1-dev layout (its
``transformer/`` the wrapped one), which ``from_pretrained(folder)`` reads alone.

The prompts are encoded as ``FluxPipeline`` and the FLUX recipe do (the recipe uses :class:`FluxTextEncoder` from
here): CLIP's pooled output ``[B, P]`` and T5's last hidden state ``[B, L, D]`` padded to ``max_sequence_length``,
without an attention mask. Guidance is true classifier-free guidance against the empty prompt (the paper's
FLUX-DFM: scale 3.0); FLUX's distilled-guidance input is the one fixed while finetuning (the adapter's).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm_ext.pipelines.dit import DFMDiTPipeline, DFMPipelineOutput
from dfm_ext.validation import parse_device
from dfm_ext.wrapping.record import CONFIG_FILE, read_record
from dfm_ext.wrapping.wrapper import DFMTransformer, load_wrapped

__all__ = ["FLUX_SUBFOLDERS", "DFMFluxPipeline", "FluxTextEncoder", "TextEmbeddings"]

#: The frozen parts of a FLUX.1-dev folder the pipeline reads (besides ``transformer/``).
FLUX_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _folder(path: str | os.PathLike, names: Sequence[str]) -> str:
    """A local FLUX-style folder (checked for ``names``) or a hub id already in the local cache (passed through)."""
    text = os.fspath(path)
    local = Path(text).expanduser()
    if text.startswith((".", "/", "~")) or local.exists():
        missing = [n for n in names if not (local / n).is_dir()]
        if missing:
            raise FileNotFoundError(f"{str(local)!r} lacks the subfolder(s) {missing}; expected the FLUX.1-dev layout (transformer, {', '.join(FLUX_SUBFOLDERS)})")
        return str(local)
    return text


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
        self, path: str | os.PathLike, *, max_sequence_length: int = 512, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:  # fmt: skip
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        where = _folder(path, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        self.path, self.max_sequence_length, self.device = os.fspath(path), int(max_sequence_length), torch.device(device)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer")
        self.t5_tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2")
        self.clip = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype).to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        self.t5 = T5EncoderModel.from_pretrained(where, subfolder="text_encoder_2", torch_dtype=dtype).to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
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

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The tokenizers and encoders into ``directory``'s FLUX subfolders."""
        parts = {"tokenizer": self.clip_tokenizer, "tokenizer_2": self.t5_tokenizer, "text_encoder": self.clip, "text_encoder_2": self.t5}
        for sub, part in parts.items():
            part.save_pretrained(os.path.join(directory, sub))


class DFMFluxPipeline(DFMDiTPipeline):
    """Text-to-image sampling from a DFM-wrapped FLUX, with the diffusers call signature.

    Args:
        transformer: the wrapped ``FluxTransformer2DModel`` (``load_wrapped`` of a FLUX run's ``final/``).
        text_encoder: the prompts' encoders (:class:`FluxTextEncoder`).
        vae: the FLUX ``AutoencoderKL``; latents are ``(vae_latent - shift_factor) * scaling_factor`` (its config's).
        **kwargs: ``scaling_factor``, ``shift_factor`` (see :class:`~dfm_ext.pipelines.DFMDiTPipeline`).

    A run's ``final/`` loads as ``DFMFluxPipeline.from_pretrained("runs/flux_dfm/final", flux="/models/FLUX.1-dev")``
    (the pipelines guide has a runnable example on the tiny FLUX assets); then
    ``pipe("a photo of a cat", num_inference_steps=(30, 10), thresholds=(0.95,), generator=g).images``.
    """

    def __init__(self, transformer: DFMTransformer, *, text_encoder: FluxTextEncoder, vae: Any, **kwargs: Any) -> None:
        super().__init__(transformer, vae=vae, **kwargs)
        self.text_encoder = text_encoder
        block_out = getattr(getattr(vae, "config", None), "block_out_channels", None)
        self.vae_scale_factor = 2 ** (len(block_out) - 1) if block_out else 8

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, flux: str | os.PathLike | None = None, device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32, max_sequence_length: int = 512, **kwargs: Any,
    ) -> DFMFluxPipeline:  # fmt: skip
        """Load a FLUX run's ``final/`` (with ``flux=`` the FLUX folder it finetuned, for the VAE and text encoders) or a
        folder :meth:`save_pretrained` wrote (everything inside; ``flux`` not needed).

        Args:
            folder: ``final/`` (``dfm_config.json``) or a pipeline folder (``transformer/dfm_config.json``).
            flux: a FLUX.1-dev-layout folder (or a hub id in the local cache) with the frozen parts.
            device: where everything runs.
            torch_dtype: the weights' dtype (float32 on a CPU; bfloat16 on a GPU halves the memory).
            max_sequence_length: T5 tokens per prompt (512 for FLUX.1-dev; the run's ``data.max_sequence_length``).
            **kwargs: ``scaling_factor``, ``shift_factor``.
        """
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        device, root = parse_device(device), Path(folder)
        weights = root / "transformer" if (root / "transformer" / CONFIG_FILE).is_file() else root
        if not (weights / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no wrapped FLUX at {str(root)!r}: expected {CONFIG_FILE} there or in its transformer/ (a FLUX run's final/)")
        frozen = root if weights != root else flux
        if frozen is None:
            raise ValueError(f"{str(root)!r} holds the transformer only: pass flux= the FLUX folder it was finetuned from (the run's model.path)")
        where = _folder(frozen, FLUX_SUBFOLDERS)
        base = FluxTransformer2DModel.from_config(read_record(weights)["base"]["config"])
        transformer = load_wrapped(weights, base, device=device).to(device, torch_dtype)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=torch_dtype).to(device).eval().requires_grad_(False)
        text = FluxTextEncoder(where, max_sequence_length=max_sequence_length, device=device, dtype=torch_dtype)
        return cls(transformer, text_encoder=text, vae=vae, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """One folder in the FLUX.1-dev layout: ``transformer/`` (the wrapped model), ``vae/``, the encoders and tokenizers."""
        out = Path(directory)
        self.transformer.save_pretrained(out / "transformer")
        self.vae.save_pretrained(str(out / "vae"))
        self.text_encoder.save_pretrained(out)
        return out

    def to(self, device: str | torch.device) -> DFMFluxPipeline:
        super().to(device)
        for part in (self.text_encoder.clip, self.text_encoder.t5):
            part.to(parse_device(device))
        self.text_encoder.device = parse_device(device)
        return self

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | Sequence[int] | None = None,
        thresholds: Sequence[float] | None = None,
        guidance_scale: float | Sequence[float] = 3.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        method: str = "euler",
        callback_on_step_end: Callable[[DFMFluxPipeline, int, Tensor, dict[str, Any]], Any] | None = None,
    ) -> DFMPipelineOutput:
        """Generate one image per prompt.

        Args:
            prompt: a prompt or a list of prompts.
            height, width: pixels (multiples of the VAE factor x 2 x the coarsest stage's factor); default: the
                resolution the model was wrapped at.
            num_inference_steps: steps per stage, e.g. ``(30, 10)``; an int is split like the default schedule.
            thresholds: when each later stage joins (the paper: 0.95 at 1024 px; default 0.9).
            guidance_scale: true CFG against the empty prompt (3.0, the paper's FLUX setting); 1 turns it off.
            generator: the noise.
            output_type: ``"pil"``, ``"pt"``, ``"np"`` or ``"latent"``.
            method: ``"euler"`` or ``"heun"``.
            callback_on_step_end: as in :class:`~dfm_ext.pipelines.DFMDiTPipeline` (stage previews in ``kwargs["preview"]``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty")
        c, h, w = self.transformer.sample_shape[0], *self.transformer.sample_shape[-2:]
        f = self.vae_scale_factor
        if any(side % f for side in (height or 0, width or 0)):
            raise ValueError(f"height and width must be multiples of the VAE's factor {f}, got {height} x {width}")
        h, w = (height // f if height else h), (width // f if width else w)
        dtype, device = next(self.transformer.parameters()).dtype, self.device
        text = self.text_encoder.encode(prompts).to(device, dtype)
        uncond = None
        if guidance_scale != 1:
            empty = self.text_encoder.empty().to(device, dtype)
            uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in empty.as_kwargs().items()}
        return self._generate(
            (len(prompts), c, h, w), text.as_kwargs(), uncond, num_inference_steps=num_inference_steps, thresholds=thresholds,
            guidance_scale=guidance_scale, generator=generator, output_type=output_type, method=method,
            callback_on_step_end=callback_on_step_end,
        )  # fmt: skip
