"""dfm_ext: Decomposable Flow Matching for existing DiT codebases.

Public names are imported lazily so that ``import dfm_ext`` stays cheap and optional
dependencies (diffusers, PyAV, ...) are only imported by the pieces that need them.

Example:
    >>> import dfm_ext
    >>> dfm_ext.LaplacianPyramid().num_stages
    2
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # decompositions
    "Decomposition": "decomposition",
    "IdentityDecomposition": "identity",
    "LaplacianPyramid": "laplacian",
    "WaveletDecomposition": "wavelet",
    "DCTDecomposition": "dct",
    "decomposition_from_config": "decomposition_factory",
    "decomposition_config": "decomposition_factory",
    "ScalePacker": "packing",
    # the DFM process
    "StageTimestepSampler": "timesteps",
    "StageTimesteps": "timesteps",
    "DFMObjective": "objective",
    "DFMLossOutput": "objective",
    "dfm_loss": "objective",
    "estimate_stage_scales": "objective",
    "StageScheduler": "schedule",
    "DFMSampler": "sampler",
    "SampleOutput": "sampler",
    "time_conventions": "time_conventions",
    # models and wrapping
    "DiT": "models",
    "DiTConfig": "models",
    "VideoDiT": "video_models",
    "VideoDiTConfig": "video_models",
    "MultiScalePatchEmbed": "embeddings",
    "MultiScaleTimestepEmbed": "embeddings",
    "MultiScaleHead": "embeddings",
    "DFMTransformer": "wrapper",
    "wrap_dit": "wrapper",
    "load_wrapped": "wrapper",
    "DiTAdapter": "adapter",
    "register_adapter": "adapter",
    # specialisation
    "specialize": "specialization",
    "StageSpecialization": "specialization",
    "save_specialization": "specialization",
    "load_specialization": "specialization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dfm_ext' has no attribute {name!r}")
    module = importlib.import_module(f"dfm_ext.{module_name}")
    value = module if name == module_name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

