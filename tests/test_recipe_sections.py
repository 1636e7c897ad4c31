"""The config sections the recipes share (recipes/sections.py): one ``dfm`` section, per-recipe defaults."""

from __future__ import annotations

import pytest

from dfm_ext.recipes.flux import task as flux_finetune
from dfm_ext.recipes.imagenet import task as imagenet
from dfm_ext.recipes.kinetics import task as kinetics
from dfm_ext.recipes.engine.config import ConfigError, from_dict
from dfm_ext.recipes.engine.sections import DFMConfig


def test_one_dfm_section_class_for_every_recipe() -> None:
    for cls in (imagenet.ImageNetConfig, kinetics.KineticsConfig, flux_finetune.FluxFinetuneConfig):
        assert type(cls().dfm) is DFMConfig


def test_partial_dfm_section_keeps_the_recipe_defaults() -> None:
    # An old kinetics config.yaml / YAML file naming only some dfm keys: standardisation stays on.
    cfg = from_dict(kinetics.KineticsConfig, {"dfm": {"masking": False}})
    assert cfg.dfm.standardize is True and cfg.dfm.masking is False
    assert from_dict(imagenet.ImageNetConfig, {"dfm": {"masking": False}}).dfm.standardize is False


@pytest.mark.parametrize(
    ("module", "override", "message"),
    [
        (imagenet, "dfm.standardize=true", "dfm.standardize=true is not read by the imagenet recipe"),
        (imagenet, "dfm.scales=[1.0,2.0]", "dfm.scales=[1.0, 2.0] is not read by the imagenet recipe"),
        (flux_finetune, "dfm.label_dropout=0.3", "dfm.label_dropout=0.3 is not read by the flux_finetune recipe"),
    ],
)
def test_a_dfm_field_the_recipe_does_not_read_is_refused(module, override, message, tmp_path) -> None:
    base = {
        imagenet: ["--config", "tiny", "data.root=/x"],
        flux_finetune: ["--config", "flux_tiny", "model.path=/x", "data.source=/x"],
    }[module]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        module.parse_args([*base, override])
