"""Run the ImageNet recipe's command in this process with ``Trainer._step`` wrapped to count host syncs per step.

::

    python benchmarks/_gpu_check_engine.py --record OUT.json [--count-syncs] -- --config tiny key=value ...
    torchrun --nproc_per_node N benchmarks/_gpu_check_engine.py --record OUT.json -- --config tiny ...

The arguments after ``--`` go to ``dfm_ext.recipes.imagenet.task.main``, which is what
``python -m dfm_ext.recipes.imagenet`` runs: the same parsing, checks, data, engine and outputs. The
only difference is the wrapper around :meth:`dfm_ext.recipes.engine.trainer.Trainer._step` (one
training step: the batch from the loader, forward, backward, clipping, the optimiser, the EMA; not the
log / checkpoint / sample work between steps), which records for each step its host time and, with
``--count-syncs`` on a CUDA device, the number of synchronizing CUDA calls: the step runs under
``torch.cuda.set_sync_debug_mode("warn")``, which makes every synchronizing call (``.item()``, a
blocking device-to-host or pageable host-to-device copy, ``cudaStreamSynchronize`` ...) issue a
``UserWarning`` ("called a synchronizing CUDA operation"), caught with ``warnings.catch_warnings(record=True)``.
Warnings raised in autograd's backward threads should be replayed in the calling thread when
``backward`` returns. torch documents the mode as experimental: only syncs that go through c10's
``memcpy_and_sync`` / ``stream_synchronize`` are reported (not ``torch.cuda.synchronize()``, events,
collectives of ``torch.distributed``). So before the first step a calibration counts known syncs (a
``.item()``, a ``.cpu()``, a read inside a backward, a pageable host-to-device copy) and the JSON says
whether the counter saw them (``reliable``: the first three each seen). The engine is not modified (others edit it): this patches the class in this process only.

Each process writes ``OUT.json.rank<R>.json``: ``calibration``, ``steps`` (``step``, ``host_ms``,
``syncs``) and ``sites`` (``file:line`` of the Python frame that made each sync, summed over steps).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SYNC_TEXT = "synchronizing CUDA operation"


@contextlib.contextmanager
def count_syncs(out: list[warnings.WarningMessage]) -> Iterator[None]:
    """Collect the sync warnings raised inside the block into ``out`` (CUDA only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    out.extend(w for w in caught if SYNC_TEXT in str(w.message))
    for w in caught:  # other warnings keep their usual fate
        if SYNC_TEXT not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _ReadInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        return a.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        float(g.sum())  # a host read inside autograd's backward
        return g


def calibrate(device: torch.device) -> dict[str, Any]:
    """Syncs the counter sees for operations known to synchronize (each should be >= 1)."""
    x = torch.ones(8, device=device, requires_grad=True)
    counts: dict[str, int] = {}
    ops = {
        "item": lambda: float(x.detach().sum()),
        "to_cpu": lambda: x.detach().cpu(),
        "read_in_backward": lambda: _ReadInBackward.apply(x).sum().backward(),
        "pageable_to_device": lambda: torch.ones(8).to(device),
    }
    for name, op in ops.items():
        torch.cuda.synchronize(device)
        found: list[warnings.WarningMessage] = []
        with count_syncs(found):
            op()
        counts[name] = len(found)
    return {"counts": counts, "reliable": all(counts[k] >= 1 for k in ("item", "to_cpu", "read_in_backward"))}


def install(count: bool) -> dict[str, Any]:
    """Wrap ``Trainer._step``; returns the record it fills."""
    from dfm_ext.recipes.engine.trainer import Trainer

    if not callable(getattr(Trainer, "_step", None)):
        raise AttributeError("dfm_ext.recipes.engine.trainer.Trainer has no _step(run) any more: update benchmarks/_gpu_check_engine.py")
    record: dict[str, Any] = {"count_syncs": count, "calibration": None, "steps": [], "sites": collections.Counter()}
    original = Trainer._step

    def _step(self: Any, run: Any) -> None:
        device = run.accelerator.device
        if count and record["calibration"] is None:
            record["calibration"] = calibrate(device)
        found: list[warnings.WarningMessage] = []
        started = time.perf_counter()
        with count_syncs(found) if count else contextlib.nullcontext():
            original(self, run)
        host_ms = 1000 * (time.perf_counter() - started)
        record["steps"].append({"step": run.counters.step + 1, "host_ms": round(host_ms, 3), "syncs": len(found) if count else None})
        record["sites"].update(f"{Path(w.filename).name}:{w.lineno}" for w in found)

    Trainer._step = _step  # type: ignore[method-assign]
    return record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, recipe_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, required=True, help="OUT: writes OUT.rank<R>.json")
    parser.add_argument("--count-syncs", action="store_true", help="count synchronizing CUDA calls per step (CUDA only)")
    args = parser.parse_args(ours)
    count = args.count_syncs and torch.cuda.is_available()
    record = install(count)
    from dfm_ext.recipes.imagenet.task import main as recipe_main

    started = time.perf_counter()
    rc = recipe_main(recipe_args)
    record.update(returncode=rc, wall_s=round(time.perf_counter() - started, 2), rank=int(os.environ.get("RANK", "0")))
    record["sites"] = dict(record["sites"].most_common())
    out = Path(f"{args.record}.rank{record['rank']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
