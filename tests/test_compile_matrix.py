"""Every documented ``train.compile`` combination compiles: {checkpointing} x {specialize none, lora, full} x
{DDP, FSDP2 on 2 CPU ranks} x {fp32, bf16} x {the reference DiT, tiny FLUX over 3 bucket shapes}.

Built and compiled as the engine does (``compile_model``: the whole model under DDP, each block under
FSDP2; tests/_compile_matrix.py) on the ``eager`` backend (dynamo's tracing: graph breaks, recompiles,
guards), with ``aot_eager`` (AOTAutograd's forward and backward graphs) where the crash was
(checkpointing + per-stage LoRA). Each run's losses and gradient norms equal the eager model's, no
graph breaks, a new stage mix never recompiles, and FLUX compiles each new bucket shape once (the
earlier shapes' graphs stay valid) and reuses it. Here: every DiT combination, DDP in this process (a
world of one: DDP wraps the module compiled the same way for any world size) and FSDP2 on two gloo
ranks in one launch (which also runs FLUX over its buckets, HSDP's (2, 1) mesh, FSDP2 accumulation and
DDP evaluation's batch split), and FLUX compiled whole over its buckets. FLUX compiles slowly on this
CPU (~5-20 s a graph), so every FLUX combination runs in ``benchmarks/compile_matrix.py`` (all 48
combinations, three buckets each, with the CPU compiled/eager step ratio: docs/results/training.md),
whose record the last test checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _compile_matrix import FLUX_SHAPES, FSDP2_MATRIX, Combo, matrix, run, steps_for
from _launch import free_port

HERE = Path(__file__).resolve().parent
DDP_HERE = [c for c in matrix("ddp") if c.family == "dit"]


def _check(combo: Combo, eager: dict, compiled: dict, buckets: bool) -> None:
    tol = dict(rel=1e-4, abs=1e-5) if combo.dtype == "fp32" else dict(rel=2e-2, abs=2e-2)
    assert compiled["losses"] == pytest.approx(eager["losses"], **tol), combo.name
    assert compiled["grad_norms"] == pytest.approx(eager["grad_norms"], **tol), combo.name
    assert compiled["graph_breaks"] == 0, combo.name
    graphs = compiled["graphs_after_step"]
    assert graphs[0] >= 1, f"{combo.name}: nothing compiled"
    if combo.family == "flux" and buckets:  # new buckets compile (a graph per shape, or dynamic shapes), a repeat reuses
        n = len(FLUX_SHAPES)
        assert graphs[n - 1] > graphs[0] and graphs[-1] == graphs[n - 1], (combo.name, graphs)
    else:  # the second step's new stage mix recompiles nothing
        assert graphs[-1] == graphs[0], (combo.name, graphs)


@pytest.mark.parametrize("combo", DDP_HERE, ids=lambda c: c.name)
def test_ddp_combination_compiles(combo: Combo) -> None:
    _check(combo, run(combo, None, 2), run(combo, "eager", 2), False)


def test_checkpointing_with_per_stage_lora_compiles_through_aot_autograd() -> None:
    """The combination that crashed (a context_fn under compile): forward and backward graphs."""
    combo = Combo("dit", "lora", True, "fp32")
    _check(combo, run(combo, None, 2), run(combo, "aot_eager", 2), False)


def test_flux_buckets_compile_whole_model() -> None:
    """FLUX with checkpointing and per-stage LoRA, compiled whole (DDP) over its three buckets and back: one
    graph per new bucket (the earlier ones are not recompiled), the repeat reuses its graph."""
    combo = Combo("flux", "lora", True, "fp32")
    steps = steps_for(combo, True)
    _check(combo, run(combo, None, steps), run(combo, "eager", steps), True)


def test_the_recorded_matrix_covers_every_combination() -> None:
    """benchmarks/results/compile_matrix.json: every combination of both parallelisms compiled, FLUX over its buckets,
    losses equal to eager, no graph break (what the docs' results page shows)."""
    record = json.loads((HERE.parent / "benchmarks" / "results" / "compile_matrix.json").read_text())
    rows = {r["combo"]: r for r in record["results"]}
    assert set(rows) == {c.name for c in matrix("ddp") + matrix("fsdp2")}
    for name, r in rows.items():
        assert r["graph_breaks"] == 0 and r["losses_match"] and r["reused_after_buckets"], name


def test_fsdp2_combinations_compile_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "fsdp2.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "_compile_matrix.py"), str(out)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    record = json.loads(out.read_text())
    results = record["matrix"]
    assert len(results) == len(FSDP2_MATRIX)
    for (combo, buckets), r in zip(FSDP2_MATRIX, results):
        _check(combo, r["eager"], r["compiled"], buckets)
    # HSDP with two replicas of one shard ((2, 1) mesh) trains as the (2,)-mesh FSDP2 does
    lora = results[[c.name for c, _ in FSDP2_MATRIX].index("fsdp2/dit/lora/fp32")]["compiled"]
    _check(Combo("dit", "lora", False, "fp32", "fsdp2"), lora, record["hsdp_2x1"], False)
    # and, in the same launch: gradient accumulation reduce-scattering every micro-batch (the default) gives the
    # gradients of one reduce-scatter at the end; DDP evaluation's BatchSplit (uneven, and fewer samples than
    # ranks) gives the whole batch's outputs
    assert record["accumulation_max_diff"] < 1e-6 and record["batch_split_max_diff"] < 1e-6, record
