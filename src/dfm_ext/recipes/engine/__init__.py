"""The engine every recipe shares, by job: ``trainer`` (the loop), ``parallel`` (DDP / FSDP2), ``checkpoint``,
``config`` (typed YAML configs) and ``sections`` (the sections recipes share), ``data``, ``latents``, ``cli``."""

from dfm_ext.recipes.engine.config import ConfigError, load_config
from dfm_ext.recipes.engine.trainer import StepLoss, TrainResult, TrainTask, Trainer

__all__ = ["ConfigError", "StepLoss", "TrainResult", "TrainTask", "Trainer", "load_config"]
