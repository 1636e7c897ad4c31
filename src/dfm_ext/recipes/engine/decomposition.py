"""The ``decomposition`` config section every recipe shares."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dfm_ext.decompositions.base import Decomposition
from dfm_ext.decompositions.factory import DECOMPOSITION_FIELDS, decomposition_config, decomposition_from_config
from dfm_ext.recipes.engine.config import ConfigError, yaml_value

__all__ = ["DecompositionConfig"]


@dataclass
class DecompositionConfig:
    """Every field of every kind of :mod:`dfm_ext.decompositions.factory`; a field of another kind than ``kind``
    must stay at its default. ``laplacian``: ``factors`` (e.g. ``[4, 2, 1]``), ``down``, ``up``,
    ``temporal_factors``; ``wavelet``: ``wave``, ``factors`` (powers of two) or ``levels`` / ``num_stages``,
    ``mode``; ``dct``: ``block_size``, ``bands``; ``identity``: nothing (plain Flow Matching).

    Checked and resolved when the config loads, so ``config.yaml`` says what is built (``factors``
    ``[1]`` for identity, ``null`` for dct; a wavelet given by ``levels`` is written with its ``factors``).
    """

    kind: Literal["laplacian", "identity", "wavelet", "dct"] = "laplacian"
    factors: tuple[int, ...] | None = (2, 1)
    down: Literal["area", "bilinear", "bicubic"] = "area"
    up: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    temporal_factors: tuple[int, ...] | None = None
    wave: str = "haar"
    levels: int | None = None
    num_stages: int | None = None
    mode: str = "periodization"
    block_size: int = 4
    bands: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        kind = self.kind
        defaults = {f.name: f.default for f in dataclasses.fields(DecompositionConfig)}
        own = set(DECOMPOSITION_FIELDS.get(kind, ())) | ({"levels", "num_stages"} if kind == "wavelet" else set())
        for name, default in defaults.items():
            value = getattr(self, name)
            if name == "kind" or name in own or value == default:
                continue
            if name == "factors" and (kind, value) in (("identity", (1,)), ("identity", None), ("dct", None)):
                continue  # identity: one stage at full resolution, [1] (older configs) or null; dct: null
            users = [k for k, names in DECOMPOSITION_FIELDS.items() if name in names] or ["wavelet"]
            raise ConfigError(
                f"decomposition.{name}={yaml_value(value)} applies to kind={'/'.join(users)}, not kind={kind}; "
                f"leave it at its default {yaml_value(default)}"
                + (" (factors: null for dct)" if name == "factors" else "")
            )
        if kind == "wavelet" and (self.levels is not None or self.num_stages is not None):
            if self.factors not in (None, defaults["factors"]):
                raise ConfigError(
                    f"decomposition: give either factors ({yaml_value(self.factors)}) or levels/num_stages "
                    f"({self.levels}/{self.num_stages}) for a wavelet, not both; set the other to null"
                )
            self.factors = None
        try:
            built = self.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"kind={kind}: {e}") from e
        resolved = decomposition_config(built)
        # Write back what is built (the defaults of the other kinds stay as they are).
        for name in DECOMPOSITION_FIELDS[kind]:
            value = resolved[name]
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self.levels = self.num_stages = None
        self.factors = {"identity": (1,), "dct": None}.get(kind, self.factors)
        self._num_stages = built.num_stages
        factors = self.factors or (1,)
        self._multiple = {"laplacian": math.lcm(*factors), "wavelet": factors[0], "dct": self.block_size, "identity": 1}[kind]

    def build(self) -> Decomposition:
        """The decomposition, through :func:`dfm_ext.decomposition_from_config` of this kind's fields."""
        kind, config = self.kind, dict[str, Any](kind=self.kind)
        for name in DECOMPOSITION_FIELDS[kind] + (("levels", "num_stages") if kind == "wavelet" else ()):
            value = getattr(self, name)
            if not (kind == "wavelet" and value is None and name in ("levels", "num_stages", "factors")):
                config[name] = list(value) if isinstance(value, tuple) else value
        return decomposition_from_config(config)

    def count_stages(self) -> int:
        return self._num_stages

    @property
    def sample_multiple(self) -> int:
        """Latent sides must be multiples of this (the coarsest stage's downsampling, or the DCT block)."""
        return self._multiple

    def check_sample_shape(self, shape: Sequence[int], what: str = "latent") -> None:
        """A :class:`ConfigError` unless the decomposition accepts samples of ``shape`` ``(C, H, W)`` / ``(C, T, H, W)``."""
        try:
            self.build().stage_shapes((1, *shape))
        except ValueError as e:
            raise ConfigError(f"decomposition (kind={self.kind}) cannot split the {what} shape {tuple(shape)}: {e}") from e
