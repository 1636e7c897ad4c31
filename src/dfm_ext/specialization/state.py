"""Where a specialised model keeps its stage state, and the accessors the other modules share.

:func:`~dfm_ext.specialization.specialize` stores the model's
:class:`~dfm_ext.specialization.routing.StageContext` as the plain attribute ``CONTEXT_ATTR`` (not a
submodule) and each specialised layer's stage parameters as its submodule ``PARAMS_ATTR``
(``<layer>.stage_params.<s>.lora_A``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from dfm_ext.validation import check_index

from dfm_ext.specialization.layers import StageLayer
from dfm_ext.specialization.routing import StageContext

__all__ = [
    "CONTEXT_ATTR",
    "PARAMS_ATTR",
    "check_stage",
    "is_specialized",
    "stage_context",
    "stage_layers",
    "stage_parameters",
    "stage_parameters_detached",
]

CONTEXT_ATTR = "_dfm_stage_context"
PARAMS_ATTR = "stage_params"


def is_specialized(model: nn.Module) -> bool:
    """Whether :func:`~dfm_ext.specialization.specialize` was applied to ``model`` (and not merged in place)."""
    return hasattr(model, CONTEXT_ATTR)


def stage_context(model: nn.Module) -> StageContext:
    """The stage context of a specialised ``model``; ``ValueError`` if it is not specialised."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not specialised (call dfm_ext.specialization first)")
    return ctx


def stage_layers(model: nn.Module) -> Iterator[tuple[str, StageLayer]]:
    """``(name, layer)`` of every specialised layer of ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, StageLayer):
            yield name, m


def check_stage(stage: object, num_stages: int) -> int:
    """``stage`` as an int in ``[0, num_stages - 1]``; ``TypeError``/``ValueError`` naming it otherwise."""
    return check_index(stage, num_stages, "stage")


def stage_parameters(model: nn.Module, stage: int | None) -> list[nn.Parameter]:
    """The stage parameters of ``stage`` (``None``: of every stage) of a specialised ``model``."""
    ctx = stage_context(model)
    if stage is not None:
        check_stage(stage, ctx.num_stages)
    out: list[nn.Parameter] = []
    for _, layer in stage_layers(model):
        for s, p in layer.stage_params.items():
            if stage is None or s == str(stage):
                out.extend(p.parameters())
    return out


@contextlib.contextmanager
def stage_parameters_detached(model: nn.Module) -> Iterator[None]:
    """Within the block, the stage parameters are out of ``model``'s module tree (put back after).

    For saving the shared weights alone in a file that an unspecialised model of the same
    architecture loads strictly.
    """
    taken = [(layer, layer._modules.pop(PARAMS_ATTR)) for _, layer in stage_layers(model)]
    try:
        yield
    finally:
        for layer, params in taken:
            layer._modules[PARAMS_ATTR] = params
