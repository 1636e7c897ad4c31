"""The ``evaluate`` commands of the recipes (``python -m dfm_ext.recipes.imagenet evaluate ...``): score a sample set
with this package, print one JSON line and write it to a file. Nothing is downloaded: every feature network is a
file you give; a missing one is a one-line ``error:`` naming the file and where it comes from (exit status 2).

- :func:`evaluate_images_command`: a PNG folder or an ADM ``.npz`` against an ADM reference batch: FID, sFID, IS,
  precision/recall (the ADM suite's definitions) with ``--inception``, FDD with ``--dinov2``.
- :func:`evaluate_videos_command`: an MP4 folder or an ``.npz`` of videos against real videos (a folder tree of
  MP4 clips, or an ``.npz``): FVD (first 16 frames, Kinetics-400 I3D) with ``--i3d``, frame-FID (over the same
  frames) with ``--inception``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfm_ext.fileio import atomic_write_text
from .adm import evaluate
from .adm_features import INCEPTION_WEIGHTS_FILE, ADMInceptionFeatures
from .video import I3D_WEIGHTS_FILE, I3DFeatures, frame_fid, fvd, iter_video_batches

__all__ = ["evaluate_images_command", "evaluate_videos_command"]

_ERRORS = (FileNotFoundError, ValueError, ImportError)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--samples", required=True, help="the sample folder (PNG / MP4 files) or .npz the sample command wrote")
    parser.add_argument("--inception", help=f"{INCEPTION_WEIGHTS_FILE} (torch-fidelity's v0.2.0 release), the ADM suite's InceptionV3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="the JSON file to write (default: metrics.json in the sample folder, or beside the .npz)")
    return parser


def _finish(args: argparse.Namespace, record: dict[str, Any]) -> int:
    samples = Path(args.samples)
    out = Path(args.out) if args.out else (samples / "metrics.json" if samples.is_dir() else samples.with_suffix(".metrics.json"))
    line = json.dumps({"samples": str(samples), "reference": str(args.reference), **record})
    atomic_write_text(out, line + "\n")
    print(line)
    return 0


def _error(e: BaseException) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def evaluate_images_command(argv: Sequence[str] | None, *, prog: str) -> int:
    """``--samples DIR_OR_NPZ --reference REF.npz [--inception FILE] [--dinov2 DIR]``: the ADM scores and FDD as JSON."""
    parser = _parser(prog, "Score image samples against an ADM reference batch: FID, sFID, IS, precision/recall, FDD-DINOv2")
    parser.add_argument("--reference", required=True, help="an ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--dinov2", help="a local transformers DINOv2 folder (a copy of facebook/dinov2-large): FDD")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    if args.inception is None and args.dinov2 is None:
        return _error(ValueError("give --inception (FID, sFID, IS, precision/recall) and/or --dinov2 (FDD)"))
    try:
        result = evaluate(args.samples, args.reference, inception=args.inception, dinov2=args.dinov2, batch_size=args.batch_size,
                          device=args.device, progress_bar=False)  # fmt: skip
    except _ERRORS as e:
        return _error(e)
    return _finish(args, result.as_dict())


def evaluate_videos_command(argv: Sequence[str] | None, *, prog: str) -> int:
    """``--samples DIR_OR_NPZ --reference DIR_OR_NPZ --i3d FILE [--inception FILE]``: FVD and frame-FID as JSON."""
    parser = _parser(prog, "Score video samples against real videos: FVD (16-frame I3D protocol) and frame-FID")
    parser.add_argument("--reference", required=True, help="real videos: a folder of .mp4 files or an .npz (arr_0 uint8 [N, T, H, W, C])")
    parser.add_argument("--i3d", help=f"{I3D_WEIGHTS_FILE} (the Kinetics-400 I3D of TATS / cd-fvd): FVD")
    parser.add_argument("--num-frames", type=int, default=16, help="the first frames of every video that FVD and frame-FID see (16: the standard FVD protocol)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.i3d is None and args.inception is None:
        return _error(ValueError("give --i3d (FVD) and/or --inception (frame-FID)"))
    record: dict[str, Any] = {}
    seen: list[int] = []

    def fake() -> Iterator[np.ndarray]:
        seen.append(0)
        for batch in iter_video_batches(args.samples, args.batch_size, num_frames=args.num_frames):
            seen[-1] += len(batch)
            yield batch

    try:
        i3d = I3DFeatures(args.i3d, device=args.device) if args.i3d else None
        inception = ADMInceptionFeatures(args.inception, device=args.device) if args.inception else None

        def real() -> Iterator[np.ndarray]:
            return iter_video_batches(args.reference, args.batch_size, num_frames=args.num_frames)

        if i3d is not None:
            record["fvd"] = fvd(real(), fake(), extractor=i3d, num_frames=args.num_frames, batch_size=args.batch_size)
            record["fvd_frames"] = args.num_frames
        if inception is not None:
            record["frame_fid"] = frame_fid(real(), fake(), inception=inception, batch_size=args.batch_size)
    except _ERRORS as e:
        return _error(e)
    return _finish(args, {"num_samples": seen[0], **record})
