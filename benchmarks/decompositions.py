"""Decompose + recompose time of each decomposition, as a ratio to ``x.clone()`` of the same tensor.

Every repetition times ``x.clone()`` and then each decomposition's ``recompose(decompose(x))``
back to back (interleaved, so load changes on a shared machine hit all of them alike); the ratio
is taken per repetition and the median, min and max over repetitions are reported.

Usage::

    python benchmarks/decompositions.py                      # writes benchmarks/results/decompositions.json
    python benchmarks/decompositions.py --reps 5 --out /tmp/dec.json --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dfm_ext.decompositions.dct import DCTDecomposition
from dfm_ext.decompositions.identity import IdentityDecomposition
from dfm_ext.decompositions.laplacian import LaplacianPyramid
from dfm_ext.decompositions.wavelet import WaveletDecomposition

SHAPES = [(64, 16, 64, 64), (8, 16, 128, 128)]
DEFAULT_OUT = Path(__file__).parent / "results" / "decompositions.json"


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return run


def measure(reps: int, warmup: int, device: torch.device, seed: int) -> list[dict]:
    decompositions = {
        "LaplacianPyramid()": LaplacianPyramid(),
        "WaveletDecomposition('haar')": WaveletDecomposition("haar"),
        # db2 runs through pytorch-wavelets' convolutions (haar has a closed form).
        "WaveletDecomposition('db2')": WaveletDecomposition("db2"),
        "DCTDecomposition()": DCTDecomposition(),
        "IdentityDecomposition()": IdentityDecomposition(),
    }
    timer = _timer(device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
        with torch.no_grad():
            for d in decompositions.values():  # correctness guard: a fast wrong answer is not a result
                err = ((d.recompose(d.decompose(x)) - x).norm() / x.norm()).item()
                assert err < 1e-5, (d, err)
            times: dict[str, list[float]] = {"clone": [], **{k: [] for k in decompositions}}
            for rep in range(warmup + reps):
                t_clone = timer(x.clone)
                sample = {k: timer(lambda d=d: d.recompose(d.decompose(x))) for k, d in decompositions.items()}
                if rep >= warmup:
                    times["clone"].append(t_clone)
                    for k, t in sample.items():
                        times[k].append(t)
        for k in decompositions:
            ratios = [t / c for t, c in zip(times[k], times["clone"])]
            rows.append(
                {
                    "shape": list(shape),
                    "decomposition": k,
                    "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "ms_median": 1e3 * statistics.median(times[k]),
                    "clone_ms_median": 1e3 * statistics.median(times["clone"]),
                }
            )
    return rows


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| input `[B, C, H, W]` float32 | decomposition | decompose + recompose / `x.clone()` (median [min, max]) | median ms | clone ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | `{r['decomposition']}` | {_num(r['ratio_median'])}x [{_num(r['ratio_min'])}, "
            f"{_num(r['ratio_max'])}] | {_num(r['ms_median'])} | {_num(r['clone_ms_median'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = measure(args.reps, args.warmup, device, args.seed)
    result = {
        "benchmark": "decompositions",
        "what": "time of recompose(decompose(x)) divided by time of x.clone(), per interleaved repetition",
        "reps": args.reps,
        "warmup": args.warmup,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    print(f"\n{args.reps} reps, {torch.get_num_threads()} threads, {device}; JSON: {args.out}")


if __name__ == "__main__":
    main()
