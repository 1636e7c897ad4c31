"""Attach and remove per-stage parameters: :func:`specialize`, :func:`merge`, :class:`StageSpecialization`.

``specialize`` swaps each targeted layer's class for its per-stage subclass
(:mod:`dfm_ext.specialization.layer_types`), gives it ``stage_params``, and hooks the model so that every
forward routes its samples by ``stage`` (:mod:`dfm_ext.specialization.routing`). ``merge`` folds one
stage back into plain layers. Layers are chosen by group (:mod:`dfm_ext.specialization.groups`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dfm_ext.specialization.groups import GROUPS, LayerGroups, Predicate, select_layers
from dfm_ext.specialization.layer_types import layer_base, stage_class
from dfm_ext.specialization.layers import StageParams
from dfm_ext.specialization.params_io import load_stage_parameters, save_stage_parameters
from dfm_ext.specialization.peft import export_peft_lora
from dfm_ext.specialization.routing import StageContext
from dfm_ext.specialization.state import (
    CONTEXT_ATTR,
    PARAMS_ATTR,
    check_stage,
    is_specialized,
    stage_context,
    stage_layers,
    stage_parameters,
)

__all__ = ["StageSpecialization", "specialize", "merge"]

Kind = Literal["lora", "full"]
Train = Literal["all", "stage"]


@dataclass(frozen=True)
class StageSpecialization:
    """What :func:`specialize` attached; also the handle to merge, save, load and export.

    Attributes:
        kind: ``"lora"`` or ``"full"``.
        rank: LoRA rank ``r`` (``None`` for ``"full"``).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank`` (``None`` for ``"full"``).
        num_stages: ``S``, the number of stages the model routes.
        stages: the stages that own parameters; other stages run the base weights.
        train: ``"all"`` (everything trainable) or ``"stage"`` (only stage parameters).
        layers: specialised module name -> group.
        parameters_per_group: group -> number of stage parameters, all stages together.
        model: the specialised model.
    """

    kind: str
    rank: int | None
    alpha: float | None
    num_stages: int
    stages: tuple[int, ...]
    train: str
    layers: Mapping[str, str]
    parameters_per_group: dict[str, int]
    model: nn.Module = field(repr=False, compare=False)

    @property
    def num_parameters(self) -> int:
        """Stage parameters in total (all groups and stages)."""
        return sum(self.parameters_per_group.values())

    @property
    def parameters_per_stage(self) -> int:
        """Stage parameters owned by one stage."""
        return self.num_parameters // len(self.stages)

    def stage_parameters(self, stage: int | None = None) -> list[nn.Parameter]:
        """The parameters of ``stage`` (or of every stage), e.g. for an optimiser param group."""
        return stage_parameters(self.model, stage)

    def route(self, stage: int | Tensor) -> contextlib.AbstractContextManager[None]:
        """Route calls that carry no ``stage`` (e.g. a plain diffusers model) to ``stage``."""
        return stage_context(self.model).manual(stage)

    def merge(self, stage: int, *, inplace: bool = False) -> nn.Module:
        """See :func:`merge`."""
        return merge(self.model, stage, inplace=inplace)

    def save(self, path: str | Path) -> None:
        """See :func:`save_stage_parameters`."""
        save_stage_parameters(self.model, path)

    def load(self, path: str | Path) -> None:
        """See :func:`load_stage_parameters`."""
        load_stage_parameters(self.model, path)

    def export_peft(self, stage: int, directory: str | Path, **kwargs: Any) -> Path:
        """See :func:`export_peft_lora`."""
        return export_peft_lora(self.model, stage, directory, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> StageSpecialization:
        # A handle kept on its model (``model.stage_specialization``) must survive the model's
        # deepcopy (EMA, merge); the default fails on the read-only ``layers`` mapping.
        model = copy.deepcopy(self.model, memo)
        if id(self) in memo:  # reached again through ``model`` while it was being copied
            return memo[id(self)]
        out = StageSpecialization(
            kind=self.kind,
            rank=self.rank,
            alpha=self.alpha,
            num_stages=self.num_stages,
            stages=self.stages,
            train=self.train,
            layers=MappingProxyType(dict(self.layers)),
            parameters_per_group=dict(self.parameters_per_group),
            model=model,
        )
        memo[id(self)] = out
        return out


def _infer_num_stages(model: nn.Module) -> int | None:
    for obj in (model, getattr(model, "decomposition", None)):
        n = getattr(obj, "num_stages", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _stage_position(model: nn.Module, stage_arg: str, consume: bool) -> int | None:
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    if consume:
        if stage_arg in sig.parameters:
            raise ValueError(f"consume_stage=True but {type(model).__name__}.forward takes {stage_arg!r} itself")
        return None
    if stage_arg not in sig.parameters:
        raise ValueError(
            f"{type(model).__name__}.forward has no {stage_arg!r} argument to route by: wrap the model with "
            f"dfm_ext.wrap_dit, pass consume_stage=True (the {stage_arg}= keyword is taken out of the call "
            "before forward), or name the argument with stage_arg="
        )
    p = sig.parameters[stage_arg]
    if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return params.index(p)
    return None


def specialize(
    model: nn.Module,
    *,
    kind: Kind = "lora",
    targets: str | Sequence[str] | Predicate = "all",
    rank: int | None = None,
    alpha: float | None = None,
    stages: Sequence[int] | None = None,
    num_stages: int | None = None,
    train: Train = "all",
    patterns: LayerGroups | None = None,
    groups: LayerGroups | None = None,
    stage_arg: str = "stage",
    consume_stage: bool = False,
    generator: torch.Generator | None = None,
) -> StageSpecialization:
    """Give the targeted layers per-stage parameters, routed by the model's ``stage`` argument.

    The model is changed in place: each targeted ``nn.Linear``/``nn.ConvNd``/``nn.Embedding``
    keeps its parameters and names (``fc1.weight``) and gains ``fc1.stage_params.<s>.*``. At
    attach time the function is unchanged. Each sample ``b`` runs stage ``stage[b]``'s parameters.

    Args:
        model: the model; its ``forward`` takes ``stage`` (a ``DFMTransformer`` does), unless
            ``consume_stage``.
        kind: ``"lora"``: ``W + (alpha / rank) B_s A_s``; ``"full"``: ``(W + W_s) / 2``.
        targets: group name(s) among ``mod``, ``proj``, ``cond``, ``attn``, ``mlp``, ``all`` (and
            any group in the table or ``patterns``), or ``predicate(name, module) -> bool``.
        rank: LoRA rank (default 16); must be ``None`` for ``"full"``.
        alpha: LoRA alpha (default ``rank``, i.e. scale 1); must be ``None`` for ``"full"``.
        stages: stages that get parameters (default all); the others run the base weights.
        num_stages: ``S``; default ``model.num_stages`` or ``model.decomposition.num_stages``.
        train: ``"all"`` leaves every parameter trainable; ``"stage"`` freezes all but the stage
            parameters (expert finetuning).
        patterns: group name -> regular expressions searched in module names; replaces or adds
            groups of the model's table. A layer joins the first group that matches, trying the
            groups of ``patterns`` first, then ``GROUPS`` in order.
        groups: the whole layer-group table, for a model whose adapter declares none (e.g. a
            bare diffusers transformer: ``groups=FluxAdapter.layer_groups``). Default: the
            ``layer_groups`` of the wrapped model's adapter, else :data:`DEFAULT_LAYER_GROUPS`
            (:mod:`dfm_ext.specialization.groups`).
        stage_arg: name of the forward argument carrying ``stage`` ``[B]`` (or an int).
        consume_stage: for a model whose forward has no such argument (a plain diffusers
            transformer): accept ``stage=`` as an extra keyword and remove it before forward.
        generator: for the LoRA ``A`` initialisation.

    Returns:
        A :class:`StageSpecialization` with the layers, groups and parameter counts.

    Raises:
        ValueError: unknown group, nothing matched, ``rank <= 0``, a stage out of range, a model
            without a stage input, or a model that is already specialised.
        TypeError: a selected layer cannot be specialised, or an argument has the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_specialized(model):
        raise ValueError(f"{type(model).__name__} is already specialised; merge it or use a fresh model")
    if kind not in ("lora", "full"):
        raise ValueError(f"kind must be 'lora' or 'full', got {kind!r}")
    if train not in ("all", "stage"):
        raise ValueError(f"train must be 'all' or 'stage', got {train!r}")
    if kind == "full":
        if rank is not None or alpha is not None:
            raise ValueError(f"rank and alpha apply to kind='lora' only, got rank={rank!r} alpha={alpha!r}")
    else:
        rank = _check_int("rank", 16 if rank is None else rank, 1)
        if alpha is None:
            alpha = float(rank)
        elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        alpha = float(alpha)
    if num_stages is None:
        num_stages = _infer_num_stages(model)
        if num_stages is None:
            raise ValueError(f"cannot infer num_stages from {type(model).__name__}; pass num_stages=")
    num_stages = _check_int("num_stages", num_stages, 1)
    if stages is None:
        stage_list = tuple(range(num_stages))
    else:
        stage_list = tuple(_check_int("stages[i]", s, 0) for s in stages)
        bad = [s for s in stage_list if s >= num_stages]
        if bad or not stage_list or len(set(stage_list)) != len(stage_list):
            raise ValueError(f"stages must be distinct indices in [0, {num_stages - 1}], got {list(stages)}")
        stage_list = tuple(sorted(stage_list))
    position = _stage_position(model, stage_arg, consume_stage)
    layers = select_layers(model, targets, patterns, groups)

    ctx = StageContext(num_stages, stage_arg, position, consume_stage)
    ctx.settings = {"kind": kind, "rank": rank, "alpha": alpha, "num_stages": num_stages, "stages": list(stage_list)}
    ctx.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    for name, group in layers.items():
        module = modules[name]
        base = layer_base(module)
        assert base is not None  # select_layers picks Linear/ConvNd/Embedding layers only
        original = type(module)
        module.__class__ = stage_class(original, base[0])
        module._stage_base_cls = original
        _attach(module, name, kind, rank, alpha, stage_list, ctx, generator)
        n = sum(p.numel() for p in module.stage_params.parameters())
        counts[group] = counts.get(group, 0) + n
    object.__setattr__(model, CONTEXT_ATTR, ctx)  # a plain attribute, not a submodule
    pre = model.register_forward_pre_hook(ctx.pre_hook, with_kwargs=True)
    post = model.register_forward_hook(ctx.post_hook, with_kwargs=True, always_call=True)
    ctx.hook_ids = (pre.id, post.id)
    if train == "stage":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in stage_parameters(model, None):
            p.requires_grad_(True)
    return StageSpecialization(
        kind=kind,
        rank=rank,
        alpha=alpha,
        num_stages=num_stages,
        stages=stage_list,
        train=train,
        layers=MappingProxyType(dict(layers)),
        parameters_per_group={g: counts[g] for g in sorted(counts, key=_group_rank)},
        model=model,
    )


def _attach(
    module: nn.Module,
    name: str,
    kind: str,
    rank: int | None,
    alpha: float | None,
    stages: tuple[int, ...],
    ctx: StageContext,
    generator: torch.Generator | None,
) -> None:
    layer: Any = module
    w = layer.weight
    params = nn.ModuleDict()
    for s in stages:
        p = StageParams()
        if kind == "full":
            p.weight = nn.Parameter(w.detach().clone())
            bias = getattr(layer, "bias", None)
            p.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        else:
            a_shape, b_shape = layer._lora_shapes(rank)
            a = torch.empty(a_shape, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            p.lora_A = nn.Parameter(a)
            p.lora_B = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=w.dtype))
        params[str(s)] = p
    layer.stage_params = params
    layer._stage_ctx = ctx
    layer._stage_name = name
    layer._stage_kind = kind
    layer._stage_scaling = 1.0 if kind == "full" else float(alpha) / float(rank)  # type: ignore[arg-type]


def _group_rank(group: str) -> tuple[int, str]:
    return (GROUPS.index(group), "") if group in GROUPS else (len(GROUPS), group)


def merge(model: nn.Module, stage: int, *, inplace: bool = False) -> nn.Module:
    """The plain model that computes what the specialised ``model`` computes on ``stage``.

    Every specialised layer becomes its original class again with the merged weight
    (``(W + W_s) / 2`` or ``W + (alpha / r) B_s A_s``); the routing hooks are removed and the
    parameters' ``requires_grad`` restored to what they were before :func:`specialize`. The result
    is a stage expert for deployment: ``merge(model, s)(..., stage=s)`` equals ``model(..., stage=s)``.

    Args:
        model: a specialised model.
        stage: the stage to merge.
        inplace: convert ``model`` itself (saves memory; the specialisation is gone) instead of a copy.
    """
    ctx = stage_context(model)
    check_stage(stage, ctx.num_stages)
    out = model if inplace else copy.deepcopy(model)
    out_ctx = stage_context(out)
    for _, layer in list(stage_layers(out)):
        weight, bias = layer.merged_parameters(stage)
        module: Any = layer
        del module._modules[PARAMS_ATTR]
        for attr in ("_stage_ctx", "_stage_name", "_stage_kind", "_stage_scaling"):
            module.__dict__.pop(attr, None)
        module.__class__ = module.__dict__.pop("_stage_base_cls")
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
    for hooks in (
        out._forward_pre_hooks,
        out._forward_pre_hooks_with_kwargs,
        out._forward_hooks,
        out._forward_hooks_with_kwargs,
        out._forward_hooks_always_called,
    ):
        for i in out_ctx.hook_ids:
            hooks.pop(i, None)
    object.__delattr__(out, CONTEXT_ATTR)
    for n, p in out.named_parameters():
        p.requires_grad_(out_ctx.requires_grad.get(n, True))
    return out
