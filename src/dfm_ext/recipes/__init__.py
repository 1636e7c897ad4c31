"""Training recipes on accelerate: the ``engine`` every recipe shares, one folder per recipe, the ``dfm-ext`` demo
(docs/development.md, Layout). The library never imports it."""

__all__ = []
