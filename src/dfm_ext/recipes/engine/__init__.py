"""The engine every recipe shares, by job.

* :mod:`~dfm_ext.recipes.engine.trainer`: :class:`Trainer` (the loop) and :class:`TrainTask` (what a recipe provides);
* :mod:`~dfm_ext.recipes.engine.parallel`: :class:`Parallelism` per strategy (:class:`DDP`, :class:`FSDP2`) and the :class:`EMA`;
* :mod:`~dfm_ext.recipes.engine.checkpoint`: the run folder, atomic verified checkpoints, resume decisions;
* :mod:`~dfm_ext.recipes.engine.config`, :mod:`~dfm_ext.recipes.engine.sections`: typed YAML configs and the sections recipes share;
* :mod:`~dfm_ext.recipes.engine.data`, :mod:`~dfm_ext.recipes.engine.latents`: what a step reads; VAEs and latent caches;
* :mod:`~dfm_ext.recipes.engine.cli`, :mod:`~dfm_ext.recipes.engine.viz`: command plumbing; sample pictures.
"""

from dfm_ext.recipes.engine.config import ConfigError, OptimConfig, TrainConfig, load_config
from dfm_ext.recipes.engine.data import BatchPlan
from dfm_ext.recipes.engine.parallel import DDP, EMA, FSDP2, Parallelism
from dfm_ext.recipes.engine.sections import RecipeConfig
from dfm_ext.recipes.engine.trainer import StepLoss, TrainResult, TrainTask, Trainer

__all__ = [
    "DDP", "EMA", "FSDP2", "BatchPlan", "ConfigError", "OptimConfig", "Parallelism", "RecipeConfig", "StepLoss", "TrainConfig",
    "TrainResult", "TrainTask", "Trainer", "load_config",
]  # fmt: skip
