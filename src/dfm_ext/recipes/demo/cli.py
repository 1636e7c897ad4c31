"""The ``dfm-ext`` command: ``demo`` (train + sample + measure), ``sample`` and ``eval``.

Run ``dfm-ext <command> --help`` for the options. Errors in the inputs (unknown dataset, a
missing or damaged checkpoint, a bad ``--steps`` list) end with a one-line message and exit
status 2; nothing is written half-way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dfm_ext.recipes.demo.data import DATASETS

__all__ = ["build_parser", "main"]

DECOMPOSITIONS = ("laplacian", "wavelet", "dct", "identity")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 30,10, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 30,10, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.9, got {text!r}") from None


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``, else an error that says ``expected {what}``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "a non-negative integer")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and for ``--help`` docs)."""
    from dfm_ext.recipes.demo.run import DemoConfig

    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="dfm-ext", description="Decomposable Flow Matching: demo, sampling and evaluation on CPU."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,sample,eval}")

    demo = sub.add_parser("demo", help="train a small class-conditional DiT with DFM, sample it, measure it")
    demo.add_argument("--steps", type=_positive_int, default=d.steps, help=f"training steps (default {d.steps})")
    demo.add_argument("--max-train-seconds", type=float, default=d.max_train_seconds,
                      help=f"stop training after this many seconds (default {d.max_train_seconds:g}; 0: no limit)")
    demo.add_argument("--sample-steps", type=_int_list, default=d.sample_steps,
                      help="sampling steps per stage (default 30,10)")  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    demo.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="training data (default auto)")
    demo.add_argument("--decomposition", choices=DECOMPOSITIONS, default=d.decomposition,
                      help="stage decomposition (default laplacian: 16x16 + 32x32)")  # fmt: skip
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    demo.add_argument("--device", default=d.device, help="torch device (default cpu)")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads for torch (default: torch's choice; 1 is faster on a busy shared machine)")
    demo.add_argument("--num-eval", type=_nonneg_int, default=d.num_eval,
                      help=f"samples for the metrics (default {d.num_eval}; 0 skips them)")  # fmt: skip
    demo.add_argument("--num-reference", type=_positive_int, default=d.num_reference,
                      help=f"held-out test images for the metrics (default {d.num_reference})")  # fmt: skip
    demo.add_argument("--no-fd", action="store_true", help="skip FD-EffNet (SWD only)")
    demo.add_argument("--cfg-scale", type=float, default=d.cfg_scale,
                      help=f"guidance for samples.png (default {d.cfg_scale})")  # fmt: skip
    demo.add_argument("--size", choices=("tiny", "demo"), default=d.size,
                      help="model size: demo (default) or tiny (for smoke tests)")  # fmt: skip
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--compile", action="store_true",
                      help="torch.compile the model for training (the engine's train.compile; same maths, faster on GPU)")
    demo.add_argument("--compile-backend", default=d.compile_backend,
                      help=f"torch.compile backend with --compile (default {d.compile_backend}; aot_eager: no code generation)")

    sample = sub.add_parser("sample", help="sample a grid from a demo checkpoint")
    sample.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (e.g. outputs/demo/checkpoint)")
    sample.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (default: as trained)")
    sample.add_argument("--steps", type=_int_list, default=None, help="steps per stage, e.g. 30,10")
    sample.add_argument("--threshold", type=_float_list, default=None, help="stage thresholds tau, e.g. 0.9")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num", type=_positive_int, default=8, help="samples per class (default 8)")
    sample.add_argument("--out", type=Path, default=Path("grid.png"))
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")

    ev = sub.add_parser("eval", help="SWD and FD-EffNet of samples against a dataset split; JSON out")
    ev.add_argument("--samples", type=Path, required=True, help="a folder of PNG samples, or a checkpoint folder")
    ev.add_argument("--dataset", choices=DATASETS, default="auto")
    ev.add_argument("--split", choices=("train", "test"), default="test")
    ev.add_argument("--num", type=_positive_int, default=1000, help="samples to use (default 1000)")
    ev.add_argument("--cfg-scale", type=float, default=None, help="when sampling a checkpoint")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--num-reference", type=_positive_int, default=2000, help="dataset images (default 2000)")
    ev.add_argument("--no-fd", action="store_true", help="skip FD-EffNet (SWD only)")
    ev.add_argument("--out", type=Path, default=None, help="write the JSON here as well as to stdout")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dfm-ext`` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from dfm_ext.recipes.demo import run as demo

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    try:
        if args.command == "demo":
            cfg = demo.DemoConfig(
                steps=args.steps, dataset=args.dataset, decomposition=args.decomposition, seed=args.seed,
                batch_size=args.batch_size, device=args.device, num_eval=args.num_eval,
                cfg_scale=args.cfg_scale, size=args.size, num_reference=args.num_reference, fd=not args.no_fd,
                max_train_seconds=args.max_train_seconds or None, sample_steps=args.sample_steps,
                compile=args.compile, compile_backend=args.compile_backend,
            )  # fmt: skip
            result = demo.run_demo(cfg, args.out, progress=not args.no_progress)
            print(f"wrote {result.out}:")
            for name, path in result.files.items():
                print(f"  {name:12s} {path}")
            return 0
        if args.command == "sample":
            path = demo.sample_checkpoint(
                args.checkpoint, args.out, cfg_scale=args.cfg_scale, steps=args.steps,
                thresholds=args.threshold, seed=args.seed, num_per_class=args.num, device=args.device,
            )  # fmt: skip
            print(f"wrote {path}")
            return 0
        if args.command == "eval":
            report = demo.evaluate_path(
                args.samples, dataset=args.dataset, split=args.split, num=args.num,
                cfg_scale=args.cfg_scale, seed=args.seed, device=args.device,
                num_reference=args.num_reference, fd=not args.no_fd,
            )  # fmt: skip
            text = demo.dump_json(report)
            if args.out is not None:
                demo.write_text_atomic(args.out, text)
            print(text)
            return 0
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"dfm-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
