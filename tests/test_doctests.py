"""Every docstring example in the library runs (so the examples the API reference shows cannot rot)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dfm_ext
import dfm_ext.adapters
import dfm_ext.recipes

# The library, the adapters and the recipes (the test environment installs every extra). The
# three are walked separately: setuptools maps adapters/ and recipes/ from outside src/dfm_ext.
_MODULES = sorted(
    {
        m.name
        for pkg in (dfm_ext, dfm_ext.adapters, dfm_ext.recipes)
        for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}.")
    }
    | {"dfm_ext.adapters", "dfm_ext.recipes"}
)


@pytest.mark.parametrize("name", ["dfm_ext", *_MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
