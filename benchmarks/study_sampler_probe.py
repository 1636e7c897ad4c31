"""Is DFM's gap to FM in the sampler or in the trained model? Re-sample the study's finished runs.

The study (``benchmarks/study.py``) samples every DFM arm with 30 + 10 Euler steps and the stage
handover at t = 0.9; FM gets 40 steps. This probe loads a run's saved training state (the EMA
weights the study evaluated; ``benchmarks/results/study_state/``, kept only on the machine that
ran it) and samples it again with other step splits and thresholds, scoring with the study's own
reference (same seed, same 500 samples, SWD and FD-EffNet). The first setting should be the
study's own, and its scores equal the JSON's (the ``study`` field): a check that the probe
evaluates what the study evaluated.

Usage::

    python benchmarks/study_sampler_probe.py --threads 1 --dataset opencv-digits --arms "DFM,DFM reducible"

Results merge into ``benchmarks/results/study_sampler_probe.json`` (rerun: done cells are skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study as S  # noqa: E402
from quality import RESULTS, Reference  # noqa: E402

from dfm_ext.fileio import atomic_write_text  # noqa: E402

OTHER_SETTINGS = ((20, 20, 0.9), (10, 30, 0.9), (20, 20, 0.7))  # (stage-0 steps, stage-1 steps, threshold)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, choices=S.DATASETS)
    ap.add_argument("--arms", type=lambda v: [a.strip() for a in v.split(",")], default=["DFM"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", type=Path, default=RESULTS, help="the folder holding study_state/ and study.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "study_sampler_probe.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a --quick study's state (its protocol and data)")
    ap.add_argument("--no-fd", action="store_true", help="SWD only")
    args = ap.parse_args(argv)
    protocol, stem = (S.QUICK, "study_quick") if args.quick else (S.FULL, "study")
    bad = [a for a in args.arms if a not in S.ARMS or a == "FM"]
    if bad:
        ap.error(f"--arms: {bad} are not DFM arms of the study; choose from {[a for a in S.ARMS if a != 'FM']}")
    missing = [a for a in args.arms if not S.state_path(args.state, args.dataset, a, args.seed).exists()]
    if missing:
        ap.error(f"no saved state for {missing} ({args.dataset}, seed {args.seed}) under {args.state / 'study_state'}")
    if args.threads:
        torch.set_num_threads(args.threads)
    study = json.loads((args.state / f"{stem}.json").read_text())
    res = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "study_sampler_probe", "cells": {}}
    res["command"] = "python benchmarks/study_sampler_probe.py --threads 1 --dataset DATASET --arms ARMS"
    train, test = S.load_split(args.dataset, "train", args.quick), S.load_split(args.dataset, "test", args.quick)
    levels = S.signal_levels(train)
    reference = Reference(test, protocol, fd=not args.no_fd)
    for arm in args.arms:
        tr = S.arm_trainer(arm, protocol, args.seed, train, levels)
        tr.load(torch.load(S.state_path(args.state, args.dataset, arm, args.seed), weights_only=True))
        recorded = study["runs"].get(S.run_key(args.dataset, arm, args.seed), {}).get("evals", {}).get(str(tr.steps_done))
        fm = study["runs"].get(S.run_key(args.dataset, "FM", args.seed), {}).get("evals", {}).get(str(tr.steps_done))
        for s0, s1, thr in ((*protocol.sample_steps, protocol.thresholds[0]), *OTHER_SETTINGS):
            key = f"{args.dataset}|{arm}|{args.seed}|{tr.steps_done}|{s0}+{s1}|{thr}"
            if key in res["cells"]:
                continue
            start = time.perf_counter()
            scores = reference.score(S.generate(tr, replace(protocol, sample_steps=(s0, s1), thresholds=(thr,)), args.seed),
                                     seed=args.seed)  # fmt: skip
            res["cells"][key] = {
                "dataset": args.dataset, "arm": arm, "seed": args.seed, "step": tr.steps_done, "steps": [s0, s1],
                "threshold": thr, "swd": round(scores["swd"]["mean"], 3), "fd_effnet": _round(scores["fd_effnet"]),
                "per_level": {k: round(v, 2) for k, v in scores["swd"]["per_level"].items()},
                "study": None if recorded is None else {"swd": round(recorded["swd"]["mean"], 3),
                                                        "fd_effnet": _round(recorded["fd_effnet"])},
                "fm": None if fm is None else {"swd": round(fm["swd"]["mean"], 3), "fd_effnet": _round(fm["fd_effnet"]),
                                               "per_level": {k: round(v, 2) for k, v in fm["swd"]["per_level"].items()}},
                "seconds": round(time.perf_counter() - start, 1),
            }  # fmt: skip
            atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
            print(json.dumps(res["cells"][key]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
