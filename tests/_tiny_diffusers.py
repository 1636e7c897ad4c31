"""Tiny diffusers DiT-family models for tests, loaded the way real checkpoints are.

Each factory builds a tiny config of the real model class, ``save_pretrained`` s it into a
directory and loads it back with ``from_pretrained`` (so the code path is the one a real
checkpoint takes), in float32 and eval mode. ``*_inputs`` build matching conditioning inputs.
Weights are deterministic: the model is initialised under ``torch.manual_seed(seed)`` and then
every parameter is perturbed with a fixed generator so that zero-initialised diffusers layers
(adaLN-zero, output projections) do not make outputs trivially zero.

Sizes (latent channels ``C = 4`` everywhere):

============  ===================================  =========================================
family        model                                native sample
============  ===================================  =========================================
dit           ``DiTTransformer2DModel``            ``[B, 4, 8, 8]``, 10 classes, learned sigma
pixart        ``PixArtTransformer2DModel``         ``[B, 4, 8, 8]``, captions ``[B, 3, 12]``, learned sigma
sd3           ``SD3Transformer2DModel``            ``[B, 4, 8, 8]``, text ``[B, 3, 12]``, pooled ``[B, 10]``
flux          ``FluxTransformer2DModel``           latent ``[B, 4, 8, 8]`` packed 2x2 -> ``[B, 16, 16]``
cogvideox     ``CogVideoXTransformer3DModel``      ``[B, F=2, 4, 8, 8]``, text ``[B, 4, 12]``
============  ===================================  =========================================
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LATENT_CHANNELS = 4
TEXT_DIM = 12
POOLED_DIM = 10
TEXT_LEN = 3


def _perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add small deterministic noise to every parameter (diffusers zero-inits several layers)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _build(cls: type, path: Path, seed: int, **config) -> nn.Module:
    """``cls(**config)`` initialised under ``seed``, perturbed, saved and loaded back (float32, eval)."""
    torch.manual_seed(seed)
    model = _perturb(cls(**config), seed)
    model.save_pretrained(Path(path))
    return cls.from_pretrained(Path(path), torch_dtype=torch.float32).eval()


# What the DiT, PixArt and SD3 tiny models have in common: 2 blocks, hidden 16, patch 2, 8x8 latents.
_IMAGE_2D = dict(
    num_layers=2, num_attention_heads=2, attention_head_dim=8,
    in_channels=LATENT_CHANNELS, sample_size=8, patch_size=2,
)  # fmt: skip


def tiny_dit(path: Path, seed: int = 0, learn_sigma: bool = True) -> nn.Module:
    """``DiTTransformer2DModel``: 2 blocks, hidden 16, patch 2, 8x8 latents, 10 classes."""
    from diffusers import DiTTransformer2DModel

    out_channels = 2 * LATENT_CHANNELS if learn_sigma else LATENT_CHANNELS
    return _build(DiTTransformer2DModel, path, seed, **_IMAGE_2D, out_channels=out_channels, num_embeds_ada_norm=10)


def tiny_pixart(path: Path, seed: int = 0) -> nn.Module:
    """``PixArtTransformer2DModel``: 2 blocks, hidden 16, cross-attention to 12-dim captions."""
    from diffusers import PixArtTransformer2DModel

    return _build(
        PixArtTransformer2DModel,
        path,
        seed,
        **_IMAGE_2D,
        out_channels=2 * LATENT_CHANNELS,
        cross_attention_dim=16,
        caption_channels=TEXT_DIM,
        use_additional_conditions=False,
    )


def tiny_sd3(path: Path, seed: int = 0) -> nn.Module:
    """``SD3Transformer2DModel``: 2 joint blocks, hidden 16, cropped sincos positions (max 16)."""
    from diffusers import SD3Transformer2DModel

    return _build(
        SD3Transformer2DModel,
        path,
        seed,
        **_IMAGE_2D,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=16,
    )


def tiny_flux(path: Path, seed: int = 0, guidance_embeds: bool = True) -> nn.Module:
    """``FluxTransformer2DModel``: 1 double + 1 single block, hidden 16, 64 -> 16 packed channels."""
    from diffusers import FluxTransformer2DModel

    from dfm_ext.recipes.flux.assets import tiny_flux_transformer_config

    config = tiny_flux_transformer_config(
        text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, guidance_embeds=guidance_embeds, latent_channels=LATENT_CHANNELS
    )
    return _build(FluxTransformer2DModel, path, seed, **config)


# What the CogVideoX 1.0 and 1.5 tiny models have in common, then what each version changes.
_COGVIDEOX = dict(
    num_attention_heads=2, num_layers=1, time_embed_dim=16, patch_size=2,
    in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, sample_width=8, sample_height=8,
    text_embed_dim=TEXT_DIM, max_text_seq_length=4,
)  # fmt: skip
_COGVIDEOX_VERSIONS = {
    # sincos positions, temporal patch 1
    "1.0": dict(attention_head_dim=8, sample_frames=5, temporal_compression_ratio=4),
    # temporal patch 2 (a Linear patch embedding), rotary positions, head dim 16
    "1.5": dict(attention_head_dim=16, sample_frames=9, patch_size_t=2, use_rotary_positional_embeddings=True, patch_bias=False),
}


def _tiny_cogvideox(path: Path, seed: int, version: str) -> nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return _build(CogVideoXTransformer3DModel, path, seed, **_COGVIDEOX, **_COGVIDEOX_VERSIONS[version])


def tiny_cogvideox(path: Path, seed: int = 0) -> nn.Module:
    """``CogVideoXTransformer3DModel`` (1.0 layout: sincos positions, temporal patch 1)."""
    return _tiny_cogvideox(path, seed, "1.0")


def tiny_cogvideox15(path: Path, seed: int = 0) -> nn.Module:
    """CogVideoX 1.5 layout: temporal patch 2 (``Linear`` patch embedding), rotary positions, head dim 16."""
    return _tiny_cogvideox(path, seed, "1.5")


def cogvideox_rope(grid: tuple[int, int, int], head_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``image_rotary_emb`` for a CogVideoX token grid ``(T', H', W')`` (what its pipeline computes)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    return get_3d_rotary_pos_embed(
        head_dim, crops_coords=((0, 0), grid[1:]), grid_size=grid[1:], temporal_size=grid[0], device="cpu"
    )


FACTORIES = {
    "dit": tiny_dit,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
    "cogvideox": tiny_cogvideox,
}


def text_inputs(family: str, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Conditioning kwargs with the names the diffusers model's forward uses."""
    g = generator
    if family == "dit":
        return {"class_labels": torch.randint(0, 10, (batch,), generator=g)}
    if family == "pixart":
        return {"encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)}
    if family in ("sd3", "flux"):
        return {
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
            "pooled_projections": torch.randn(batch, POOLED_DIM, generator=g),
        }
    if family == "cogvideox":
        return {"encoder_hidden_states": torch.randn(batch, 4, TEXT_DIM, generator=g)}
    raise ValueError(f"unknown family {family!r}")
