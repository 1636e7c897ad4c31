"""Per-stage parameter specialisation (paper 4.2, Table 1d): per-stage LoRA or full copies of chosen layers."""

from dfm_ext.specialize.core import (
    GROUP_PATTERNS,
    GROUPS,
    StageSpecialization,
    checkpoint,
    export_peft_lora,
    is_specialized,
    load_specialization,
    load_stage_parameters,
    merge,
    routing_active,
    save_specialization,
    save_stage_parameters,
    specialize,
    stage_parameters_detached,
)

__all__ = [
    "GROUPS",
    "GROUP_PATTERNS",
    "StageSpecialization",
    "checkpoint",
    "export_peft_lora",
    "is_specialized",
    "load_specialization",
    "load_stage_parameters",
    "merge",
    "routing_active",
    "save_specialization",
    "save_stage_parameters",
    "specialize",
    "stage_parameters_detached",
]
