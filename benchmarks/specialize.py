"""Train-step cost of per-stage parameter specialisation on a wrapped reference DiT.

Configurations (all on the same wrapped DiT, two Laplacian stages, mixed-stage batches drawn with
the DFM default p_0 = 0.9, ``--p0``): none, LoRA rank 16 and 64 on every group ("all"), full
specialisation on "all" and on "mlp". A CPU ``stage`` takes the grouped route (stage counts read
on the host, the batch reordered so that each stage's samples are one block of rows: the majority
stage runs as the merged weight, every other stage as the base weight plus its own rank-r LoRA on
its block); "caller order" keeps the batch as drawn (the other stages' scattered rows get a
rank-2r correction of the merged weight: the route of a model that cannot reorder its inputs); the
"masked" LoRA rows force the route a device ``stage`` (or ``torch.compile``) takes, which reads
nothing back: every stage's LoRA on every sample, masked (before the grouped route existed, this
was also the CPU route for mixed batches). One train step = forward + backward + AdamW (fused
kernel by default, ``--adamw``). The
configurations run interleaved (round-robin) in the same process so that machine noise hits all
of them alike; we report median/min/max seconds and the median relative to "none", on two clocks
(and, for CPU time, the median over steps of the ratio to "none" on the same step's batch):
wall time, and process CPU time (``time.process_time``), which on a CPU shared with other work
(and with ``--threads 1``) is far less noisy than wall time: it does not count time the process
waits for a core. ``--repeats N`` measures N times with freshly built models (the spread between
repeats, a few percent on a shared machine, is larger than within one) and pools the steps.

    .venv/bin/python benchmarks/specialize.py --out benchmarks/results/specialize.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit
from dfm_ext.specialization import specialize
from dfm_ext.specialization.state import stage_context

CONFIGS = {
    "none": None,
    "lora r16 all": dict(kind="lora", targets="all", rank=16),
    "lora r16 all caller order": dict(kind="lora", targets="all", rank=16, caller_order=True),
    "lora r16 all masked": dict(kind="lora", targets="all", rank=16, masked=True),
    "lora r64 all": dict(kind="lora", targets="all", rank=64),
    "lora r64 all masked": dict(kind="lora", targets="all", rank=64, masked=True),
    "full all": dict(kind="full", targets="all"),
    "full mlp": dict(kind="full", targets="mlp"),
}


def build(cfg: DiTConfig, spec: dict | None, device: torch.device, adamw: str = "fused"):
    torch.manual_seed(0)
    model = wrap_dit(DiT(cfg), LaplacianPyramid(factors=(2, 1)), init="scratch").to(device)
    n_stage = 0
    if spec is not None:
        spec = dict(spec)
        masked = spec.pop("masked", False)
        caller_order = spec.pop("caller_order", False)
        handle = specialize(model, generator=torch.Generator().manual_seed(0), **spec)
        n_stage = handle.num_parameters
        if masked:
            stage_context(model).read_counts = False
        if caller_order:
            stage_context(model).group_batch = False
    # torch's AdamW defaults to its per-tensor Python loop on CPU (foreach only on CUDA): a cost
    # per parameter tensor that specialisation multiplies (56 -> 172 tensors at LoRA "all"); a
    # CPU trainer should use the fused kernel (one call for all tensors; CUDA has it too).
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[adamw]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **impl)
    return model, opt, n_stage


def measure(runs: dict, args: argparse.Namespace, device: torch.device) -> dict[str, tuple[list[float], list[float]]]:
    """Interleaved train steps of every configuration: ``name -> (wall seconds, CPU seconds)`` per timed step."""
    shapes = runs["none"][0].stage_shapes
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    order = list(runs)
    for step in range(args.warmup + args.steps):
        stages = [torch.randn(args.batch, *s, generator=g).to(device) for s in shapes]
        target = [torch.randn(args.batch, *s, generator=g).to(device) for s in shapes]
        t = torch.rand(args.batch, 2, generator=g).to(device)
        stage = (torch.rand(args.batch, generator=g) > args.p0).long().to(device)  # mixed batches
        y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
        # alternate the order every step, so that no configuration always runs first or last
        for name in order if step % 2 == 0 else order[::-1]:
            model, opt, _ = runs[name]
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(stages, t, stage, y=y)
            loss = sum(((o - tt) ** 2).mean() for o, tt in zip(out, target))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    return {name: (times[name], cpu_times[name]) for name in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--size", type=int, default=16, help="latent size; tokens = (size / 2) ** 2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure this many times, each with freshly built models; the pooled steps and each repeat's ratio are reported")
    ap.add_argument("--p0", type=float, default=0.9, help="probability of stage 0 per sample (the DFM default 0.9)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adamw", choices=("fused", "foreach", "loop"), default="fused",
                    help="AdamW implementation for every configuration (loop: torch's CPU default)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/specialize.json"))
    args = ap.parse_args()
    if args.repeats < 1 or args.steps < 1:
        ap.error(f"--repeats and --steps must be >= 1, got {args.repeats} and {args.steps}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = DiTConfig(
        input_size=args.size, patch_size=2, in_channels=4, hidden_size=args.hidden, depth=args.depth,
        num_heads=args.heads, num_classes=10, class_dropout_prob=0.0,
    )
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu_times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    per_repeat: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        # fresh models and optimisers each repeat (same seeds, same batches): what differs between
        # repeats is the process's memory layout and the machine's load, which move a single
        # run's ratios by a few percent
        runs = {name: build(cfg, spec, device, args.adamw) for name, spec in CONFIGS.items()}
        rep_cpu = measure(runs, args, device)
        for name, cts in rep_cpu.items():
            times[name] += cts[0]
            cpu_times[name] += cts[1]
            per_repeat[name].append(statistics.median(c / n for c, n in zip(cts[1], rep_cpu["none"][1])))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {per_repeat[name][-1]:.3f}" for name in CONFIGS if name != "none"), flush=True)  # fmt: skip
    base_params = sum(p.numel() for p in runs["none"][0].parameters())

    base_median = statistics.median(times["none"])
    base_cpu = statistics.median(cpu_times["none"])
    results = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "relative_median": statistics.median(ts) / base_median,
            "cpu_median_s": statistics.median(cpu_times[name]),
            "cpu_relative_median": statistics.median(cpu_times[name]) / base_cpu,
            # the same step's batch, run back to back: the median of per-step ratios cancels slow
            # drifts of a shared machine that a ratio of two medians keeps
            "cpu_paired_ratio_median": statistics.median(c / n for c, n in zip(cpu_times[name], cpu_times["none"])),
            "cpu_paired_ratio_per_repeat": per_repeat[name],
            "stage_parameters": runs[name][2],
            "stage_parameters_relative": runs[name][2] / base_params,
        }
        for name, ts in times.items()
    }
    record = {
        "command": "python benchmarks/specialize.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"
        ),
        "model": {**cfg.to_dict(), "tokens": cfg.grid_size[0] * cfg.grid_size[1], "parameters": base_params},
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "note": "CPU shared with other processes: timings are noisy" if device.type == "cpu" else "",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(
        f"{'config':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'x none':>7} "
        f"{'cpu s':>7} {'cpu x none':>10} {'paired':>7} {'stage params':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:<20} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['max_s']:8.3f} {r['relative_median']:7.2f} "
            f"{r['cpu_median_s']:7.3f} {r['cpu_relative_median']:10.3f} {r['cpu_paired_ratio_median']:7.3f} "
            f"{r['stage_parameters']:13,d}"
        )


if __name__ == "__main__":
    main()
