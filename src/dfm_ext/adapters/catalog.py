"""Every transformer class of ``diffusers.models.transformers``: the adapter that wraps it, or why none does.

:data:`SHIPPED` maps a diffusers class name to the built-in adapter's registry name;
:data:`REFUSED` maps the others to the reason. ``tests/test_adapters_catalog.py`` enumerates the
installed diffusers' transformer classes and checks that each is in exactly one of the two, so a
diffusers upgrade that adds a family fails that test until the family is shipped or refused here.

The reasons fall in a few kinds: not an image or video denoiser (audio, music, proteins, a CLIP
prior, temporal layers of a UNet); audio and video denoised together; a time input DFM cannot
give (two times per sample, per-frame or per-token times); a sample that is more than the
generated latents (reference or history latents concatenated to or prepended before it, a cache
of earlier chunks). A family whose adapter is not written yet is refused as ``"not written yet: ..."``,
saying what its adapter needs beyond the shipped patterns (none in diffusers 0.42.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["REFUSED", "SHIPPED", "diffusers_support"]

#: diffusers class -> the built-in adapter's registry name
SHIPPED: Mapping[str, str] = MappingProxyType(
    {
        "DiTTransformer2DModel": "diffusers_dit",
        "PixArtTransformer2DModel": "pixart",
        "SD3Transformer2DModel": "sd3",
        "FluxTransformer2DModel": "flux",
        "CogVideoXTransformer3DModel": "cogvideox",
        "SanaTransformer2DModel": "sana",
        "AuraFlowTransformer2DModel": "auraflow",
        "WanTransformer3DModel": "wan",
        "Lumina2Transformer2DModel": "lumina2",
        "QwenImageTransformer2DModel": "qwenimage",
        "Flux2Transformer2DModel": "flux2",
        "LTXVideoTransformer3DModel": "ltx_video",
        "HunyuanDiT2DModel": "hunyuandit",
        "CogView4Transformer2DModel": "cogview4",
        "ChromaTransformer2DModel": "chroma",
        "OvisImageTransformer2DModel": "ovis_image",
        "LongCatImageTransformer2DModel": "longcat_image",
        "BriaTransformer2DModel": "bria",
        "SkyReelsV2Transformer3DModel": "skyreels_v2",
        "CogView3PlusTransformer2DModel": "cogview3plus",
        "SanaVideoTransformer3DModel": "sana_video",
        "WanVACETransformer3DModel": "wan_vace",
        "HunyuanVideoTransformer3DModel": "hunyuan_video",
        "MochiTransformer3DModel": "mochi",
        "HiDreamImageTransformer2DModel": "hidream_image",
        "LuminaNextDiT2DModel": "lumina_next",
        "AllegroTransformer3DModel": "allegro",
        "CosmosTransformer3DModel": "cosmos",
        "EasyAnimateTransformer3DModel": "easyanimate",
        "Krea2Transformer2DModel": "krea2",
        "ErnieImageTransformer2DModel": "ernie_image",
        "NucleusMoEImageTransformer2DModel": "nucleusmoe_image",
        "Ideogram4Transformer2DModel": "ideogram4",
        "HunyuanImageTransformer2DModel": "hunyuan_image",
        "LatteTransformer3DModel": "latte",
        "BriaFiboTransformer2DModel": "bria_fibo",
        "ZImageTransformer2DModel": "z_image",
        "Kandinsky5Transformer3DModel": "kandinsky5",
        "HunyuanVideo15Transformer3DModel": "hunyuan_video15",
        "PRXTransformer2DModel": "prx",
        "MotifVideoTransformer3DModel": "motif_video",
        "Flux3Transformer2DModel": "flux3",
        "BriaFibo2Transformer2DModel": "bria_fibo2",
    }
)

_NOT_VISUAL = "not an image or video denoiser"
_AUDIO_VIDEO = (
    "denoises audio and video jointly (two token streams with their own times); DFM's stages would decompose "
    "the video only, and the audio stream has no stage to belong to"
)
_CONTEXT = "the sample is not only the generated latents"

#: diffusers class -> why dfm_ext ships no adapter for it
REFUSED: Mapping[str, str] = MappingProxyType(
    {
        # Not image or video denoisers.
        "AceStepTransformer1DModel": f"{_NOT_VISUAL}: music (1-D audio latents), with a second time input timestep_r",
        "LongCatAudioDiTTransformer": f"{_NOT_VISUAL}: audio (1-D latents)",
        "MiniMaxMusic3Transformer1DModel": f"{_NOT_VISUAL}: music (1-D latents)",
        "MiniMaxMusic3RVQDepthDecoder": f"{_NOT_VISUAL}: a residual-VQ token decoder for music, not a diffusion model",
        "StableAudioDiTModel": f"{_NOT_VISUAL}: audio (1-D latents)",
        "StableAudio3DiTModel": f"{_NOT_VISUAL}: audio (1-D latents)",
        "T5FilmDecoder": f"{_NOT_VISUAL}: spectrogram diffusion for music (FiLM-conditioned T5 decoder)",
        "PriorTransformer": f"{_NOT_VISUAL}: the unCLIP prior, which denoises a CLIP image embedding, not pixels or latents",
        "RFD4ProteinaTransformer": f"{_NOT_VISUAL}: protein structure generation",
        "Transformer2DModel": (
            "the generic 2-D transformer: checkpoints of its patched DiT layouts load as the shipped classes "
            "(from_pretrained remaps norm_type 'ada_norm_zero' to DiTTransformer2DModel, adapter diffusers_dit, and "
            "'ada_norm_single' to PixArtTransformer2DModel, adapter pixart); its other layouts are a UNet's spatial "
            "transformer (continuous inputs) or VQ-Diffusion (discrete latent classes), not patched DiTs"
        ),
        "DreamLiteTransformer2DModel": (
            f"{_NOT_VISUAL} on its own: the spatial transformer inside DreamLite's UNet (models/unets/unet_dreamlite.py): "
            "GroupNorm and a 1x1 proj_in over the UNet's feature maps, the input added back as a residual; no patch "
            "embedding, time embedder or output head of a denoiser to widen (and no DreamLite pipeline in diffusers)"
        ),
        "TransformerTemporalModel": (
            f"{_NOT_VISUAL} on its own: the temporal attention layers inside a video UNet, with no patch embedding "
            "or output head to widen"
        ),
        # Audio and video together.
        "LTX2VideoTransformer3DModel": _AUDIO_VIDEO,
        "MiniMaxH3Transformer3DModel": _AUDIO_VIDEO,
        "Kandinsky6Transformer3DModel": _AUDIO_VIDEO,
        # Time inputs DFM cannot give.
        "AnyFlowTransformer3DModel": (
            "a flow-map model: it reads two times (timestep and r_timestep) and predicts the jump between them, "
            "not a velocity at one time per stage"
        ),
        "AnyFlowFARTransformer3DModel": (
            "a flow-map model (two times per sample) generating video chunk by chunk with a key-value cache"
        ),
        "HeliosTransformer3DModel": (
            f"{_CONTEXT}: autoregressive video that prepends short, mid and long histories of earlier latents"
        ),
        "HunyuanVideoFramepackTransformer3DModel": (
            f"{_CONTEXT}: FramePack next-section video, conditioned on clean history latents and an image embedding"
        ),
        "SanaWMTransformer3DModel": f"{_CONTEXT}: a camera-controlled world model generating chunk by chunk",
        "SanaWMLTX2RefinerTransformer3DModel": f"{_CONTEXT}: a chunked refiner of the Sana world model with a key-value cache",
        "WanAnimate2Transformer3DModel": f"{_CONTEXT}: lists of variable-size clips with condition latents and a key-value cache",
        "WanAnimateTransformer3DModel": f"{_CONTEXT}: character animation driven by pose latents and face pixels",
        "ChronoEditTransformer3DModel": (
            f"{_CONTEXT}: image editing, the reference image's latents are concatenated to the input channels "
            "(in_channels > out_channels)"
        ),
        "JoyImageEditTransformer3DModel": f"{_CONTEXT}: image editing, the reference image's tokens are part of the sequence",
        "JoyImageEditPlusTransformer3DModel": f"{_CONTEXT}: multi-image editing, reference tokens in the sequence",
        "OmniGenTransformer2DModel": (
            f"{_CONTEXT}: an interleaved sequence of text tokens and input-image latents processed by one LLM"
        ),
        "GlmImageTransformer2DModel": (
            f"{_CONTEXT}: conditioned on image tokens an autoregressive prior generated (prior_token_id) and a cache"
        ),
        "QwenImage21Transformer2DModel": f"{_CONTEXT}: image masks and a key-value cache of reference images",
        "ConsisIDTransformer3DModel": (
            f"{_CONTEXT}: identity-preserving image-to-video, the reference image's latents are concatenated to the "
            "input channels (ConsisIDPipeline takes in_channels // 2 as the latent channels) and face features "
            "condition the blocks"
        ),
        "Kandinsky6SRTransformer3DModel": (
            f"{_CONTEXT}: video super-resolution, the input channels are the noisy latent, the anchor latent (the "
            "low-resolution video) and its mask concatenated (2 C + 1, channels-last), with no text; DFM's coarse "
            "stages would regenerate what the anchor already gives"
        ),
        "Cosmos3OmniTransformer": f"{_CONTEXT}: an omni-modal model (text, image, video and action tokens in one sequence)",
    }
)


def diffusers_support(names: list[str]) -> dict[str, str]:
    """``"adapter <name>"`` or ``"refused: <reason>"`` for each diffusers class name (``"unknown"`` for a new one)."""
    out = {}
    for name in names:
        if name in SHIPPED:
            out[name] = f"adapter {SHIPPED[name]}"
        elif name in REFUSED:
            out[name] = f"refused: {REFUSED[name]}"
        else:
            out[name] = "unknown"
    return out
