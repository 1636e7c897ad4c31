"""Per-stage parameter specialisation: stage experts inside one model (paper 4.2, Table 1d, F).

:func:`specialize` gives chosen layers extra parameters per stage and routes every sample to
the parameters of the stage it is generating, read from the ``stage`` ``[B]`` argument the
model already receives. Two kinds:

* ``kind="full"``: stage ``s`` of a layer with base weight ``W`` owns a full copy ``W_s``
  (initialised to ``W``) and runs with the average ``(W + W_s) / 2`` ("stage weights averaged
  with the base weights"); likewise the bias.
* ``kind="lora"``: stage ``s`` owns a low-rank pair ``A_s`` ``[r, in]``, ``B_s`` ``[out, r]``
  (``A_s`` Kaiming-uniform, ``B_s = 0``) and runs with ``W + (alpha / r) * B_s @ A_s``.

Both start as the unchanged function. Layers are chosen by *group*, with the paper's groups
``mod`` (adaLN modulation), ``proj`` (patch embedding and output projection), ``cond`` (timestep,
class and text conditioning), ``attn``, ``mlp``, and ``all`` (their union). Each model family
declares its groups' module-name patterns on its adapter (``adapter.layer_groups``); a wrapped
model uses its adapter's, other models :data:`DEFAULT_LAYER_GROUPS` (conventional DiT and
diffusers names) or pass ``groups``, ``patterns`` or a predicate.

Routing: a forward pre-hook on the top model reads ``stage`` and the specialised layers route
their input by stage (no loop over samples), so a batch that mixes stages, the normal case in DFM
training, runs every sample with its own stage's parameters. With a CPU ``stage`` the per-stage
counts are read on the host: the stage with most samples runs on every row (LoRA merged into the
weight where that is cheaper) and the other stages' rows alone are corrected. A device ``stage``
(or ``torch.compile``) is never read back: LoRA runs every stage on every sample, masked. Either
way every stage's parameters take part in every forward (zero gradients for a stage absent from
the batch), so data-parallel ranks always use the same parameters.

Modules, by job: :mod:`~dfm_ext.specialization.routing` (stage routing, :func:`checkpoint`),
:mod:`~dfm_ext.specialization.layers` (the per-stage layer mixin),
:mod:`~dfm_ext.specialization.layer_types` (per-stage Linear/Conv/Embedding),
:mod:`~dfm_ext.specialization.lora_ops` (the fused LoRA ops of a per-stage Linear),
:mod:`~dfm_ext.specialization.groups` (layer-group tables and selection),
:mod:`~dfm_ext.specialization.state` (accessors), :mod:`~dfm_ext.specialization.attach`
(:func:`specialize`, :func:`merge`), :mod:`~dfm_ext.specialization.params_io` (the stage-parameter
file), :mod:`~dfm_ext.specialization.peft` (peft export), :mod:`~dfm_ext.specialization.io` (a
specialisation saved next to a model).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    ...     def forward(self, x, stage):
    ...         return self.mlp(x)
    >>> model = Tiny()
    >>> x, stage = torch.randn(3, 5, 4), torch.tensor([0, 1, 1])
    >>> before = model(x, stage)
    >>> spec = specialize(model, kind="lora", targets="mlp", rank=2, num_stages=2)
    >>> spec.parameters_per_group
    {'mlp': 96}
    >>> torch.allclose(model(x, stage), before)
    True
    >>> expert = spec.merge(1)  # a plain model for stage 1
    >>> type(expert.mlp[0]).__name__
    'Linear'
"""

from dfm_ext.specialization.attach import StageSpecialization, merge, specialize
from dfm_ext.specialization.groups import DEFAULT_LAYER_GROUPS, GROUP_PATTERNS, GROUPS, combine_layer_groups
from dfm_ext.specialization.io import load_specialization, restore_specialization, save_specialization, specialization_record
from dfm_ext.specialization.params_io import load_stage_parameters, save_stage_parameters
from dfm_ext.specialization.peft import export_peft_lora
from dfm_ext.specialization.routing import checkpoint, routing_active
from dfm_ext.specialization.state import is_specialized, stage_parameters_detached

__all__ = [
    "DEFAULT_LAYER_GROUPS",
    "GROUPS",
    "GROUP_PATTERNS",
    "StageSpecialization",
    "checkpoint",
    "combine_layer_groups",
    "export_peft_lora",
    "is_specialized",
    "load_specialization",
    "load_stage_parameters",
    "merge",
    "restore_specialization",
    "routing_active",
    "save_specialization",
    "save_stage_parameters",
    "specialization_record",
    "specialize",
    "stage_parameters_detached",
]
