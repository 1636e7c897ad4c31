"""The ``dfm-ext`` command: ``demo`` (train the image recipe on offline data, sample, measure), ``sample``, ``eval``.

``dfm-ext demo`` trains ``configs/demo.yaml`` of the image recipe (its options become overrides;
``--set key=value`` adds any other) in ``OUT/run`` (a stopped demo resumes), then draws
``samples.png``, ``progressive.png`` and ``loss.png`` and scores ``--num-eval`` samples against the
held-out split (``metrics.json``). Bad inputs end with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import Any, NoReturn, cast

import torch

from dfm_ext.fileio import atomic_write_text
from dfm_ext.recipes.demo.data import DATASETS, fashion_mnist_available
from dfm_ext.recipes.demo.report import compute_metrics, evaluate_samples, generate, load_run, load_split, sample_run
from dfm_ext.recipes.engine.config import apply_overrides, load_config
from dfm_ext.recipes.engine.viz import save_image_grid, save_loss_curves, save_progressive
from dfm_ext.recipes.engine.trainer import check_batch_fits
from dfm_ext.recipes.imagenet.task import ImageNetConfig, ImageNetTask, build_dataset, run
from dfm_ext.validation import parse_device

__all__ = ["CONFIG", "build_parser", "demo_config", "demo_overrides", "estimate_seconds", "main", "run_demo"]

#: The demo's config of the image recipe.
CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
DECOMPOSITIONS = {"laplacian": ["decomposition.kind=laplacian"], "wavelet": ["decomposition.kind=wavelet"],
                  "dct": ["decomposition.kind=dct", "decomposition.factors=null"], "identity": ["decomposition.kind=identity"]}  # fmt: skip
SIZES = {"demo": "{hidden_size: 128, depth: 4, num_heads: 4}", "tiny": "{hidden_size: 32, depth: 1, num_heads: 2}"}


def _numbers(kind: Callable[[str], Any], what: str) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values: tuple[Any, ...] | None = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = None
        if values is None or kind is int and (not values or min(values) < 1):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {repr(text) if value is None else value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for a mistyped option or command (``typed``: the arguments being parsed)."""

    typed: Sequence[str] = ()

    def _known(self) -> tuple[list[str], list[str]]:
        """(options, commands) of this parser and its subcommands."""
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        commands: list[str] = []
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands += list(action.choices)
                for sub in action.choices.values():
                    options += sub._known()[0] if isinstance(sub, _Parser) else []
        return options, commands

    def error(self, message: str) -> NoReturn:
        options, commands = self._known()
        for word in (w.split("=")[0] for w in self.typed):
            choices = options if word.startswith("--") else commands
            close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75) if word not in options + commands else []
            if close:
                message += f" ({word} is not {'an option' if choices is options else 'a command'}: did you mean {close[0]}?)"
                break
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and for ``--help`` docs)."""
    parser = _Parser(prog="dfm-ext", description="Decomposable Flow Matching: demo, sampling and evaluation.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,sample,eval}")
    demo = sub.add_parser("demo", help="train a small class-conditional DiT with DFM on offline images, sample it, measure it", allow_abbrev=False)
    demo.add_argument("--steps", type=_at_least(1), default=None, help="training steps (default 2000)")
    demo.add_argument("--max-train-seconds", type=float, default=None, help="stop training after this many seconds (default and 0: no limit)")
    demo.add_argument("--sample-steps", type=_numbers(int, "positive integers like 30,10"), default=None, help="sampling steps per stage (default 30,10)")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    demo.add_argument("--dataset", choices=DATASETS, default="auto", help="training data (default auto: Fashion-MNIST if installed)")
    demo.add_argument("--decomposition", choices=tuple(DECOMPOSITIONS), default="laplacian", help="stage decomposition (default laplacian: 16x16 + 32x32)")
    demo.add_argument("--batch-size", type=_at_least(1), default=None, help="default 64")
    demo.add_argument("--num-eval", type=_at_least(0), default=1000, help="samples for the metrics (default 1000; 0 skips them)")
    demo.add_argument("--cfg-scale", type=float, default=None, help="guidance for samples.png (default 3)")
    demo.add_argument("--size", choices=tuple(SIZES), default="demo", help="model size: demo (default) or tiny (smoke tests)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--compile", action="store_true", help="torch.compile the model for training (same maths)")
    demo.add_argument("--compile-backend", default=None, help="torch.compile backend with --compile (default inductor)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other override of configs/demo.yaml")

    sample = sub.add_parser("sample", help="sample a grid from a trained run", allow_abbrev=False)
    sample.add_argument("--checkpoint", type=Path, required=True, help="a demo output folder, a run folder or its final/")
    sample.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (default: the run's)")
    sample.add_argument("--steps", type=_numbers(int, "positive integers like 30,10"), default=None, help="steps per stage, e.g. 30,10")
    sample.add_argument("--threshold", type=_numbers(float, "numbers like 0.9"), default=None, help="stage thresholds tau, e.g. 0.9")
    sample.add_argument("--num", type=_at_least(1), default=8, help="samples per class (default 8)")
    sample.add_argument("--out", type=Path, default=Path("grid.png"), help="a .png grid, or a folder of one PNG per sample")

    ev = sub.add_parser("eval", help="SWD and FD-EffNet of samples against a dataset split; JSON out", allow_abbrev=False)
    ev.add_argument("--samples", type=Path, required=True, help="a folder of PNG samples, or a trained run (samples drawn now)")
    ev.add_argument("--dataset", choices=DATASETS, default="auto")
    ev.add_argument("--split", choices=("train", "test"), default="test")
    ev.add_argument("--num", type=_at_least(1), default=1000, help="samples to use (default 1000)")
    ev.add_argument("--cfg-scale", type=float, default=1.0, help="guidance when sampling a run (default 1)")
    ev.add_argument("--out", type=Path, default=None, help="write the JSON here as well as to stdout")
    for p in (demo, ev):
        p.add_argument("--num-reference", type=_at_least(1), default=2000, help="held-out images for the metrics (default 2000)")
        p.add_argument("--no-fd", action="store_true", help="skip FD-EffNet (SWD only)")
    for p in (demo, sample, ev):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.add_argument("--threads", type=_at_least(1), default=None, help="CPU threads for torch (1 is faster on a busy shared machine)")
    return parser


def demo_config(args: argparse.Namespace) -> ImageNetConfig:
    """``configs/demo.yaml`` with the overrides ``dfm-ext demo``'s options stand for, validated before any file is read;
    then the training set's name, channels and classes go into it."""
    parse_device(args.device)
    cfg = load_config(ImageNetConfig, CONFIG, demo_overrides(args))
    cfg.validate()
    name = ("fashion-mnist" if fashion_mnist_available() else "skimage") if args.dataset == "auto" else args.dataset
    data = load_split(name, "train", cfg.data.resolution, args.seed)  # cached for the training set
    cfg = apply_overrides(cfg, [f"data.factory_kwargs={{dataset: {data.name}}}", f"data.num_classes={data.num_classes}",
                                f"vae.latent_channels={data.image_shape[0]}"])  # fmt: skip
    cfg.validate()
    return cfg


def demo_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of ``configs/demo.yaml`` that ``dfm-ext demo``'s options stand for (the data's come later)."""
    out = [f"train.output_dir={args.out / 'run'}", f"train.seed={args.seed}", f"train.progress={str(not args.no_progress).lower()}",
           f"model.overrides={SIZES[args.size]}", *DECOMPOSITIONS[args.decomposition]]  # fmt: skip
    if args.steps is not None:
        out += [f"train.steps={args.steps}", f"train.checkpoint_every={max(1, min(500, args.steps))}", f"optim.warmup_steps={max(1, min(100, args.steps // 5))}"]
    for flag, key in (("batch_size", "train.global_batch_size"), ("max_train_seconds", "train.max_train_seconds"),
                      ("cfg_scale", "sampling.guidance_scale"), ("compile_backend", "train.compile_backend")):  # fmt: skip
        if getattr(args, flag) is not None and not (flag == "max_train_seconds" and args.max_train_seconds == 0):  # 0: no limit
            out.append(f"{key}={getattr(args, flag)}")
    if args.compile:
        out.append("train.compile=true")
    if args.device != "cpu":
        out.append("train.cpu=false")
    if args.decomposition == "identity":  # one stage: the same total step budget in one segment
        out += [f"sampling.steps=[{sum(args.sample_steps or (30, 10))}]", "sampling.thresholds=[]"]
    elif args.sample_steps is not None:
        out.append(f"sampling.steps={list(args.sample_steps)}")
    return [*out, *args.set]


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """``dfm-ext demo``: train, then write the pictures and ``metrics.json`` into ``args.out``; returns the metrics."""
    started = time.perf_counter()
    cfg = demo_config(args)
    dataset = build_dataset(cfg)
    check_batch_fits(len(cast(Sized, dataset)), cfg.train)  # before the estimate's timed steps
    say = print if not args.no_progress else (lambda *a, **k: None)
    estimate = estimate_seconds(ImageNetTask(cfg), dataset, cfg, args)
    name = cfg.data.factory_kwargs["dataset"]
    say(f"dfm-ext demo: {name} ({len(cast(Sized, dataset))} images), {args.decomposition} decomposition, "
        f"DiT {args.size} "
        f"({estimate['parameters'] / 1e6:.2f} M parameters), {cfg.train.steps} steps of batch {cfg.train.global_batch_size} "
        f"on {args.device}: about {sum(estimate['seconds'].values()) / 60:.1f} minutes here (training "
        f"{estimate['seconds']['train'] / 60:.1f}, sampling and scoring {estimate['seconds']['sample'] / 60:.1f})", flush=True)  # fmt: skip
    result = run("demo", cfg, dataset)
    if result.stopped_early:
        say(f"the training budget stopped the run after {result.step} of {cfg.train.steps} steps: the samples and metrics below "
            "are NOT representative of the demo (run without --max-train-seconds for that)")  # fmt: skip
    t_sample, trained = time.perf_counter(), load_run(result.output_dir, device=args.device)
    nc, g = cfg.data.num_classes, torch.Generator().manual_seed(args.seed + 1)
    grid, previews = generate(trained.model, cfg, torch.arange(nc).repeat_interleave(8), guidance=cfg.sampling.guidance_scale, generator=g, device=args.device)
    logs = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    curves = {k.replace("loss_", "").replace("_", " "): [r[k] for r in logs if k in r] for k in logs[-1] if k.startswith("loss")}
    save_image_grid(grid, args.out / "samples.png", nrow=8, scale=3)
    save_progressive([p[::8][:8] for p in previews[:-1]], grid[::8][:8], args.out / "progressive.png", scale=4)
    save_loss_curves(curves, args.out / "loss.png", title=f"DFM training loss ({args.decomposition}, {name})")
    metrics: dict[str, Any] = {
        "dataset": name, "decomposition": args.decomposition, "model": {"size": args.size, "parameters": estimate["parameters"]},
        "steps": result.step, "steps_requested": cfg.train.steps, "stopped_early": result.stopped_early,
        "batch_size": cfg.train.global_batch_size, "compile": cfg.train.compile, "train_seconds": round(result.train_seconds, 2),
        "seconds_per_step": round(result.train_seconds / max(result.step, 1), 4), "final_logged": logs[-1],
        "estimate_seconds": estimate["seconds"], "sampling": {"steps": list(cfg.sampling.steps), "thresholds": list(cfg.sampling.thresholds),
        "grid_cfg_scale": cfg.sampling.guidance_scale, "grid_images": len(grid)}, "eval": None,
    }  # fmt: skip
    if result.stopped_early:
        metrics["note"] = f"stopped by train.max_train_seconds after {result.step} of {cfg.train.steps} steps: not representative"
    if args.num_eval:
        say(f"sampling {args.num_eval} images and scoring them against the test split ...", flush=True)
        labels = torch.arange(args.num_eval) % nc
        fake, _ = generate(trained.model, cfg, labels, guidance=1.0, generator=torch.Generator().manual_seed(args.seed + 2), device=args.device)
        test = load_split(name, "test", cfg.data.resolution, args.seed)
        real = test.subset(args.num_reference, generator=torch.Generator().manual_seed(args.seed)).images
        metrics["eval"] = {"split": "test", "cfg_scale": 1.0, **compute_metrics(fake, real, seed=args.seed, fd=not args.no_fd)}
    metrics["sample_seconds"] = round(time.perf_counter() - t_sample, 2)
    metrics["total_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_text(args.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def estimate_seconds(task: Any, dataset: Any, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The demo's duration here, from 3 timed training steps after a warm-up one (sampling: a forward per sample
    and step, two with guidance, about a third of a training step per image; scoring adds a few seconds)."""
    torch.manual_seed(cfg.train.seed)
    model, b = task.build_model().to(args.device), cfg.train.global_batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    batch = task.collate([dataset[(i % len(dataset), False)] for i in range(b)])
    times = []
    for i in range(4):
        started = time.perf_counter()
        task.loss(model, batch, generator=torch.Generator().manual_seed(i), device=torch.device(args.device)).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - started)
    step = sorted(times[1:])[1]
    per_image_step = step / (3 * b)
    image_steps = (cfg.data.num_classes * 8 * 2 + args.num_eval) * sum(cfg.sampling.steps)
    train = cfg.train.steps * step if cfg.train.max_train_seconds is None else min(cfg.train.steps * step, cfg.train.max_train_seconds)
    sample = image_steps * per_image_step + (10.0 if args.num_eval else 0.0)
    return {"parameters": sum(p.numel() for p in model.parameters()), "seconds": {"train": round(train, 1), "sample": round(sample, 1)}}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dfm-ext`` console script; returns the exit status (2: a usage error)."""
    _Parser.typed = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "demo":
            run_demo(args)
            print(f"wrote {args.out}: samples.png progressive.png loss.png metrics.json run/")
        elif args.command == "sample":
            print(f"wrote {sample_run(args)}")
        else:
            text = json.dumps(evaluate_samples(args), indent=2)
            if args.out is not None:
                atomic_write_text(args.out, text + "\n")
            print(text)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"dfm-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
