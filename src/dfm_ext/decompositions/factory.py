"""One factory for decompositions: a plain config dict <-> a decomposition, round trip exact.

Every entry point builds its decomposition here: the recipes (``decomposition:`` section of a
config), the ``dfm-ext demo`` CLI (``--decomposition``), the demo checkpoint (``config.json``)
and :func:`dfm_ext.load_wrapped` (``dfm_config.json``). :func:`decomposition_config` writes
back what was built, so a saved config always names the decomposition that produced the weights.

A config is a mapping with ``kind`` and that kind's own fields (anything else is refused)::

    {"kind": "laplacian", "factors": [2, 1], "down": "area", "up": "bilinear", "temporal_factors": None}
    {"kind": "wavelet", "wave": "haar", "factors": [2, 1], "mode": "periodization"}
    {"kind": "dct", "block_size": 4, "bands": [1]}
    {"kind": "identity"}

Missing fields take the constructor's defaults. A wavelet may give ``levels`` (and
``num_stages``) instead of ``factors``; the canonical form written back uses ``factors``.

Example:
    >>> d = decomposition_from_config({"kind": "wavelet", "wave": "db2", "factors": [4, 1]})
    >>> d.factors, d.wave
    ((4, 1), 'db2')
    >>> decomposition_config(d)
    {'kind': 'wavelet', 'wave': 'db2', 'factors': [4, 1], 'mode': 'periodization'}
    >>> decomposition_from_config({"kind": "dct", "factors": [4, 1]})
    Traceback (most recent call last):
    ...
    ValueError: decomposition config: 'factors' does not apply to kind='dct'; its fields are block_size, bands
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DECOMPOSITION_KINDS", "DECOMPOSITION_FIELDS", "decomposition_config", "decomposition_from_config"]

#: The kinds a config can name, and each kind's fields (in canonical order).
DECOMPOSITION_FIELDS: dict[str, tuple[str, ...]] = {
    "laplacian": ("factors", "down", "up", "temporal_factors"),
    "wavelet": ("wave", "factors", "mode"),
    "dct": ("block_size", "bands"),
    "identity": (),
}
#: The kinds a config can name (``"kind"``), in the order above.
DECOMPOSITION_KINDS: tuple[str, ...] = tuple(DECOMPOSITION_FIELDS)
# Accepted on input only (the canonical wavelet config spells its stages as factors).
_INPUT_ONLY = {"wavelet": ("levels", "num_stages")}
_SEQUENCE_FIELDS = ("factors", "temporal_factors", "bands")


def _classes() -> dict[str, type]:
    from dfm_ext.decompositions.dct import DCTDecomposition
    from dfm_ext.decompositions.identity import IdentityDecomposition
    from dfm_ext.decompositions.laplacian import LaplacianPyramid
    from dfm_ext.decompositions.wavelet import WaveletDecomposition

    return {
        "laplacian": LaplacianPyramid,
        "wavelet": WaveletDecomposition,
        "dct": DCTDecomposition,
        "identity": IdentityDecomposition,
    }


def decomposition_from_config(config: Mapping[str, Any] | str) -> Any:
    """Build the decomposition a config describes.

    Args:
        config: a mapping ``{"kind": ..., <that kind's fields>}`` (lists or tuples for
            sequences), or just the kind's name (all defaults).

    Raises:
        TypeError: ``config`` is not a mapping or string, or a field has the wrong type.
        ValueError: unknown ``kind``, a field that does not belong to the kind, or a value
            the decomposition refuses (the message names it).
    """
    if isinstance(config, str):
        config = {"kind": config}
    if not isinstance(config, Mapping):
        raise TypeError(f"a decomposition config must be a mapping with 'kind', got {type(config).__name__}")
    kind = config.get("kind")
    if kind not in DECOMPOSITION_FIELDS:
        raise ValueError(f"decomposition config: unknown kind {kind!r}; choose one of {', '.join(DECOMPOSITION_KINDS)}")
    allowed = DECOMPOSITION_FIELDS[kind] + _INPUT_ONLY.get(kind, ())
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        if key == "kind":
            continue
        if key not in allowed:
            fields = ", ".join(allowed) or "(none)"
            raise ValueError(f"decomposition config: {key!r} does not apply to kind={kind!r}; its fields are {fields}")
        if key in _SEQUENCE_FIELDS and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    if kind == "wavelet" and kwargs.get("factors") is None:
        kwargs.pop("factors", None)  # null factors: levels / num_stages (or the defaults) decide
    if kind == "wavelet" and "factors" in kwargs:
        given = [k for k in ("levels", "num_stages") if kwargs.get(k) is not None]
        if given:
            raise ValueError(
                f"decomposition config: give either factors or levels/num_stages for a wavelet, not both "
                f"(factors={list(kwargs['factors'])}, {', '.join(f'{k}={kwargs[k]}' for k in given)})"
            )
        kwargs.pop("levels", None)
        kwargs.pop("num_stages", None)
    return _classes()[kind](**kwargs)


def decomposition_config(decomposition: Any) -> dict[str, Any]:
    """The canonical config of a built-in decomposition (JSON- and YAML-ready).

    ``decomposition_from_config(decomposition_config(d))`` rebuilds ``d`` exactly (same class,
    same parameters, same ``repr``), and ``decomposition_config`` of that is the same dict.

    Raises:
        TypeError: ``decomposition`` is not one of the built-in classes (subclasses included:
            their extra behaviour could not be rebuilt from the dict).
    """
    for kind, cls in _classes().items():
        if type(decomposition) is cls:
            break
    else:
        raise TypeError(
            f"{type(decomposition).__name__} is not a built-in decomposition "
            f"({', '.join(c.__name__ for c in _classes().values())}); it has no config"
        )
    out: dict[str, Any] = {"kind": kind}
    for name in DECOMPOSITION_FIELDS[kind]:
        value = getattr(decomposition, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_record(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config in a saved decomposition record (``save_pretrained``'s ``decomposition.config``);
    ``None``: the record holds no rebuildable config (a custom decomposition)."""
    config = record.get("config")
    return None if config is None else dict(config)
