"""Two CPU processes under ``accelerate launch`` (gloo), as the recipe tests run them.

``accelerate launch --multi_gpu`` with ``ACCELERATE_USE_CPU=true`` is the only way to get two
real CPU ranks (see FACTS.md). The rendezvous port is picked free just before the launch, so
another launch (pytest-xdist runs several) can still take it in between; that failure, and a rank
aborting in C++ with "terminate called without an active exception" (seen once under heavy load,
not reproduced since; see below), are retried once, with a new port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
_PORT_TAKEN = ("Address already in use", "EADDRINUSE", "errno: 98")
# A rank aborting in C++ ("terminate called without an active exception", exit -6) was seen once
# in a fresh CI-like run under heavy CPU load (per-stage LoRA under DDP, gloo), and not in 4 reruns,
# nor in 8 more (two launches at a time on 2 cores, the per-stage LoRA test's settings). Suspected:
# ranks using different parameter sets per step (a single-stage batch ran only its stage's
# parameters); that is gone at the root (every stage's parameters take part in every step,
# tests/test_specialize.py::test_ddp_without_find_unused_parameters_trains_any_stage_mix), but
# as the abort was never reproduced its cause is not proven, so it is still retried once, never
# a wrong result. (TORCH_DISTRIBUTED_DEBUG=DETAIL cannot help here: with torch 2.13 on gloo CPU
# both ranks segfault in DDP's constructor, in logger.set_construction_data_and_log.)
_ABORTED = ("terminate called without an active exception",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(module: str, args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` ``python -m module *args`` on two gloo CPU ranks; returns the finished process."""
    for _ in range(2):
        cmd = [
            ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", module, *args,
        ]  # fmt: skip
        res = subprocess.run(
            cmd, env={**env, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=timeout, check=False
        )
        if res.returncode == 0 or not any(m in res.stderr for m in _PORT_TAKEN + _ABORTED):
            return res
        print(f"retrying the two-rank launch once: {[m for m in _PORT_TAKEN + _ABORTED if m in res.stderr]}")
    return res


__all__ = ["ACCELERATE", "free_port", "launch_two_cpu_processes"]
