"""A host-sync detector for CPU-only machines: count the reads of tensor values a GPU step would stall on.

On an accelerator, reading a tensor's value on the host (``.item()``, ``int(t)``, ``float(t)``,
``bool(t)``, ``if t``, ``t.tolist()``, ``t.numpy()``, ``torch.nonzero``, ``torch.equal``) waits for
every queued kernel. On a CPU nothing waits, so such reads go unnoticed until a GPU run is slow.
:func:`count_host_reads` catches them here:

* a ``TorchDispatchMode`` sees every aten op; the value reads are ``aten._local_scalar_dense``
  (``item``/``int``/``float``/``bool``), ``aten.is_nonzero``, ``aten.nonzero``, ``aten.equal``
  and ``aten.allclose``; ``Tensor.tolist`` and ``Tensor.numpy``, which bypass the dispatcher, are
  wrapped for the duration;
* the library's value checks are made to take their accelerator route (``torch._assert_async``,
  no read) by answering "no" to :func:`dfm_ext.validation.on_host`;
* a read is attributed to the innermost frame of the project (or the package) that made it.
  Reads of host scalars that stay on the host on a GPU as well are not syncs and are skipped:
  the step counters of ``torch.optim`` optimisers (on the CPU unless ``capturable``).

On a GPU the same check is ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dfm_ext.validation

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.equal.default, aten.allclose.default}
SRC = Path(dfm_ext.__file__).resolve().parent
#: Where a read is a host scalar on an accelerator too (not a sync): the optimisers' step counters. Not
#: ``torch/optim/swa_utils.py``: AveragedModel's ``n_averaged`` is a buffer on the model's device.
HOST_SCALARS = ("torch/optim/",)
NOT_HOST_SCALARS = ("torch/optim/swa_utils.py",)


@dataclass
class Reads:
    """The value reads seen: ``(what, where)``, ``where`` the innermost project frame (``file:line function``)."""

    found: list[tuple[str, str]] = field(default_factory=list)
    counting: bool = True

    def __len__(self) -> int:
        return len(self.found)

    def report(self) -> str:
        return "\n".join(f"{what} at {where}" for what, where in self.found)

    def record(self, what: str) -> None:
        if not self.counting:
            return
        stack = traceback.extract_stack()
        frames = [f for f in stack if Path(f.filename).name != "_host_sync.py"]
        recent = [f.filename.replace("\\", "/") for f in frames[-6:]]
        if any(m in name for name in recent for m in HOST_SCALARS) and not any(m in name for name in recent for m in NOT_HOST_SCALARS):
            return
        mine = [f for f in frames if Path(f.filename).resolve().is_relative_to(SRC)]
        callers = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
        f = (mine or callers or frames)[-1]
        self.found.append((what, f"{Path(f.filename).name}:{f.lineno} {f.name}"))


class _Mode(TorchDispatchMode):
    def __init__(self, reads: Reads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in READS:
            self.reads.record(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads(monkeypatch) -> Iterator[Reads]:  # noqa: ANN001
    """Count host reads of tensor values inside the block (``reads.counting`` pauses it)."""
    import sys

    reads = Reads()
    real_on_host = dfm_ext.validation.on_host
    for name, module in list(sys.modules.items()):  # every module that imported the predicate by name
        if name.startswith("dfm_ext") and getattr(module, "on_host", None) is real_on_host:
            monkeypatch.setattr(module, "on_host", lambda *tensors: False)
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, __real=real, __name=name, **k):  # noqa: ANN001
            reads.record(f"Tensor.{__name}")
            return __real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with _Mode(reads):
        yield reads
