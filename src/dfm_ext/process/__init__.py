"""The DFM process: per-stage training times, the objective, the sampling schedule and sampler.

Everything here works on lists of stage tensors and the model contract
``model(stages, t [B, S], stage [B], mask [B, S] | None, **cond) -> list[Tensor]``; nothing
depends on how the model is built. :mod:`~dfm_ext.process.conventions` converts the paper's time
(``t = 0`` noise, ``t = 1`` data) to the conventions of other codebases.
"""

from dfm_ext.process import conventions
from dfm_ext.process.allocation import ProgressAllocation, make_allocation, signal_level_locations
from dfm_ext.process.reducible import ReducibleAllocation, stage_errors
from dfm_ext.process.objective import DFMLossOutput, DFMObjective, dfm_loss, estimate_stage_scales
from dfm_ext.process.sampler import DFMSampler, SampleOutput
from dfm_ext.process.schedule import StageScheduler
from dfm_ext.process.timesteps import StageTimesteps, StageTimestepSampler, default_stage_probabilities

__all__ = [
    "DFMLossOutput",
    "DFMObjective",
    "DFMSampler",
    "ProgressAllocation",
    "ReducibleAllocation",
    "SampleOutput",
    "StageScheduler",
    "StageTimestepSampler",
    "StageTimesteps",
    "conventions",
    "default_stage_probabilities",
    "dfm_loss",
    "estimate_stage_scales",
    "make_allocation",
    "signal_level_locations",
    "stage_errors",
]
