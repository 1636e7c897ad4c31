"""Built-in DiT adapters for :func:`dfm_ext.wrap_dit`, one module per family.

Each module exposes a module-level ``ADAPTER`` (an instance following
:class:`dfm_ext.wrapping.adapter.DiTAdapter`). They are listed here lazily: a module is imported only
when ``adapter="auto"`` (or its name) needs it, and the diffusers ones only for models whose
class comes from diffusers, so ``import dfm_ext`` never imports diffusers.

=================  ==========================================================================
name               family
=================  ==========================================================================
``dit``            facebookresearch DiT / SiT / LightningDiT style, and :class:`dfm_ext.DiT`
``diffusers_dit``  diffusers ``DiTTransformer2DModel``
``pixart``         diffusers ``PixArtTransformer2DModel``
``sd3``            diffusers ``SD3Transformer2DModel``
``flux``           diffusers ``FluxTransformer2DModel``
``cogvideox``      diffusers ``CogVideoXTransformer3DModel``
``video_dit``      :class:`dfm_ext.models.video_dit.VideoDiT` and DiT-named video models (per-frame ``Conv3d``)
``sana``           diffusers ``SanaTransformer2DModel`` (declarative, :mod:`dfm_ext.adapters.spec`)
``auraflow``       diffusers ``AuraFlowTransformer2DModel`` (declarative)
``wan``            diffusers ``WanTransformer3DModel`` (declarative)
``lumina2``        diffusers ``Lumina2Transformer2DModel`` (declarative)
``qwenimage``      diffusers ``QwenImageTransformer2DModel`` (declarative)
``flux2``          diffusers ``Flux2Transformer2DModel`` (declarative)
``ltx_video``      diffusers ``LTXVideoTransformer3DModel`` (declarative)
``hunyuandit``     diffusers ``HunyuanDiT2DModel`` (declarative)
``cogview4``       diffusers ``CogView4Transformer2DModel`` (declarative; resolution-shifted time)
``chroma``         diffusers ``ChromaTransformer2DModel`` (declarative; shared modulation approximator)
``ovis_image``     diffusers ``OvisImageTransformer2DModel`` (FLUX.1-style, :mod:`~dfm_ext.adapters.dual_stream`)
``longcat_image``  diffusers ``LongCatImageTransformer2DModel`` (FLUX.1-style)
``bria``           diffusers ``BriaTransformer2DModel`` (FLUX.1-style)
``skyreels_v2``    diffusers ``SkyReelsV2Transformer3DModel`` (Wan's layout, fps and block-causal mask)
``cogview3plus``   diffusers ``CogView3PlusTransformer2DModel`` (declarative)
``sana_video``     diffusers ``SanaVideoTransformer3DModel`` (declarative)
``wan_vace``       diffusers ``WanVACETransformer3DModel`` (Wan's layout and VACE's control branch)
``hunyuan_video``  diffusers ``HunyuanVideoTransformer3DModel`` (declarative; the text refiner reads time too)
``mochi``          diffusers ``MochiTransformer3DModel`` (declarative; per-frame patch conv as a ``Conv3d``)
``hidream_image``  diffusers ``HiDreamImageTransformer2DModel`` (declarative; mixture-of-experts blocks)
``lumina_next``    diffusers ``LuminaNextDiT2DModel`` (declarative; the pipeline's resolution-scaled RoPE)
``allegro``        diffusers ``AllegroTransformer3DModel`` (declarative; asks for the prediction type)
``cosmos``         diffusers ``CosmosTransformer3DModel`` (Cosmos-Predict2; asks for the parameterisation)
``easyanimate``    diffusers ``EasyAnimateTransformer3DModel`` (declarative; text-to-video)
``krea2``          diffusers ``Krea2Transformer2DModel`` (single-stream MMDiT; fused text-encoder layers)
``ernie_image``    diffusers ``ErnieImageTransformer2DModel`` (declarative; the pipeline's 2x2 fold, sequence-first blocks)
``nucleusmoe_image``  diffusers ``NucleusMoEImageTransformer2DModel`` (declarative; expert-choice mixture of experts)
``ideogram4``      diffusers ``Ideogram4Transformer2DModel`` (declarative; the packed text-and-image sequence built as its pipeline does)
``hunyuan_image``  diffusers ``HunyuanImageTransformer2DModel`` (declarative; HunyuanImage 2.1, the text refiner reads time too)
``latte``          diffusers ``LatteTransformer3DModel`` (declarative; asks for the prediction type; no per-stage attn/mlp)
``bria_fibo``      diffusers ``BriaFiboTransformer2DModel`` (declarative; per-block text-encoder layers)
``z_image``        diffusers ``ZImageTransformer2DModel`` (declarative; per-sample padded image and caption sequences)
``kandinsky5``     diffusers ``Kandinsky5Transformer3DModel`` (declarative; channels-last, the pipeline's RoPE scale asked for)
``hunyuan_video15``  diffusers ``HunyuanVideo15Transformer3DModel`` (declarative; text-to-video, Qwen and ByT5 text joined as the model joins them)
``prx``            diffusers ``PRXTransformer2DModel`` (declarative; asks for the prediction, the pixel-space x0 variant refused)
``motif_video``    diffusers ``MotifVideoTransformer3DModel`` (declarative; text-to-video, asks for the scheduler's prediction)
``flux3``          diffusers ``Flux3Transformer2DModel`` (declarative; its modular pipeline's packed latents, the text clean in every stage)
``bria_fibo2``     diffusers ``BriaFibo2Transformer2DModel`` (declarative; Perceiver gist tokens, clean in every stage)
=================  ==========================================================================

Writing an adapter for another family: the public helpers of :mod:`dfm_ext.adapters.common`
and :mod:`dfm_ext.adapters.diffusers_common`, and the declarative :class:`~dfm_ext.adapters.spec.AdapterSpec`
(see ``docs/guides/adapters.md``).

The adapter classes are importable from here (``from dfm_ext.adapters import DiTFamilyAdapter``),
also lazily: each is imported from its module on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dfm_ext.wrapping.adapter import LazyAdapter

if TYPE_CHECKING:  # the same names, visible to IDEs and type checkers; at run time __getattr__ imports them
    from dfm_ext.adapters.cogvideox import CogVideoXAdapter
    from dfm_ext.adapters.diffusers_dit import DiffusersDiTAdapter
    from dfm_ext.adapters.dit import DiTFamilyAdapter
    from dfm_ext.adapters.flux import FluxAdapter
    from dfm_ext.adapters.pixart import PixArtAdapter
    from dfm_ext.adapters.sd3 import SD3Adapter
    from dfm_ext.adapters.video_dit import VideoDiTAdapter
    from dfm_ext.adapters.sana import SanaAdapter
    from dfm_ext.adapters.auraflow import AuraFlowAdapter
    from dfm_ext.adapters.wan import WanAdapter
    from dfm_ext.adapters.lumina2 import Lumina2Adapter
    from dfm_ext.adapters.qwenimage import QwenImageAdapter
    from dfm_ext.adapters.flux2 import Flux2Adapter
    from dfm_ext.adapters.ltx import LTXVideoAdapter
    from dfm_ext.adapters.hunyuandit import HunyuanDiTAdapter
    from dfm_ext.adapters.spec import AdapterSpec, SpecAdapter
    from dfm_ext.adapters.cogview4 import CogView4Adapter
    from dfm_ext.adapters.chroma import ChromaAdapter
    from dfm_ext.adapters.ovis_image import OvisImageAdapter
    from dfm_ext.adapters.longcat_image import LongCatImageAdapter
    from dfm_ext.adapters.bria import BriaAdapter
    from dfm_ext.adapters.skyreels_v2 import SkyReelsV2Adapter
    from dfm_ext.adapters.cogview3plus import CogView3PlusAdapter
    from dfm_ext.adapters.sana_video import SanaVideoAdapter
    from dfm_ext.adapters.wan_vace import WanVACEAdapter
    from dfm_ext.adapters.hunyuan_video import HunyuanVideoAdapter
    from dfm_ext.adapters.mochi import MochiAdapter
    from dfm_ext.adapters.hidream_image import HiDreamImageAdapter
    from dfm_ext.adapters.lumina_next import LuminaNextAdapter
    from dfm_ext.adapters.allegro import AllegroAdapter
    from dfm_ext.adapters.cosmos import CosmosAdapter
    from dfm_ext.adapters.easyanimate import EasyAnimateAdapter
    from dfm_ext.adapters.krea2 import Krea2Adapter
    from dfm_ext.adapters.ernie_image import ErnieImageAdapter
    from dfm_ext.adapters.nucleusmoe_image import NucleusMoEImageAdapter
    from dfm_ext.adapters.ideogram4 import Ideogram4Adapter
    from dfm_ext.adapters.hunyuan_image import HunyuanImageAdapter
    from dfm_ext.adapters.latte import LatteAdapter
    from dfm_ext.adapters.bria_fibo import BriaFiboAdapter
    from dfm_ext.adapters.z_image import ZImageAdapter
    from dfm_ext.adapters.kandinsky5 import Kandinsky5Adapter
    from dfm_ext.adapters.hunyuan_video15 import HunyuanVideo15Adapter
    from dfm_ext.adapters.prx import PRXAdapter
    from dfm_ext.adapters.motif_video import MotifVideoAdapter
    from dfm_ext.adapters.flux3 import Flux3Adapter
    from dfm_ext.adapters.bria_fibo2 import BriaFibo2Adapter

# class name -> module; resolved on first access (PEP 562) so this package stays light.
_CLASSES = {
    "DiTFamilyAdapter": "dit",
    "VideoDiTAdapter": "video_dit",
    "DiffusersDiTAdapter": "diffusers_dit",
    "PixArtAdapter": "pixart",
    "SD3Adapter": "sd3",
    "FluxAdapter": "flux",
    "CogVideoXAdapter": "cogvideox",
    "SanaAdapter": "sana",
    "AuraFlowAdapter": "auraflow",
    "WanAdapter": "wan",
    "Lumina2Adapter": "lumina2",
    "QwenImageAdapter": "qwenimage",
    "Flux2Adapter": "flux2",
    "LTXVideoAdapter": "ltx",
    "HunyuanDiTAdapter": "hunyuandit",
    "CogView4Adapter": "cogview4",
    "ChromaAdapter": "chroma",
    "OvisImageAdapter": "ovis_image",
    "LongCatImageAdapter": "longcat_image",
    "BriaAdapter": "bria",
    "SkyReelsV2Adapter": "skyreels_v2",
    "CogView3PlusAdapter": "cogview3plus",
    "SanaVideoAdapter": "sana_video",
    "WanVACEAdapter": "wan_vace",
    "HunyuanVideoAdapter": "hunyuan_video",
    "MochiAdapter": "mochi",
    "HiDreamImageAdapter": "hidream_image",
    "LuminaNextAdapter": "lumina_next",
    "AllegroAdapter": "allegro",
    "CosmosAdapter": "cosmos",
    "EasyAnimateAdapter": "easyanimate",
    "Krea2Adapter": "krea2",
    "ErnieImageAdapter": "ernie_image",
    "NucleusMoEImageAdapter": "nucleusmoe_image",
    "Ideogram4Adapter": "ideogram4",
    "HunyuanImageAdapter": "hunyuan_image",
    "LatteAdapter": "latte",
    "BriaFiboAdapter": "bria_fibo",
    "ZImageAdapter": "z_image",
    "Kandinsky5Adapter": "kandinsky5",
    "HunyuanVideo15Adapter": "hunyuan_video15",
    "PRXAdapter": "prx",
    "MotifVideoAdapter": "motif_video",
    "Flux3Adapter": "flux3",
    "BriaFibo2Adapter": "bria_fibo2",
    "AdapterSpec": "spec",
    "SpecAdapter": "spec",
}

__all__ = ["builtin_adapters", *_CLASSES]

# Registry name -> module, in the order ``adapter="auto"`` tries them; the diffusers ones import
# only once a model from the ``diffusers`` package is offered.
_OWN = {"dit": "dit", "video_dit": "video_dit"}
_DIFFUSERS = {
    "diffusers_dit": "diffusers_dit", "pixart": "pixart", "sd3": "sd3", "flux": "flux", "cogvideox": "cogvideox",
    "sana": "sana", "auraflow": "auraflow", "wan": "wan", "lumina2": "lumina2", "qwenimage": "qwenimage",
    "flux2": "flux2", "ltx_video": "ltx", "hunyuandit": "hunyuandit", "cogview4": "cogview4", "chroma": "chroma",
    "ovis_image": "ovis_image", "longcat_image": "longcat_image", "bria": "bria",
    "skyreels_v2": "skyreels_v2", "cogview3plus": "cogview3plus", "sana_video": "sana_video", "wan_vace": "wan_vace",
    "hunyuan_video": "hunyuan_video", "mochi": "mochi", "hidream_image": "hidream_image",
    "lumina_next": "lumina_next", "allegro": "allegro", "cosmos": "cosmos",
    "easyanimate": "easyanimate",
    "krea2": "krea2",
    "ernie_image": "ernie_image",
    "nucleusmoe_image": "nucleusmoe_image",
    "ideogram4": "ideogram4",
    "hunyuan_image": "hunyuan_image",
    "latte": "latte",
    "bria_fibo": "bria_fibo",
    "z_image": "z_image",
    "kandinsky5": "kandinsky5",
    "hunyuan_video15": "hunyuan_video15",
    "prx": "prx",
    "motif_video": "motif_video",
    "flux3": "flux3",
    "bria_fibo2": "bria_fibo2",
}  # fmt: skip
_BUILTIN: tuple[LazyAdapter, ...] = (
    *(LazyAdapter(name, f"dfm_ext.adapters.{module}") for name, module in _OWN.items()),
    *(LazyAdapter(name, f"dfm_ext.adapters.{module}", module_prefix="diffusers") for name, module in _DIFFUSERS.items()),
)


def builtin_adapters() -> list[LazyAdapter]:
    """The built-in adapters in the order ``adapter="auto"`` tries them (after user-registered ones)."""
    return list(_BUILTIN)


def __getattr__(name: str) -> Any:
    module = _CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module 'dfm_ext.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dfm_ext.adapters.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
