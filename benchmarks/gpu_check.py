"""GPU check: MFU, the largest DiT-XL/2 batch, a real engine step with its host syncs, sampler throughput,
LoRA / checkpointing costs and 1-vs-N-GPU scaling, in one command and one JSON file.

::

    python benchmarks/gpu_check.py                  # CUDA: about 6-7 minutes on one H100 (an estimate: never run on a GPU)
    python benchmarks/gpu_check.py --cpu --quick    # tiny sizes on the CPU (what tests/test_gpu_check.py runs)

It writes ``benchmarks/results/gpu_check.json`` (or ``--out``); each part is written as soon as it
finishes, and a part that fails records its error while the others still run. Without CUDA (and
without ``--cpu``) it prints one line, writes ``{"cuda": false, ...}`` and exits 0. The parts, in
the order they run (sizes for CUDA; ``--quick`` uses the tiny DiT, a few steps, and the CPU stand-ins said):

``engine`` (3). The ``tiny`` ImageNet recipe end to end: an image folder and a tiny VAE
    (:mod:`dfm_ext.recipes.imagenet.assets`), a latent cache (``python -m dfm_ext.recipes.imagenet.cache``),
    then 30 steps from the cache with the EMA, the DDP path, ``train.mixed_precision=bf16
    train.compile=true`` (inductor), a checkpoint and a sample grid. It runs in a subprocess through
    ``benchmarks/_gpu_check_engine.py``, which calls the recipe's ``main`` (what ``python -m
    dfm_ext.recipes.imagenet`` runs) with ``Trainer._step`` wrapped: each step runs under
    ``torch.cuda.set_sync_debug_mode("warn")`` and the synchronizing calls are counted per step, with
    the source lines that made them (the engine itself is not changed). A calibration first checks that
    the counter sees known syncs. Quick: 3 steps on the CPU in float32; syncs "not measurable on CPU".
``train_step`` (5). One training step (module docstring of ``_gpu_check_models.py``) of DiT-B/2 on
    32x32x4 latents (256 tokens), batch 64: ``base`` (unwrapped), ``wrapped``, ``lora`` (per-stage
    LoRA) and ``ckpt`` (activation checkpointing), each eager and ``torch.compile(fullgraph=True)``;
    3 warm-up and 10 timed steps between ``torch.cuda.synchronize`` calls, peak memory from
    ``torch.cuda.max_memory_allocated``. Ratios side by side: wrapped/base, lora/wrapped, ckpt/wrapped
    (time and memory), compiled/eager per arm; each ratio is the quotient of the two measured values.
    The eager arms run first, then the compiled ones (wrapped, lora, ckpt, base) while the budget allows.
``mfu`` (1). For every timed configuration: model FLOPs per step counted from the config
    (``_gpu_check_flops.py`` says how: the matrix products of attention, MLP, adaLN, embeddings and
    head, x3 for forward + backward), divided by the step time and the GPU's dense bf16 peak from a
    table by ``torch.cuda.get_device_name()`` (H100, H200, A100; ``null`` with the reason otherwise).
    The count is checked against ``torch.utils.flop_counter`` on each model, on its device.
``memory`` (2). DiT-XL/2 wrapped with ``LaplacianPyramid((2, 1))`` at 256 and 1024 tokens (32x32 and
    64x64 latents, patch 2), bf16 autocast, AdamW: the largest per-GPU batch whose training step fits,
    without and with activation checkpointing, by doubling then bisection on
    ``torch.cuda.OutOfMemoryError`` (the cache emptied between tries; to within 1/16; at most 30 s and 14
    tries per search), then both modes timed at the largest batch that fits without checkpointing
    (at most 256; 3/4 of it after an OOM there). Eager: a compiled step usually needs less. Quick: a fake byte limit on the CPU
    (``FakeMemoryLimit``) raises a real ``OutOfMemoryError``, so the search and its recovery run as on a GPU.
``sampler`` (4). ``DFMSampler`` Euler, 30 + 10 steps, classifier-free guidance 1.5 (conditional and
    unconditional in one batched call), on the wrapped DiT-XL/2 at 256 tokens, 32 images per batch,
    bf16 autocast, eager then compiled (``model.compile()``): images/s over 2 timed batches after one
    warm-up batch (the compile).
``scaling`` (6). With N > 1 GPUs: the engine (the same runner) under ``torchrun`` on 1 and on N GPUs,
    DDP (``train.sharding=none``) and FSDP2, DiT-B/2 on 32x32x4 cached latents, 32 images per GPU (the
    global batch is 32 N, so it divides for any N), eager; steps/s from the engine's ``metrics.jsonl``
    (the first window, with the warm-up, left out) and the weak-scaling efficiency
    ``steps/s(N) / steps/s(1)``. Skipped with one GPU. On the CPU only with ``--scaling-procs N``: 1 and N
    gloo processes, FSDP2 (the tests run N = 3).

The single-GPU parts share a time budget (``--budget-s``, default 420 s); a part or arm that would
start with too little of it left is recorded as skipped (the compiled arms keep a share for the
memory and sampler parts), so the whole run stays under 8 minutes on one H100. All durations here are
estimates until it has run on a GPU; scaling gets 300 s more on a multi-GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_check_flops import count_forward_flops, dit_forward_flops, mfu_record, peak_bf16_flops, train_step_flops  # noqa: E402
from _gpu_check_models import KINDS, LORA, autocast, build, dit_config, make_step, sync, time_steps  # noqa: E402
from _gpu_check_search import FakeMemoryLimit, largest_fitting, oom_safe  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"
ENGINE_RUNNER = Path(__file__).resolve().parent / "_gpu_check_engine.py"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the CUDA run and ``--quick``."""

    preset_small: str = "B/2"  # train-step arms and scaling
    preset_large: str = "XL/2"  # memory and sampler
    num_classes: int = 1000
    arms_latent: int = 32
    arms_batch: int = 64
    warmup: int = 3
    steps: int = 10
    mem_latents: tuple[int, ...] = (32, 64)  # 256 and 1024 tokens at patch 2
    mem_start: tuple[int, ...] = (32, 8)
    mem_limit: tuple[int, ...] = (4096, 1024)
    mem_relative: float = 1 / 16
    mem_tries: int = 14
    mem_search_s: float = 30.0
    mem_time_cap: int = 256
    sampler_latent: int = 32
    sampler_batch: int = 32
    sampler_runs: int = 2
    guidance: float = 1.5
    engine_steps: int = 30
    engine_log_every: int = 10
    scaling_resolution: int = 128  # the tiny VAE downsamples 4x: 32x32x4 latents
    scaling_per_process: int = 32
    scaling_steps: int = 25
    scaling_log_every: int = 5
    scaling_shardings: tuple[str, ...] = ("none", "fsdp2")
    # Minimum seconds left to start (estimates for one H100; compile dominates).
    need_compiled_arm: float = 60.0
    need_eager_arm: float = 10.0
    need_memory_search: float = 20.0
    need_sampler_compiled: float = 60.0


GPU = Sizes()
QUICK = Sizes(
    preset_small="tiny", preset_large="tiny", num_classes=10, arms_latent=8, arms_batch=4, warmup=1, steps=2,
    mem_latents=(8, 16), mem_start=(2, 2), mem_limit=(128, 128), mem_relative=0.0, mem_tries=20, mem_search_s=60.0, mem_time_cap=4,
    sampler_latent=8, sampler_batch=2, sampler_runs=1, engine_steps=3, engine_log_every=1,
    scaling_resolution=32, scaling_per_process=2, scaling_steps=4, scaling_log_every=2, scaling_shardings=("fsdp2",),
    need_compiled_arm=0, need_eager_arm=0, need_memory_search=0, need_sampler_compiled=0,
)  # fmt: skip
#: Quick mode: the fake GPU holds the static bytes and this many samples of the plain (unchecked) step.
QUICK_FAKE_SAMPLES = 13.5


class Budget:
    """Seconds left of ``total`` since construction."""

    def __init__(self, total: float) -> None:
        self.total, self.start = total, time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def deadline(self, cap: float) -> float:
        return time.perf_counter() + max(0.0, min(cap, self.left()))

    def skip(self, need: float, what: str) -> dict[str, Any] | None:
        if self.left() < need:
            return {"skipped": f"time budget: {self.left():.0f} s left of {self.total:.0f} s, {what} needs about {need:.0f} s"}
        return None


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
        info["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return info


def _error(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2500:]}


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _dynamo_stats() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


# -- subprocess runs of the recipe ----------------------------------------------------------------


def _python() -> str:
    return sys.executable


def make_assets(root: Path, *, size: int, per_class: int = 4) -> Path:
    """An image folder (crops of scikit-image photos, one class per photo) and a tiny VAE under ``root``."""
    from dfm_ext.recipes.engine.cli import make_tiny_vae
    from dfm_ext.recipes.imagenet.assets import make_image_folder

    if not (root / "vae").is_dir():
        make_image_folder(root / "images", per_class=per_class, size=size)
        make_tiny_vae(root)
    return root


def build_cache(assets: Path, out: Path, *, resolution: int, cpu: bool) -> dict[str, Any]:
    """The latent cache of the tiny config at ``resolution``: ``dfm_ext.recipes.imagenet.cache.main`` (what
    ``python -m dfm_ext.recipes.imagenet.cache`` runs), called in this process."""
    import contextlib
    import io

    from dfm_ext.recipes.imagenet.cache import main as cache_main

    argv = ["--config", "tiny", "--out", str(out), *(["--device", "cpu", "--dtype", "float32"] if cpu else []),
            f"data.root={assets / 'images'}", f"vae.path={assets}", f"data.resolution={resolution}"]  # fmt: skip
    if (out / "index.json").is_file():
        return json.loads((out / "build.json").read_text())
    start = time.perf_counter()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cache_main(argv)
    if rc != 0:
        raise RuntimeError(f"the latent cache build failed ({rc}): {stderr.getvalue()[-2000:]}")
    rec = {"command": "python -m dfm_ext.recipes.imagenet.cache --config tiny --out ... " + " ".join(argv[-3:]).replace(str(assets), "ASSETS"),
           "wall_s": round(time.perf_counter() - start, 2), **json.loads(stdout.getvalue().strip().splitlines()[-1])}  # fmt: skip
    rec.pop("out", None)
    (out / "build.json").write_text(json.dumps(rec))
    return rec


def recipe_args(*, cache: Path, assets: Path, out: Path, steps: int, batch: int, log_every: int, cpu: bool, compile_: bool,
                backend: str, sample: bool, extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    return [
        "--config", "tiny",
        f"data.latent_cache={cache}",
        f"vae.path={assets}",
        f"train.output_dir={out}",
        f"train.steps={steps}",
        f"train.global_batch_size={batch}",
        f"train.log_every={log_every}",
        f"train.checkpoint_every={steps}",
        f"train.sample_every={steps if sample else 0}",
        "train.trackers=[]",
        "train.progress=false",
        "train.num_workers=0",
        f"train.cpu={'true' if cpu else 'false'}",
        "train.mixed_precision=" + ('"no"' if cpu else "bf16"),  # quoted: YAML reads a bare no as false
        f"train.compile={'true' if compile_ else 'false'}",
        f"train.compile_backend={backend}",
        "optim.warmup_steps=1",
        *extra,
    ]  # fmt: skip


def scaling_global_batch(per_process: int, procs: int) -> int:
    """The global batch of a scaling run: the same per-process batch at any process count (divides by construction)."""
    return per_process * procs


def _run_group(cmd: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session; on timeout the whole process group goes (torchrun's workers too)."""
    import signal

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, (err or "") + f"\nkilled after the {timeout:.0f} s time budget")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_recipe(args: list[str], record: Path, *, procs: int | None, count_syncs: bool, timeout: float, cpu: bool) -> dict[str, Any]:
    """The recipe through the runner (under ``torchrun`` when ``procs`` is given); its record and outputs."""
    runner = [str(ENGINE_RUNNER), "--record", str(record), *(["--count-syncs"] if count_syncs else []), "--"]
    if procs is None:
        cmd = [_python(), *runner, *args]
    else:
        cmd = [_python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *runner, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpu and procs is not None:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    res = _run_group(cmd, env=env, timeout=max(30.0, timeout))
    wall = time.perf_counter() - start
    shown = ["python" if c == _python() else c for c in cmd]
    rec: dict[str, Any] = {
        "command": " ".join(shown[: len(shown) - len(args)] + ["--config", "tiny", "..."]).replace(str(Path.cwd()) + "/", ""),
        "overrides": [a for a in args if a.startswith(("train.", "optim.", "model."))],
        "returncode": res.returncode,
        "wall_s": round(wall, 2),
    }
    if res.returncode != 0:
        rec.update(ok=False, stderr_tail=res.stderr[-3000:])
        return rec
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.output_dir=")))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    windows = [m["steps_per_s"] for m in metrics if "steps_per_s" in m]
    steady = windows[1:] or windows  # the first window holds the warm-up (and the compile)
    summary = json.loads((out / "summary.json").read_text())
    rec.update(
        losses=losses,
        finite=all(math.isfinite(x) for x in losses),
        steps=summary.get("step"),
        steps_per_s_windows=windows,
        steps_per_s=statistics.median(steady) if steady else None,
        parallelism=summary.get("parallelism"),
        num_processes=summary.get("num_processes"),
        checkpoint_written=(out / "checkpoints" / f"step-{summary.get('step', 0):06d}" / "complete.json").is_file(),
        final_written=(out / "final" / "model.safetensors").is_file(),
        runner=json.loads(Path(f"{record}.rank0.json").read_text()),
    )
    return rec


def _sync_summary(runner: dict[str, Any], *, steady_from: int) -> dict[str, Any]:
    steps = runner["steps"]
    host = [s["host_ms"] for s in steps if s["step"] >= steady_from] or [s["host_ms"] for s in steps]
    out: dict[str, Any] = {"host_ms_per_step_median": round(statistics.median(host), 3) if host else None}
    if not runner["count_syncs"]:
        out["syncs"] = {"measured": False, "reason": "not measurable on CPU: torch.cuda.set_sync_debug_mode needs a CUDA device"}
        return out
    counts = [s["syncs"] for s in steps]
    steady = [s["syncs"] for s in steps if s["step"] >= steady_from]
    out["syncs"] = {
        "measured": True,
        "method": "torch.cuda.set_sync_debug_mode('warn') around Trainer._step, warnings counted (benchmarks/_gpu_check_engine.py)",
        "calibration": runner["calibration"],
        "per_step": counts,
        "steady_from_step": steady_from,
        "steady_max": max(steady) if steady else None,
        "steady_median": statistics.median(steady) if steady else None,
        "zero_per_step": bool(steady) and max(steady) == 0,
        "sites": runner["sites"],
    }
    return out


def run_engine(workdir: Path, sizes: Sizes, *, device: str, backend: str, budget: Budget) -> dict[str, Any]:
    """Part 3: assets, latent cache, the tiny recipe (EMA, DDP path, bf16, compile) with syncs counted per step."""
    cpu = device == "cpu"
    assets = make_assets(workdir / "assets", size=40)
    cache_dir = workdir / "latents-32"
    cache = build_cache(assets, cache_dir, resolution=32, cpu=cpu)
    s = sizes.engine_steps
    args = recipe_args(cache=cache_dir, assets=assets, out=workdir / "engine", steps=s, batch=8, log_every=sizes.engine_log_every,
                       cpu=cpu, compile_=True, backend=backend, sample=not cpu)  # fmt: skip
    rec = run_recipe(args, workdir / "engine-record" / "r.json", procs=None, count_syncs=not cpu, timeout=budget.left(), cpu=cpu)
    rec["latent_cache"] = cache
    if rec.get("returncode") != 0:
        return rec
    runner = rec.pop("runner")
    rec.update(_sync_summary(runner, steady_from=3 if s >= 4 else 2))
    rec["steps_recorded"] = [st["step"] for st in runner["steps"]]
    rec["calibration_reliable"] = None if runner["calibration"] is None else runner["calibration"]["reliable"]
    import yaml

    resolved = yaml.safe_load((workdir / "engine" / "config.yaml").read_text())  # the config the run used
    rec["ema_decay"] = resolved["train"]["ema_decay"]
    rec["sample_written"] = (workdir / "engine" / "samples" / f"step-{s:06d}.png").is_file() if not cpu else None
    rec["ok"] = bool(rec["finite"] and len(rec["losses"]) == s // sizes.engine_log_every + (s % sizes.engine_log_every > 0)
                     and rec["checkpoint_written"] and rec["final_written"] and rec["sample_written"] is not False and rec["ema_decay"]
                     and rec["steps_recorded"] == list(range(1, s + 1)))  # fmt: skip
    return rec


# -- part 5 (+1): train-step arms ------------------------------------------------------------------


def flop_check(built: Any, device: str) -> dict[str, Any]:
    """The analytic forward FLOPs of ``built`` at batch 1 against FlopCounterMode on the model itself."""
    from dfm_ext import StageTimestepSampler

    cfg, model = built.cfg, built.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, *cfg.image_size, generator=g).to(device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    t = torch.rand(1, generator=g).to(device)
    if built.stage_shapes is None:
        counted = count_forward_flops(lambda: model(x, t, y))
    else:
        ts = StageTimestepSampler(2).sample(1, generator=g, device=device)
        stages = [s.to(device) for s in model.decomposition.decompose(x)]
        counted = count_forward_flops(lambda: model(stages, ts.t, ts.stage, ts.mask, y=y))
    analytic = dit_forward_flops(cfg, 1, built.stage_shapes)["forward"]
    return {"analytic_forward": analytic, "flop_counter_forward": counted, "equal": analytic == counted}


def _arm(kind: str, compiled: bool, sizes: Sizes, *, device: str, backend: str) -> dict[str, Any]:
    cfg = dit_config(sizes.preset_small, sizes.arms_latent, num_classes=sizes.num_classes)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    built = build(kind, cfg, device)
    rec: dict[str, Any] = {"kind": kind, "compiled": compiled, "batch": sizes.arms_batch, "params": built.params}
    if kind == "lora":
        rec["lora"] = {**LORA, "stage_params": built.lora_params}
    if not compiled and kind in ("base", "wrapped"):
        rec["flop_check"] = flop_check(built, device)
    torch._dynamo.reset()  # each compiled arm compiles afresh (the loss closures share code objects)
    graphs, breaks = _dynamo_stats()
    step, _ = make_step(built, sizes.arms_batch, device, compiled=compiled, backend=backend)
    rec.update(time_steps(step, device, warmup=sizes.warmup, steps=sizes.steps))
    if compiled:
        after = _dynamo_stats()
        rec.update(graphs_compiled=after[0] - graphs, graph_breaks=after[1] - breaks)
    rec["samples_per_s"] = round(sizes.arms_batch / rec["seconds_per_step"], 3)
    rec["model_flops_per_step"] = train_step_flops(cfg, sizes.arms_batch, built.stage_shapes)
    if device == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del built, step
    torch._dynamo.reset()
    _free(device)
    return rec


def run_train_step(sizes: Sizes, *, device: str, backend: str, budget: Budget, write: Callable[[dict[str, Any]], None],
                   reserve: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Part 5: base / wrapped / lora / ckpt, eager and compiled, with the ratios of the measured values.

    A compiled arm starts only with ``reserve`` seconds (the later parts' share) and its own estimate left."""
    arms: dict[str, Any] = {}
    part: dict[str, Any] = {
        "model": f"DiT-{sizes.preset_small}", "latent": [4, sizes.arms_latent, sizes.arms_latent], "batch": sizes.arms_batch,
        "autocast": "bf16" if device == "cuda" else "none (float32)", "compile": f"torch.compile(loss_fn, fullgraph=True, backend={backend!r})",
        "arms": arms,
    }  # fmt: skip
    for compiled in (False, True):
        for kind in ("wrapped", "lora", "ckpt", "base"):  # compiled arms in this order of interest, as the budget allows
            name = f"{kind}_{'compiled' if compiled else 'eager'}"
            need = sizes.need_compiled_arm + reserve if compiled else sizes.need_eager_arm
            skip = budget.skip(need, f"the {name} arm (with {reserve:.0f} s kept for the later parts)" if compiled else f"the {name} arm")
            if skip:
                arms[name] = skip
                continue
            try:
                arms[name] = _arm(kind, compiled, sizes, device=device, backend=backend)
            except Exception as e:  # record and go on: the other arms are still worth having
                arms[name] = _error(e)
                _free(device)
            write(part)

    def ratio(a: str, b: str, key: str) -> float | None:
        return _ratio(arms.get(a, {}).get(key), arms.get(b, {}).get(key))

    ratios: dict[str, float | None] = {}
    for mode in ("eager", "compiled"):
        for num, den in (("wrapped", "base"), ("lora", "wrapped"), ("ckpt", "wrapped")):
            ratios[f"{num}/{den} time ({mode})"] = ratio(f"{num}_{mode}", f"{den}_{mode}", "seconds_per_step")
            ratios[f"{num}/{den} peak memory ({mode})"] = ratio(f"{num}_{mode}", f"{den}_{mode}", "peak_memory_gib")
    for kind in KINDS:
        ratios[f"compiled/eager time ({kind})"] = ratio(f"{kind}_compiled", f"{kind}_eager", "seconds_per_step")
        ratios[f"compiled/eager peak memory ({kind})"] = ratio(f"{kind}_compiled", f"{kind}_eager", "peak_memory_gib")
    part["ratios"] = ratios
    ran = [a for a in arms.values() if "skipped" not in a]
    part["ok"] = bool(ran) and all("error" not in a and a["losses_finite"] for a in ran)
    return part


# -- part 2: the largest batch ---------------------------------------------------------------------


def _saved_bytes_per_sample(built: Any, device: str) -> int:
    """Bytes autograd saves for backward in one sample's forward (parameters excluded): the quick mode's memory stand-in."""
    params = {p.data_ptr() for p in built.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    step, opt = make_step(built, 1, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def _search_one(built: Any, sizes: Sizes, index: int, *, device: str, fake: FakeMemoryLimit | None, budget: Budget) -> dict[str, Any]:
    opt = torch.optim.AdamW(built.model.parameters(), lr=1e-4)

    def step_at(batch: int) -> dict[str, Any]:
        if fake is not None:
            fake.check(batch)
        step, _ = make_step(built, batch, device, optimizer=opt, seed=batch)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        rec: dict[str, Any] = {"step_s": round(time.perf_counter() - t0, 3), "loss_finite": math.isfinite(float(loss))}
        if device == "cuda":
            rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if fake is not None:
            rec["fake_bytes"] = fake.bytes(batch)
        return rec

    attempt = oom_safe(step_at, cleanup=lambda: opt.zero_grad(set_to_none=True))
    found = largest_fitting(attempt, start=sizes.mem_start[index], limit=sizes.mem_limit[index], relative=sizes.mem_relative,
                            max_tries=sizes.mem_tries, deadline=budget.deadline(sizes.mem_search_s))  # fmt: skip
    del opt
    _free(device)
    return found


def _time_at(built: Any, batch: int, *, device: str) -> dict[str, Any]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, _ = make_step(built, batch, device)
    rec = time_steps(step, device, warmup=1, steps=3)
    rec["batch"] = batch
    rec["model_flops_per_step"] = train_step_flops(built.cfg, batch, built.stage_shapes)
    rec["tokens_per_s"] = round(batch * dit_forward_flops(built.cfg, 1, built.stage_shapes)["tokens"] / rec["seconds_per_step"], 1)
    if device == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del step
    _free(device)
    return rec


def _time_both(built: Any, batch: int, *, device: str, budget: Budget) -> dict[str, Any]:
    """Without and with checkpointing at ``batch``; after an OOM at the edge (fragmentation), at 3/4 of it."""
    base = built.model.base
    timed: dict[str, Any] = {}
    attempt = oom_safe(lambda b: _time_at(built, b, device=device))
    for ckpt in (False, True):
        base.gradient_checkpointing = ckpt
        key = "checkpointing" if ckpt else "no_checkpointing"
        if (skip := budget.skip(5, "timing")) is not None:
            timed[key] = skip
            continue
        rec = attempt(batch)
        if not rec["fits"] and batch > 1:
            rec = {**attempt(max(1, 3 * batch // 4)), "first_try": rec}
        timed[key] = rec
    timed["ckpt/plain time"] = _ratio(*(timed[k].get("seconds_per_step") for k in ("checkpointing", "no_checkpointing")))
    base.gradient_checkpointing = False
    return timed


def run_memory(sizes: Sizes, *, device: str, budget: Budget, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Part 2: the largest per-GPU batch of the wrapped DiT-XL/2, without and with activation checkpointing."""
    part: dict[str, Any] = {
        "model": f"DiT-{sizes.preset_large} wrapped, LaplacianPyramid((2, 1))", "autocast": "bf16" if device == "cuda" else "none (float32)",
        "optimizer": "AdamW (foreach)", "search": "doubling, then bisection on OOM to within max(1, largest/16)" if sizes.mem_relative
        else "doubling, then bisection on OOM to 1", "eager": True, "tokens": {},
    }  # fmt: skip
    if device != "cuda":
        part["memory_limit"] = (f"fake (CPU): static bytes (16 per parameter: weights, grads, two AdamW moments) + batch x the bytes autograd "
                                f"saves for one sample, against static + {QUICK_FAKE_SAMPLES} x that of the plain step")  # fmt: skip
    for i, latent in enumerate(sizes.mem_latents):
        cfg = dit_config(sizes.preset_large, latent, num_classes=sizes.num_classes)
        tokens = cfg.grid_size[0] * cfg.grid_size[1]
        entry: dict[str, Any] = {"latent": [4, latent, latent]}
        part["tokens"][str(tokens)] = entry
        skip = budget.skip(2 * sizes.need_memory_search, f"the {tokens}-token searches")
        if skip:
            entry.update(skip)
            write(part)
            continue
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
            built = build("wrapped", cfg, device)
            entry["params"] = built.params
            entry["flop_check"] = flop_check(built, device)
            base = built.model.base
            fake = None
            if device != "cuda":
                static = 16 * built.params
                fake_plain = FakeMemoryLimit(static, _saved_bytes_per_sample(built, device), 0)
                limit = static + int(QUICK_FAKE_SAMPLES * fake_plain.per_sample)
            for ckpt in (False, True):
                key = "checkpointing" if ckpt else "no_checkpointing"
                base.gradient_checkpointing = ckpt
                if device != "cuda":
                    fake = FakeMemoryLimit(static, _saved_bytes_per_sample(built, device), limit)
                    entry[f"fake_{key}"] = {"static": fake.static, "per_sample": fake.per_sample, "limit": fake.limit,
                                            "largest_under_limit": fake.largest()}  # fmt: skip
                skip = budget.skip(sizes.need_memory_search, f"the {tokens}-token search ({key})")
                entry[key] = skip or _search_one(built, sizes, i, device=device, fake=fake, budget=budget)
                write(part)
            plain = entry["no_checkpointing"].get("largest")
            if plain:
                entry["timed"] = _time_both(built, min(plain, sizes.mem_time_cap), device=device, budget=budget)
        except Exception as e:
            entry.update(_error(e))
        finally:
            built = base = None
            _free(device)
        write(part)
    searches = [e.get(k) for e in part["tokens"].values() for k in ("no_checkpointing", "checkpointing")]
    part["ok"] = all("error" not in e for e in part["tokens"].values()) and any(s and s.get("largest") for s in searches)
    return part


# -- part 4: sampler throughput --------------------------------------------------------------------


def run_sampler(sizes: Sizes, *, device: str, backend: str, budget: Budget, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Part 4: DFMSampler Euler 30 + 10 with CFG on the wrapped DiT, images/s eager and compiled."""
    from dfm_ext import DFMSampler, StageScheduler

    cfg = dit_config(sizes.preset_large, sizes.sampler_latent, num_classes=sizes.num_classes)
    built = build("wrapped", cfg, device)
    model = built.model.eval()
    sampler = DFMSampler(model.decomposition, StageScheduler.default(2), method="euler", guidance_scale=sizes.guidance)
    b = sizes.sampler_batch
    labels = torch.arange(b, device=device) % cfg.num_classes
    uncond = {"y": torch.full_like(labels, cfg.num_classes)}
    calls = sampler.scheduler.num_steps
    flops_per_image = calls * 2 * dit_forward_flops(cfg, 1, built.stage_shapes)["forward"]  # x2: guidance's unconditional half
    part: dict[str, Any] = {
        "model": f"DiT-{sizes.preset_large} wrapped", "latent": [4, sizes.sampler_latent, sizes.sampler_latent], "batch": b,
        "scheduler": repr(sampler.scheduler), "method": "euler", "guidance_scale": sizes.guidance, "model_calls_per_batch": calls,
        "forward_batch": 2 * b, "autocast": "bf16" if device == "cuda" else "none (float32)", "modes": {},
    }  # fmt: skip

    def one_batch() -> torch.Tensor:
        with torch.no_grad(), autocast(device):
            out = sampler.sample(model, (b, cfg.in_channels, *cfg.image_size), generator=torch.Generator(device=device).manual_seed(0),
                                 device=device, uncond=uncond, y=labels)  # fmt: skip
        return out.x

    peak = peak_bf16_flops(torch.cuda.get_device_name() if device == "cuda" else None)["flops"]
    for mode in ("eager", "compiled"):
        skip = budget.skip(sizes.need_sampler_compiled if mode == "compiled" else sizes.need_eager_arm, f"the {mode} sampler")
        if skip:
            part["modes"][mode] = skip
            continue
        try:
            graphs, breaks = _dynamo_stats()
            if mode == "compiled":
                model.compile(backend=backend)
            sync(device)
            t0 = time.perf_counter()
            x = one_batch()
            sync(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(sizes.sampler_runs):
                x = one_batch()
            sync(device)
            elapsed = time.perf_counter() - t0
            images = b * sizes.sampler_runs
            achieved = flops_per_image * images / elapsed
            part["modes"][mode] = {
                "warmup_s": round(warm, 3), "timed_batches": sizes.sampler_runs, "seconds": round(elapsed, 4),
                "images_per_s": images / elapsed, "finite": bool(torch.isfinite(x).all()), "model_flops_per_image": flops_per_image,
                "achieved_tflops": round(achieved / 1e12, 6), "mfu": None if peak is None else round(achieved / peak, 4),
            }  # fmt: skip
            if mode == "compiled":
                after = _dynamo_stats()
                part["modes"][mode].update(graphs_compiled=after[0] - graphs, graph_breaks=after[1] - breaks)
        except Exception as e:
            part["modes"][mode] = _error(e)
        write(part)
    m = part["modes"]
    part["compiled/eager images_per_s"] = _ratio(m.get("compiled", {}).get("images_per_s"), m.get("eager", {}).get("images_per_s"))
    ran = [v for v in m.values() if "skipped" not in v]
    part["ok"] = bool(ran) and all("error" not in v and v["finite"] for v in ran)
    del model, built
    torch._dynamo.reset()
    _free(device)
    return part


# -- part 6: 1 vs N processes ----------------------------------------------------------------------


def run_scaling(workdir: Path, sizes: Sizes, procs: int, *, device: str, backend: str, budget: Budget) -> dict[str, Any]:
    """Part 6: the engine under torchrun on 1 and ``procs`` processes, DDP and FSDP2, steps/s and weak-scaling efficiency."""
    cpu = device == "cpu"
    r = sizes.scaling_resolution
    assets = make_assets(workdir / ("assets" if r == 32 else f"assets-{r}"), size=40 if r == 32 else r)  # 32: the engine part's
    cache_dir = workdir / f"latents-{r}"
    cache = build_cache(assets, cache_dir, resolution=r, cpu=cpu)
    part: dict[str, Any] = {
        "model": f"DiT-{sizes.preset_small}", "latent": [4, sizes.scaling_resolution // 4, sizes.scaling_resolution // 4],
        "per_process_batch": sizes.scaling_per_process, "steps": sizes.scaling_steps, "log_every": sizes.scaling_log_every,
        "compile": False, "latent_cache": cache, "runs": {},
    }  # fmt: skip
    for sharding in sizes.scaling_shardings:
        runs: dict[str, Any] = {}
        part["runs"][sharding] = runs
        for n in (1, procs):
            g = scaling_global_batch(sizes.scaling_per_process, n)
            args = recipe_args(cache=cache_dir, assets=assets, out=workdir / f"scale-{sharding}-{n}", steps=sizes.scaling_steps, batch=g,
                               log_every=sizes.scaling_log_every, cpu=cpu, compile_=False, backend=backend, sample=False,
                               extra=(f"train.sharding={sharding}", f"model.preset={sizes.preset_small}",
                                      f"data.resolution={sizes.scaling_resolution}"))  # fmt: skip
            try:
                rec = run_recipe(args, workdir / f"scale-record-{sharding}-{n}" / "r.json", procs=n, count_syncs=False, timeout=budget.left(), cpu=cpu)
                rec.pop("runner", None)
                rec["global_batch"] = g
                if rec.get("steps_per_s"):
                    rec["images_per_s"] = rec["steps_per_s"] * g
                rec["ok"] = rec.get("returncode") == 0 and rec.get("finite", False) and rec.get("num_processes") == n
            except Exception as e:
                rec = _error(e)
            runs[str(n)] = rec
        one, many = runs.get("1", {}).get("steps_per_s"), runs.get(str(procs), {}).get("steps_per_s")
        runs["efficiency"] = _ratio(many, one)
        runs["speedup_images_per_s"] = _ratio(runs.get(str(procs), {}).get("images_per_s"), runs.get("1", {}).get("images_per_s"))
    part["ok"] = all(r.get("ok") for runs in part["runs"].values() for k, r in runs.items() if isinstance(r, dict))
    return part


# -- part 1: MFU -----------------------------------------------------------------------------------


def mfu_part(result: dict[str, Any], device: str) -> dict[str, Any]:
    """Part 1 from the timed configurations of parts 5 and 2."""
    name = torch.cuda.get_device_name() if device == "cuda" else None
    peak = peak_bf16_flops(name)
    part: dict[str, Any] = {
        "device_name": name or platform.processor() or "cpu",
        "peak_bf16_flops": peak["flops"],
        "peak_source": peak["matched"],
        "mfu_null_reason": peak["reason"],
        "method": "model FLOPs per step counted from the config (benchmarks/_gpu_check_flops.py: matrix products of attention, MLP, "
        "adaLN, embeddings and head, x3 for forward + backward; checkpointing's recompute and LoRA's products not counted) "
        "/ measured seconds per step / peak",
        "configurations": {},
        "flop_checks": {},
    }  # fmt: skip
    conf = part["configurations"]
    if not any("seconds_per_step" in a for a in result.get("train_step", {}).get("arms", {}).values()) and not any(
        "timed" in e for e in result.get("memory", {}).get("tokens", {}).values()
    ):
        return {"skipped": "no timed configuration (the train_step and memory parts did not time any)"}
    tp = result.get("train_step", {})
    for arm, rec in tp.get("arms", {}).items():
        if "seconds_per_step" in rec:
            conf[f"{tp['model']} {arm} batch {rec['batch']}"] = mfu_record(rec["model_flops_per_step"], rec["seconds_per_step"], peak["flops"])
        if "flop_check" in rec:
            part["flop_checks"][f"{tp['model']} {rec['kind']}"] = rec["flop_check"]
    mem = result.get("memory", {})
    for tokens, entry in mem.get("tokens", {}).items():
        if "flop_check" in entry:
            part["flop_checks"][f"{mem['model']} {tokens} tokens"] = entry["flop_check"]
        for key, rec in entry.get("timed", {}).items():
            if isinstance(rec, dict) and "seconds_per_step" in rec:
                label = f"{mem['model'].split(',')[0]} {tokens} tokens {key} batch {rec['batch']}"
                conf[label] = mfu_record(rec["model_flops_per_step"], rec["seconds_per_step"], peak["flops"])
    part["ok"] = bool(conf) and all(c["equal"] for c in part["flop_checks"].values())
    return part


# -- main ------------------------------------------------------------------------------------------

PARTS = ("engine", "train_step", "memory", "sampler", "scaling")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (seconds)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even without CUDA (float32; use with --quick)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the single-GPU parts (default 420)")
    parser.add_argument("--scaling-procs", type=int, default=None, help="processes of the scaling part (default: the GPU count; on the CPU: none)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --cpu --quick: eager)")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to skip")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print(f"no CUDA device visible: nothing checked (pass --cpu --quick for a CPU smoke run); wrote {args.out}")
        _write(args.out, {"cuda": False, "ran": False, "reason": "torch.cuda.is_available() is False", **_env_info("cpu")})
        return 0
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda":  # before the first allocation; fewer failures from fragmentation after an OOM
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sizes = QUICK if args.quick else GPU
    # On the CPU, "eager" (dynamo tracing only) keeps the smoke run to seconds; inductor on a GPU.
    backend = args.compile_backend or ("eager" if device == "cpu" and args.quick else "inductor")
    n_gpus = torch.cuda.device_count() if cuda and device == "cuda" else 0
    procs = args.scaling_procs or (n_gpus if device == "cuda" else 1)
    result: dict[str, Any] = {
        "cuda": cuda,
        "ran": True,
        "quick": args.quick,
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **_env_info(device),
        "compile_backend": backend,
        "budget_s": args.budget_s,
    }
    budget = Budget(args.budget_s)
    start = time.perf_counter()
    _write(args.out, result)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))

    def part(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        if key in args.skip:
            result[key] = {"skipped": "--skip"}
        else:
            print(f"[{time.perf_counter() - start:6.1f} s] {key}", flush=True)
            try:
                result[key] = fn()
            except Exception as e:  # keep what the part wrote before it failed
                result[key] = {**{k: v for k, v in result.get(key, {}).items() if k != "partial"}, **_error(e)}
        _write(args.out, result)

    def writer(key: str) -> Callable[[dict[str, Any]], None]:
        def write(partial: dict[str, Any]) -> None:
            result[key] = {**partial, "partial": True}
            _write(args.out, result)

        return write

    try:
        part("engine", lambda: run_engine(workdir, sizes, device=device, backend=backend, budget=budget))
        reserve = sizes.need_memory_search * 2 * len(sizes.mem_latents) + sizes.need_sampler_compiled  # memory and sampler
        part("train_step", lambda: run_train_step(sizes, device=device, backend=backend, budget=budget, write=writer("train_step"),
                                                  reserve=reserve))  # fmt: skip
        result["mfu"] = mfu_part(result, device)
        _write(args.out, result)
        part("memory", lambda: run_memory(sizes, device=device, budget=budget, write=writer("memory")))
        result["mfu"] = mfu_part(result, device)
        _write(args.out, result)
        part("sampler", lambda: run_sampler(sizes, device=device, backend=backend, budget=budget, write=writer("sampler")))
        if procs > 1:
            extra = Budget(max(budget.left(), 0) + 300)  # its own allowance on a multi-GPU machine
            part("scaling", lambda: run_scaling(workdir, sizes, procs, device=device, backend=backend, budget=extra))
        else:
            why = f"needs more than one CUDA device (found {n_gpus})" if device == "cuda" else "on the CPU only with --scaling-procs N (N gloo processes)"
            result["scaling"] = {"skipped": why}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        parts = {k: result.get(k, {}) for k in (*PARTS, "mfu")}
        result["ok"] = all(p.get("ok", False) for p in parts.values() if "skipped" not in p)
        result["failed_parts"] = [k for k, p in parts.items() if "skipped" not in p and not p.get("ok", False)]
        _write(args.out, result)
    summary = {"ok": result["ok"], "failed_parts": result["failed_parts"], "wall_s": result["wall_s"]}
    eng = result.get("engine", {}).get("syncs", {})
    if eng.get("measured"):
        summary["engine syncs per step (steady max)"] = eng["steady_max"]
    for k, v in result.get("train_step", {}).get("ratios", {}).items():
        if v is not None and "time" in k:
            summary[k] = round(v, 3)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
