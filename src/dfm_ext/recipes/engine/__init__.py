"""The engine every recipe shares, by job: ``trainer`` (the loop), ``parallel`` (DDP, FSDP2, EMA), ``checkpoint``,
``config`` and ``sections`` (typed configs), ``data`` and ``latents`` (what a step reads), ``cli``, ``viz``."""

from dfm_ext.recipes.engine.config import ConfigError, OptimConfig, TrainConfig, load_config
from dfm_ext.recipes.engine.data import BatchPlan
from dfm_ext.recipes.engine.parallel import DDP, EMA, FSDP2, Parallelism
from dfm_ext.recipes.engine.sections import RecipeConfig
from dfm_ext.recipes.engine.trainer import StepLoss, TrainResult, TrainTask, Trainer

__all__ = [
    "DDP", "EMA", "FSDP2", "BatchPlan", "ConfigError", "OptimConfig", "Parallelism", "RecipeConfig", "StepLoss", "TrainConfig",
    "TrainResult", "TrainTask", "Trainer", "load_config",
]  # fmt: skip
