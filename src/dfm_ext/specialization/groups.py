"""Layer groups: which layers of a model :func:`~dfm_ext.specialization.specialize` targets by name.

A *layer-group table* maps a group name to regular expressions searched (``re.search``) in the
full module names of the model. The paper's groups are ``cond`` (timestep, class and text
conditioning), ``mod`` (adaLN modulation), ``attn``, ``mlp`` and ``proj`` (patch embedding and
output projection); ``all`` is their union. A layer joins the first group that matches, in the
order :data:`GROUPS` (user ``patterns`` first).

Each model family declares its own table on its adapter (``adapter.layer_groups``, see
:class:`dfm_ext.wrapping.adapter.DiTAdapter`): the table used for a model is, first match wins,

1. the ``groups=`` argument of ``specialize``;
2. the ``layer_groups`` of the model's ``adapter`` (a wrapped model), or of the first module
   inside it that has one (a module holding a wrapped model, e.g. under ``.wrapped``);
3. :data:`DEFAULT_LAYER_GROUPS`, the conventional names of the reference DiT/SiT code and of
   diffusers' shared transformer blocks.

This module knows no model family: it reads the adapter duck-typed and never imports
:mod:`dfm_ext.wrapping` or :mod:`dfm_ext.adapters` (they sit above it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from torch import nn

from dfm_ext.specialization.layer_types import layer_base
from dfm_ext.specialization.layers import StageLayer

__all__ = [
    "GROUPS",
    "DEFAULT_LAYER_GROUPS",
    "GROUP_PATTERNS",
    "LayerGroups",
    "Predicate",
    "combine_layer_groups",
    "declared_layer_groups",
    "select_layers",
]

Predicate = Callable[[str, nn.Module], bool]
#: A layer-group table: group name -> regular expressions searched in module names.
LayerGroups = Mapping[str, Sequence[str]]

#: The paper's layer groups, in the order a layer is assigned (first match wins).
GROUPS: tuple[str, ...] = ("cond", "mod", "attn", "mlp", "proj")

#: The table for a model whose adapter declares none (or an unwrapped model): the names of the
#: reference DiT/SiT code (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.i.attn``,
#: ``blocks.i.mlp``, ``adaLN_modulation``, ``final_layer``) and of diffusers' shared blocks
#: (``attn1.to_q``, ``ff.net``, ``norm1.linear``, ``time_text_embed``, ``pos_embed.proj``,
#: ``proj_out``). A bare diffusers transformer of a built-in family gets its family's exact
#: groups with ``groups=<Family>Adapter.layer_groups`` (e.g. ``dfm_ext.adapters.FluxAdapter``).
DEFAULT_LAYER_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "cond": (
            r"(^|\.)t_embedder(\.|$)",
            r"(^|\.)y_embedder(\.|$)",
            r"(^|\.)time_text_embed\.",
            r"(^|\.)timestep_embedder\.",
        ),
        "mod": (r"(^|\.)adaLN_modulation\.", r"(^|\.)norm[^.]*\.linear$"),
        "attn": (r"(^|\.)attn\d*\.",),
        "mlp": (r"(^|\.)mlp\.", r"(^|\.)ff(_context)?\."),
        "proj": (
            r"(^|\.)x_embedder(\.|$)",
            r"(^|\.)final_layer\.linear$",
            r"(^|\.)(pos_embed|patch_embed)\.proj(\.proj)?$",
            r"(^|\.)proj_out$",
        ),
    }
)

#: The name this table had when it also held every family's patterns; kept importable.
GROUP_PATTERNS = DEFAULT_LAYER_GROUPS


def _checked(table: object, what: str) -> dict[str, tuple[str, ...]]:
    """``table`` as ``{group: (regex, ...)}``; ``TypeError``/``ValueError`` naming ``what`` otherwise."""
    if not isinstance(table, Mapping):
        raise TypeError(f"{what} must map group names to regular expressions, got {type(table).__name__}")
    out: dict[str, tuple[str, ...]] = {}
    for g, pats in table.items():
        if g == "all" or not isinstance(g, str):
            raise ValueError(f"{what}: group name must be a string other than 'all', got {g!r}")
        pats = (pats,) if isinstance(pats, str) else tuple(pats)
        for p in pats:
            if not isinstance(p, str):
                raise TypeError(f"{what}: group {g!r} holds {p!r}, not a regular expression string")
            re.compile(p)
        out[g] = pats
    return out


def combine_layer_groups(*tables: LayerGroups) -> Mapping[str, tuple[str, ...]]:
    """One read-only table whose group ``g`` holds the patterns of ``g`` in every table, in order.

    For adapters that extend a shared table with their family's own names.
    """
    out: dict[str, tuple[str, ...]] = {}
    for i, table in enumerate(tables):
        for g, pats in _checked(table, f"layer-group table {i}").items():
            out[g] = out.get(g, ()) + pats
    return MappingProxyType(out)


def declared_layer_groups(model: nn.Module) -> tuple[LayerGroups, str] | None:
    """``(table, where)``: the ``layer_groups`` of the adapter of ``model`` or of a module inside it.

    Looks at ``model.adapter`` first, then at the ``adapter`` of each submodule in module order
    (a module holding a wrapped model); ``None`` when no adapter declares groups.
    """
    for name, module in model.named_modules():
        table = getattr(getattr(module, "adapter", None), "layer_groups", None)
        if table is not None:
            where = f"the adapter of {name or type(model).__name__}"
            _checked(table, f"layer_groups of {where}")
            return table, where
    return None


def select_layers(
    model: nn.Module,
    targets: str | Sequence[str] | Predicate,
    patterns: LayerGroups | None,
    groups: LayerGroups | None = None,
) -> dict[str, str]:
    """Specialised module name -> group, for ``specialize(model, targets=, patterns=, groups=)``.

    The table is ``groups``, else the adapter's (:func:`declared_layer_groups`), else
    :data:`DEFAULT_LAYER_GROUPS`; ``patterns`` then replaces or adds groups, tried first.
    Only leaf ``nn.Linear``/``nn.ConvNd``/``nn.Embedding`` layers are selected.

    Raises:
        ValueError: an unknown group, nothing matched, or a layer that is already specialised.
        TypeError: a layer that cannot be specialised, or a malformed table.
    """
    if groups is not None:
        table = _checked(groups, "groups")
    else:
        declared = declared_layer_groups(model)
        table = dict(DEFAULT_LAYER_GROUPS) if declared is None else _checked(*declared)
    user: list[str] = []
    if patterns is not None:
        extra = _checked(patterns, "patterns")
        table.update(extra)
        user = list(extra)
    if callable(targets):
        chosen = None
    else:
        names = [targets] if isinstance(targets, str) else list(targets)
        if not names:
            raise ValueError("targets is empty")
        unknown = [g for g in names if g != "all" and g not in table]
        if unknown:
            raise ValueError(f"unknown target group(s) {unknown}; known: {['all', *table]} (or pass patterns=)")
        chosen = set(table) if "all" in names else set(names)
    # groups given in ``patterns`` are tried first, so a user's pattern wins over a declared one
    order = user + [g for g in GROUPS if g in table and g not in user]
    order += [g for g in table if g not in order]
    compiled = {g: [re.compile(p) for p in table[g]] for g in order}

    layers: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        group: str | None
        if callable(targets):
            if not targets(name, module):
                continue
            group = "custom"
        else:
            group = next((g for g in order if any(p.search(name) for p in compiled[g])), None)
            if group is None or group not in chosen:  # type: ignore[operator]
                continue
        kind = layer_base(module)
        if kind is None:
            if callable(targets):
                raise TypeError(
                    f"the predicate selected {name!r} ({type(module).__name__}); only nn.Linear, nn.Conv1d/2d/3d "
                    "and nn.Embedding can be specialised"
                )
            continue  # a container or norm inside a matched group: its leaf layers are matched
        if not kind[1]:
            raise TypeError(
                f"cannot specialise {name!r} ({type(module).__name__}): it overrides forward, uses grouped "
                "convolution or an Embedding max_norm; exclude it with patterns= or a predicate"
            )
        if isinstance(module, StageLayer):
            raise ValueError(f"{name!r} is already specialised")
        layers[name] = group
    if not layers:
        raise ValueError(
            f"targets {targets!r} matched no nn.Linear/Conv/Embedding layer in {type(model).__name__}; "
            "pass patterns={group: [regex, ...]} or a predicate(name, module) for this model"
        )
    return layers
