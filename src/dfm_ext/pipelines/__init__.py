"""Diffusers-style pipelines over wrapped models: ``Pipeline.from_pretrained(folder)`` then ``pipe(...).images``:
:class:`DFMDiTPipeline` (class-conditional DiTs) and :class:`DFMFluxPipeline` (text-to-image FLUX).

A layer above :mod:`~dfm_ext.wrapping` (it loads ``save_pretrained`` folders with
:func:`~dfm_ext.wrapping.wrapper.load_wrapped`) and :mod:`~dfm_ext.process` (it samples with
:class:`~dfm_ext.process.sampler.DFMSampler`); it needs neither accelerate nor the recipes.
"""

from __future__ import annotations

from dfm_ext.pipelines.dit import DFMDiTPipeline, DFMPipelineOutput
from dfm_ext.pipelines.flux import FLUX_SUBFOLDERS, DFMFluxPipeline, FluxTextEncoder, TextEmbeddings

__all__ = ["FLUX_SUBFOLDERS", "DFMDiTPipeline", "DFMFluxPipeline", "DFMPipelineOutput", "FluxTextEncoder", "TextEmbeddings"]
