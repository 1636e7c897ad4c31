"""The engine's training step under the host-sync detector: every ``Trainer._step`` of a recipe run counted.

:func:`counting_steps` patches ``Trainer._step`` so each step runs inside :func:`_host_sync.count_host_reads`
(the library's value checks on their accelerator route, value reads counted) and records
``(step, reads)``; log, checkpoint and evaluation work happens outside ``_step`` (at check steps) and
is not counted. Run as a module (``python -m _engine_sync OUT -- RECIPE ARGS``, under two ranks) it
trains the ImageNet recipe with ``RECIPE ARGS`` and each rank writes ``OUT.<rank>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator

import pytest

from _host_sync import count_host_reads
from dfm_ext.recipes.engine.trainer import Trainer


@contextlib.contextmanager
def counting_steps() -> Iterator[list[tuple[int, list[tuple[str, str]]]]]:
    """Within the block every ``Trainer._step`` is counted: a list of ``(step, [(read, where), ...])``."""
    steps: list[tuple[int, list[tuple[str, str]]]] = []
    real = Trainer._step

    def counted(self: Trainer, run) -> None:  # noqa: ANN001
        patch = pytest.MonkeyPatch()  # undone after the step: the detector's patches do not pile up
        try:
            with count_host_reads(patch) as reads:
                real(self, run)
        finally:
            patch.undo()
        steps.append((run.counters.step + 1, list(reads.found)))

    Trainer._step = counted  # type: ignore[method-assign]
    try:
        yield steps
    finally:
        Trainer._step = real  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    from dfm_ext.recipes.imagenet.task import main as imagenet_main

    out, args = argv[0], argv[argv.index("--") + 1 :]
    with counting_steps() as steps:
        status = imagenet_main(args)
    with open(f"{out}.{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump({"status": status, "steps": steps}, f)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
