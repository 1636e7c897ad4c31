"""Every docstring example in the library runs (so the examples the API reference shows cannot rot)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dfm_ext

# The library, the adapters and the recipes (the test environment installs every extra); not the
# recipes' ``__main__`` modules, which run their command when imported.
_MODULES = sorted(m.name for m in pkgutil.walk_packages(dfm_ext.__path__, prefix="dfm_ext.") if not m.name.endswith(".__main__"))


@pytest.mark.parametrize("name", ["dfm_ext", *_MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
