"""Layer groups come from each family's adapter and select exactly what the old single table did."""

from __future__ import annotations

import copy
import re
from types import MappingProxyType

import pytest
import torch
from torch import nn

from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit
from dfm_ext.specialization import DEFAULT_LAYER_GROUPS, GROUPS, combine_layer_groups, specialize
from dfm_ext.specialization.groups import select_layers

# A copy of ``GROUP_PATTERNS`` as it was in dfm_ext.specialization (one table for every family),
# the reference the adapters' own tables must reproduce.
OLD_GROUP_PATTERNS = {
    "cond": (
        r"(^|\.)t_embedder(\.|$)",
        r"(^|\.)y_embedder(\.|$)",
        r"(^|\.)time_text_embed\.",
        r"(^|\.)timestep_embedder\.",
        r"(^|\.)class_embedder\.",
        r"(^|\.)adaln_single\.emb\.",
        r"(^|\.)caption_projection\.",
        r"(^|\.)context_embedder$",
        r"(^|\.)time_embedding\.",
        r"(^|\.)patch_embed\.text_proj$",
    ),
    "mod": (
        r"(^|\.)adaLN_modulation\.",
        r"(^|\.)norm[^.]*\.linear$",
        r"(^|\.)adaln_single\.linear$",
        r"(^|\.)proj_out_1$",
    ),
    "attn": (r"(^|\.)attn\d*\.",),
    "mlp": (
        r"(^|\.)mlp\.",
        r"(^|\.)ff(_context)?\.",
        r"(^|\.)single_transformer_blocks\.\d+\.proj_(mlp|out)$",
    ),
    "proj": (
        r"(^|\.)x_embedder(\.|$)",
        r"(^|\.)final_layer\.linear$",
        r"(^|\.)(pos_embed|patch_embed)\.proj(\.proj)?$",
        r"(^|\.)proj_out(_2)?$",
    ),
}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _old_selection(model: nn.Module) -> dict[str, str]:
    """Layer name -> group under the old table: first group in GROUPS order with a matching pattern."""
    out = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, _LAYERS):
            continue
        group = next((g for g in GROUPS if any(re.search(p, name) for p in OLD_GROUP_PATTERNS[g])), None)
        if group is not None:
            out[name] = group
    return out


def _video_dit():
    from dfm_ext.models.video_dit import VideoDiT, VideoDiTConfig

    return VideoDiT(VideoDiTConfig.preset("tiny", in_channels=4, num_classes=3))


def _family(name: str, tmp_path_factory) -> tuple[nn.Module, nn.Module]:
    """``(bare model, wrapped model)`` of a built-in family, tiny."""
    torch.manual_seed(0)
    if name == "dit":  # the reference DiT; "diffusers_dit" is diffusers' DiTTransformer2DModel
        base = DiT(DiTConfig.preset("tiny"))
    elif name == "video_dit":
        base = _video_dit()
    else:
        pytest.importorskip("diffusers")
        import _tiny_diffusers as T

        factories = {**T.FACTORIES, "diffusers_dit": T.tiny_dit, "cogvideox15": T.tiny_cogvideox15}
        factories["flux_no_guidance"] = lambda p: T.tiny_flux(p, guidance_embeds=False)
        base = factories[name](tmp_path_factory.mktemp(name))
    return base, wrap_dit(copy.deepcopy(base), LaplacianPyramid(factors=(2, 1)))


FAMILIES = {
    "dit": "dit",
    "video_dit": "video_dit",
    "diffusers_dit": "diffusers_dit",
    "pixart": "pixart",
    "sd3": "sd3",
    "flux": "flux",
    "flux_no_guidance": "flux",
    "cogvideox": "cogvideox",
    "cogvideox15": "cogvideox",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_groups_select_what_the_old_table_did(family: str, tmp_path_factory) -> None:
    base, wrapped = _family(family, tmp_path_factory)
    assert wrapped.adapter.name == FAMILIES[family]
    declared = wrapped.adapter.layer_groups
    assert set(declared) == set(GROUPS)

    # wrapped: the adapter's table is found on the model; every group selects the same layers
    expected = _old_selection(wrapped)
    assert set(expected.values()) == set(GROUPS), expected  # every group has layers to compare
    for group in GROUPS:
        got = select_layers(wrapped, group, None)
        assert sorted(got) == sorted(n for n, g in expected.items() if g == group), (family, group)
    spec = specialize(copy.deepcopy(wrapped), kind="lora", targets="all", rank=2)
    assert dict(spec.layers) == expected

    # bare model with the family's table passed explicitly: the same again
    assert select_layers(base, "all", None, groups=declared) == _old_selection(base)

    # a module that holds the wrapped model finds the adapter inside it
    holder = nn.Module()
    holder.wrapped = wrapped
    assert select_layers(holder, "all", None) == {f"wrapped.{n}": g for n, g in expected.items()}


# ---------------------------------------------------------------------------------------------
# how the table is chosen: groups= > the adapter's layer_groups > DEFAULT_LAYER_GROUPS


class _Net(nn.Module):
    def __init__(self, adapter=None) -> None:
        super().__init__()
        self.adapter = adapter
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.text = nn.Linear(4, 4)

    def forward(self, x, stage):
        return self.mlp(x) + self.text(x)


class _Adapter:
    def __init__(self, layer_groups=None) -> None:
        if layer_groups is not None:
            self.layer_groups = layer_groups


def test_table_choice_and_custom_groups() -> None:
    # no adapter, or one that declares nothing: the default table ("text" is in no group)
    for model in (_Net(), _Net(_Adapter())):
        assert select_layers(model, "all", None) == {"mlp.0": "mlp", "mlp.1": "mlp"}
    # an adapter's own table, with a group of its own, used as a target and in "all" (after GROUPS)
    table = {"mlp": [r"^mlp\.1$"], "text": r"^text$"}
    model = _Net(_Adapter(table))
    assert select_layers(model, "all", None) == {"mlp.1": "mlp", "text": "text"}
    spec = specialize(model, targets="text", rank=2, num_stages=2)
    assert dict(spec.layers) == {"text": "text"}
    with pytest.raises(ValueError, match=r"unknown target group\(s\) \['attn'\]; known: \['all', 'mlp', 'text'\]"):
        select_layers(_Net(_Adapter(table)), "attn", None)
    # groups= replaces the adapter's table; patterns= still adds to it and is tried first
    assert select_layers(model, "all", None, groups={"x": [r"^mlp\.0$"]}) == {"mlp.0": "x"}
    assert select_layers(_Net(_Adapter(table)), "all", {"first": [r"^mlp"]}) == {"mlp.0": "first", "mlp.1": "first", "text": "text"}


def test_malformed_tables_are_named() -> None:
    with pytest.raises(TypeError, match="layer_groups of the adapter of _Net must map group names"):
        select_layers(_Net(_Adapter(["mlp"])), "all", None)
    with pytest.raises(TypeError, match=r"groups: group 'mlp' holds 3, not a regular expression"):
        select_layers(_Net(), "all", None, groups={"mlp": [3]})
    with pytest.raises(ValueError, match="other than 'all', got 'all'"):
        select_layers(_Net(), "all", None, groups={"all": [".*"]})


def test_combine_layer_groups() -> None:
    a = {"mlp": (r"a",), "attn": r"b"}
    combined = combine_layer_groups(a, {"mlp": [r"c"], "text": [r"d"]})
    assert dict(combined) == {"mlp": ("a", "c"), "attn": ("b",), "text": ("d",)}
    assert isinstance(combined, MappingProxyType)
    assert set(DEFAULT_LAYER_GROUPS) == set(GROUPS)


def test_specialize_sits_below_wrapping_and_adapters() -> None:
    """``dfm_ext.specialization`` imports no layer above it (it reads adapters duck-typed)."""
    import ast
    from pathlib import Path

    import dfm_ext

    below = ("dfm_ext.specialization", "dfm_ext.validation", "dfm_ext.fileio", "dfm_ext.decompositions", "dfm_ext.process")
    for path in sorted((Path(dfm_ext.__file__).parent / "specialization").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dfm_ext"):
                assert node.module.startswith(below), (path.name, node.module)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("dfm_ext") or alias.name.startswith(below), (path.name, alias.name)
