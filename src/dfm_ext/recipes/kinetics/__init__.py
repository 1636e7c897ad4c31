"""Class-conditional video generation on Kinetics: ``python -m dfm_ext.recipes.kinetics``."""

from dfm_ext.recipes.kinetics.task import KineticsConfig, KineticsTask, main

__all__ = ["KineticsConfig", "KineticsTask", "main"]
