"""``benchmarks/gpu_check.py``: the CPU smoke run (``--cpu --quick``) and the no-CUDA exit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
ARMS = ("base_eager", "wrapped_eager", "base_compiled", "wrapped_compiled")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


def test_cpu_quick_run_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    res = _run("--cpu", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["ran"] is True and d["quick"] is True and d["device"] == "cpu" and d["ok"] is True
    recipe = d["recipe"]
    assert recipe["ok"] and recipe["returncode"] == 0 and recipe["finite"]
    assert "train.compile=true" in recipe["overrides"]
    assert len(recipe["losses"]) == recipe["steps_logged"] == 2 and all(math.isfinite(x) for x in recipe["losses"])
    tp = d["throughput"]
    assert tp["ok"] and sorted(tp["arms"]) == sorted(ARMS)
    for name in ARMS:
        arm = tp["arms"][name]
        assert arm["ms_per_step"] > 0 and arm["samples_per_s"] > 0 and arm["losses_finite"], (name, arm)
        assert arm["compiled"] is name.endswith("compiled")
    assert tp["arms"]["wrapped_eager"]["params"] > tp["arms"]["base_eager"]["params"]  # per-stage layers
    r = tp["ratios"]
    expected = tp["arms"]["wrapped_eager"]["ms_per_step"] / tp["arms"]["base_eager"]["ms_per_step"]
    assert r["wrapped/base time (eager)"] == pytest.approx(expected, rel=1e-3)
    assert r["compiled/eager time (wrapped)"] > 0
    assert r["wrapped/base peak memory (eager)"] is None  # CUDA-only measurement
    assert "skipped" in d["fsdp2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = _run("--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], res.stdout
    d = json.loads(out.read_text())
    assert d["cuda"] is False and d["ran"] is False
    assert not any(k in d for k in ("recipe", "throughput"))
