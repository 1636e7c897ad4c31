"""DFM ablations at small scale: does each of the paper's design choices point the same way here?

Protocol (fixed before any full run; ``--quick`` only shrinks the sizes marked *): the quality
benchmark's protocol (``benchmarks/quality.py``: Fashion-MNIST 32x32, reference DiT hidden 128*,
depth 4*, 64 tokens, AdamW lr 1e-3, batch 64, EMA, 10% label dropout, Euler 40 steps, no
guidance) with 1500* training steps, seed 0, 1000* samples scored by SWD (x1e3, 1000* test
images) and FD-EffNet (64 px, all 10k test images). Each variant changes one thing from the
DFM baseline (2-stage Laplacian, p0 = 0.9, logit-normal (0, 1) / (1.5, 1), masking, 30 + 10
steps, tau 0.9):

============================  =====================================  ============================
variant                       change                                 paper's direction
============================  =====================================  ============================
no input masking              ``masking="loss"`` (Table 1c)          worse than baseline
tied timesteps                every stage shares t in training, and  much worse (Table 1b)
                              stages are denoised together (40 steps)
p0 = 0.7                      first-stage probability (Table 1a)     worse than p0 = 0.9
20 + 20 steps                 sampling split only (Fig. 3)           worse than 30 + 10
wavelet                       Haar DWT stages instead of Laplacian   Laplacian preferred (3.2, F)
DCT                           block-DCT bands instead of Laplacian   worse (App. F)
full specialisation, mlp      per-stage MLP weights averaged with    better (Table 1d)
                              the shared ones (``dfm_ext.specialization``)
full specialisation, all      the same for every layer               better, the best (Table 1d)
============================  =====================================  ============================

"Reproduces" is judged per metric: ``yes`` when the variant moves the paper's way (worse, or
better for specialisation) on both SWD and FD-EffNet, ``no`` when it moves the other way on
both, ``mixed`` otherwise. One seed at this scale
is a weak test: differences of a few percent are within seed noise (see the quality benchmark's
seed spread). Outputs: ``benchmarks/results/ablations.json`` and ``ablations.md``
(``ablations_quick.*`` with ``--quick``, a smoke check whose numbers mean nothing).

Cost: 52 minutes for the first seven variants with ``--threads 1`` here (6 trained models, 7
evaluations); about 9 more per specialisation variant. ``--variants "a; b"`` runs a subset (plus
the baseline), ``--stem`` names its output files.

Run: ``python benchmarks/ablations.py`` (full) or ``python benchmarks/ablations.py --quick``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import Protocol, Reference, base_config, benchmark_args, train_and_test  # noqa: E402

from harness import Trainer  # noqa: E402
from harness import MODEL_SIZES, balanced_labels, generate, model_config  # noqa: E402
from dfm_ext.fileio import atomic_write_text  # noqa: E402

FULL = Protocol(steps=1500, eval_at=(1500,), seeds=(0,), num_eval=1000, num_swd_reference=1000)
QUICK = Protocol(steps=20, eval_at=(20,), seeds=(0,), num_eval=64, num_swd_reference=64, num_fd_reference=256,
                 size="tiny", batch_size=16, chunk=5)  # fmt: skip

# name -> (training overrides, sampling overrides, the paper's expectation)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "baseline": ({}, {}, "reference"),
    "no input masking": ({"masking": "loss"}, {}, "worse (Table 1c)"),
    "tied timesteps": ({"timestep_mode": "tied"}, {"tied": True}, "much worse (Table 1b)"),
    "p0 = 0.7": ({"p0": 0.7}, {}, "worse (Table 1a)"),
    "20 + 20 steps": ({}, {"sample_steps": (20, 20)}, "worse (Fig. 3)"),
    "wavelet": ({"decomposition": "wavelet"}, {}, "Laplacian preferred (Sec. 3.2, App. F)"),
    "DCT": ({"decomposition": "dct"}, {}, "worse (App. F)"),
    "full specialisation, mlp": ({"specialize": "full", "specialize_targets": ("mlp",)}, {}, "better (Table 1d)"),
    "full specialisation, all": ({"specialize": "full", "specialize_targets": ("all",)}, {}, "better, the best (Table 1d)"),
}


@torch.no_grad()
def sample_tied(model: nn.Module, config: dict[str, Any], labels: Tensor, *, steps: int, generator: torch.Generator,
                batch_size: int = 250) -> Tensor:  # fmt: skip
    """Euler with every stage active and sharing one time ``t: 0 -> 1`` (the tied ablation's sampler)."""
    from harness import make_decomposition

    decomposition = make_decomposition(config["decomposition"])
    c, h, w = config["image_shape"]
    s = decomposition.num_stages
    out = []
    model.eval()
    for chunk in labels.split(batch_size):
        b = chunk.shape[0]
        state = [torch.randn(shape, generator=generator) for shape in decomposition.stage_shapes((b, c, h, w))]
        stage = torch.full((b,), s - 1, dtype=torch.long)
        mask = torch.ones(b, s, dtype=torch.bool)
        times = torch.linspace(0, 1, steps + 1)
        for i in range(steps):
            t = times[i].expand(b, s).contiguous()
            v = model(state, t, stage, mask, y=chunk)
            dt = float(times[i + 1] - times[i])
            state = [z + dt * vz for z, vz in zip(state, v)]
        out.append(decomposition.recompose(state))
    return torch.cat(out)


def verdict(base: dict[str, Any], var: dict[str, Any]) -> str:
    """Does the paper's direction (``var["expected"]``: "worse ..." or "better ...") show on both metrics?"""
    worse = []
    for key in ("swd", "fd_effnet"):
        b = base["swd"]["mean"] if key == "swd" else base["fd_effnet"]
        v = var["swd"]["mean"] if key == "swd" else var["fd_effnet"]
        if b is not None and v is not None:
            worse.append(v > b)
    if not worse:
        return "n/a"
    if var["expected"].startswith("better"):
        worse = [not w for w in worse]  # then "yes" means better on both
    return "yes" if all(worse) else ("no" if not any(worse) else "mixed")


def main(argv: Sequence[str] | None = None) -> int:
    def subset_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--variants", default=None,
                            help=f"run only these (and the baseline), separated by ';': {'; '.join(VARIANTS)}")
        parser.add_argument("--stem", default=None, help="output file name stem (default ablations / ablations_quick)")

    args = benchmark_args(argv, __doc__, "tiny smoke check; numbers mean nothing", configure=subset_options)
    protocol = QUICK if args.quick else FULL
    stem = args.stem or ("ablations_quick" if args.quick else "ablations")
    chosen = list(VARIANTS)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(";") if v.strip()]
        unknown = [v for v in wanted if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        chosen = ["baseline", *[v for v in wanted if v != "baseline"]]
    t0 = time.perf_counter()
    train_data, test = train_and_test(args.dataset)
    print(f"ablations ({'quick' if args.quick else 'full'}): {train_data.name}, model {protocol.size} "
          f"{MODEL_SIZES[protocol.size]}, {protocol.steps} steps, seed {protocol.seeds[0]}", flush=True)  # fmt: skip
    reference = Reference(test, protocol, fd=not args.no_fd)
    base = replace(base_config(protocol, protocol.seeds[0], train_data.name), decomposition="laplacian")
    trained: dict[tuple, Trainer] = {}
    rows: dict[str, Any] = {}
    for name in chosen:
        train_over, sample_over, expectation = VARIANTS[name]
        cfg = replace(base, **train_over)
        key = tuple(sorted((k, str(v)) for k, v in train_over.items()))
        if key not in trained:
            tr = Trainer(cfg, train_data)
            for _ in range(protocol.steps):
                tr.step()
            trained[key] = tr
        tr = trained[key]
        mc = model_config(cfg, train_data.image_shape, train_data.num_classes)
        labels = balanced_labels(protocol.num_eval, train_data.num_classes)
        g = torch.Generator().manual_seed(10_000 + cfg.seed)
        start = time.perf_counter()
        if sample_over.get("tied"):
            fake = sample_tied(tr.ema.module, mc, labels, steps=sum(protocol.sample_steps), generator=g)
        else:
            steps = sample_over.get("sample_steps", protocol.sample_steps)
            fake, _ = generate(tr.ema.module, mc, labels, steps=steps, thresholds=protocol.thresholds, cfg_scale=1.0,
                               generator=g)  # fmt: skip
        sample_seconds = time.perf_counter() - start
        scores = reference.score(fake, seed=cfg.seed)
        rows[name] = {"train": train_over, "sampling": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in sample_over.items()},
                      "expected": expectation, "seconds_per_step": round(tr.seconds / tr.steps_done, 5),
                      "sample_seconds": round(sample_seconds, 2), **scores}  # fmt: skip
        print(f"  {name:18s} SWD {scores['swd']['mean']:.2f}  FD-EffNet {scores['fd_effnet']}", flush=True)
    for name, row in rows.items():
        row["reproduces"] = "-" if name == "baseline" else verdict(rows["baseline"], row)
    title = f"DFM ablations, {train_data.name} 32x32, DiT {protocol.size}, {protocol.steps} steps, 1 seed" + (
        " (QUICK SMOKE CHECK: numbers mean nothing)" if args.quick else "")  # fmt: skip
    lines = [f"### {title}", "", "| variant | SWD x1e3 | FD-EffNet | paper | reproduces here |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        fd = "n/a" if row["fd_effnet"] is None else f"{row['fd_effnet']:.2f}"
        lines.append(f"| {name} | {row['swd']['mean']:.2f} | {fd} | {row['expected']} | {row['reproduces']} |")
    table = "\n".join(lines) + "\n"
    result = {
        "benchmark": "ablations", "quick": args.quick, "protocol": json.loads(json.dumps(asdict(protocol))),
        "baseline_config": json.loads(json.dumps(asdict(base), default=list)), "dataset": train_data.name,
        "variants": rows, "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "command": "python " + " ".join(["benchmarks/ablations.py", *(sys.argv[1:] if argv is None else argv)]),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{stem}.md", table + "\n")
    print(table)
    print(f"wrote {args.out / (stem + '.json')} and {stem}.md in {result['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
