"""dfm_ext: Decomposable Flow Matching for existing DiT codebases.

The library is layered; each subpackage imports only the ones listed before it:
:mod:`~dfm_ext.validation` -> :mod:`~dfm_ext.decompositions` -> :mod:`~dfm_ext.process`
-> :mod:`~dfm_ext.specialization` -> :mod:`~dfm_ext.models` -> :mod:`~dfm_ext.wrapping`;
:mod:`~dfm_ext.metrics` stands apart. Adapters (:mod:`dfm_ext.adapters`) and the accelerate
recipes and demo (:mod:`dfm_ext.recipes`) sit on top and are not imported here.

Example:
    >>> import dfm_ext
    >>> dfm_ext.LaplacianPyramid().num_stages
    2
"""

from __future__ import annotations

# decompositions
from dfm_ext.decompositions import (
    DCTDecomposition,
    Decomposition,
    IdentityDecomposition,
    LaplacianPyramid,
    WaveletDecomposition,
    decomposition_config,
    decomposition_from_config,
)

# models
from dfm_ext.models import DiT, DiTConfig, VideoDiT, VideoDiTConfig

# the DFM process
from dfm_ext.process import (
    DFMLossOutput,
    DFMObjective,
    DFMSampler,
    SampleOutput,
    StageScheduler,
    StageTimesteps,
    StageTimestepSampler,
    conventions,
    dfm_loss,
    estimate_stage_scales,
)

# specialisation
from dfm_ext.specialization import StageSpecialization, load_specialization, save_specialization, specialize

# wrapping
from dfm_ext.wrapping import (
    DFMTransformer,
    DiTAdapter,
    MultiScaleHead,
    MultiScalePatchEmbed,
    MultiScaleTimestepEmbed,
    ScalePacker,
    load_wrapped,
    register_adapter,
    wrap_dit,
)

__version__ = "0.1.0"

__all__ = [
    "DCTDecomposition",
    "DFMLossOutput",
    "DFMObjective",
    "DFMSampler",
    "DFMTransformer",
    "DiT",
    "DiTAdapter",
    "DiTConfig",
    "Decomposition",
    "IdentityDecomposition",
    "LaplacianPyramid",
    "MultiScaleHead",
    "MultiScalePatchEmbed",
    "MultiScaleTimestepEmbed",
    "SampleOutput",
    "ScalePacker",
    "StageScheduler",
    "StageSpecialization",
    "StageTimestepSampler",
    "StageTimesteps",
    "VideoDiT",
    "VideoDiTConfig",
    "WaveletDecomposition",
    "conventions",
    "decomposition_config",
    "decomposition_from_config",
    "dfm_loss",
    "estimate_stage_scales",
    "load_specialization",
    "load_wrapped",
    "register_adapter",
    "save_specialization",
    "specialize",
    "wrap_dit",
]
