"""Offline assets for the ``flux_tiny`` config: a FLUX-layout folder of tiny random models and captioned photos.

Every model is saved with ``save_pretrained`` so that it loads as the real ones do (the tokenizers:
word-level over the captions' words); the photos are cropped at several aspect ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from dfm_ext.recipes.engine.cli import assets_main, make_tiny_vae, photo

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["CAPTIONS", "make_captioned_images", "make_tiny_flux", "make_tiny_text_encoders", "tiny_flux_transformer_config"]

#: Photo -> caption words (the tiny tokenizers' vocabulary comes from these).
CAPTIONS = {"astronaut": "a portrait of an astronaut in a white suit", "coffee": "a cup of coffee on a red table",
            "chelsea": "a ginger cat looking at the camera", "rocket": "a rocket on the launch pad under a blue sky"}  # fmt: skip
LATENT_CHANNELS, T5_DIM, POOLED_DIM = 4, 16, 12


def make_captioned_images(root: str | Path, *, per_photo: int = 4, seed: int = 0, side: int = 64) -> Path:
    """Crops of each photo (square, landscape, portrait) as ``root/<photo>_<i>.{png,jpg}`` + ``.txt``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    aspects = (1.0, 1.5, 1 / 1.5)
    for name, caption in CAPTIONS.items():
        img = photo(name)
        h, w = img.shape[:2]
        for i in range(per_photo):
            a = aspects[i % len(aspects)]
            ch = int(rng.integers(min(h, w) // 2, min(h, w)))
            cw = min(w, int(ch * a))
            ch = min(h, int(cw / a))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            out = (round(side * np.sqrt(a)), round(side / np.sqrt(a)))
            crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize(out, Image.Resampling.BICUBIC)
            stem = root / f"{name}_{i}"
            crop.save(stem.with_suffix(".png" if i % 2 else ".jpg"))
            stem.with_suffix(".txt").write_text(caption + "\n")
    return root


def _word_tokenizer(
    words: Sequence[str], *, specials: dict[str, str], template: str, max_length: int
) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in [*dict.fromkeys(specials.values()), *sorted(set(words))]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=specials["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials_used = [(p, vocab[p]) for p in dict.fromkeys(template.split()) if p != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials_used)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **{f"{k}_token": v for k, v in specials.items()}), vocab


def make_tiny_text_encoders(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny CLIP (hidden 12) and T5 (d_model 16) encoders with word-level tokenizers under ``path``."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    words = " ".join(CAPTIONS.values()).lower().split()
    clip_tok, clip_vocab = _word_tokenizer(
        words, specials={"unk": "<|unk|>", "bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"},
        template="<|startoftext|> $A <|endoftext|>", max_length=16,
    )  # fmt: skip
    t5_tok, t5_vocab = _word_tokenizer(words, specials={"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}, template="$A </s>", max_length=32)
    clip_tok.save_pretrained(str(path / "tokenizer"))
    t5_tok.save_pretrained(str(path / "tokenizer_2"))
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=POOLED_DIM, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=POOLED_DIM, bos_token_id=clip_vocab["<|startoftext|>"],
        eos_token_id=clip_vocab["<|endoftext|>"], pad_token_id=clip_vocab["<|endoftext|>"],
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_vocab), d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
        pad_token_id=t5_vocab["<pad>"], eos_token_id=t5_vocab["</s>"],
        # transformers types T5Config as a dataclass of its own fields; its __init__ also takes the common kwargs
        decoder_start_token_id=t5_vocab["<pad>"],  # type: ignore[call-arg]
    ))  # fmt: skip
    clip.save_pretrained(str(path / "text_encoder"))
    t5.save_pretrained(str(path / "text_encoder_2"))
    return path


def tiny_flux_transformer_config(
    *, text_dim: int = T5_DIM, pooled_dim: int = POOLED_DIM, guidance_embeds: bool = True, latent_channels: int = LATENT_CHANNELS
) -> dict:
    """``FluxTransformer2DModel`` kwargs: 1 double + 1 single block, hidden 16, ``4 C`` packed channels."""
    return dict(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def make_tiny_flux(path: str | Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A complete FLUX-layout folder: tiny transformer, VAE and both text encoders with tokenizers."""
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    make_tiny_vae(path, seed=seed, latent_channels=LATENT_CHANNELS)
    make_tiny_text_encoders(path, seed=seed)
    torch.manual_seed(seed)
    # Any: under mypy diffusers' top-level exports resolve to its dummy objects (no nn.Module methods)
    transformer: Any = FluxTransformer2DModel(**tiny_flux_transformer_config(guidance_embeds=guidance_embeds))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    transformer.save_pretrained(str(path / "transformer"))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    assets_main(argv, prog="python -m dfm_ext.recipes.flux.assets", doc=__doc__,
                makers={"model.path": ("flux", make_tiny_flux), "data.source": ("images", make_captioned_images)})  # fmt: skip


if __name__ == "__main__":
    main()
