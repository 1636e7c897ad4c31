"""Host-side milliseconds per training step that grow with the dataset: the batch plan, before and after.

What the training process does on the host for every optimiser step besides launching kernels
(``engine/trainer.py``, ``engine/data.py``): the batch plan's micro-batches for this rank
(``PlanBatchSampler``), the step's generator (``step_generator``) and collating a micro-batch of
latents with labels. Measured at a synthetic dataset of ``--items`` entries (ImageNet's 1.28M by
default, and a small one beside it to show the cost no longer depends on the size), global batch
256 over 8 ranks (32 per rank), with:

* ``before``: ``BatchPlan.global_batch`` as it was until issue 26 (every step drew the whole
  epoch's permutation again: ``O(N)`` per step);
* ``after``: the per-epoch cache (``O(G)`` per step; one ``O(N)`` draw per epoch, reported
  separately as ``epoch_draw_ms`` and amortised into ``mean_ms``).

Both give the same batches (asserted here; ``tests/test_recipes_data.py`` checks it too). Usage::

    python benchmarks/host_overhead.py                  # writes benchmarks/results/host_overhead.json
    python benchmarks/host_overhead.py --steps 50 --before-steps 5 --out /tmp/h.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dfm_ext.fileio import atomic_write_text
from dfm_ext.recipes.engine.data import BatchPlan, collate_items
from dfm_ext.recipes.engine.trainer import step_generator

RESULTS = Path(__file__).resolve().parent / "results"


def global_batch_before(plan: BatchPlan, step: int) -> list[tuple[int, bool]]:
    """``BatchPlan.global_batch`` before the per-epoch cache (verbatim but for the name)."""
    start, n = step * plan.global_batch_size, plan.num_items
    out: list[tuple[int, bool]] = []
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for pos in range(start, start + plan.global_batch_size):
        epoch, offset = divmod(pos, n)
        if epoch not in cache:
            rng = np.random.default_rng([plan.seed, epoch])
            cache[epoch] = rng.permutation(n), rng.integers(0, 2, n).astype(bool) if plan.random_flip else np.zeros(n, bool)
        order, flips = cache[epoch]
        idx = int(order[offset])
        out.append((idx, bool(flips[idx])))
    return out


def micro_batches_before(plan: BatchPlan, step: int) -> list[list[tuple[int, bool]]]:
    batch, b = global_batch_before(plan, step), plan.global_batch_size // (plan.world_size * plan.accumulation)
    return [batch[plan.shard_index(m) * b : (plan.shard_index(m) + 1) * b] for m in range(plan.accumulation)]


def host_step(plan: BatchPlan, step: int, items: list[dict], before: bool) -> None:
    """One step's host work on one rank: its micro-batches' keys, the generator, the collated batch."""
    micro = micro_batches_before(plan, step) if before else plan.micro_batches(step)
    for m, keys in enumerate(micro):
        step_generator(plan.seed, step, plan.shard_index(m))
        collate_items([{**items[i % len(items)], "index": k} for i, (k, _) in enumerate(keys)])


def measure(n: int, steps: int, before: bool, start: int, world: int, batch: int) -> dict[str, float]:
    plan = BatchPlan(n, batch, world_size=world, seed=0, random_flip=True, rank=0)
    items = [{"latents": torch.zeros(4, 32, 32), "label": i % 1000, "bad": []} for i in range(batch // world)]
    epoch = time.perf_counter()
    host_step(plan, start, items, before)  # the first step of a run (after) draws the epoch: timed apart
    first_ms = (time.perf_counter() - epoch) * 1e3
    times = []
    for step in range(start + 1, start + 1 + steps):
        t0 = time.perf_counter()
        host_step(plan, step, items, before)
        times.append((time.perf_counter() - t0) * 1e3)
    steps_per_epoch = n / batch
    median = statistics.median(times)
    out = {"median_ms": median, "max_ms": max(times), "first_step_ms": first_ms, "steps_timed": steps}
    if not before:  # one epoch draw per epoch, amortised over its steps
        out["epoch_draw_ms"] = first_ms - median
        out["mean_ms"] = statistics.fmean(times) + max(0.0, first_ms - median) / steps_per_epoch
    else:
        out["mean_ms"] = statistics.fmean(times)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[1_281_167, 10_000])
    ap.add_argument("--steps", type=int, default=300, help="steps timed after the change")
    ap.add_argument("--before-steps", type=int, default=20, help="steps timed before the change (~55 ms each)")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS / "host_overhead.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for n in args.items:  # the two implementations give the same batches
        plan = BatchPlan(n, args.batch, world_size=args.world, seed=0, random_flip=True, rank=0)
        for step in (0, 1, n // args.batch, n // args.batch + 1):
            assert plan.micro_batches(step) == micro_batches_before(plan, step), (n, step)
    results = {}
    for n in args.items:
        start = (n // args.batch) // 2  # mid-epoch
        results[str(n)] = {
            "before": measure(n, args.before_steps, True, start, args.world, args.batch),
            "after": measure(n, args.steps, False, start, args.world, args.batch),
        }
        print(n, json.dumps(results[str(n)]), file=sys.stderr)
    record = {
        "meta": {"torch": torch.__version__, "numpy": np.__version__, "machine": platform.machine(), "threads": 1,
                 "world_size": args.world, "global_batch": args.batch, "per_rank_batch": args.batch // args.world,
                 "command": "python benchmarks/host_overhead.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:]))},
        "target_ms": 2.0,
        "results": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
