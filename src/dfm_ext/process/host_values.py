"""Host twins: integer tensors on a device whose values the host already knows, with no read back.

A training step's current stages are drawn on the host (:meth:`~dfm_ext.process.timesteps.StageTimestepSampler.sample`
with ``stage_generator``) and a sampling step's stage is a Python int: the host knows the values,
the device needs them too. :func:`host_to_device` copies a NumPy array to the device (non-blocking,
from pinned memory on CUDA) and records the array as the device tensor's *host twin*;
:func:`host_twin` gives it back to whoever receives the tensor, e.g. the stage routing of a
specialised model (:mod:`dfm_ext.specialization.routing`), which then knows each stage's sample
count without a device-to-host sync and takes its grouped route.

The twin is attached to the tensor object (a registry keyed by identity, dropped when the tensor
dies): ops that return the same tensor keep it (``.long()`` of a long tensor, ``.to()`` its own
device), any other op gives a tensor without one. Values are read from the twin only outside
``torch.compile`` (a compiled graph routes with device tensors).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import Tensor

__all__ = ["host_to_device", "host_twin", "with_host_twin"]

_TWINS: dict[int, tuple[weakref.ref[Tensor], np.ndarray]] = {}


def with_host_twin(tensor: Tensor, values: np.ndarray) -> Tensor:
    """Record ``values`` (equal to ``tensor``'s, on the host) as ``tensor``'s host twin; returns ``tensor``.

    Raises:
        ValueError: the shapes differ.
    """
    values = np.asarray(values)
    if tuple(values.shape) != tuple(tensor.shape):
        raise ValueError(f"host values of shape {values.shape} for a tensor of shape {tuple(tensor.shape)}")
    if torch.compiler.is_compiling():  # a traced graph never reads the twin (host_twin is None there)
        return tensor
    key = id(tensor)
    if key not in _TWINS:
        weakref.finalize(tensor, _TWINS.pop, key, None)
    _TWINS[key] = (weakref.ref(tensor), values)
    return tensor


def host_twin(tensor: object) -> np.ndarray | None:
    """The host values recorded for ``tensor`` (:func:`with_host_twin`), or ``None``.

    Example:
        >>> import numpy as np, torch
        >>> t = host_to_device(np.array([0, 1, 1]), torch.device("cpu"))
        >>> host_twin(t).tolist(), host_twin(t.long()) is host_twin(t), host_twin(t + 0)
        ([0, 1, 1], True, None)
    """
    if not isinstance(tensor, Tensor) or torch.compiler.is_compiling():
        return None
    entry = _TWINS.get(id(tensor))
    return entry[1] if entry is not None and entry[0]() is tensor else None


def host_to_device(values: np.ndarray, device: torch.device | str, dtype: torch.dtype = torch.long) -> Tensor:
    """``values`` as a ``dtype`` tensor on ``device`` with ``values`` as its host twin.

    The copy is non-blocking from pinned memory on an accelerator (a copy from pageable memory
    would wait for the device); on the CPU the tensor shares nothing with ``values``.
    """
    device = torch.device(device)
    host = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    if device.type == "cpu":
        out = host.clone()
    else:
        out = host.pin_memory().to(device, non_blocking=True)
    return with_host_twin(out, np.asarray(values))
