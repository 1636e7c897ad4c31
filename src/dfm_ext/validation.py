"""Value checks that never stall the step: the one rule every module follows.

A check on a tensor's *metadata* (type, dtype, shape, device) reads host state and is always done
at once. A check on its *values* (``t`` in ``[0, 1]``, a stage or class index in range, finite
numbers) has to read the data, and reading data that lives on an accelerator is a device-to-host
synchronisation (``.item()``, ``int(t)``, ``bool(t)``, ``if tensor``) which, inside a training
or sampling step, stalls the device every step and breaks ``torch.compile`` graphs. So
:func:`check_value`:

* **eager mode, CPU tensors** (configs, data loading, CPU training): reads the values and raises
  a ``ValueError`` at once, naming the offending values;
* **accelerator tensors, or while** ``torch.compile`` **traces**: enqueues
  ``torch._assert_async(ok, message)``. It does not sync and does not break the graph (checked by
  ``tests/test_compile.py``); a failure surfaces at the next synchronisation: a ``RuntimeError``
  with ``message`` on the CPU, a device-side assertion on CUDA.

Sequences given as arguments (probabilities, thresholds, scales) are host values: they are checked
by :func:`float_sequence` when the object is built, never in a step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["parse_device", "check_index", "check_value", "float_sequence", "on_host"]


def check_index(value: object, size: int, name: str) -> int:
    """A host int ``value`` in ``[0, size - 1]`` (a stage index, ``preview``'s ``upto``).

    Raises:
        TypeError: ``value`` is not an int (``bool`` is refused).
        ValueError: ``value`` is out of range; the message names ``name``, the range and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < size:
        raise ValueError(f"{name} must be in [0, {size - 1}], got {value}")
    return value


def on_host(*tensors: Tensor) -> bool:
    """Whether values of ``tensors`` can be read without a device sync or a graph break."""
    if torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" for t in tensors)


def check_value(ok: Tensor, message: str, got: Callable[[], Any] | None = None) -> None:
    """Require the bool scalar ``ok``; see the module docstring for when it is read.

    Args:
        ok: 0-dim bool tensor, ``True`` when the values are valid.
        message: what must hold (also the device-side assertion's message).
        got: called only on the host path, after a failure, to show the offending values.

    Raises:
        ValueError: on the host path, when ``ok`` is False: ``"{message}, got {got()}"``.
    """
    if on_host(ok):
        if not bool(ok):
            raise ValueError(message if got is None else f"{message}, got {got()}")
        return
    torch._assert_async(ok, message)


def float_sequence(
    value: object,
    name: str,
    *,
    length: int | None = None,
    finite: bool = True,
) -> tuple[float, ...]:
    """``value`` as a tuple of floats, or a ``TypeError``/``ValueError`` that names ``name``.

    Accepts a list, tuple, 1-D tensor or other iterable of real numbers; rejects strings, bytes,
    a lone scalar and booleans (``probabilities='ab'`` and ``thresholds=0.9`` are mistakes, not
    sequences).

    Example:
        >>> float_sequence([1, 0.5], "w")
        (1.0, 0.5)
        >>> float_sequence(0.9, "thresholds")
        Traceback (most recent call last):
        ...
        TypeError: thresholds must be a sequence of numbers, got 0.9 (float)
    """
    if isinstance(value, Tensor):
        if value.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of numbers, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().cpu().tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {value!r} ({type(value).__name__})")
    items = list(value)
    out = []
    for i, v in enumerate(items):
        if isinstance(v, Tensor) and v.ndim == 0:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a number, got {v!r} ({type(v).__name__}) in {name}={value!r}")
        f = float(v)
        if finite and not math.isfinite(f):
            raise ValueError(f"{name}[{i}] must be finite, got {f} in {name}={value!r}")
        out.append(f)
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(out)}: {tuple(out)}")
    return tuple(out)


def parse_device(device: str | torch.device, *, check_available: bool = True) -> torch.device:
    """``device`` as a :class:`torch.device`, checked to exist in this torch build (one-line errors).

    Raises:
        ValueError: an unknown device string, or (``check_available``) a device this machine or
            torch build does not have (``cuda`` on a CPU-only build, ``cuda:3`` with 2 GPUs, ...).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"unknown device {str(device)!r}: {first}") from None
    if not check_available or dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA GPU"
            raise ValueError(f"device {str(device)!r} is not available: {build}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available on this machine; use --device cpu")
        return dev
    module = getattr(torch, dev.type, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        raise ValueError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    return dev
