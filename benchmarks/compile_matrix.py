"""Every ``train.compile`` combination, compiled against eager: graphs, graph breaks, losses, CPU step-time ratio.

The combinations of ``tests/_compile_matrix.py`` (reference DiT and tiny FLUX over three aspect-ratio
buckets x none / per-stage LoRA / per-stage full x checkpointing x fp32 / bf16 autocast, under DDP (in
this process: the model compiled whole) and FSDP2 (two gloo ranks under ``torchrun``: each block
compiled, bf16 with the engine's ``MixedPrecisionPolicy``)), each trained a few steps eager and
compiled with ``--backend`` from the same initial weights: FLUX through its three buckets and back. Per
combination: whether the losses match (fp32 1e-4 relative, bf16 2e-2), the graphs compiled and the
graph breaks, whether the repeated bucket reused its graph, and the median step time of ``--time-steps``
further steps compiled / eager. Resumable: ``benchmarks/results/compile_matrix.json`` is rewritten after
every combination and finished ones are skipped. Usage::

    python benchmarks/compile_matrix.py                       # aot_eager, both parallelisms
    python benchmarks/compile_matrix.py --backend inductor --out benchmarks/results/compile_matrix_inductor.json --only ddp/dit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _compile_matrix import FLUX_SHAPES, Combo, matrix, run  # noqa: E402

from dfm_ext.fileio import atomic_write_text  # noqa: E402


def one(combo: Combo, backend: str, time_steps: int) -> dict:
    steps = len(FLUX_SHAPES) + 1 if combo.family == "flux" else 2
    eager = run(combo, None, steps, time_steps=time_steps)
    compiled = run(combo, backend, steps, time_steps=time_steps)
    tol = 1e-4 if combo.dtype == "fp32" else 2e-2
    close = all(abs(a - b) <= tol * max(1.0, abs(a)) for a, b in zip(eager["losses"], compiled["losses"]))
    graphs = compiled["graphs_after_step"]
    return {
        "combo": combo.name, "family": combo.family, "specialize": combo.specialize, "checkpointing": combo.checkpointing,
        "dtype": combo.dtype, "parallel": combo.parallel, "backend": backend, "graphs": graphs[-1],
        "graphs_after_step": graphs, "graph_breaks": compiled["graph_breaks"], "losses_match": close,
        "reused_after_buckets": graphs[-1] == graphs[len(FLUX_SHAPES) - 1] if combo.family == "flux" else graphs[-1] == graphs[0],
        "eager_step_s": eager["median_step_s"], "compiled_step_s": compiled["median_step_s"],
        "ratio": compiled["median_step_s"] / eager["median_step_s"],
    }  # fmt: skip


def load(out: Path) -> dict:
    return json.loads(out.read_text()) if out.is_file() else {"results": []}


def save(out: Path, record: dict, args: argparse.Namespace) -> None:
    record["meta"] = {"torch": torch.__version__, "machine": platform.machine(), "threads": 1, "backend": args.backend,
                      "time_steps": args.time_steps,
                      "command": f"python benchmarks/compile_matrix.py --backend {args.backend}" + (f" --only {args.only}" if args.only else "")}  # fmt: skip
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--time-steps", type=int, default=6)
    ap.add_argument("--only", default="", help="run the combinations whose name starts with this")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compile_matrix.json")
    ap.add_argument("--ranks", action="store_true", help=argparse.SUPPRESS)  # inside the two-rank launch
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ranks:  # FSDP2: every rank runs every combination; rank 0 records
        import torch.distributed as dist

        dist.init_process_group("gloo")
        record = load(args.out)
        done = {r["combo"] for r in record["results"]}
        for combo in matrix("fsdp2"):
            if combo.name in done or not combo.name.startswith(args.only or "fsdp2"):
                continue
            row = one(combo, args.backend, args.time_steps)
            if dist.get_rank() == 0:
                record["results"].append(row)
                save(args.out, record, args)
                print(json.dumps(row), file=sys.stderr, flush=True)
        dist.destroy_process_group()
        return 0
    record = load(args.out)
    for combo in matrix("ddp"):
        if combo.name in {r["combo"] for r in record["results"]} or not combo.name.startswith(args.only or "ddp"):
            continue
        record["results"].append(one(combo, args.backend, args.time_steps))
        save(args.out, record, args)
        print(json.dumps(record["results"][-1]), file=sys.stderr, flush=True)
    if not args.only or args.only.startswith("fsdp2"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), __file__, "--ranks",
               "--backend", args.backend, "--time-steps", str(args.time_steps), "--out", str(args.out), "--only", args.only]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
