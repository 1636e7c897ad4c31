"""Built-in DiT adapters for :func:`dfm_ext.wrap_dit`, one module per family.

Each module exposes a module-level ``ADAPTER`` (an instance following
:class:`dfm_ext.adapter.DiTAdapter`). They are listed here lazily: a module is imported only
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
``video_dit``      :class:`dfm_ext.video_models.VideoDiT` and DiT-named video models (per-frame ``Conv3d``)
=================  ==========================================================================
"""

from __future__ import annotations

from dfm_ext.adapter import LazyAdapter

_BUILTIN: tuple[LazyAdapter, ...] = (
    LazyAdapter("dit", "dfm_ext.adapters.dit"),
    LazyAdapter("video_dit", "dfm_ext.adapters.video_dit"),
    LazyAdapter("diffusers_dit", "dfm_ext.adapters.diffusers_dit", module_prefix="diffusers"),
    LazyAdapter("pixart", "dfm_ext.adapters.pixart", module_prefix="diffusers"),
    LazyAdapter("sd3", "dfm_ext.adapters.sd3", module_prefix="diffusers"),
    LazyAdapter("flux", "dfm_ext.adapters.flux", module_prefix="diffusers"),
    LazyAdapter("cogvideox", "dfm_ext.adapters.cogvideox", module_prefix="diffusers"),
)


def builtin_adapters() -> list[LazyAdapter]:
    """The built-in adapters in the order ``adapter="auto"`` tries them (after user-registered ones)."""
    return list(_BUILTIN)
