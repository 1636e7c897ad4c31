"""Converters between dfm_ext's flow time and the time conventions of other codebases.

dfm_ext follows the paper: ``t = 0`` is pure noise, ``t = 1`` is data, and
``x_t = t * x + (1 - t) * noise``. Other codebases count the other way:

========================  ===============================  =========================
convention                value at noise / at data         conversion from ``t``
========================  ===============================  =========================
``sigma`` (diffusers)     1 / 0                            ``sigma = 1 - t``
continuous timestep       1000 / 0  (SD3, Flux, diffusers  ``timestep = 1000 * (1 - t)``
                          ``FlowMatchEulerDiscreteScheduler``)
integer timestep          999 / 0  (DiT/SiT-style          ``k = round(999 * (1 - t))``
                          ``torch.long`` indices)
========================  ===============================  =========================

The integer convention is the *linear* flow-matching discretisation: ``k`` indexes ``N``
equally spaced sigmas ``k / (N - 1)`` with ``N = num_train_timesteps``. It is not the DDPM/VP
``alpha_bar`` table, which describes a different noising process.

Every function accepts a Python float or a tensor and returns the same kind; out-of-range values
raise ``ValueError`` rather than being clipped.

Example:
    >>> import torch
    >>> t = torch.tensor([0.0, 0.25, 1.0])
    >>> t_to_sigma(t)
    tensor([1.0000, 0.7500, 0.0000])
    >>> t_to_timestep(t)
    tensor([1000.,  750.,    0.])
    >>> t_to_discrete(t)
    tensor([999, 749,   0])
    >>> discrete_to_t(t_to_discrete(t))
    tensor([0.0000, 0.2503, 1.0000])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "TIME_CONVENTIONS",
    "TimeConvention",
    "affine_time",
    "check_time_convention",
    "register_time_convention",
    "time_convention_names",
    "time_transform",
    "t_to_sigma",
    "sigma_to_t",
    "t_to_timestep",
    "timestep_to_t",
    "t_to_discrete",
    "discrete_to_t",
]

T = TypeVar("T", float, Tensor)


def _check_range(value: float | Tensor, low: float, high: float, name: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() and (bool((value < low).any()) or bool((value > high).any()) or bool(value.isnan().any())):
            raise ValueError(
                f"{name} must lie in [{low}, {high}]; got values in "
                f"[{float(value.min())}, {float(value.max())}]"
            )
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not low <= float(value) <= high:  # NaN fails this too
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _check_num(num_train_timesteps: int) -> int:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    return num_train_timesteps


def _one_minus(value: T, name: str) -> T:
    _check_range(value, 0.0, 1.0, name)
    return 1 - value


def t_to_sigma(t: T) -> T:
    """Flow time ``t`` (0 = noise) to diffusers' ``sigma = 1 - t`` (1 = noise); :func:`sigma_to_t` inverts it.

    Example:
        >>> t_to_sigma(0.25), sigma_to_t(t_to_sigma(0.25))
        (0.75, 0.25)
    """
    return _one_minus(t, "t")


def sigma_to_t(sigma: T) -> T:
    """Diffusers' ``sigma`` (1 = noise) to flow time ``t = 1 - sigma`` (the inverse of :func:`t_to_sigma`)."""
    return _one_minus(sigma, "sigma")


def t_to_timestep(t: T, num_train_timesteps: int = 1000) -> T:
    """Flow time to the continuous ``timestep = num_train_timesteps * sigma`` of SD3/Flux.

    This is what diffusers' ``FlowMatchEulerDiscreteScheduler`` passes to SD3 and Flux
    transformers (Flux divides it by 1000 again inside the pipeline).

    Example:
        >>> t_to_timestep(0.1)
        900.0
    """
    _check_num(num_train_timesteps)
    return t_to_sigma(t) * num_train_timesteps


def timestep_to_t(timestep: T, num_train_timesteps: int = 1000) -> T:
    """Inverse of :func:`t_to_timestep`: ``t = 1 - timestep / num_train_timesteps``.

    Example:
        >>> timestep_to_t(750.0)
        0.25
    """
    _check_num(num_train_timesteps)
    _check_range(timestep, 0.0, float(num_train_timesteps), "timestep")
    return 1 - timestep / num_train_timesteps


def t_to_discrete(t: float | Tensor, num_train_timesteps: int = 1000) -> int | Tensor:
    """Flow time to an integer timestep ``k = round((N - 1) * (1 - t))``; noise is ``N - 1``, data ``0``.

    Returns an ``int`` for a float input and a ``torch.long`` tensor for a tensor input.
    ``discrete_to_t(t_to_discrete(t))`` is within ``0.5 / (N - 1)`` of ``t``.

    Example:
        >>> t_to_discrete(0.0), t_to_discrete(1.0), t_to_discrete(0.5)
        (999, 0, 500)
    """
    n = _check_num(num_train_timesteps)
    if isinstance(t, Tensor):
        # float64 so that round-tripping discrete_to_t(k) gives back k exactly for every k < 2**24.
        return torch.round(t_to_sigma(t).double() * (n - 1)).long()
    # Python's round() and torch.round() both round half to even, so floats and tensors agree.
    return int(round(t_to_sigma(t) * (n - 1)))


def discrete_to_t(k: int | float | Tensor, num_train_timesteps: int = 1000) -> float | Tensor:
    """Integer timestep ``k`` in ``[0, N - 1]`` to flow time ``t = 1 - k / (N - 1)``.

    A tensor input gives a float32 tensor (float64 if ``k`` is float64).

    Example:
        >>> discrete_to_t(999), discrete_to_t(0)
        (0.0, 1.0)
    """
    n = _check_num(num_train_timesteps)
    if isinstance(k, Tensor):
        if torch.is_floating_point(k) and not bool((k == torch.round(k)).all()):
            raise ValueError("discrete timesteps must be whole numbers")
        _check_range(k, 0, n - 1, "k")
        dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        return (1 - k.double() / (n - 1)).to(dtype)
    if isinstance(k, float) and k.is_integer():  # a whole float such as 999.0 is accepted
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int or a tensor, got {k!r}")
    _check_range(k, 0, n - 1, "k")
    return 1 - k / (n - 1)


def affine_time(t: Tensor, a: float, b: float) -> Tensor:
    """``a + b t``: the model-input time of an affine named convention."""
    return a + b * t


#: The affine conventions, as ``(a, b)`` in ``a + b t`` (each takes a ``scale`` parameter too).
#: ``"discrete"`` stays continuous here (differentiable, equal to :func:`t_to_discrete` at the grid
#: points before rounding); :func:`t_to_discrete` rounds for code that indexes a table.
TIME_CONVENTIONS: dict[str, tuple[float, float]] = {
    "unit": (0.0, 1.0),  # SiT and LightningDiT (SiT's transport): the embedder sees t itself, 1 = data
    "x1000": (0.0, 1000.0),  # dfm_ext.DiT / VideoDiT (declared): t * 1000, 1000 = data
    "sigma": (1.0, -1.0),  # diffusers sigma = 1 - t
    "timestep": (1000.0, -1000.0),  # SD3/Flux continuous timestep 1000 * (1 - t)
    "discrete": (999.0, -999.0),  # DiT integer diffusion time (continuous, not rounded): 999 * (1 - t)
}


@dataclass(frozen=True)
class _Kind:
    fn: Callable[..., Tensor]  # fn(t, grid, **params)
    defaults: Mapping[str, Any]
    grid_unless: str | None  # the map needs the token grid while this parameter is None
    doc: str


_KINDS: dict[str, _Kind] = {}


def register_time_convention(
    name: str,
    fn: Callable[..., Tensor],
    *,
    defaults: Mapping[str, Any],
    needs_grid_unless: str | None = None,
    doc: str = "",
) -> None:
    """Add a named time convention: ``fn(t, grid, **params)`` maps paper time ``t [B]`` to a model's time input.

    ``defaults`` names every parameter with its default (JSON scalars: numbers, strings, ``None``).
    ``needs_grid_unless``: the parameter that, while ``None``, makes the map read the token grid
    (``grid``, a tuple of ints; e.g. a resolution-dependent shift), or ``None`` for maps that never
    do. ``fn`` must be importable from the module that registers it: a model holding a
    :class:`TimeConvention` pickles its name and parameters, and the registering module must be
    imported before such a model (or a saved ``dfm_config.json``) is loaded.

    Raises:
        ValueError: ``name`` is taken or not an identifier-like string.
    """
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or name in _KINDS:
        raise ValueError(f"time convention name {name!r} is taken or not a plain identifier")
    if needs_grid_unless is not None and needs_grid_unless not in defaults:
        raise ValueError(f"needs_grid_unless={needs_grid_unless!r} is not one of the parameters {sorted(defaults)}")
    _KINDS[name] = _Kind(fn, dict(defaults), needs_grid_unless, doc)


def time_convention_names() -> list[str]:
    """Every registered time convention name, sorted."""
    return sorted(_KINDS)


def _affine_kind(t: Tensor, grid: Any, *, a: float, b: float, scale: float) -> Tensor:
    del grid  # affine conventions do not depend on the resolution
    if scale == 1.0:
        return affine_time(t, a, b)
    return affine_time(t, a * scale, b * scale)


def _unshifted_timestep(
    t: Tensor, grid: Sequence[int] | None, *, shift: str, base_seq_len: float, base_shift: float, max_shift: float,
    mu: float | None, scale: float,
) -> Tensor:  # fmt: skip
    # The model reads the *unshifted* s while its noise level is sigma = m / (m + 1/s - 1), with
    # m = mu ("linear" shift) or exp(mu) ("exponential"); inverted: s = sigma / (sigma + m (1 - sigma)).
    if mu is None:
        mu = math.sqrt(math.prod(int(g) for g in grid or ()) / base_seq_len) * max_shift + base_shift
    m = mu if shift == "linear" else math.exp(mu)
    sigma = 1 - t
    return scale * sigma / (sigma + m * t)


for _name, (_a, _b) in TIME_CONVENTIONS.items():
    register_time_convention(
        _name, functools.partial(_affine_kind, a=_a, b=_b), defaults={"scale": 1.0},
        doc=f"{_a:g} + {_b:g} t, times scale",
    )  # fmt: skip
register_time_convention(
    "shifted_timestep", _unshifted_timestep,
    defaults={"shift": "linear", "base_seq_len": 256.0, "base_shift": 0.25, "max_shift": 0.75, "mu": None, "scale": 1000.0},
    needs_grid_unless="mu",
    doc="scale * s where the noise level sigma = 1 - t is the resolution-shifted s (CogView4: "
    "mu = max_shift sqrt(tokens / base_seq_len) + base_shift, sigma = mu / (mu + 1/s - 1))",
)  # fmt: skip


def _choices() -> str:
    return (
        f"choose one of {time_convention_names()} "
        '("discrete": facebookresearch DiT, "unit": SiT / LightningDiT, "x1000": dfm_ext.DiT, '
        '"timestep": SD3 / Flux, "sigma": 1 - t, "shifted_timestep": CogView4), or a '
        'TimeConvention(name, **params) such as TimeConvention("timestep", scale=0.5)'
    )


def _check_param(kind_name: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"time convention {kind_name!r}: {key} must be a string, got {value!r}")
        return value
    if value is None:
        if default is not None:
            raise ValueError(f"time convention {kind_name!r}: {key} must be a number, got None")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"time convention {kind_name!r}: {key} must be a finite number, got {value!r}")
    if key == "scale" and not float(value) > 0:
        raise ValueError(f"time scale must be a finite positive number, got {value!r}")
    return float(value)


class TimeConvention:
    """A named, parameterised map from paper time ``t`` (0 = noise, 1 = data) to a model's time input.

    ``TimeConvention("timestep")`` is ``1000 (1 - t)``; ``TimeConvention("timestep", scale=0.5)``
    is ``500 (1 - t)`` (Sana's ``timestep_scale``); ``TimeConvention("shifted_timestep")`` is
    CogView4's resolution-dependent map, which reads the token grid: ``convention(t, grid)``.
    The named kinds are :func:`time_convention_names` (add one with
    :func:`register_time_convention`). An instance holds only its name and parameters, so a
    model holding one pickles (``torch.save(model)``), and :meth:`to_config` is JSON
    (``save_pretrained`` records it, ``load_wrapped`` rebuilds it).

    Args:
        name: a registered kind.
        **params: its parameters (those equal to the default are dropped).

    Raises:
        ValueError: unknown name (the message lists them), unknown parameter, or a bad value.

    Example:
        >>> import torch
        >>> TimeConvention("timestep", scale=0.5)(torch.tensor([0.0, 1.0]))
        tensor([500.,   0.])
        >>> tc = TimeConvention("shifted_timestep")
        >>> tc.needs_grid, round(float(tc(torch.tensor([0.5]), grid=(64, 64))[0]), 1)  # 1024 px: mu = 3.25
        (True, 235.3)
        >>> TimeConvention.from_config(tc.to_config()) == tc
        True
    """

    __slots__ = ("name", "params")

    def __init__(self, name: str, **params: Any) -> None:
        kind = _KINDS.get(name) if isinstance(name, str) else None
        if kind is None:
            raise ValueError(f"unknown time_convention {name!r}; {_choices()}")
        unknown = sorted(set(params) - set(kind.defaults))
        if unknown:
            raise ValueError(f"time convention {name!r} takes the parameters {sorted(kind.defaults)}, not {unknown}")
        checked = {k: _check_param(name, k, v, kind.defaults[k]) for k, v in params.items()}
        self.name: str = name
        self.params: dict[str, Any] = {k: v for k, v in sorted(checked.items()) if v != kind.defaults[k]}

    @property
    def needs_grid(self) -> bool:
        """Whether the map reads the token grid (``__call__`` then needs ``grid``)."""
        key = _KINDS[self.name].grid_unless
        return key is not None and self.param(key) is None

    def param(self, key: str) -> Any:
        """A parameter's value (its default when not given)."""
        return self.params.get(key, _KINDS[self.name].defaults[key])

    def scaled(self, scale: float) -> TimeConvention:
        """The same map times ``scale`` (for kinds with a ``scale`` parameter)."""
        if "scale" not in _KINDS[self.name].defaults:
            raise ValueError(f"time convention {self.name!r} has no scale parameter")
        return TimeConvention(self.name, **{**self.params, "scale": self.param("scale") * float(scale)})

    def __call__(self, t: Tensor, grid: Sequence[int] | None = None) -> Tensor:
        """``t [B]`` (paper time) -> the model's time input ``[B]``; ``grid`` (the token grid) where :attr:`needs_grid`."""
        if grid is None and self.needs_grid:
            raise ValueError(f"time convention {self!r} depends on the token grid; call it with grid=(Gh, Gw)")
        kind = _KINDS[self.name]
        return kind.fn(t, grid, **{**kind.defaults, **self.params})

    def to_config(self) -> str | dict[str, Any]:
        """The name alone when every parameter is at its default, else ``{"name": ..., **params}`` (JSON)."""
        return self.name if not self.params else {"name": self.name, **self.params}

    @classmethod
    def from_config(cls, value: str | Mapping[str, Any] | TimeConvention) -> TimeConvention:
        """Rebuild from :meth:`to_config` (a name or a mapping with ``"name"``), or pass an instance through."""
        if isinstance(value, TimeConvention):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            return cls(value["name"], **{k: v for k, v in value.items() if k != "name"})
        raise ValueError(f"unknown time_convention {value!r}; {_choices()}")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str) and not self.params:
            return other == self.name
        return isinstance(other, TimeConvention) and (self.name, self.params) == (other.name, other.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.params.items())))

    def __repr__(self) -> str:
        return f"TimeConvention({', '.join([repr(self.name), *(f'{k}={v!r}' for k, v in self.params.items())])})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.name, self.params))


def _rebuild(name: str, params: dict[str, Any]) -> TimeConvention:
    return TimeConvention(name, **params)


def check_time_convention(value: Any, *, allow_none: bool = False) -> str | dict[str, Any] | None:
    """``value`` (a name, a ``{"name": ..., **params}`` mapping or a :class:`TimeConvention`) in its JSON
    form (the name alone when no parameter differs from the default), or ``None`` where allowed.

    Raises:
        ValueError: unknown convention (the message lists them) or bad parameters.
    """
    if value is None and allow_none:
        return None
    return TimeConvention.from_config(value).to_config()


def time_transform(name: str | Mapping[str, Any] | TimeConvention, scale: float = 1.0) -> TimeConvention:
    """The map from paper time ``t`` (0 = noise, 1 = data) to a model's time input, times ``scale``.

    ``"unit"``: ``t``; ``"x1000"``: ``1000 t``; ``"sigma"``: ``1 - t``; ``"timestep"``:
    ``1000 (1 - t)``; ``"discrete"``: ``999 (1 - t)`` (DiT's integer time, left continuous so
    it stays differentiable and exact at the grid points); ``"shifted_timestep"``: CogView4's
    resolution-dependent map (see :class:`TimeConvention`). ``scale`` multiplies the result (e.g.
    Sana's ``timestep_scale``: ``"timestep"`` with ``scale=0.5`` is ``500 (1 - t)``).

    The result is a :class:`TimeConvention`: a model holding it pickles (``torch.save(model)``).

    Raises:
        ValueError: unknown convention (the message lists them), or ``scale`` is not a finite
            positive number.

    Example:
        >>> import torch
        >>> time_transform("discrete")(torch.tensor([0.0, 1.0]))
        tensor([999.,   0.])
        >>> time_transform("sigma", scale=1000.0)(torch.tensor([0.25]))
        tensor([750.])
    """
    convention = TimeConvention.from_config(name)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < float(scale) < float("inf"):
        raise ValueError(f"time scale must be a finite positive number, got {scale!r}")
    return convention if scale == 1 else convention.scaled(scale)
