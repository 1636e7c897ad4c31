"""Tiny random diffusers models of the families added by issue 17, loaded the way real checkpoints are.

Each factory builds a tiny config of the real class, ``save_pretrained`` s it and loads it back
with ``from_pretrained`` (float32, eval); every parameter is then perturbed with a fixed generator
so that zero-initialised layers (adaLN-zero, output projections) do not make outputs trivially zero.
``base_call`` runs the *unwrapped* model on a full sample in dfm_ext layout and converts its output
to the paper's convention (velocity ``x - noise``, ``t = 1`` data), from each family's pipeline:

===========  ===================================  =======================  ===============  ==============
family       class                                native sample            model's time     prediction
===========  ===================================  =======================  ===============  ==============
sana         ``SanaTransformer2DModel``           ``[B, 4, 8, 8]``, p 2    1000 sigma * ts  noise - x
auraflow     ``AuraFlowTransformer2DModel``       ``[B, 4, 8, 8]``, p 2    sigma            noise - x
wan          ``WanTransformer3DModel``            ``[B, 4, 2, 8, 8]``      1000 sigma       noise - x
lumina2      ``Lumina2Transformer2DModel``        ``[B, 4, 8, 8]``, p 2    t (1 = data)     x - noise
qwenimage    ``QwenImageTransformer2DModel``      ``[B, 4, 8, 8]``, 2x2    sigma            noise - x
flux2        ``Flux2Transformer2DModel``          ``[B, 4, 8, 8]``, 2x2    1000 sigma       noise - x
ltx_video    ``LTXVideoTransformer3DModel``       ``[B, 4, 2, 4, 4]``, p 1 1000 sigma       noise - x
hunyuandit   ``HunyuanDiT2DModel``                ``[B, 4, 8, 8]``, p 2    999 sigma (DDPM)  raw (re-param.)
cogview4     ``CogView4Transformer2DModel``       ``[B, 4, 8, 8]``, p 2    1000 s, shifted   noise - x
chroma       ``ChromaTransformer2DModel``         ``[B, 4, 8, 8]``, 2x2    sigma             noise - x
ovis_image   ``OvisImageTransformer2DModel``      ``[B, 4, 8, 8]``, 2x2    sigma             noise - x
longcat      ``LongCatImageTransformer2DModel``   ``[B, 4, 8, 8]``, 2x2    sigma             noise - x
bria         ``BriaTransformer2DModel``           ``[B, 4, 8, 8]``, 2x2    1000 sigma        noise - x
hunyuan_vid. ``HunyuanVideoTransformer3DModel``   ``[B, 4, 2, 8, 8]``      1000 sigma (x2)  noise - x
mochi        ``MochiTransformer3DModel``          ``[B, 4, 2, 8, 8]``      1000 t           x - noise
hidream      ``HiDreamImageTransformer2DModel``   ``[B, 4, 8, 8]``, p 2    1000 sigma       x - noise
lumina_next  ``LuminaNextDiT2DModel``             ``[B, 4, 8, 8]``, p 2    t (1 = data)     x - noise
allegro      ``AllegroTransformer3DModel``        ``[B, 4, 2, 8, 8]``      999 sigma (DDPM) v (asked)
cosmos       ``CosmosTransformer3DModel``         ``[B, 4, 2, 8, 8]``      sigma            noise - x
easyanimate  ``EasyAnimateTransformer3DModel``    ``[B, 4, 2, 8, 8]``      1000 sigma       noise - x
krea2        ``Krea2Transformer2DModel``          ``[B, 4, 8, 8]``, 2x2    sigma            noise - x
ernie_image  ``ErnieImageTransformer2DModel``     ``[B, 4, 8, 8]``, 2x2    1000 sigma       noise - x
nucleusmoe   ``NucleusMoEImageTransformer2DModel````[B, 4, 8, 8]``, 2x2    sigma            x - noise
ideogram4    ``Ideogram4Transformer2DModel``      ``[B, 4, 8, 8]``, 2x2    t (1 = data)     x - noise
hunyuan_img. ``HunyuanImageTransformer2DModel``   ``[B, 4, 8, 8]``, p 2    1000 sigma (x2)  noise - x
latte        ``LatteTransformer3DModel``          ``[B, 4, 2, 8, 8]``      999 sigma (DDPM) epsilon (asked)
bria_fibo    ``BriaFiboTransformer2DModel``       ``[B, 4, 8, 8]``, p 1    1000 sigma       noise - x
z_image      ``ZImageTransformer2DModel``         ``[B, 4, 8, 8]``, p 2    1000 t           x - noise
kandinsky5   ``Kandinsky5Transformer3DModel``     ``[B, 4, 2, 8, 8]``      1000 sigma       noise - x
hunyuan_v15  ``HunyuanVideo15Transformer3DModel`` ``[B, 4, 2, 8, 8]``      1000 sigma (x2)  noise - x
prx          ``PRXTransformer2DModel``            ``[B, 4, 8, 8]``, p 2    sigma            noise - x (asked)
motif_video  ``MotifVideoTransformer3DModel``     ``[B, 4, 2, 8, 8]``      1000 sigma       noise - x (asked)
flux3        ``Flux3Transformer2DModel``          ``[B, 4, 8, 8]``, p 1    1000 sigma       noise - x
bria_fibo2   ``BriaFibo2Transformer2DModel``      ``[B, 4, 8, 8]``, p 2    1000 sigma       noise - x
===========  ===================================  =======================  ===============  ==============

Timesteps are written ``a - a * t`` (``a = 1000 * scale``), the float expression the adapters use;
CogView4's unshifted ``s = sigma / (sigma + mu (1 - sigma))`` is written as the convention computes
it. Models that multiply ``sigma`` by 1000 themselves (AuraFlow, Qwen-Image, FLUX.2, Chroma) round
``(1 - t) 1000`` differently from ``1000 - 1000 t``; at dyadic times (``k / 1024``, what
:func:`exact_times` draws) both are exact, so stage 0 can be compared without that rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

C = 4  # latent channels
TEXT_DIM = 12
TEXT_LEN = 3
SANA_TIMESTEP_SCALE = 0.5  # not 1, so the test sees that the adapter reads config.timestep_scale


def _build(cls: type, path: Path, seed: int, **config) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(**config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.save_pretrained(Path(path))
    return cls.from_pretrained(Path(path), torch_dtype=torch.float32).eval()


def tiny_sana(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import SanaTransformer2DModel

    return _build(
        SanaTransformer2DModel, path, seed,
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TEXT_DIM, sample_size=8, patch_size=2, mlp_ratio=2.0,
        timestep_scale=SANA_TIMESTEP_SCALE,
    )


def tiny_auraflow(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import AuraFlowTransformer2DModel

    return _build(
        AuraFlowTransformer2DModel, path, seed,
        sample_size=8, patch_size=2, in_channels=C, out_channels=C, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pos_embed_max_size=64,  # an 8x8 position table: the native 4x4 grid and room for 2x
    )


def tiny_wan(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return _build(
        WanTransformer3DModel, path, seed,
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )


def tiny_lumina2(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import Lumina2Transformer2DModel

    return _build(
        Lumina2Transformer2DModel, path, seed,
        sample_size=8, patch_size=2, in_channels=C, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(16, 16, 16),
        cap_feat_dim=TEXT_DIM,
    )


def tiny_qwenimage(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return _build(
        QwenImageTransformer2DModel, path, seed,
        patch_size=2, in_channels=4 * C, out_channels=C, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
    )


def _pack(x: torch.Tensor) -> torch.Tensor:  # QwenImagePipeline._pack_latents (= FluxPipeline's)
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(y: torch.Tensor, h: int, w: int) -> torch.Tensor:  # QwenImagePipeline._unpack_latents, one frame
    b, _, c4 = y.shape
    return y.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def tiny_flux2(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    return _build(
        Flux2Transformer2DModel, path, seed,
        patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )


def tiny_ltx_video(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return _build(
        LTXVideoTransformer3DModel, path, seed,
        in_channels=C, out_channels=C, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, num_layers=1, caption_channels=TEXT_DIM,
    )


HUNYUAN_T5_LEN = 4


def tiny_hunyuandit(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import HunyuanDiT2DModel

    return _build(
        HunyuanDiT2DModel, path, seed,
        num_attention_heads=2, attention_head_dim=8, in_channels=C, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=TEXT_DIM, cross_attention_dim_t5=8,
        pooled_projection_dim=8, text_len=TEXT_LEN, text_len_t5=HUNYUAN_T5_LEN, use_style_cond_and_image_meta_size=True,
    )


def tiny_cogview4(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import CogView4Transformer2DModel

    return _build(
        CogView4Transformer2DModel, path, seed,
        patch_size=2, in_channels=C, out_channels=C, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=4, pos_embed_max_size=32, sample_size=8,
    )


def tiny_chroma(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import ChromaTransformer2DModel

    return _build(
        ChromaTransformer2DModel, path, seed,
        patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=2,
    )


_DUAL_STREAM = dict(
    patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
)  # fmt: skip


def tiny_ovis_image(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import OvisImageTransformer2DModel

    return _build(OvisImageTransformer2DModel, path, seed, **_DUAL_STREAM, out_channels=4 * C)


def tiny_longcat_image(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import LongCatImageTransformer2DModel

    return _build(LongCatImageTransformer2DModel, path, seed, **_DUAL_STREAM, pooled_projection_dim=TEXT_DIM)


def tiny_bria(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import BriaTransformer2DModel

    return _build(BriaTransformer2DModel, path, seed, **_DUAL_STREAM)


def _dual_stream_call(m, x, t, cond, *, timestep, txt_ids, img_ids) -> torch.Tensor:
    h, w = x.shape[-2:]
    out = m(_pack(x), timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, **cond).sample
    return -_unpack(out, h, w)


def _flux_ids(x: torch.Tensor, cond: dict) -> dict:
    from dfm_ext.adapters.flux import flux_image_ids

    return {"txt_ids": torch.zeros(cond["encoder_hidden_states"].shape[1], 3), "img_ids": flux_image_ids((x.shape[-2] // 2, x.shape[-1] // 2))}


def _ovis_image_call(m, x, t, cond):  # OvisImagePipeline: timestep / 1000 = sigma; the model multiplies by 1000
    return _dual_stream_call(m, x, t, cond, timestep=1.0 - t, **_flux_ids(x, cond))


def _bria_call(m, x, t, cond):  # BriaPipeline (flow matching): the scheduler's timestep 1000 sigma as is
    return _dual_stream_call(m, x, t, cond, timestep=1000.0 - 1000.0 * t, **_flux_ids(x, cond))


def _longcat_image_call(m, x, t, cond):  # LongCatImagePipeline.prepare_pos_ids: text (0, i, i), image (1, 512 + r, 512 + c)
    n, gh, gw = cond["encoder_hidden_states"].shape[1], x.shape[-2] // 2, x.shape[-1] // 2
    i = torch.arange(n).float()
    txt = torch.stack([torch.zeros(n), i, i], -1)
    img = torch.zeros(gh, gw, 3)
    img[..., 0], img[..., 1], img[..., 2] = 1, torch.arange(gh)[:, None] + 512.0, torch.arange(gw)[None, :] + 512.0
    return _dual_stream_call(m, x, t, cond, timestep=1.0 - t, txt_ids=txt, img_ids=img.reshape(-1, 3))


def tiny_skyreels_v2(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import SkyReelsV2Transformer3DModel

    return _build(
        SkyReelsV2Transformer3DModel, path, seed,
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
        inject_sample_info=True, num_frame_per_block=2,  # the fps embedding and a block-causal mask over 4 frames
    )


def _skyreels_v2_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    cond = {**cond, "fps": cond["fps"].tolist()}  # the pipeline's list of frame-rate classes
    return -m(x, timestep=1000.0 - 1000.0 * t, **cond).sample


def tiny_cogview3plus(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import CogView3PlusTransformer2DModel

    return _build(
        CogView3PlusTransformer2DModel, path, seed,
        patch_size=2, in_channels=C, out_channels=C, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=4, pos_embed_max_size=16, sample_size=8,
    )


def _cogview3plus_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # CogVideoX's DDIM scheduler: integer DDPM steps (999 = noise), v-prediction taken raw.
    return m(x, timestep=999.0 - 999.0 * t, **cond).sample


def tiny_sana_video(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import SanaVideoTransformer3DModel

    return _build(
        SanaVideoTransformer3DModel, path, seed,
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM,
        mlp_ratio=2.0, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32,
    )


def _sana_video_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return -m(x, timestep=1000.0 - 1000.0 * t, **cond).sample  # flow DPM-Solver: 1000 sigma, noise - x


VACE_CHANNELS = 8


def tiny_wan_vace(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import WanVACETransformer3DModel

    return _build(
        WanVACETransformer3DModel, path, seed,
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1],
        vace_in_channels=VACE_CHANNELS,
    )


def _wan_vace_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return -m(x, timestep=1000.0 - 1000.0 * t, **cond).sample


POOLED_DIM = 8


def tiny_hunyuan_video(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return _build(
        HunyuanVideoTransformer3DModel, path, seed,
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4),
    )


def _hunyuan_video_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # HunyuanVideoPipeline: FlowMatchEuler timestep 1000 sigma, guidance = scale * 1000; predicts noise - x.
    guidance = torch.full((x.shape[0],), 1000.0)  # the adapter's default guidance scale 1.0
    return -m(x, timestep=1000.0 - 1000.0 * t, guidance=guidance, **cond).sample


MOCHI_TEXT_DIM = 16  # Mochi's attention pool splits the text width into 8 heads


def tiny_mochi(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import MochiTransformer3DModel

    return _build(
        MochiTransformer3DModel, path, seed,
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16, in_channels=C,
        text_embed_dim=MOCHI_TEXT_DIM, time_embed_dim=32,
    )


def _mochi_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # MochiPipeline: FlowMatchEuler with invert_sigmas, timestep 1000 (1 - sigma) = 1000 t; predicts x - noise.
    return m(x, timestep=1000.0 * t, **cond).sample


HIDREAM_LLAMA_LAYERS = 2


def tiny_hidream_image(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    return _build(
        HiDreamImageTransformer2DModel, path, seed,
        patch_size=2, in_channels=C, out_channels=C, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, caption_channels=[TEXT_DIM, TEXT_DIM], text_emb_dim=POOLED_DIM, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 6, 6), max_resolution=(16, 16), llama_layers=[0, 1],
    )


def _hidream_image_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # HiDreamImagePipeline: timesteps 1000 sigma, Llama layers [N, B, L, D]; it negates the output: x - noise.
    cond = {**cond, "encoder_hidden_states_llama3": cond["encoder_hidden_states_llama3"].transpose(0, 1)}
    return m(x, timesteps=1000.0 - 1000.0 * t, **cond).sample


def tiny_lumina_next(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import LuminaNextDiT2DModel

    return _build(
        LuminaNextDiT2DModel, path, seed,
        sample_size=16,  # twice the native 8x8 sample: the pipeline's resolution scaling is 0.5, not 1
        patch_size=2, in_channels=C, hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
        learn_sigma=True, cross_attention_dim=TEXT_DIM,
    )


def _lumina_next_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # LuminaPipeline: timestep 1 - sigma = t; RoPE for 384 x 384 tokens, scaled by sqrt(width * height) /
    # default_image_size (linear below scaling_watershed = 1.0, NTK above); first C channels, negated
    # before the scheduler: x - noise.
    import math

    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    scale = math.sqrt(x.shape[-2] * x.shape[-1]) / m.config.sample_size
    factors = {"linear_factor": scale, "ntk_factor": 1.0} if t[0] < 1.0 else {"linear_factor": 1.0, "ntk_factor": scale}
    rope = get_2d_rotary_pos_embed_lumina(m.head_dim, 384, 384, **factors)
    return m(x, timestep=t, image_rotary_emb=rope, cross_attention_kwargs={}, **cond).sample[:, :C]


def tiny_allegro(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import AllegroTransformer3DModel

    return _build(
        AllegroTransformer3DModel, path, seed,
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=C, out_channels=C,
        num_layers=1, cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=2, caption_channels=TEXT_DIM,
    )


def _allegro_adapter(**kw):
    from dfm_ext.adapters.allegro import AllegroAdapter

    return AllegroAdapter(prediction="v_prediction", **kw)


def _allegro_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # AllegroPipeline: a DDPM-family scheduler (integer steps, 999 = noise); v-prediction taken raw.
    # RoPE as _prepare_rotary_positional_embeddings builds it for the latent's token grid.
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    cfg, (f, h, w) = m.config, (x.shape[2], x.shape[3] // 2, x.shape[4] // 2)
    freqs_t, freqs_h, freqs_w, gt, gh, gw = get_3d_rotary_pos_embed_allegro(
        cfg.attention_head_dim, ((0, 0), (h, w)), (h, w), f,
        (cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w),
    )  # fmt: skip
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return m(x, timestep=999.0 - 999.0 * t, image_rotary_emb=((freqs_t, freqs_h, freqs_w), tuple(pos)), **cond).sample


_COSMOS = dict(
    in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=12, num_layers=1, mlp_ratio=2.0,
    text_embed_dim=TEXT_DIM, adaln_lora_dim=8, max_size=(4, 32, 32), patch_size=(1, 2, 2),
)  # fmt: skip


def tiny_cosmos(path: Path, seed: int = 0, **config) -> nn.Module:
    # concat_padding_mask=False: the model's own forward resizes the mask with torchvision, which is not
    # installed here (the mask-dropping path is checked against this model in test_adapters_families.py)
    from diffusers import CosmosTransformer3DModel

    return _build(CosmosTransformer3DModel, path, seed, **{**_COSMOS, "concat_padding_mask": False, **config})


def _cosmos_adapter(**kw):
    from dfm_ext.adapters.cosmos import CosmosAdapter

    return CosmosAdapter(parameterization="flow", **kw)


def _cosmos_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # Cosmos2 pipelines: input c_in x_sigma = the flow interpolant, timestep = s = sigma / (sigma + 1) = 1 - t,
    # x = x_s - s F: F = noise - x.
    return -m(x, timestep=1.0 - t, **cond).sample


def tiny_easyanimate(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import EasyAnimateTransformer3DModel

    return _build(
        EasyAnimateTransformer3DModel, path, seed,
        num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C, patch_size=2, num_layers=1,
        mmdit_layers=1, time_embed_dim=16, text_embed_dim=TEXT_DIM, text_embed_dim_t5=POOLED_DIM, sample_width=8,
        sample_height=8,
    )


def _easyanimate_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return -m(x, 1000.0 - 1000.0 * t, **cond).sample  # FlowMatchEuler: 1000 sigma, noise - x


KREA2_TEXT_LAYERS = 2


def tiny_krea2(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import Krea2Transformer2DModel

    return _build(
        Krea2Transformer2DModel, path, seed,
        in_channels=4 * C, num_layers=1, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=TEXT_DIM, num_text_layers=KREA2_TEXT_LAYERS,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    )


def _krea2_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # Krea2Pipeline: _pack_latents (p = 2, channel-major), prepare_position_ids (text zeros, image (0, h, w)),
    # timestep = sigma (the embedder multiplies by 1000); FlowMatchEuler: noise - x.
    h, w = x.shape[-2:]
    ids = torch.cat([torch.zeros(cond["encoder_hidden_states"].shape[1], 3), _flux_ids(x, cond)["img_ids"]])
    return -_unpack(m(_pack(x), timestep=1.0 - t, position_ids=ids, **cond).sample, h, w)


def tiny_ernie_image(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import ErnieImageTransformer2DModel

    return _build(
        ErnieImageTransformer2DModel, path, seed,
        hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=32, in_channels=4 * C, out_channels=4 * C,
        patch_size=1, text_in_dim=TEXT_DIM, rope_axes_dim=(4, 6, 6),
    )


def _ernie_image_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # ErnieImagePipeline: latents diffused 2x2-folded (_patchify_latents, channel-major), FlowMatchEuler
    # timestep 1000 sigma; noise - x.
    b, c, h, w = x.shape
    folded = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    out = m(folded, timestep=1000.0 - 1000.0 * t, **cond).sample
    return -out.reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)


def tiny_nucleusmoe_image(path: Path, seed: int = 0) -> nn.Module:
    # The routed experts are torch.empty parameters the model never initialises: drawn here, then _build's steps.
    from diffusers import NucleusMoEImageTransformer2DModel

    torch.manual_seed(seed)
    model = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=4 * C, out_channels=C, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        num_key_value_heads=1, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), dense_moe_strategy="all_moe",
        num_experts=4, moe_intermediate_dim=16, capacity_factors=1.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.save_pretrained(Path(path))
    return NucleusMoEImageTransformer2DModel.from_pretrained(Path(path), torch_dtype=torch.float32).eval()


def _nucleusmoe_image_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # NucleusMoEImagePipeline: _pack_latents (p = 2, channel-major), timestep / 1000 = sigma (the sinusoid scales
    # it by 1000), img_shapes (1, h / p, w / p); the pipeline negates the output: x - noise.
    h, w = x.shape[-2:]
    out = m(_pack(x), timestep=1.0 - t, img_shapes=[(1, h // 2, w // 2)] * x.shape[0], **cond).sample
    return _unpack(out, h, w)


def tiny_ideogram4(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import Ideogram4Transformer2DModel

    return _build(
        Ideogram4Transformer2DModel, path, seed,
        in_channels=4 * C, num_layers=1, attention_head_dim=16, num_attention_heads=2, intermediate_size=32,
        adaln_dim=16, llm_features_dim=TEXT_DIM, mrope_section=(4, 2, 2),
    )  # fmt: skip


def _ideogram4_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # Ideogram4Pipeline: [left-padding][text][image] from _prepare_ids, the latent folded 2x2 in (p, q, c) order
    # (as its decoder unpatches), zero latents over the text and zero features over the image; model time
    # t = 1 - sigma; it steps Euler on -v: v = x - noise.
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    b, c, h, w = x.shape
    gh, gw = h // 2, w // 2
    text, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"]
    n_text, n_img = text.shape[1], gh * gw
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(mask.sum(1).tolist(), gh, gw, n_text, x.device)
    tokens = x.view(b, c, gh, 2, gw, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, 4 * c)
    out = m(
        hidden_states=torch.cat([torch.zeros(b, n_text, 4 * c), tokens], dim=1), timestep=t,
        encoder_hidden_states=torch.cat([text, torch.zeros(b, n_img, text.shape[-1])], dim=1),
        position_ids=position_ids, segment_ids=segment_ids, indicator=indicator,
    ).sample[:, n_text:]  # fmt: skip
    return out.view(b, gh, gw, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def tiny_hunyuan_image(path: Path, seed: int = 0, **config) -> nn.Module:
    # Without the ByT5 stream (its projection's hidden width is fixed at 2048: 4M parameters), which
    # test_adapters_families.py checks once with text_embed_2_dim.
    from diffusers import HunyuanImageTransformer2DModel

    return _build(
        HunyuanImageTransformer2DModel, path, seed,
        **{"in_channels": C, "out_channels": C, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1,
           "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": (2, 2),
           "text_embed_dim": TEXT_DIM, "rope_axes_dim": (4, 4), "guidance_embeds": True, **config},
    )  # fmt: skip


def _hunyuan_image_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # HunyuanImagePipeline: FlowMatchEuler timestep 1000 sigma, guidance = scale * 1000; predicts noise - x.
    guidance = torch.full((x.shape[0],), 1000.0)  # the adapter's default guidance scale 1.0
    return -m(x, timestep=1000.0 - 1000.0 * t, guidance=guidance, **cond).sample


def tiny_latte(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import LatteTransformer3DModel

    return _build(
        LatteTransformer3DModel, path, seed,
        num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", caption_channels=TEXT_DIM, video_length=2,
    )  # fmt: skip


def _latte_adapter(**kw):
    from dfm_ext.adapters.latte import LatteAdapter

    return LatteAdapter(prediction="epsilon", **kw)


def _latte_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # LattePipeline: a DDPM-family scheduler (integer steps, 999 = noise); epsilon (asked) taken as -epsilon,
    # the learned-sigma half dropped.
    return -m(x, timestep=999.0 - 999.0 * t, **cond).sample[:, :C]


FIBO_TEXT_LAYER_DIM = 8


def tiny_bria_fibo(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import BriaFiboTransformer2DModel

    return _build(
        BriaFiboTransformer2DModel, path, seed,
        patch_size=1, in_channels=C, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), text_encoder_dim=FIBO_TEXT_LAYER_DIM,
    )  # fmt: skip


def _bria_fibo_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # BriaFiboPipeline (do_patching=False): one token per latent pixel, ids as Flux's, FlowMatchEuler timestep
    # 1000 sigma, the joint mask [text, image] passed only when a token is dropped; noise - x.
    from dfm_ext.adapters.flux import flux_image_ids

    b, c, h, w = x.shape
    text, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"].bool()
    joint = torch.cat([mask, torch.ones(b, h * w, dtype=torch.bool)], dim=1)
    out = m(
        x.permute(0, 2, 3, 1).reshape(b, h * w, c), encoder_hidden_states=text,
        text_encoder_layers=list(cond["text_encoder_layers"].unbind(1)), timestep=1000.0 - 1000.0 * t,
        img_ids=flux_image_ids((h, w)), txt_ids=torch.zeros(text.shape[1], 3),
        joint_attention_kwargs={"attention_mask": joint[:, None, None, :]},
    ).sample  # fmt: skip
    return -out.view(b, h, w, c).permute(0, 3, 1, 2)


def tiny_z_image(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import ZImageTransformer2DModel

    return _build(
        ZImageTransformer2DModel, path, seed,
        in_channels=C, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM,
        axes_dims=(4, 6, 6), axes_lens=(96, 16, 16),
    )  # fmt: skip


def _z_image_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # ZImagePipeline: per-sample lists (latents [C, 1, H, W], the kept caption tokens), model time
    # (1000 - timestep) / 1000 = t (the model multiplies by t_scale); it steps Euler on -out: out = x - noise.
    text, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"].bool()
    out = m(list(x.unsqueeze(2).unbind(0)), t, [row[keep] for row, keep in zip(text, mask)]).sample
    return torch.stack(out).squeeze(2)


#: the RoPE scale Kandinsky5T2VPipeline uses between 480 and 854 px (not 1, so the test sees it is passed on)
KANDINSKY5_SCALE = (1.0, 2.0, 2.0)


def tiny_kandinsky5(path: Path, seed: int = 0, **config) -> nn.Module:
    from diffusers import Kandinsky5Transformer3DModel

    return _build(
        Kandinsky5Transformer3DModel, path, seed,
        **{"in_visual_dim": C, "out_visual_dim": C, "in_text_dim": TEXT_DIM, "in_text_dim2": POOLED_DIM, "time_dim": 16,
           "patch_size": (1, 2, 2), "model_dim": 32, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 1,
           "axes_dims": (4, 6, 6), **config},
    )  # fmt: skip


def _kandinsky5_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # Kandinsky5T2VPipeline: channels-last latents (with zero condition latents and mask when visual_cond),
    # the FlowMatchEuler timestep 1000 sigma, RoPE positions arange per axis; it steps on noise - x.
    b, c, f, h, w = x.shape
    latents = x.permute(0, 2, 3, 4, 1)
    if m.visual_cond:
        latents = torch.cat([latents, torch.zeros_like(latents), torch.zeros(b, f, h, w, 1)], dim=-1)
    text = cond["encoder_hidden_states"]
    out = m(latents, text, 1000.0 - 1000.0 * t, cond["pooled_projections"], [torch.arange(n) for n in (f, h // 2, w // 2)],
            torch.arange(text.shape[1]), scale_factor=cond["scale_factor"]).sample  # fmt: skip
    return -out.permute(0, 4, 1, 2, 3)


HV15_GLYPH_DIM = 8  # ByT5 width
HV15_IMAGE_DIM = 8  # SigLIP width


def tiny_hunyuan_video15(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import HunyuanVideo15Transformer3DModel

    return _build(
        HunyuanVideo15Transformer3DModel, path, seed,
        in_channels=2 * C + 1, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, text_embed_dim=TEXT_DIM, text_embed_2_dim=HV15_GLYPH_DIM,
        image_embed_dim=HV15_IMAGE_DIM, rope_axes_dim=(2, 2, 4),
    )  # fmt: skip


def _hunyuan_video15_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # HunyuanVideo15Pipeline (text-to-video): [latents, zero condition latents, zero mask], zero SigLIP embeddings
    # (two tokens here, 729 in the pipeline), FlowMatchEuler's 1000 sigma, the ByT5 block all masked without glyph
    # text; it steps on noise - x.
    b, c, f, h, w = x.shape
    text = cond["encoder_hidden_states"]
    glyph = cond.get("encoder_hidden_states_2", torch.zeros(b, 2, HV15_GLYPH_DIM))
    glyph_mask = cond.get("encoder_attention_mask_2", torch.zeros(b, glyph.shape[1], dtype=torch.long))
    out = m(
        torch.cat([x, torch.zeros_like(x), torch.zeros(b, 1, f, h, w)], dim=1), timestep=1000.0 - 1000.0 * t,
        encoder_hidden_states=text, encoder_attention_mask=cond["encoder_attention_mask"], encoder_hidden_states_2=glyph,
        encoder_attention_mask_2=glyph_mask, image_embeds=torch.zeros(b, 2, HV15_IMAGE_DIM),
    ).sample  # fmt: skip
    return -out


def tiny_prx(path: Path, seed: int = 0, **config) -> nn.Module:
    from diffusers import PRXTransformer2DModel

    return _build(
        PRXTransformer2DModel, path, seed,
        **{"in_channels": C, "patch_size": 2, "context_in_dim": TEXT_DIM, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2,
           "depth": 1, "axes_dim": [8, 8], **config},
    )  # fmt: skip


def _prx_adapter(**kw):
    from dfm_ext.adapters.prx import PRXAdapter

    return PRXAdapter(prediction="velocity", **kw)


def _prx_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # PRXPipeline: t_cont = timestep / 1000 = sigma (the model multiplies by time_factor); FlowMatchEuler steps
    # on the output as is: noise - x.
    return -m(x, timestep=1.0 - t, encoder_hidden_states=cond["encoder_hidden_states"], attention_mask=cond["attention_mask"]).sample


def tiny_motif_video(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import MotifVideoTransformer3DModel

    return _build(
        MotifVideoTransformer3DModel, path, seed,
        in_channels=2 * C + 1, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=2, num_decoder_layers=1, mlp_ratio=2.0, patch_size=2, text_embed_dim=TEXT_DIM,
        rope_axes_dim=(2, 2, 4), enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True,
    )  # fmt: skip


def _motif_video_adapter(**kw):
    from dfm_ext.adapters.motif_video import MotifVideoAdapter

    return MotifVideoAdapter(prediction="flow_prediction", **kw)


def _motif_video_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # MotifVideoPipeline (text-to-video): [latents, zero condition latents, zero mask], a flow-matching scheduler's
    # 1000 sigma, its output stepped on as is: noise - x (the prediction the adapter asks for).
    b, c, f, h, w = x.shape
    out = m(torch.cat([x, torch.zeros_like(x), torch.zeros(b, 1, f, h, w)], dim=1), timestep=1000.0 - 1000.0 * t,
            encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"]).sample  # fmt: skip
    return -out


def tiny_flux3(path: Path, seed: int = 0, **config) -> nn.Module:
    from diffusers import Flux3Transformer2DModel

    return _build(
        Flux3Transformer2DModel, path, seed,
        **{"in_channels": C, "cond_in_channels": C, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
           "num_attention_heads": 2, "joint_attention_dim": TEXT_DIM, "timestep_channels": 32, "mlp_ratio": 2.0,
           "axes_dims_rope": (4, 4, 4, 4), **config},
    )  # fmt: skip


def _flux3_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # The FLUX.3 modular pipeline: the packed latent's pixels as tokens, image ids from _prepare_image_ids at its
    # image_rope_scale 0.5, text ids from _prepare_text_ids; timestep = sigma (the model multiplies by 1000);
    # FlowMatchEuler steps on noise - x.
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids

    b, c, h, w = x.shape
    text = cond["encoder_hidden_states"]
    out = m(x.flatten(2).transpose(1, 2), encoder_hidden_states=text, timestep=1.0 - t, img_ids=_prepare_image_ids(h, w, 0.5),
            txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(text)).sample  # fmt: skip
    return -out.transpose(1, 2).reshape(b, c, h, w)


FIBO2_BUNDLES = 2  # the Perceiver's text bundle and one injection block's


def tiny_bria_fibo2(path: Path, seed: int = 0) -> nn.Module:
    from diffusers import BriaFibo2Transformer2DModel

    return _build(
        BriaFibo2Transformer2DModel, path, seed,
        in_channels=C, patch_size=2, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, cap_feat_dim=TEXT_DIM,
        injection_layer_ids=(0,), perceiver_num_layers=1, min_num_gist_tokens=2, max_num_gist_tokens=4, gist_step=1,
        gist_min_text_len=2, gist_max_text_len=4, axes_dims=(4, 6, 6), axes_lens=(16, 16, 16),
    )  # fmt: skip


def _bria_fibo2_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # BriaFibo2Pipeline: timestep = scheduler timestep / 1000 = sigma (the model multiplies by t_scale);
    # FlowMatchEuler steps on noise - x.
    return -m(x, timestep=1.0 - t, encoder_hidden_states=cond["encoder_hidden_states"],
              encoder_attention_mask=cond.get("encoder_attention_mask")).sample  # fmt: skip


def exact_times(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform times rounded to ``k / 1024``: ``1 - t`` and ``1000 t`` are exact in float32 there."""
    return torch.round(torch.rand(shape, generator=generator) * 1024) / 1024


def cogview4_mu(grid: tuple[int, int]) -> float:
    """CogView4Pipeline's ``calculate_shift`` for ``grid[0] * grid[1]`` image tokens (scheduler defaults)."""
    return (grid[0] * grid[1] / 256) ** 0.5 * 0.75 + 0.25


def _cogview4_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # CogView4Pipeline: the model reads the unshifted 1000 s; its noise level is the shifted sigma.
    mu = cogview4_mu((x.shape[-2] // 2, x.shape[-1] // 2))
    return -m(x, timestep=1000.0 * (1 - t) / ((1 - t) + mu * t), **cond).sample


def _chroma_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # ChromaPipeline: FluxPipeline's packing and ids; timestep = sigma (the model multiplies by 1000).
    from dfm_ext.adapters.flux import flux_image_ids

    h, w = x.shape[-2:]
    txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
    out = m(_pack(x), timestep=1.0 - t, img_ids=flux_image_ids((h // 2, w // 2)), txt_ids=txt_ids, **cond).sample
    return -_unpack(out, h, w)


def _sana_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    a = 1000.0 * SANA_TIMESTEP_SCALE
    return -m(x, timestep=a - a * t, **cond).sample


def _auraflow_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return -m(x, timestep=1.0 - t, **cond).sample


def _wan_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return -m(x, timestep=1000.0 - 1000.0 * t, **cond).sample


def _lumina2_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # Lumina2Pipeline: timestep 1 - sigma (= t, 1 = data), output negated before the scheduler: x - noise.
    mask = torch.ones(x.shape[0], cond["encoder_hidden_states"].shape[1], dtype=torch.long)
    return m(x, timestep=t, encoder_attention_mask=mask, **cond).sample


def _qwenimage_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # QwenImagePipeline: timestep / 1000 = sigma, the model scales it by 1000; predicts noise - x.
    h, w = x.shape[-2:]
    out = m(_pack(x), timestep=1.0 - t, img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0], **cond).sample
    return -_unpack(out, h, w)


def _flux2_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # Flux2Pipeline: _patchify_latents (2x2, channel-major) then _pack_latents (flatten the grid);
    # ids (t, h, w, l); the model multiplies sigma and guidance by 1000; predicts noise - x.
    b, c, h, w = x.shape
    folded = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    tokens = folded.reshape(b, c * 4, -1).permute(0, 2, 1)
    one = torch.arange(1)
    img_ids = torch.cartesian_prod(one, torch.arange(h // 2), torch.arange(w // 2), one)
    txt_ids = torch.cartesian_prod(one, one, one, torch.arange(cond["encoder_hidden_states"].shape[1]))
    out = m(tokens, timestep=1.0 - t, guidance=torch.ones(b), img_ids=img_ids, txt_ids=txt_ids, **cond).sample
    out = out.permute(0, 2, 1).reshape(b, c * 4, h // 2, w // 2)  # _unpack_latents_with_ids on a full grid
    out = out.reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)  # _unpatchify_latents
    return -out


#: what LTXPipeline derives from LTX-Video's VAE at 25 fps
LTX_ROPE_SCALE = (8 / 25, 32.0, 32.0)


def _ltx_video_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # LTXPipeline: patch 1 packing [B, C, F, H, W] -> [B, F*H*W, C]; timestep = 1000 sigma; predicts noise - x.
    b, c, f, h, w = x.shape
    cond = dict(cond)
    scale = cond.pop("rope_interpolation_scale")
    tokens = x.flatten(2).transpose(1, 2)
    out = m(tokens, timestep=1000.0 - 1000.0 * t, encoder_attention_mask=None, num_frames=f, height=h, width=w,
            rope_interpolation_scale=scale, **cond).sample  # fmt: skip
    return -out.transpose(1, 2).reshape(b, c, f, h, w)


def _hunyuandit_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # HunyuanDiTPipeline: DDPM integer timesteps (999 = noise), learned sigma: keep the first C channels.
    from dfm_ext.adapters.hunyuandit import hunyuan_rope

    rope = hunyuan_rope(m, (x.shape[-2] // 2, x.shape[-1] // 2))
    return m(x, timestep=999.0 - 999.0 * t, image_rotary_emb=rope, **cond).sample[:, :C]


#: family -> (factory, base_call, native sample shape, adapter name)
FAMILIES = {
    "sana": (tiny_sana, _sana_call, (C, 8, 8), "sana"),
    "auraflow": (tiny_auraflow, _auraflow_call, (C, 8, 8), "auraflow"),
    "wan": (tiny_wan, _wan_call, (C, 2, 8, 8), "wan"),
    "lumina2": (tiny_lumina2, _lumina2_call, (C, 8, 8), "lumina2"),
    "qwenimage": (tiny_qwenimage, _qwenimage_call, (C, 8, 8), "qwenimage"),
    "flux2": (tiny_flux2, _flux2_call, (C, 8, 8), "flux2"),
    "ltx_video": (tiny_ltx_video, _ltx_video_call, (C, 2, 4, 4), "ltx_video"),
    "hunyuandit": (tiny_hunyuandit, _hunyuandit_call, (C, 8, 8), "hunyuandit"),
    "cogview4": (tiny_cogview4, _cogview4_call, (C, 8, 8), "cogview4"),
    "chroma": (tiny_chroma, _chroma_call, (C, 8, 8), "chroma"),
    "ovis_image": (tiny_ovis_image, _ovis_image_call, (C, 8, 8), "ovis_image"),
    "longcat_image": (tiny_longcat_image, _longcat_image_call, (C, 8, 8), "longcat_image"),
    "bria": (tiny_bria, _bria_call, (C, 8, 8), "bria"),
    "skyreels_v2": (tiny_skyreels_v2, _skyreels_v2_call, (C, 4, 8, 8), "skyreels_v2"),
    "cogview3plus": (tiny_cogview3plus, _cogview3plus_call, (C, 8, 8), "cogview3plus"),
    "sana_video": (tiny_sana_video, _sana_video_call, (C, 2, 8, 8), "sana_video"),
    "wan_vace": (tiny_wan_vace, _wan_vace_call, (C, 2, 8, 8), "wan_vace"),
    "hunyuan_video": (tiny_hunyuan_video, _hunyuan_video_call, (C, 2, 8, 8), "hunyuan_video"),
    "mochi": (tiny_mochi, _mochi_call, (C, 2, 8, 8), "mochi"),
    "hidream_image": (tiny_hidream_image, _hidream_image_call, (C, 8, 8), "hidream_image"),
    "lumina_next": (tiny_lumina_next, _lumina_next_call, (C, 8, 8), "lumina_next"),
    "allegro": (tiny_allegro, _allegro_call, (C, 2, 8, 8), "allegro"),
    "cosmos": (tiny_cosmos, _cosmos_call, (C, 2, 8, 8), "cosmos"),
    "easyanimate": (tiny_easyanimate, _easyanimate_call, (C, 2, 8, 8), "easyanimate"),
    "krea2": (tiny_krea2, _krea2_call, (C, 8, 8), "krea2"),
    "ernie_image": (tiny_ernie_image, _ernie_image_call, (C, 8, 8), "ernie_image"),
    "nucleusmoe_image": (tiny_nucleusmoe_image, _nucleusmoe_image_call, (C, 8, 8), "nucleusmoe_image"),
    "ideogram4": (tiny_ideogram4, _ideogram4_call, (C, 8, 8), "ideogram4"),
    "hunyuan_image": (tiny_hunyuan_image, _hunyuan_image_call, (C, 8, 8), "hunyuan_image"),
    "latte": (tiny_latte, _latte_call, (C, 2, 8, 8), "latte"),
    "bria_fibo": (tiny_bria_fibo, _bria_fibo_call, (C, 8, 8), "bria_fibo"),
    "z_image": (tiny_z_image, _z_image_call, (C, 8, 8), "z_image"),
    "kandinsky5": (tiny_kandinsky5, _kandinsky5_call, (C, 2, 8, 8), "kandinsky5"),
    "hunyuan_video15": (tiny_hunyuan_video15, _hunyuan_video15_call, (C, 2, 8, 8), "hunyuan_video15"),
    "prx": (tiny_prx, _prx_call, (C, 8, 8), "prx"),
    "motif_video": (tiny_motif_video, _motif_video_call, (C, 2, 8, 8), "motif_video"),
    "flux3": (tiny_flux3, _flux3_call, (C, 8, 8), "flux3"),
    "bria_fibo2": (tiny_bria_fibo2, _bria_fibo2_call, (C, 8, 8), "bria_fibo2"),
}

#: families whose own patch is 1 (stage 0 at the native size with patch 1)
PATCH_ONE = {"ltx_video", "bria_fibo", "flux3"}

#: family -> the adapter to wrap it with (keywords: time_convention), for adapters that ask for a choice
ADAPTERS = {"allegro": _allegro_adapter, "cosmos": _cosmos_adapter, "latte": _latte_adapter, "prx": _prx_adapter,
            "motif_video": _motif_video_adapter}  # fmt: skip

#: family -> the layer groups its adapter leaves out, and why
GROUPS_LEFT_OUT = {"latte": {"attn", "mlp"}}  # its blocks run on frame- and token-major batches


#: family -> (the text keyword, its trailing shape) where it is not ("encoder_hidden_states", TEXT_DIM)
TEXT_KEYS: dict[str, tuple[str, int | tuple[int, ...]]] = {
    "krea2": ("encoder_hidden_states", (KREA2_TEXT_LAYERS, TEXT_DIM)),  # tapped text-encoder layers per token
    "ernie_image": ("text_bth", TEXT_DIM),
    "mochi": ("encoder_hidden_states", MOCHI_TEXT_DIM),
    "hidream_image": ("encoder_hidden_states_t5", TEXT_DIM),
    "bria_fibo2": ("encoder_hidden_states", (FIBO2_BUNDLES, TEXT_LEN, TEXT_DIM)),  # bundles before tokens
}


#: family -> the expected shape in its text keyword's error, where the text is not [B, L, ...] (regex)
TEXT_SHAPE_IN_ERROR = {"bria_fibo2": rf"\[2, {FIBO2_BUNDLES}, \*, {TEXT_DIM}\]"}


def text_key(family: str) -> tuple[str, int | tuple[int, ...]]:
    """The family's main text keyword and its width, or trailing shape (what a wrong width is tested on)."""
    return TEXT_KEYS.get(family, ("encoder_hidden_states", TEXT_DIM))


def text_inputs(family: str, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The conditioning the family's forward takes, random: text embeddings ``[B, 3, 12]`` (and LTX's RoPE scale)."""
    key, width = text_key(family)
    trailing = width if isinstance(width, tuple) else (width,)
    out: dict = {key: torch.randn(batch, TEXT_LEN, *trailing, generator=generator)}
    if family == "ltx_video":
        out["rope_interpolation_scale"] = LTX_ROPE_SCALE
    if family == "wan_vace":  # control latents at the native sample's (stage 0's) resolution
        out["control_hidden_states"] = torch.randn(batch, VACE_CHANNELS, 2, 8, 8, generator=generator)
    if family == "skyreels_v2":
        out["fps"] = torch.ones(batch, dtype=torch.long)  # the pipeline's class for 24 fps (0 is 16 fps)
    if family in ("cogview4", "cogview3plus"):  # pixel sizes, as CogView4Pipeline passes them (8x VAE)
        size = torch.tensor([[64.0, 64.0]] * batch)
        out.update(original_size=size, target_size=size.clone(), crop_coords=torch.zeros(batch, 2))
    if family == "hunyuan_video":  # Llama tokens with the last one padded in the second sample
        out["pooled_projections"] = torch.randn(batch, POOLED_DIM, generator=generator)
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_attention_mask"][1:, -1] = 0
    if family == "mochi":
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
        out["encoder_attention_mask"][1:, -1] = False
    if family == "hidream_image":  # Llama layers batch first
        out["encoder_hidden_states_llama3"] = torch.randn(batch, HIDREAM_LLAMA_LAYERS, TEXT_LEN, TEXT_DIM, generator=generator)
        out["pooled_embeds"] = torch.randn(batch, POOLED_DIM, generator=generator)
    if family == "lumina_next":  # the last caption token padded in the second sample
        out["encoder_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_mask"][1:, -1] = 0
    if family == "allegro":
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_attention_mask"][1:, -1] = 0
    if family == "cosmos":  # the video pipelines' frame rate (RoPE's temporal scale)
        out["attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
        out["attention_mask"][1:, -1] = False
        out["fps"] = 16
    if family == "easyanimate":  # the T5 stream of models built with text_embed_dim_t5
        out["encoder_hidden_states_t5"] = torch.randn(batch, 2, POOLED_DIM, generator=generator)
    if family == "krea2":  # the last token padded in the second sample
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
        out["encoder_attention_mask"][1:, -1] = False
    if family == "ernie_image":  # the pipeline's _pad_text: the second sample's last token is padding
        out["text_bth"][1:, -1] = 0.0
        out["text_lens"] = torch.tensor([TEXT_LEN] + [TEXT_LEN - 1] * (batch - 1))
    if family == "nucleusmoe_image":  # the last token padded in the second sample
        out["encoder_hidden_states_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_hidden_states_mask"][1:, -1] = 0
    if family == "ideogram4":  # the pipeline left-pads: the second sample's first token is padding (zero features)
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
        out["encoder_attention_mask"][1:, 0] = False
        out["encoder_hidden_states"][1:, 0] = 0.0
    if family == "hunyuan_image":  # the last token padded in the second sample
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_attention_mask"][1:, -1] = 0
    if family == "bria_fibo":  # one text-encoder layer per block (2), batch first; the last token padded in the second sample
        out["text_encoder_layers"] = torch.randn(batch, 2, TEXT_LEN, FIBO_TEXT_LAYER_DIM, generator=generator)
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_attention_mask"][1:, -1] = 0
    if family == "z_image":  # the pipeline's kept tokens: the second sample's last token dropped
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
        out["encoder_attention_mask"][1:, -1] = False
    if family == "kandinsky5":  # CLIP pooled, and the pipeline's RoPE scale (required)
        out["pooled_projections"] = torch.randn(batch, POOLED_DIM, generator=generator)
        out["scale_factor"] = KANDINSKY5_SCALE
    if family == "hunyuan_video15":  # the last Qwen token padded in the second sample
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_attention_mask"][1:, -1] = 0
    if family == "prx":  # the pipeline's cross_attn_mask: the last token padded in the second sample
        out["attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
        out["attention_mask"][1:, -1] = False
    if family == "motif_video":  # the last token padded in the second sample
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["encoder_attention_mask"][1:, -1] = 0
    if family == "bria_fibo2":  # [B, bundles, L, D]; the last token padded in the second sample (2 vs 3 gist tokens)
        out["encoder_hidden_states"] = torch.randn(batch, FIBO2_BUNDLES, TEXT_LEN, TEXT_DIM, generator=generator)
        out["encoder_attention_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
        out["encoder_attention_mask"][1:, -1] = False
    if family == "hunyuandit":
        out["encoder_hidden_states_t5"] = torch.randn(batch, HUNYUAN_T5_LEN, 8, generator=generator)
        out["text_embedding_mask"] = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        out["text_embedding_mask_t5"] = torch.ones(batch, HUNYUAN_T5_LEN, dtype=torch.long)
        out["image_meta_size"] = torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * batch)
        out["style"] = torch.zeros(batch, dtype=torch.long)
    return out
