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
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "TIME_CONVENTIONS",
    "affine_time",
    "check_time_convention",
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
    """``a + b t``: the model-input time of a named convention (picklable through ``functools.partial``)."""
    return a + b * t


#: Named maps from flow time ``t`` to a model's time input, as ``(a, b)`` in ``a + b t``.
#: ``"discrete"`` stays continuous here (differentiable, equal to :func:`t_to_discrete` at the grid
#: points before rounding); :func:`t_to_discrete` rounds for code that indexes a table.
TIME_CONVENTIONS: dict[str, tuple[float, float]] = {
    "unit": (0.0, 1.0),  # SiT and LightningDiT (SiT's transport): the embedder sees t itself, 1 = data
    "x1000": (0.0, 1000.0),  # dfm_ext.DiT / VideoDiT (declared): t * 1000, 1000 = data
    "sigma": (1.0, -1.0),  # diffusers sigma = 1 - t
    "timestep": (1000.0, -1000.0),  # SD3/Flux continuous timestep 1000 * (1 - t)
    "discrete": (999.0, -999.0),  # DiT integer diffusion time (continuous, not rounded): 999 * (1 - t)
}


def check_time_convention(name: Any, *, allow_none: bool = False) -> str | None:
    """``name`` if it is a known time convention (or ``None`` where allowed); else ``ValueError`` listing them."""
    if name is None and allow_none:
        return None
    if not isinstance(name, str) or name not in TIME_CONVENTIONS:
        raise ValueError(
            f"unknown time_convention {name!r}; choose one of {sorted(TIME_CONVENTIONS)} "
            '("discrete": facebookresearch DiT, "unit": SiT / LightningDiT, "x1000": dfm_ext.DiT, '
            '"timestep": SD3 / Flux, "sigma": 1 - t)'
        )
    return name


def time_transform(name: str, scale: float = 1.0) -> Callable[[Tensor], Tensor]:
    """A named map from paper time ``t`` (0 = noise, 1 = data) to a model's time input, times ``scale``.

    ``"unit"``: ``t``; ``"x1000"``: ``1000 t``; ``"sigma"``: ``1 - t``; ``"timestep"``:
    ``1000 (1 - t)``; ``"discrete"``: ``999 (1 - t)`` (DiT's integer time, left continuous so
    it stays differentiable and exact at the grid points). ``scale`` multiplies the result (e.g.
    Sana's ``timestep_scale``: ``"timestep"`` with ``scale=0.5`` is ``500 (1 - t)``).

    The result is a :func:`functools.partial` of the module-level :func:`affine_time`, so a
    model holding it pickles (``torch.save(model)``), unlike a lambda.

    Raises:
        ValueError: ``name`` is unknown (the message lists the conventions), or ``scale`` is not
            a finite positive number.

    Example:
        >>> import torch
        >>> time_transform("discrete")(torch.tensor([0.0, 1.0]))
        tensor([999.,   0.])
        >>> time_transform("sigma", scale=1000.0)(torch.tensor([0.25]))
        tensor([750.])
    """
    check_time_convention(name)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < float(scale) < float("inf"):
        raise ValueError(f"time scale must be a finite positive number, got {scale!r}")
    a, b = TIME_CONVENTIONS[name]
    if scale == 1:
        return functools.partial(affine_time, a=a, b=b)
    return functools.partial(affine_time, a=a * float(scale), b=b * float(scale))
