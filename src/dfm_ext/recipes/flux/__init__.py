"""FLUX finetuning with DFM: ``python -m dfm_ext.recipes.flux``."""

from dfm_ext.recipes.flux.task import FluxFinetuneConfig, FluxTask, load_finetuned, main

__all__ = ["FluxFinetuneConfig", "FluxTask", "load_finetuned", "main"]
