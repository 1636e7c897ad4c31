"""Every docstring example in the library runs (so README-style examples cannot rot)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dfm_ext

# Modules that need optional heavy dependencies are still collected; they skip if those are absent.
_MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(dfm_ext.__path__, prefix="dfm_ext.")
    if not m.name.startswith(("dfm_ext.adapters", "dfm_ext.recipes"))
)


@pytest.mark.parametrize("name", ["dfm_ext", *_MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
