"""The ``dfm-ext`` command (``demo``, ``sample``, ``eval``): the image recipe on offline data, sampled and measured."""

from dfm_ext.recipes.demo.cli import main

__all__ = ["main"]
