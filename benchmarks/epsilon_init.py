"""DFM finetuning of an epsilon-prediction DiT: which output treatment to start from (issue 27, item 7).

A tiny class-conditional DiT is pretrained here with its own DDPM objective (linear betas
1e-4..0.02 over 1000 steps, integer time k, epsilon target, 10% label dropout) on Fashion-MNIST
at 16x16 (the Laplacian pyramid's stage 0 of the 32x32 images, so stage 0 is the pretraining
distribution). It is then wrapped for two-stage DFM at 32x32 (stage 0 16x16 with the model's
own patch 2, stage 1 32x32 with patch 4) and finetuned with the DFM objective under three output
treatments, from the same weights, data order, times and noise:

* ``raw``: the epsilon output taken as the velocity (``time_convention="discrete"``: the embedder
  sees ``999 (1 - t)``), the adapter's default before this measurement;
* ``neg``: the same with ``output_scale=-1`` (``-epsilon`` as the velocity);
* ``exact``: the exact re-parametrisation of a VP epsilon model as a flow velocity, on stage 0
  (the stage whose head is pretrained; later stages start at zero as plain velocities): the flow
  state ``x_t = t x + (1 - t) eps`` is the DDPM state of equal signal-to-noise ratio scaled by
  ``r = sqrt(t^2 + (1 - t)^2)``, so the model gets ``x_t / r`` at the DDPM step ``k(t)`` of that
  SNR (interpolated on the ``alpha_bar`` table), and its ``eps_hat`` gives
  ``v = (x_t - eps_hat) / t`` (``t`` clamped at ``--t-min``).

Reported: the DFM loss (mean over elements, default stage probabilities p0 = 0.9) and the
stage-0 loss on a fixed held-out batch (fixed noise and times) after 0, 100 and 500 steps (and the
steps in between that ``--eval-every`` adds). Analytic reference at step 0 for unit-variance data
and a perfect epsilon: raw ``E|2 eps - x|^2 = 5``, zero output 2, ``-eps`` 1, exact 0.

Single-threaded (``torch.set_num_threads(1)``), resumable: the pretrained weights and every
evaluation are written as they come (``--out`` JSON and a cache folder beside it); a rerun skips
what is done. About 16 minutes on the shared 2-core machine under load (pretraining 647 s, each
finetuning arm 74-138 s)::

    .venv/bin/python benchmarks/epsilon_init.py --out benchmarks/results/epsilon_init.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm_ext import DFMObjective, DiT, DiTConfig, LaplacianPyramid, StageTimestepSampler, wrap_dit
from dfm_ext.adapters import DiTFamilyAdapter
from dfm_ext.process.timesteps import StageTimesteps
from dfm_ext.fileio import atomic_write_bytes
from dfm_ext.recipes.demo.data import load_dataset

OPTIONS = ("raw", "neg", "exact")
#: stage-0 time bins for the per-t loss at the first and last evaluation (where the options differ)
T_BINS = ((0.0, 0.02), (0.02, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0))


def ddpm_alpha_bar(steps: int = 1000) -> Tensor:
    """DDPM's linear-beta ``alpha_bar`` table (float64): ``prod_{i <= k} (1 - beta_i)``."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def snr_matched_step(t: Tensor, alpha_bar: Tensor) -> Tensor:
    """The continuous DDPM step ``k`` whose SNR ``alpha_bar / (1 - alpha_bar)`` equals the flow's ``t^2 / (1 - t)^2``."""
    log_snr_table = torch.log(alpha_bar / (1 - alpha_bar))  # decreasing in k
    td = t.double().clamp(1e-12, 1 - 1e-12)
    log_snr = 2 * (torch.log(td) - torch.log1p(-td))
    x = -log_snr_table  # increasing
    q = (-log_snr).clamp(float(x[0]), float(x[-1]))
    i = torch.searchsorted(x, q).clamp(1, len(x) - 1)
    w = (q - x[i - 1]) / (x[i] - x[i - 1])
    return ((i - 1) + w).to(t.dtype)


class EpsilonAsVelocity(DiTFamilyAdapter):
    """The exact conversion of an epsilon model to a flow velocity on stage 0 (see the module docstring).

    Only stage 0's head is pretrained; later stages start at zero and are trained as plain
    velocities (converting them too would turn their zero output into ``x_t / t``).
    """

    def __init__(self, time_convention: Any = "discrete", output_scale: float = 1.0, t_min: float = 0.02):
        super().__init__(time_convention, output_scale)
        self.t_min = float(t_min)

    def forward(self, model, packed, t, stage, **cond):  # noqa: ANN001, ANN201
        n0 = model.x_embedder.stage_slice(0).stop  # stage 0's packed channels come first
        t0 = t[:, 0, None, None, None]
        r = torch.sqrt(t0**2 + (1 - t0) ** 2)
        out = super().forward(model, torch.cat([packed[:, :n0] / r, packed[:, n0:]], 1), t, stage, **cond)
        return torch.cat([(packed[:, :n0] - out[:, :n0]) / t0.clamp_min(self.t_min), out[:, n0:]], 1)


def build_base(args: argparse.Namespace) -> DiT:
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=args.hidden, depth=args.depth,
                    num_heads=4, num_classes=10, class_dropout_prob=0.1)  # fmt: skip
    return DiT(cfg)


def pretrain(args: argparse.Namespace, data: Tensor, labels: Tensor, cache: Path) -> tuple[DiT, dict[str, Any]]:
    """DDPM epsilon pretraining at 16x16 (cached in ``cache``)."""
    from safetensors.torch import load_model, save_model

    model = build_base(args)
    info_path = cache / "pretrain.json"
    weights = cache / "pretrained.safetensors"
    if info_path.is_file() and weights.is_file():
        load_model(model, str(weights))
        return model, json.loads(info_path.read_text())
    alpha_bar = ddpm_alpha_bar().float()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    model.train()
    start, losses = time.time(), []
    for step in range(args.pretrain_steps):
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=g)
        x, y = data[idx], labels[idx]
        k = torch.randint(0, 1000, (args.batch,), generator=g)
        eps = torch.randn(x.shape, generator=g)
        a = alpha_bar[k].view(-1, 1, 1, 1)
        xk = a.sqrt() * x + (1 - a).sqrt() * eps
        loss = (model(xk, k.float() / 1000, y) - eps).square().mean()  # the embedder sees 1000 t = k
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 500 == 0:
            print(f"pretrain {step + 1}/{args.pretrain_steps}: eps loss {sum(losses[-500:]) / 500:.4f}", flush=True)
    info = {"steps": args.pretrain_steps, "final_eps_loss_mean_last_500": sum(losses[-500:]) / min(500, len(losses)),
            "seconds": time.time() - start}  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    save_model(model, str(weights))
    atomic_write_bytes(info_path, json.dumps(info).encode())
    return model, info


def wrap(option: str, base: DiT, args: argparse.Namespace):  # noqa: ANN201
    model = copy.deepcopy(base)
    model.dfm_time_convention = "discrete"  # this DiT reads the DDPM step k = 999 (1 - t) (instance declaration)
    pyramid = LaplacianPyramid(factors=(2, 1))
    if option == "exact":
        adapter = EpsilonAsVelocity(t_min=args.t_min)
    else:
        adapter = DiTFamilyAdapter("discrete", output_scale=-1.0 if option == "neg" else 1.0)
    wrapped = wrap_dit(model, pyramid, adapter=adapter, sample_shape=(1, 32, 32), patch_sizes=[2, 4])
    if option == "exact":  # stage 0 reads the SNR-matched DDPM step instead of 999 (1 - t)
        wrapped.base.t_embedder.time_transform = functools.partial(snr_matched_step, alpha_bar=ddpm_alpha_bar())
    return wrapped, pyramid


def evaluate(model, pyramid, batch: dict[str, Any], bins: bool = False) -> dict[str, Any]:  # noqa: ANN001
    model.eval()
    objective = DFMObjective(2)
    stages = pyramid.decompose(batch["x"])
    with torch.no_grad():
        out = objective(model, stages, batch["times"], noise=batch["noise"], y=batch["y"])
        only0 = objective(model, stages, batch["times0"], noise=batch["noise"], y=batch["y"])
        result: dict[str, Any] = {"loss": float(out.loss), "stage0_loss": float(only0.loss), "per_stage": [float(v) for v in out.per_stage]}
        if bins:  # stage 0 alone at times drawn uniformly in each bin
            n = batch["x"].shape[0]
            u = batch["u"]
            result["stage0_loss_by_t"] = {}
            for lo, hi in T_BINS:
                t = torch.stack([lo + (hi - lo) * u, torch.zeros(n)], 1)
                times = StageTimesteps(t=t, stage=torch.zeros(n, dtype=torch.long), mask=torch.tensor([[True, False]]).expand(n, 2))
                result["stage0_loss_by_t"][f"{lo}-{hi}"] = float(objective(model, stages, times, noise=batch["noise"], y=batch["y"]).loss)
    model.train()
    return result


def finetune(option: str, base: DiT, args, data, labels, eval_batch, results: dict, save) -> None:  # noqa: ANN001
    done = results["options"].setdefault(option, {})
    if str(args.steps) in done:
        print(f"{option}: done", flush=True)
        return
    model, pyramid = wrap(option, base, args)
    sampler = StageTimestepSampler(2)
    objective = DFMObjective(2)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(2)  # the same stream for every option
    model.train()
    checkpoints = sorted({0, args.steps, *range(0, args.steps + 1, args.eval_every)})
    start = time.time()
    for step in range(args.steps + 1):
        if step in checkpoints:
            done[str(step)] = evaluate(model, pyramid, eval_batch, bins=step in (0, args.steps))
            print(f"{option} step {step}: {done[str(step)]}", flush=True)
            save()
        if step == args.steps:
            break
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=g)
        x, y = data[idx], labels[idx]
        drop = torch.rand(args.batch, generator=g) < 0.1
        loss = objective(model, pyramid.decompose(x), sampler.sample(args.batch, generator=g), generator=g,
                         y=y, force_drop_ids=drop.long()).loss  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    results.setdefault("seconds", {})[option] = time.time() - start
    save()


def bins_table(results: dict, steps: list[int]) -> str:
    """Stage-0 loss per time bin (t = 0 noise), at the first and last step."""
    lines = ["| option | step | " + " | ".join(f"t in [{lo}, {hi})" for lo, hi in T_BINS) + " |", "|" + "---|" * (2 + len(T_BINS))]
    for option in OPTIONS:
        for step in steps:
            r = results["options"].get(option, {}).get(str(step), {}).get("stage0_loss_by_t")
            if r:
                lines.append(f"| {option} | {step} | " + " | ".join(f"{r[f'{lo}-{hi}']:.3f}" for lo, hi in T_BINS) + " |")
    return "\n".join(lines)


def table(results: dict, steps: list[int]) -> str:
    head = "| option | " + " | ".join(f"loss @ {s}" for s in steps) + " | " + " | ".join(f"stage-0 loss @ {s}" for s in steps) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(steps))]
    for option in OPTIONS:
        r = results["options"].get(option, {})
        cells = [f"{r[str(s)]['loss']:.4f}" if str(s) in r else "-" for s in steps]
        cells += [f"{r[str(s)]['stage0_loss']:.4f}" if str(s) in r else "-" for s in steps]
        lines.append(f"| {option} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/epsilon_init.json"))
    ap.add_argument("--pretrain-steps", type=int, default=3000)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--t-min", type=float, default=0.02)
    ap.add_argument("--eval-size", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = args.out.with_suffix("").parent / (args.out.stem + "_cache")
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("options", {})
    results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["command"] = "python benchmarks/epsilon_init.py " + f"--out {args.out}"

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, json.dumps(results, indent=2).encode())

    train = load_dataset("fashion-mnist", "train", size=32)
    test = load_dataset("fashion-mnist", "test", size=32)
    data, labels = train.images, train.labels
    pyramid = LaplacianPyramid(factors=(2, 1))
    base, info = pretrain(args, pyramid.decompose(data)[0], labels, cache)
    results["pretrain"] = info
    results["data"] = {"name": train.name, "train": int(data.shape[0]), "std": float(data.std())}
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(test.images.shape[0], generator=g)[: args.eval_size]
    x = test.images[idx]
    eval_batch = {
        "x": x, "y": test.labels[idx], "noise": [torch.randn(s.shape, generator=g) for s in pyramid.decompose(x)],
        "times": StageTimestepSampler(2).sample(args.eval_size, generator=g),
        "times0": StageTimestepSampler(2, probabilities=[1.0, 0.0]).sample(args.eval_size, generator=g),
        "u": torch.rand(args.eval_size, generator=g),
    }  # fmt: skip
    save()
    for option in OPTIONS:
        finetune(option, base, args, data, labels, eval_batch, results, save)
    steps = sorted({0, 100, args.steps} & {int(s) for r in results["options"].values() for s in r})
    md = table(results, steps) + "\n\nStage-0 loss by stage-0 time:\n\n" + bins_table(results, [0, args.steps])
    results["table"] = md
    save()
    atomic_write_bytes(args.out.with_suffix(".md"), (md + "\n").encode())
    print(md)


if __name__ == "__main__":
    main()
