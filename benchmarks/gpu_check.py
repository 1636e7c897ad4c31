"""GPU check: the engine with bf16 + torch.compile, and DiT-B/2 train-step cost wrapped vs unwrapped.

One command, one JSON file (``benchmarks/results/gpu_check.json`` or ``--out``)::

    python benchmarks/gpu_check.py                  # on a CUDA machine: about 3-5 minutes on one H200
    python benchmarks/gpu_check.py --cpu --quick    # tiny sizes on the CPU (what tests/test_gpu_check.py runs)

On a CUDA machine it

a. trains the ``tiny`` ImageNet recipe (assets from :mod:`dfm_ext.recipes.imagenet.assets`) for a few
   steps with ``train.mixed_precision=bf16 train.compile=true`` (inductor), in a subprocess
   (``python -m dfm_ext.recipes.imagenet``), and records its losses and that they are finite;
b. times one training step (forward under bf16 autocast, loss, backward, AdamW) of the reference
   DiT-B/2 on 32x32x4 latents (batch 64): ``base`` (unwrapped, plain flow matching) and
   ``wrapped`` (``wrap_dit`` with ``LaplacianPyramid((2, 1))`` through ``DFMObjective``), each
   eager and compiled (``torch.compile(loss_fn, fullgraph=True)``; the backward runs AOTAutograd's
   compiled backward, the optimiser step stays eager). Each arm builds its own model, warms up
   (the compile happens there, timed separately) and is timed over ``--steps`` steps with
   ``torch.cuda.synchronize``; ``torch.cuda.max_memory_allocated`` is its peak memory. Ratios
   wrapped/base (time, memory) and compiled/eager are reported side by side;
c. with more than one visible GPU, runs (a) again with ``train.sharding=fsdp2`` on all of them
   under ``torchrun``.

Each part is written to the JSON as soon as it finishes, and a failing part records its error
instead of stopping the others. Without CUDA (and without ``--cpu``) it prints one line saying
so, writes ``{"cuda": false, ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"


def _write(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def _env_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


# -- (a) the tiny recipe through the engine --------------------------------------------------------


def _recipe_args(assets: Path, out: Path, steps: int, *, cpu: bool, backend: str, sample: bool, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--config", "tiny",
        f"data.root={assets / 'images'}",
        f"vae.path={assets}",
        f"train.output_dir={out}",
        f"train.steps={steps}",
        "train.global_batch_size=8",
        "train.log_every=1",
        f"train.checkpoint_every={steps}",
        f"train.sample_every={steps if sample else 0}",
        "train.trackers=[]",
        "train.progress=false",
        "train.num_workers=0",
        f"train.cpu={'true' if cpu else 'false'}",
        # bf16 matmuls run at ~1 GFLOP/s on CPUs without AMX: the --cpu check stays float32.
        "train.mixed_precision=" + ('"no"' if cpu else "bf16"),  # quoted: YAML reads a bare no as false
        "train.compile=true",
        f"train.compile_backend={backend}",
        "optim.warmup_steps=1",
        *extra,
    ]  # fmt: skip


def _read_losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def run_recipe(workdir: Path, steps: int, *, cpu: bool, backend: str, sample: bool = True, launcher: list[str] | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train the tiny config in a subprocess; its losses, finiteness and wall time."""
    from dfm_ext.recipes.engine.cli import make_tiny_vae
    from dfm_ext.recipes.imagenet.assets import make_image_folder

    assets = workdir / "assets"
    if not (assets / "vae").is_dir():
        make_image_folder(assets / "images", per_class=4, size=40)
        make_tiny_vae(assets)
    out = workdir / ("run-" + ("fsdp2" if launcher else "single"))
    args = _recipe_args(assets, out, steps, cpu=cpu, backend=backend, sample=sample, extra=extra)
    cmd = [*(launcher or [sys.executable]), "-m", "dfm_ext.recipes.imagenet", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - start
    rec: dict[str, Any] = {
        "command": " ".join(["python" if c == sys.executable else c for c in cmd[: len(cmd) - len(args)]] + args[:1] + ["tiny", "..."]),
        "overrides": [a for a in args if a.startswith(("train.", "optim."))],
        "returncode": res.returncode,
        "wall_s": round(wall, 2),
    }
    if res.returncode != 0:
        rec["ok"] = False
        rec["stderr_tail"] = res.stderr[-3000:]
        return rec
    losses = _read_losses(out)
    summary = json.loads((out / "summary.json").read_text())
    rec.update(
        losses=losses,
        finite=all(math.isfinite(x) for x in losses),
        steps_logged=len(losses),
        sharding=summary.get("sharding"),
        num_processes=summary.get("num_processes"),
        sample_written=(out / "samples" / f"step-{steps:06d}.png").is_file() if sample else None,
    )
    rec["ok"] = rec["finite"] and len(losses) == steps and rec["sample_written"] is not False
    return rec


# -- (b) DiT train-step throughput ----------------------------------------------------------------


def _dit_config(quick: bool):
    from dfm_ext import DiTConfig

    if quick:
        return DiTConfig.preset("tiny", input_size=8, in_channels=4, num_classes=10, class_dropout_prob=0.0), 4
    return DiTConfig.preset("B/2", input_size=32, in_channels=4, num_classes=1000, class_dropout_prob=0.0), 64


def _arm(kind: str, compiled: bool, *, quick: bool, batch: int | None, device: str, backend: str, warmup: int, steps: int) -> dict[str, Any]:
    """One arm: build, warm up (compile), time ``steps`` training steps, peak memory."""
    from dfm_ext import DFMObjective, DiT, LaplacianPyramid, StageTimestepSampler, wrap_dit

    cfg, default_batch = _dit_config(quick)
    b = batch or default_batch
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = DiT(cfg)
    g = torch.Generator().manual_seed(1)
    h, w = cfg.image_size
    x = torch.randn(b, cfg.in_channels, h, w, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (b,), generator=g).to(device)
    if kind == "wrapped":
        model = wrap_dit(base, LaplacianPyramid((2, 1))).to(device)
        objective = DFMObjective(2)
        stages = [s.to(device) for s in model.decomposition.decompose(x)]
        # Sampled on the CPU, as the data pipeline does (its values are checked there).
        ts = StageTimestepSampler(2, probabilities=(0.5, 0.5)).sample(b, generator=g, device=device)

        def loss_fn():
            return objective(model, stages, ts, y=y).loss

    else:
        model = base.to(device)
        t = torch.rand(b, generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)

        def loss_fn():  # plain flow matching at the same token count (t = 1 is data)
            tt = t.view(-1, 1, 1, 1)
            return F.mse_loss(model(tt * x + (1 - tt) * noise, t, y).float(), x - noise)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fn = torch.compile(loss_fn, fullgraph=True, backend=backend) if compiled else loss_fn
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> torch.Tensor:
        with autocast:
            loss = fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(step())
    sync()
    elapsed = time.perf_counter() - t0
    last = [float(v) for v in torch.stack(losses).cpu()]  # one host transfer, after timing
    rec = {
        "kind": kind,
        "compiled": compiled,
        "batch": b,
        "params": sum(p.numel() for p in model.parameters()),
        "warmup_steps": warmup,
        "warmup_s": round(warm, 3),  # includes compilation for compiled arms
        "timed_steps": steps,
        "ms_per_step": round(1000 * elapsed / steps, 3),
        "samples_per_s": round(b * steps / elapsed, 2),
        "losses_finite": all(math.isfinite(v) for v in last),
        "last_loss": last[-1],
    }
    if device == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del model, opt, fn
    if device == "cuda":
        torch.cuda.empty_cache()
    return rec


def run_throughput(*, quick: bool, batch: int | None, device: str, backend: str, warmup: int, steps: int) -> dict[str, Any]:
    cfg, default_batch = _dit_config(quick)
    arms: dict[str, Any] = {}
    for compiled in (False, True):
        for kind in ("base", "wrapped"):
            name = f"{kind}_{'compiled' if compiled else 'eager'}"
            try:
                arms[name] = _arm(kind, compiled, quick=quick, batch=batch, device=device, backend=backend, warmup=warmup, steps=steps)
            except Exception as e:  # record and go on: the other arms are still worth having
                arms[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
                if device == "cuda":
                    torch.cuda.empty_cache()

    def ratio(a: str, b: str, key: str) -> float | None:
        if key in arms.get(a, {}) and key in arms.get(b, {}) and arms[b][key]:
            return round(arms[a][key] / arms[b][key], 4)
        return None

    ratios = {}
    for mode in ("eager", "compiled"):
        ratios[f"wrapped/base time ({mode})"] = ratio(f"wrapped_{mode}", f"base_{mode}", "ms_per_step")
        ratios[f"wrapped/base peak memory ({mode})"] = ratio(f"wrapped_{mode}", f"base_{mode}", "peak_memory_gib")
    for kind in ("base", "wrapped"):
        ratios[f"compiled/eager time ({kind})"] = ratio(f"{kind}_compiled", f"{kind}_eager", "ms_per_step")
        ratios[f"compiled/eager peak memory ({kind})"] = ratio(f"{kind}_compiled", f"{kind}_eager", "peak_memory_gib")
    model = "DiT-tiny (quick)" if quick else "DiT-B/2"
    return {
        "model": model,
        "latent": [cfg.in_channels, *cfg.image_size],
        "batch": batch or default_batch,
        "autocast": "bf16" if device == "cuda" else "none (float32)",
        "compile_backend": backend,
        "arms": arms,
        "ratios": ratios,
        "ok": all("error" not in a and a["losses_finite"] for a in arms.values()),
    }


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (seconds)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even without CUDA (float32; use with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 20; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm (default 3; --quick 1)")
    parser.add_argument("--batch", type=int, default=None, help="DiT batch (default 64; --quick 4)")
    parser.add_argument("--recipe-steps", type=int, default=None, help="steps of the tiny recipe (default 6; --quick 2)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --cpu --quick: eager)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["recipe", "throughput", "fsdp"], help="parts to skip")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print(f"no CUDA device visible: nothing checked (pass --cpu --quick for a CPU smoke run); wrote {args.out}")
        _write(args.out, {"cuda": False, "ran": False, "reason": "torch.cuda.is_available() is False", **_env_info("cpu")})
        return 0
    device = "cpu" if args.cpu else "cuda"
    # On the CPU, "eager" (dynamo tracing only) keeps the smoke run to seconds; inductor on a GPU.
    backend = args.compile_backend or ("eager" if device == "cpu" and args.quick else "inductor")
    steps = args.steps or (2 if args.quick else 20)
    warmup = args.warmup or (1 if args.quick else 3)
    recipe_steps = args.recipe_steps or (2 if args.quick else 6)
    result: dict[str, Any] = {
        "cuda": cuda,
        "ran": True,
        "quick": args.quick,
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **_env_info(device),
        "compile_backend": backend,
    }
    start = time.perf_counter()
    _write(args.out, result)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        if "recipe" not in args.skip:
            print("(a) tiny ImageNet recipe, compile" + (" + bf16" if device == "cuda" else ""), flush=True)
            try:
                result["recipe"] = run_recipe(workdir, recipe_steps, cpu=device == "cpu", backend=backend, sample=not args.quick)
            except Exception as e:
                result["recipe"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            _write(args.out, result)
        if "throughput" not in args.skip:
            print(f"(b) {'DiT-tiny' if args.quick else 'DiT-B/2'} train step: base/wrapped x eager/compiled", flush=True)
            result["throughput"] = run_throughput(
                quick=args.quick, batch=args.batch, device=device, backend=backend, warmup=warmup, steps=steps
            )  # fmt: skip
            _write(args.out, result)
        n_gpus = torch.cuda.device_count() if cuda else 0
        if "fsdp" not in args.skip and device == "cuda" and n_gpus > 1:
            print(f"(c) tiny recipe with train.sharding=fsdp2 on {n_gpus} GPUs (torchrun)", flush=True)
            torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(n_gpus)]
            try:
                result["fsdp2"] = run_recipe(
                    workdir, recipe_steps, cpu=False, backend=backend, launcher=torchrun, extra=("train.sharding=fsdp2",)
                )  # fmt: skip
            except Exception as e:
                result["fsdp2"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        else:
            result["fsdp2"] = {"skipped": f"needs more than one CUDA device (found {n_gpus})"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        parts = [result.get(k, {}) for k in ("recipe", "throughput", "fsdp2")]
        result["ok"] = all(p.get("ok", True) for p in parts if "skipped" not in p)
        _write(args.out, result)
    tp = result.get("throughput", {}).get("ratios", {})
    print(json.dumps({"ok": result["ok"], "wall_s": result["wall_s"], **tp}, indent=1))
    print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
