"""The largest batch that fits: doubling, then bisection on out-of-memory, bounded in tries and time (``gpu_check.py`` part 2).

:func:`largest_fitting` only needs ``attempt(batch) -> {"fits": bool, ...}`` and assumes that
fitting is monotone in the batch. :func:`oom_safe` turns a training step into such an attempt:
``torch.cuda.OutOfMemoryError`` (and the allocator failures cuBLAS reports as ``RuntimeError``) is
caught, recorded, and the memory it held is released (``gc`` and ``torch.cuda.empty_cache``) before
the next try. On the CPU a :class:`FakeMemoryLimit` raises a real ``torch.cuda.OutOfMemoryError``
when a byte estimate passes a chosen limit, so that the same path is exercised without a GPU.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FakeMemoryLimit", "is_oom", "largest_fitting", "oom_safe"]

#: RuntimeError texts that mean the allocator ran out (cuBLAS and cuDNN report it in their own words).
_OOM_TEXTS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` says the device ran out of memory."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXTS))


def oom_safe(step: Callable[[int], dict[str, Any]], cleanup: Callable[[], None] | None = None) -> Callable[[int], dict[str, Any]]:
    """``attempt(batch)``: ``{"fits": True, **step(batch)}``, or ``{"fits": False, "error": ...}`` after an OOM
    (``cleanup()`` first, e.g. the optimiser's ``zero_grad(set_to_none=True)``; then ``gc`` and the CUDA cache)."""

    def attempt(batch: int) -> dict[str, Any]:
        error = None
        try:
            rec = step(batch)
        except Exception as e:  # noqa: BLE001 - anything but an OOM is re-raised below
            if not is_oom(e):
                raise
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        # Outside the except block: the exception and the frames (tensors) it held are gone.
        if error is None:
            return {"fits": True, **rec}
        if cleanup is not None:
            cleanup()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"fits": False, "error": error}

    return attempt


def largest_fitting(
    attempt: Callable[[int], dict[str, Any]], *, start: int, limit: int, resolution: int = 1, relative: float = 0.0,
    max_tries: int = 24, deadline: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The largest batch in ``[1, limit]`` that ``attempt`` fits: double from ``start`` until a try fails
    (or ``limit`` fits), then bisect between the last fit and the first failure until they are at most
    ``max(resolution, relative * fit)`` apart.

    Returns ``largest`` (0 when not even 1 fits), ``first_failure`` (the smallest batch seen to fail; ``None``
    when none did), ``tries`` (each attempt's record with its ``batch``, in order) and ``bounded``: ``None``,
    or why the search stopped early (``max_tries``, the ``deadline`` of ``time.perf_counter()``) or that
    ``limit`` fit, so the true largest may be above it.

    Example:
        >>> r = largest_fitting(lambda b: {"fits": b <= 13}, start=2, limit=64)
        >>> r["largest"], r["first_failure"], [t["batch"] for t in r["tries"]]
        (13, 14, [2, 4, 8, 16, 12, 14, 13])
    """
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    tries: list[dict[str, Any]] = []
    lo, hi = 0, None  # largest fit, smallest failure
    bounded = None

    def run(b: int) -> bool:
        rec = {"batch": b, **attempt(b)}
        tries.append(rec)
        return bool(rec["fits"])

    def stop() -> str | None:
        if len(tries) >= max_tries:
            return f"max_tries ({max_tries})"
        if deadline is not None and time.perf_counter() >= deadline:
            return "time budget"
        return None

    b = start
    while True:  # doubling
        if run(b):
            lo = b
            if b >= limit:
                bounded = f"the search limit {limit} fits"
                break
            if (bounded := stop()) is not None:
                break
            b = min(2 * b, limit)
        else:
            hi = b
            break
    while hi is not None and bounded is None:  # bisection
        gap = max(resolution, int(relative * lo))
        if hi - lo <= gap:
            break
        if (bounded := stop()) is not None:
            break
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return {"largest": lo, "first_failure": hi, "tries": tries, "bounded": bounded}


@dataclass(frozen=True)
class FakeMemoryLimit:
    """A stand-in for the GPU allocator on the CPU: ``static + batch * per_sample`` bytes against ``limit`` bytes.

    ``check(batch)`` raises ``torch.cuda.OutOfMemoryError`` when the estimate passes the limit; the
    largest batch under it is ``(limit - static) // per_sample``.
    """

    static: int
    per_sample: int
    limit: int

    def bytes(self, batch: int) -> int:
        return self.static + batch * self.per_sample

    def largest(self) -> int:
        return max(0, (self.limit - self.static) // self.per_sample)

    def check(self, batch: int) -> None:
        if self.bytes(batch) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"fake limit: batch {batch} needs {self.bytes(batch)} bytes of {self.limit}")
