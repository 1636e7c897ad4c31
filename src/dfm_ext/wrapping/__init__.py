"""Wrapping a DiT for DFM: stage packing, multi-scale embeddings, the adapter protocol, ``wrap_dit``, I/O."""

from dfm_ext.wrapping.adapter import DiTAdapter, LazyAdapter, register_adapter, registered_adapters, resolve_adapter, unregister_adapter
from dfm_ext.wrapping.embeddings import MultiScaleHead, MultiScalePatchEmbed, MultiScaleTimestepEmbed
from dfm_ext.wrapping.packing import ScalePacker, patch_sizes_for_grid
from dfm_ext.wrapping.record import describe_mismatch, save_pretrained
from dfm_ext.wrapping.wrapper import DFMTransformer, load_wrapped, wrap_dit

__all__ = [
    "DFMTransformer",
    "DiTAdapter",
    "LazyAdapter",
    "MultiScaleHead",
    "MultiScalePatchEmbed",
    "MultiScaleTimestepEmbed",
    "ScalePacker",
    "describe_mismatch",
    "load_wrapped",
    "patch_sizes_for_grid",
    "register_adapter",
    "registered_adapters",
    "resolve_adapter",
    "save_pretrained",
    "unregister_adapter",
    "wrap_dit",
]
