"""Every transformer class of the installed diffusers is either wrapped by a built-in adapter or refused with a reason.

The classes are enumerated from diffusers itself (``diffusers.models.transformers``, every
``ModelMixin`` subclass), so a diffusers upgrade that adds a family fails here until it is
shipped or refused in :mod:`dfm_ext.adapters.catalog`.
"""

from __future__ import annotations

import pytest

diffusers = pytest.importorskip("diffusers")

from dfm_ext.adapters import builtin_adapters  # noqa: E402
from dfm_ext.adapters.catalog import REFUSED, SHIPPED, diffusers_support  # noqa: E402


def _diffusers_transformers() -> list[str]:
    import diffusers.models.transformers as transformers
    from diffusers.models.modeling_utils import ModelMixin

    return sorted(
        n for n in dir(transformers) if isinstance(getattr(transformers, n, None), type) and issubclass(getattr(transformers, n), ModelMixin)
    )


def test_every_diffusers_transformer_is_shipped_or_refused_with_a_reason() -> None:
    names = _diffusers_transformers()
    assert len(names) > 50  # the enumeration found diffusers' classes (75 in diffusers 0.42.1)
    support = diffusers_support(names)
    unknown = [n for n, s in support.items() if s == "unknown"]
    assert not unknown, f"new diffusers transformers: ship an adapter or refuse them in dfm_ext.adapters.catalog: {unknown}"
    assert not set(SHIPPED) & set(REFUSED)
    assert all(len(reason) > 20 for reason in REFUSED.values())
    # No stale entries: every name in the catalog is a class of this diffusers.
    assert set(SHIPPED) | set(REFUSED) <= set(names), sorted((set(SHIPPED) | set(REFUSED)) - set(names))
    shipped = sum(s.startswith("adapter") for s in support.values())
    print(f"diffusers {diffusers.__version__}: {len(names)} transformer classes, {shipped} shipped, {len(names) - shipped} refused")


@pytest.mark.parametrize("cls_name,adapter_name", sorted(SHIPPED.items()))
def test_each_shipped_class_has_its_built_in_adapter(cls_name: str, adapter_name: str) -> None:
    """The catalog's adapter is registered, and it is the one whose matches() takes that class."""
    found = {a.name: a for a in builtin_adapters()}
    assert adapter_name in found
    adapter = found[adapter_name].load()
    model_class = getattr(adapter, "model_class", None) or adapter.spec.model_class
    assert model_class == cls_name


@pytest.mark.parametrize("norm_type,loads_as", [("ada_norm_zero", "DiTTransformer2DModel"), ("ada_norm_single", "PixArtTransformer2DModel")])
def test_transformer_2d_checkpoints_of_dit_layouts_load_as_shipped_classes(tmp_path, norm_type: str, loads_as: str) -> None:
    """Why Transformer2DModel is refused: from_pretrained turns its patched DiT layouts into classes with adapters."""
    from diffusers import Transformer2DModel

    extra = {"num_embeds_ada_norm": 10} if norm_type == "ada_norm_zero" else {"num_embeds_ada_norm": 1000, "caption_channels": 12, "cross_attention_dim": 16}
    Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
                       patch_size=2, norm_type=norm_type, **extra).save_pretrained(tmp_path)  # fmt: skip
    loaded = Transformer2DModel.from_pretrained(tmp_path)
    assert type(loaded).__name__ == loads_as and loads_as in SHIPPED
