"""Quality benchmark: Flow Matching against DFM on the same DiT trunk, measured side by side.

Protocol (fixed before any full run; ``--quick`` only shrinks the sizes marked *):

* Data: Fashion-MNIST train split (60k, 28x28 zero-padded to 32x32, [-1, 1]); the metrics compare
  against the held-out test split (10k). Falls back to scikit-image photo crops when
  Fashion-MNIST is not installed (the JSON records which was used).
* Trunk: the reference DiT of ``dfm_ext.models.dit`` (hidden 128*, depth 4*, 4 heads*), class
  conditional, on the same 8x8 = 64-token grid in both arms:

  - FM: ``IdentityDecomposition``, one stage 32x32, patch 4.
  - DFM: ``LaplacianPyramid(factors=(2, 1))``, stages 16x16 (patch 2) and 32x32 (patch 4),
    paper defaults: p0 = 0.9, logit-normal (0, 1) for the current stage and (1.5, 1) for earlier
    ones, input and loss masking, no standardisation.

* Optimisation, identical in both arms: AdamW (0.9, 0.99, eps 1e-8, weight decay 0.01), lr 1e-3
  with 100 warmup steps, gradient clipping 1.0, EMA 0.995 (with warm-up), batch 64, 10% label
  dropout, 2000 steps*, seeds 0 and 1 (the seed fixes initialisation, batches, times and noise).
* Sampling: Euler, 40 steps (DFM: 30 + 10 with tau 0.9; FM: 40), EMA weights, no guidance
  (cfg 1), 2000* samples with balanced labels (200 per class), fixed noise seed.
* Metrics, at steps 500, 1000, 1500 and 2000*: multi-scale SWD (x1e3; levels 32, 16, 8; 2000*
  generated vs 2000* test images) and FD-EffNet (EfficientNet-Lite0 features at 64 px, 2000*
  generated vs all 10k test images). Lower is better for both.
* Wall time per training step for each arm, measured in the same process: the arms are trained
  in interleaved chunks of 50 steps (alternating which goes first), so machine load hits both alike.
* Outputs (``benchmarks/results``): ``quality.json`` (everything), ``quality.png`` (metric vs step,
  mean over seeds with each seed faint), ``quality.md`` (a Markdown table). ``--quick`` writes
  ``quality_quick.*`` instead and is a smoke check of the pipeline only: its numbers mean nothing.

Cost: about an hour on 2 CPU cores (4 training runs of 2000 steps, 16 evaluations of 2000 samples).

Run: ``python benchmarks/quality.py`` (full) or ``python benchmarks/quality.py --quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from harness import Trainer  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from dfm_ext.recipes.demo.data import ImageDataset, load_dataset
from harness import MODEL_SIZES, DemoConfig, balanced_labels, generate  # noqa: E402
from dfm_ext.fileio import atomic_write_text
from dfm_ext.recipes.demo.report import FD_RESOLUTION, compute_metrics

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Protocol:
    """Sizes of a run (the full protocol's values are the defaults)."""

    steps: int = 2000
    eval_at: tuple[int, ...] = (500, 1000, 1500, 2000)
    seeds: tuple[int, ...] = (0, 1)
    num_eval: int = 2000
    num_swd_reference: int = 2000
    num_fd_reference: int | None = None  # None: the whole test split
    size: str = "demo"
    batch_size: int = 64
    chunk: int = 50
    sample_steps: tuple[int, ...] = (30, 10)
    thresholds: tuple[float, ...] = (0.9,)


FULL = Protocol()
QUICK = Protocol(steps=20, eval_at=(10, 20), seeds=(0, 1), num_eval=64, num_swd_reference=64,
                 num_fd_reference=256, size="tiny", batch_size=16, chunk=5)  # fmt: skip

ARMS: dict[str, dict[str, Any]] = {
    "FM": {"decomposition": "identity"},
    "DFM": {"decomposition": "laplacian", "p0": 0.9, "masking": True, "timestep_mode": "dfm"},
}


def base_config(protocol: Protocol, seed: int, dataset: str) -> DemoConfig:
    """The recipe shared by every arm (no time budget: every arm runs all its steps)."""
    return DemoConfig(
        steps=protocol.steps, dataset=dataset, size=protocol.size, seed=seed, batch_size=protocol.batch_size,
        max_train_seconds=None, sample_steps=protocol.sample_steps, thresholds=protocol.thresholds,
        num_eval=protocol.num_eval, eval_cfg_scale=1.0,
    )  # fmt: skip


class Reference:
    """Held-out images for SWD and their EfficientNet feature statistics for FD, computed once."""

    def __init__(self, test: ImageDataset, protocol: Protocol, seed: int = 0, fd: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.swd_images = test.subset(protocol.num_swd_reference, generator=g).images
        self.extractor = None
        self.features = None
        self.fd_error: str | None = None
        self.num_fd = None
        if fd:
            try:
                from dfm_ext.metrics.effnet import EfficientNetLite0Features
                from dfm_ext.metrics.frechet import feature_statistics
            except ImportError as e:  # pragma: no cover - depends on the environment
                self.fd_error = str(e)
                return
            fd_images = test.images if protocol.num_fd_reference is None else test.subset(
                protocol.num_fd_reference, generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
            self.extractor = EfficientNetLite0Features(FD_RESOLUTION)
            self.features = feature_statistics(fd_images, self.extractor, progress_bar=False, batch_size=250)
            self.num_fd = int(fd_images.shape[0])

    def score(self, fake: torch.Tensor, seed: int = 0) -> dict[str, Any]:
        out = compute_metrics(fake, self.swd_images, seed=seed, fd=self.features is not None,
                              real_features=self.features, extractor=self.extractor)  # fmt: skip
        out["num_fd_reference"] = self.num_fd
        return out


def evaluate(trainer: Trainer, reference: Reference, protocol: Protocol, num_classes: int, seed: int) -> dict[str, Any]:
    """Sample ``protocol.num_eval`` images from the EMA weights and score them."""
    from harness import model_config

    cfg = trainer.cfg
    mc = model_config(cfg, trainer.data.image_shape, num_classes)
    start = time.perf_counter()
    fake, _ = generate(trainer.ema.module, mc, balanced_labels(protocol.num_eval, num_classes),
                       steps=protocol.sample_steps, thresholds=protocol.thresholds, cfg_scale=1.0,
                       generator=torch.Generator().manual_seed(10_000 + seed), device=cfg.device)  # fmt: skip
    sample_seconds = time.perf_counter() - start
    trainer.model.train()
    scores = reference.score(fake, seed=seed)
    return {"step": trainer.steps_done, "sample_seconds": round(sample_seconds, 2), **scores}


def train_interleaved(
    arms: dict[str, DemoConfig],
    data: ImageDataset,
    protocol: Protocol,
    reference: Reference,
    log: Any = print,
) -> dict[str, Any]:
    """Train every arm for ``protocol.steps`` in interleaved chunks; evaluate each at ``eval_at``."""
    trainers = {}
    for name, cfg in arms.items():
        trainers[name] = Trainer(cfg, data)
    evals: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    order = list(arms)
    done = 0
    for target in protocol.eval_at:
        while done < target:
            n = min(protocol.chunk, target - done)
            for name in order:
                for _ in range(n):
                    trainers[name].step()
            order.reverse()
            done += n
        for name, tr in trainers.items():
            e = evaluate(tr, reference, protocol, data.num_classes, tr.cfg.seed)
            evals[name].append(e)
            log(f"  {name:>4s} step {target:5d}: SWD mean {e['swd']['mean']:.2f}  FD-EffNet {e['fd_effnet']}"
                f"  ({tr.seconds / tr.steps_done:.3f} s/step)")  # fmt: skip
    return {
        name: {
            "config": json.loads(json.dumps(asdict(tr.cfg), default=list)),
            "parameters": sum(p.numel() for p in tr.model.parameters()),
            "train_seconds": round(tr.seconds, 2),
            "seconds_per_step": round(tr.seconds / tr.steps_done, 5),
            "final_loss_mean_last100": _mean_finite(tr.history["loss"][-100:]),
            "evals": evals[name],
        }
        for name, tr in trainers.items()
    }


def _mean_finite(values: Sequence[float]) -> float | None:
    v = [x for x in values if math.isfinite(x)]
    return round(sum(v) / len(v), 5) if v else None


def _agg(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summarise(runs: dict[int, dict[str, Any]], protocol: Protocol) -> dict[str, Any]:
    """Mean and std over seeds per arm and evaluation step."""
    arms = list(next(iter(runs.values())))
    out: dict[str, Any] = {}
    for arm in arms:
        rows = []
        for i, step in enumerate(protocol.eval_at):
            evs = [runs[s][arm]["evals"][i] for s in runs]
            swd_m, swd_s = _agg([e["swd"]["mean"] for e in evs])
            fd_m, fd_s = _agg([e["fd_effnet"] for e in evs])
            levels = {k: _agg([e["swd"]["per_level"][k] for e in evs])[0] for k in evs[0]["swd"]["per_level"]}
            rows.append({"step": step, "swd_mean": swd_m, "swd_std": swd_s, "fd_effnet": fd_m, "fd_effnet_std": fd_s,
                         "swd_per_level": levels})  # fmt: skip
        sps = _agg([runs[s][arm]["seconds_per_step"] for s in runs])
        out[arm] = {"curve": rows, "seconds_per_step": sps[0], "seconds_per_step_std": sps[1]}
    return out


def _fmt(m: float | None, s: float | None, digits: int = 2) -> str:
    if m is None:
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s else f"{m:.{digits}f}"


def markdown_table(summary: dict[str, Any], title: str) -> str:
    arms = list(summary)
    head = ["step"] + [f"{a} SWD" for a in arms] + [f"{a} FD-EffNet" for a in arms]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(summary[arms[0]]["curve"]):
        cells = [str(row["step"])]
        cells += [_fmt(summary[a]["curve"][i]["swd_mean"], summary[a]["curve"][i]["swd_std"]) for a in arms]
        cells += [_fmt(summary[a]["curve"][i]["fd_effnet"], summary[a]["curve"][i]["fd_effnet_std"]) for a in arms]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| arm | s / training step | levels (SWD x1e3 at the last step) |")
    lines.append("|---|---|---|")
    for a in arms:
        lv = ", ".join(f"{k}: {v:.2f}" for k, v in summary[a]["curve"][-1]["swd_per_level"].items() if v is not None)
        lines.append(f"| {a} | {_fmt(summary[a]['seconds_per_step'], summary[a]['seconds_per_step_std'], 3)} | {lv} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], runs: dict[int, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in ((axes[0], "swd_mean", "SWD x1e3 (mean over levels)"), (axes[1], "fd_effnet", "FD-EffNet")):
        for i, arm in enumerate(summary):
            steps = [r["step"] for r in summary[arm]["curve"]]
            vals = [r[key] for r in summary[arm]["curve"]]
            if any(v is None for v in vals):
                continue
            for seed, run in runs.items():
                per = [e["swd"]["mean"] if key == "swd_mean" else e["fd_effnet"] for e in run[arm]["evals"]]
                ax.plot(steps, per, color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, vals, color=f"C{i}", marker="o", label=arm)
        ax.set_xlabel("training step")
        ax.set_ylabel(label + " (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def benchmark_args(
    argv: Sequence[str] | None,
    doc: str | None,
    quick_help: str,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The options every benchmark here shares (``configure`` adds more); applies ``--threads``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--dataset", default="auto", choices=("auto", "fashion-mnist", "skimage"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-fd", action="store_true", help="SWD only")
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def train_and_test(dataset: str) -> tuple[Any, Any]:
    """The training split and the held-out test split of the same dataset."""
    train = load_dataset(dataset, "train")
    return train, load_dataset(train.name, "test")


def main(argv: Sequence[str] | None = None) -> int:
    args = benchmark_args(argv, __doc__, "tiny smoke check (a minute or two); numbers mean nothing")
    protocol = QUICK if args.quick else FULL
    stem = "quality_quick" if args.quick else "quality"
    t0 = time.perf_counter()
    train_data, test = train_and_test(args.dataset)
    print(f"quality benchmark ({'quick' if args.quick else 'full'}): {train_data.name}, {len(train_data)} train / "
          f"{len(test)} test, model {protocol.size} {MODEL_SIZES[protocol.size]}, {protocol.steps} steps, "
          f"seeds {protocol.seeds}", flush=True)  # fmt: skip
    reference = Reference(test, protocol, fd=not args.no_fd)
    runs: dict[int, dict[str, Any]] = {}
    for seed in protocol.seeds:
        print(f"seed {seed}", flush=True)
        base = base_config(protocol, seed, train_data.name)
        arms = {name: replace(base, **over) for name, over in ARMS.items()}
        runs[seed] = train_interleaved(arms, train_data, protocol, reference, log=lambda m: print(m, flush=True))
    summary = summarise(runs, protocol)
    title = f"FM vs DFM, {train_data.name} 32x32, DiT {protocol.size}, {len(protocol.seeds)} seeds" + (
        " (QUICK SMOKE CHECK: numbers mean nothing)" if args.quick else "")  # fmt: skip
    result = {
        "benchmark": "quality",
        "quick": args.quick,
        "protocol": json.loads(json.dumps(asdict(protocol))),
        "arms": ARMS,
        "dataset": train_data.name,
        "fd_effnet_resolution": FD_RESOLUTION,
        "fd_error": reference.fd_error,
        "summary": summary,
        "runs": {str(k): v for k, v in runs.items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "command": "python benchmarks/quality.py" + (" --quick" if args.quick else ""),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    table = markdown_table(summary, title)
    atomic_write_text(args.out / f"{stem}.md", table + "\n")
    plot(summary, runs, args.out / f"{stem}.png", title)
    print(table)
    print(f"wrote {args.out / (stem + '.json')}, {stem}.md, {stem}.png in {result['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
