"""Overhead of ``wrap_dit`` over the unwrapped reference DiT at the same token count.

For each model size, one training step (forward, MSE loss, backward, AdamW) and one sampling
step (forward under ``torch.no_grad``) of

* A: the reference :class:`dfm_ext.DiT` on ``[B, C, H, W]`` (patch ``p``, grid ``H/p``), and
* B: ``wrap_dit`` of the same DiT with a 2-stage Laplacian pyramid (stage 0 at ``H/2`` with
  patch ``p/2``, stage 1 at ``H`` with patch ``p``: the same grid and token count),

are timed interleaved (A, B, A, B, ...) after warm-up, and the per-repetition ratio B/A is
reported as min/median/max. Decomposing the data is not timed (it belongs to the data pipeline).

The same steps are also run under ``torch.compile(..., fullgraph=True)`` (inductor; the training
step compiles forward and loss, its backward is compiled by AOTAutograd, the optimizer step stays
eager), and compiled wrapped / compiled base is reported beside the eager ratio from the same run
(goal: <= 1.02). ``fullgraph=True`` fails loudly if the wrapper ever breaks the graph. The
warm-up calls include the compilation, which is not timed. ``--no-compile`` skips this part.

``--families sana wan`` measures the diffusers adapters instead (:data:`FAMILIES`): A is the
unwrapped diffusers model's own forward on stage 0 at its native size (its own time convention),
B the ``wrap_dit`` model on both stages (stage 0 with the model's patch, stage 1 at twice the size
with twice the patch: the same token count); eager only; written to ``overhead_families.json``.

Usage::

    python benchmarks/overhead.py                      # writes benchmarks/results/overhead.json
    python benchmarks/overhead.py --reps 5 --sizes small --threads 1
    python benchmarks/overhead.py --families sana wan --reps 15 --threads 1   # overhead_families.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit

SIZES = {
    # name: (preset overrides, batch)
    "small": (dict(input_size=16, patch_size=2, hidden_size=192, depth=6, num_heads=3), 8),
    "S/2": (dict(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6), 4),
}


def train_step(loss_fn, opt):
    """One optimiser step on ``loss_fn()``, as a zero-argument callable for the timer."""

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step



def describe(base, wrapped, config: dict, batch: int) -> dict:
    """What one measured pair is: config, batch, token count, stage shapes, patch sizes, parameters."""
    return dict(
        config=config,
        batch=batch,
        tokens=wrapped.packer.num_tokens,
        stage_shapes=[list(s) for s in wrapped.stage_shapes],
        patch_sizes=[list(p) for p in wrapped.packer.patch_sizes],
        params_base=sum(p.numel() for p in base.parameters()),
        params_wrapped=sum(p.numel() for p in wrapped.parameters()),
    )

def _sana(text: torch.Tensor):
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=48, num_layers=4,
        num_cross_attention_heads=4, cross_attention_head_dim=48, cross_attention_dim=192, caption_channels=64,
        sample_size=16, patch_size=2,
    )  # fmt: skip

    def call(m, x, t):  # SanaPipeline: timestep = 1000 sigma * timestep_scale (1 here)
        return m(x, encoder_hidden_states=text, timestep=1000 - 1000 * t).sample

    return model, (4, 16, 16), call


def _wan(text: torch.Tensor):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=48, in_channels=4, out_channels=4,
        text_dim=64, freq_dim=64, ffn_dim=768, num_layers=4,
    )  # fmt: skip

    def call(m, x, t):  # WanPipeline: timestep = 1000 sigma
        return m(x, timestep=1000 - 1000 * t, encoder_hidden_states=text).sample

    return model, (4, 2, 16, 16), call


#: diffusers families for ``--families``: builder(text) -> (model, native sample shape, base call)
FAMILIES = {"sana": _sana, "wan": _wan}
FAMILY_BATCH = 4


def _setup_family(name: str, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    b = FAMILY_BATCH
    text = torch.randn(b, 8, 64, generator=g).to(device)
    base, native, call = FAMILIES[name](text)
    base = base.to(device)
    video = len(native) == 4
    sample = (*native[:-2], 2 * native[-2], 2 * native[-1])
    patches = [(1, 2, 2), (1, 4, 4)] if video else [2, 4]
    wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid((2, 1)), sample_shape=sample, patch_sizes=patches).to(device)
    stages = [torch.randn(b, *s, generator=g).to(device) for s in wrapped.stage_shapes]
    targets = [torch.randn(b, *s, generator=g).to(device) for s in wrapped.stage_shapes]
    t = torch.rand(b, generator=g).to(device)
    t2 = torch.stack([torch.rand(b, generator=g).to(device), t], 1)
    stage = torch.ones(b, dtype=torch.long, device=device)
    opt_a = torch.optim.AdamW(base.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)

    def loss_a():
        return F.mse_loss(call(base, stages[0], t), targets[0])

    def loss_b():
        out = wrapped(stages, t2, stage, encoder_hidden_states=text)
        return sum((F.mse_loss(o, v) for o, v in zip(out, targets)), torch.zeros((), device=device))

    fns = {
        "train": (train_step(loss_a, opt_a), train_step(loss_b, opt_b)),
        "sample": (torch.no_grad()(lambda: call(base, stages[0], t)), torch.no_grad()(lambda: wrapped(stages, t2, stage, encoder_hidden_states=text))),
    }
    info = describe(base, wrapped, dict(base.config), b)
    return info, fns


def _setup(name: str, seed: int = 0, device: str = "cpu", compile_too: bool = True):
    overrides, batch = SIZES[name]
    torch.manual_seed(seed)
    cfg = DiTConfig(in_channels=4, num_classes=1000, class_dropout_prob=0.0, **overrides)
    base = DiT(cfg).to(device)
    decomposition = LaplacianPyramid((2, 1))
    wrapped = wrap_dit(copy.deepcopy(base), decomposition).to(device)
    assert wrapped.packer.num_tokens == cfg.grid_size[0] * cfg.grid_size[1]
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.image_size
    x = torch.randn(batch, 4, h, w, generator=g).to(device)
    target = torch.randn(batch, 4, h, w, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    stages = decomposition.decompose(x)
    targets = decomposition.decompose(target)
    t2 = torch.stack([torch.rand(batch, generator=g).to(device), t], 1)
    stage = torch.ones(batch, dtype=torch.long, device=device)
    mask = torch.ones(batch, 2, dtype=torch.bool, device=device)
    opt_a = torch.optim.AdamW(base.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)

    def loss_a():
        return F.mse_loss(base(x, t, y), target)

    def loss_b():
        out = wrapped(stages, t2, stage, mask, y=y)
        loss = F.mse_loss(out[0], targets[0])
        for o, v in zip(out[1:], targets[1:]):
            loss = loss + F.mse_loss(o, v)
        return loss

    def forward_a():
        return base(x, t, y)

    def forward_b():
        return wrapped(stages, t2, stage, mask, y=y)

    def sample(forward_fn):
        @torch.no_grad()
        def step():
            forward_fn()

        return step

    fns = {
        "train": (train_step(loss_a, opt_a), train_step(loss_b, opt_b)),
        "sample": (sample(forward_a), sample(forward_b)),
    }
    if compile_too:
        compiled = {f: torch.compile(f, fullgraph=True) for f in (loss_a, loss_b, forward_a, forward_b)}
        fns["train_compiled"] = (train_step(compiled[loss_a], opt_a), train_step(compiled[loss_b], opt_b))
        fns["sample_compiled"] = (sample(compiled[forward_a]), sample(compiled[forward_b]))

    info = describe(base, wrapped, cfg.to_dict(), batch)
    return info, fns


def _time(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(sizes: list[str], reps: int, warmup: int, device: str, compile_too: bool = True, families: bool = False) -> dict:
    results = {}
    for name in sizes:
        info, fns = _setup_family(name, device=device) if families else _setup(name, device=device, compile_too=compile_too)
        entry = dict(info)
        for kind, (fa, fb) in fns.items():
            # Compiled steps: the first call compiles the forward, the first backward the backward.
            for _ in range(max(warmup, 2) if kind.endswith("_compiled") else warmup):
                fa()
                fb()
            ta, tb = [], []
            for i in range(reps):
                # alternate which goes first, so slow drifts of a shared machine hit both equally
                if i % 2 == 0:
                    ta.append(_time(fa, device))
                    tb.append(_time(fb, device))
                else:
                    tb.append(_time(fb, device))
                    ta.append(_time(fa, device))
            ratios = [b / a for a, b in zip(ta, tb)]
            entry[kind] = dict(
                base_median_s=statistics.median(ta),
                wrapped_median_s=statistics.median(tb),
                ratio_min=min(ratios),
                ratio_median=statistics.median(ratios),
                ratio_max=max(ratios),
                reps=reps,
            )
        results[name] = entry
    return results


def markdown(results: dict) -> str:
    lines = [
        "| model | tokens | batch | step | mode | base (s) | wrapped (s) | wrapped / base min / median / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results.items():
        for kind in ("train", "sample"):
            for mode, key in (("eager", kind), ("compiled", f"{kind}_compiled")):
                if key not in e:
                    continue
                r = e[key]
                lines.append(
                    f"| {name} | {e['tokens']} | {e['batch']} | {kind} | {mode} | {r['base_median_s']:.4f} | "
                    f"{r['wrapped_median_s']:.4f} | {r['ratio_min']:.3f} / {r['ratio_median']:.3f} / {r['ratio_max']:.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), help="measure these diffusers adapters instead")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    parser.add_argument("--out", type=Path, default=None, help="default: results/overhead.json (overhead_families.json)")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("overhead_families.json" if args.families else "overhead.json")
    torch.set_num_threads(args.threads)
    if args.families:
        results = run(args.families, args.reps, args.warmup, args.device, compile_too=False, families=True)
    else:
        results = run(args.sizes, args.reps, args.warmup, args.device, compile_too=not args.no_compile)
    meta = dict(
        torch=torch.__version__,
        device=args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        threads=args.threads,
        machine=platform.machine(),
        command="python benchmarks/overhead.py " + " ".join(
            f"--{k.replace('_', '-')}" if isinstance(v, bool)
            else f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out" and v is not False and v is not None and not (k == "sizes" and args.families)
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(markdown(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
