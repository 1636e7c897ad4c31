"""The documented ``train.compile`` option combinations, built and stepped the way the engine does it.

One combination: a family (the reference DiT, or tiny FLUX over three aspect-ratio buckets), a
specialisation (none, per-stage LoRA, per-stage full copies), activation checkpointing, a precision
(float32, bf16 autocast; under FSDP2 also the engine's ``MixedPrecisionPolicy``) and a parallelism
(``ddp``: the model compiled whole, as DDP wraps it; ``fsdp2``: ``fully_shard`` then each block
compiled alone). :func:`run` trains it a few steps eager or compiled (``compile_model``, the engine's
own function) and reports the losses, the gradients' norm, the graphs compiled and the graph breaks.

Used by ``tests/test_compile_matrix.py`` and ``benchmarks/compile_matrix.py``; run as a module under
two ranks (``python -m _compile_matrix OUT.json``) it runs :data:`FSDP2_MATRIX` with FSDP2 over the
process group and rank 0 writes the results.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import dfm_ext
from dfm_ext.recipes.engine.parallel import compile_model, shard_model

FAMILIES = ("dit", "flux")
SPECIALIZE = ("none", "lora", "full")
#: FLUX latents ``[4, H, W]`` of three aspect-ratio buckets (stage 0 at half the resolution).
FLUX_SHAPES = ((8, 8), (8, 12), (12, 8))
DIT_SHAPE = (8, 8)
TEXT_DIM, POOLED_DIM, BATCH = 16, 12, 4


@dataclass(frozen=True)
class Combo:
    family: str
    specialize: str
    checkpointing: bool
    dtype: str  # "fp32" or "bf16"
    parallel: str = "ddp"

    @property
    def name(self) -> str:
        ckpt = "+ckpt" if self.checkpointing else ""
        return f"{self.parallel}/{self.family}/{self.specialize}{ckpt}/{self.dtype}"


def matrix(parallel: str) -> list[Combo]:
    return [Combo(f, s, c, d, parallel) for f, s, c, d in itertools.product(FAMILIES, SPECIALIZE, (False, True), ("fp32", "bf16"))]


def steps_for(combo: Combo, buckets: bool) -> int:
    """Steps a test runs: FLUX over its three buckets and back to the first (``buckets``), else two stage mixes."""
    return len(FLUX_SHAPES) + 1 if buckets and combo.family == "flux" else 2


#: What the two-rank launch runs (``(combo, all three FLUX buckets)``): every DiT combination, FLUX with and
#: without per-stage LoRA and checkpointing (the FLUX buckets' recompiles are the same code as under DDP).
FSDP2_MATRIX = [(c, False) for c in matrix("fsdp2") if c.family == "dit"] + [
    (Combo("flux", "none", False, "fp32", "fsdp2"), True), (Combo("flux", "lora", True, "bf16", "fsdp2"), False)]  # fmt: skip


def build(combo: Combo, seed: int = 0) -> torch.nn.Module:
    """The wrapped model of ``combo`` (weights perturbed so every gradient is non-zero)."""
    torch.manual_seed(seed)
    if combo.family == "dit":
        base = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=DIT_SHAPE[0], in_channels=4, num_classes=10, class_dropout_prob=0.0))
        if combo.checkpointing:
            base.enable_gradient_checkpointing()
        model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(4, *DIT_SHAPE))
    else:
        from diffusers import FluxTransformer2DModel

        from dfm_ext.adapters.flux import FluxAdapter
        from dfm_ext.recipes.flux.assets import tiny_flux_transformer_config

        base = FluxTransformer2DModel(**tiny_flux_transformer_config(text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, latent_channels=4))
        if combo.checkpointing:
            base.enable_gradient_checkpointing()
        model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), adapter=FluxAdapter(guidance=1.0),
                                 sample_shape=(4, *FLUX_SHAPES[0]), init="pretrained", any_sample_shape=True)  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.02)
    if combo.specialize != "none":
        targets = "all" if combo.family == "dit" else ["attn", "mlp"]
        dfm_ext.specialize(model, kind=combo.specialize, targets=targets, rank=2 if combo.specialize == "lora" else None)
        with torch.no_grad():  # the stages' parameters away from their (identity) init
            for n, p in model.named_parameters():
                if "stage_params" in n:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.02)
    return model


def shapes(combo: Combo, steps: int, buckets: bool = True) -> list[tuple[int, int]]:
    """The latent shape of each step: the DiT's one, or the FLUX buckets in turn (the first only without ``buckets``)."""
    cycle = (FLUX_SHAPES if buckets else FLUX_SHAPES[:1]) if combo.family == "flux" else (DIT_SHAPE,)
    return [cycle[i % len(cycle)] for i in range(steps)]


def batch(combo: Combo, step: int, shape: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    z = torch.randn(BATCH, 4, *shape, generator=g)
    if combo.family == "dit":
        return z, {"y": torch.randint(0, 10, (BATCH,), generator=g)}
    return z, {"encoder_hidden_states": torch.randn(BATCH, 5, TEXT_DIM, generator=g), "pooled_projections": torch.randn(BATCH, POOLED_DIM, generator=g)}


def prepare(combo: Combo, backend: str | None, mesh_shape: tuple[int, ...] | None = None) -> torch.nn.Module:
    """Build, shard (FSDP2, with the engine's mixed-precision policy under bf16) and compile as the engine does."""
    model = build(combo)
    if combo.parallel == "fsdp2":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if combo.dtype == "bf16" else None
        names = ("replicate", "shard") if mesh_shape is not None and len(mesh_shape) == 2 else None
        mesh = init_device_mesh("cpu", mesh_shape or (dist.get_world_size(),), mesh_dim_names=names)
        shard_model(model, mesh, mp_policy=policy)
    if backend is not None:
        compile_model(model, backend, per_block=combo.parallel == "fsdp2")
    return model


def run(combo: Combo, backend: str | None, steps: int, *, buckets: bool = True, time_steps: int = 0,
        mesh_shape: tuple[int, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """``steps`` training steps (loss, backward, SGD): losses, gradient norms, graphs and breaks; then
    ``time_steps`` more timed steps (median seconds) when asked."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = prepare(combo, backend, mesh_shape)
    objective, times = dfm_ext.DFMObjective(2), dfm_ext.StageTimestepSampler(2, probabilities=(0.5, 0.5))
    params = [p for p in model.parameters() if p.requires_grad]
    losses, norms, graphs, seconds = [], [], [], []
    for step, shape in enumerate(shapes(combo, steps + time_steps, buckets)):
        z, cond = batch(combo, step, shape)
        g = torch.Generator().manual_seed(step)
        # every step a new stage mix (host-drawn, as the recipes draw it); the noise from the step's generator
        ts = times.sample(BATCH, generator=g, stage_generator=np.random.default_rng(step))
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=combo.dtype == "bf16"):
            out = objective(model, model.decomposition.decompose(z), ts, generator=g, **cond)
        out.loss.backward()
        with torch.no_grad():
            norm = sum(_local(p.grad).float().pow(2).sum() for p in params if p.grad is not None)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(norm)
                norm = norm / (mesh_shape[0] if mesh_shape is not None and len(mesh_shape) == 2 else 1)  # replicas counted once
            for p in params:
                if p.grad is not None:
                    p.sub_(1e-2 * p.grad)
                    p.grad = None
        if step >= steps:
            seconds.append(time.perf_counter() - started)
        losses.append(float(out.loss))
        norms.append(float(norm) ** 0.5)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    return {"combo": asdict(combo), "backend": backend, "losses": losses, "grad_norms": norms, "graphs_after_step": graphs,
            "graph_breaks": int(sum(counters["graph_break"].values())), "median_step_s": float(np.median(seconds)) if seconds else None}  # fmt: skip


def _accumulation_modes_agree() -> float:
    """Max |difference| of the sharded gradients after two micro-batches: reduce-scatter per micro-batch vs once."""
    from types import SimpleNamespace

    from dfm_ext.recipes.engine.parallel import FSDP2

    grads = []
    for mode in ("reduce_scatter", "unsharded"):
        model = prepare(Combo("dit", "lora", False, "fp32", "fsdp2"), None)
        parallel = FSDP2.__new__(FSDP2)
        parallel.train = SimpleNamespace(fsdp_accumulation=mode)  # the one key gradient_sync reads
        objective, times = dfm_ext.DFMObjective(2), dfm_ext.StageTimestepSampler(2, probabilities=(0.5, 0.5))
        for micro in range(2):
            z, cond = batch(Combo("dit", "lora", False, "fp32"), 10 * torch.distributed.get_rank() + micro, DIT_SHAPE)
            g = torch.Generator().manual_seed(micro)
            with parallel.gradient_sync(model, micro == 1):
                ts = times.sample(BATCH, generator=g, stage_generator=np.random.default_rng(micro))
                (objective(model, model.decomposition.decompose(z), ts, generator=g, **cond).loss / 2).backward()
        grads.append([_local(p.grad).clone() for p in model.parameters()])
    return max(float((a - b).abs().max()) for a, b in zip(*grads))


def _batch_split_agrees() -> float:
    """Max |difference| between the model and :class:`BatchSplit` of it (batches of 3 and 1 over two ranks)."""
    from dfm_ext.process.host_values import host_to_device
    from dfm_ext.recipes.engine.batch_split import BatchSplit

    model = build(Combo("dit", "lora", False, "fp32")).eval()
    split = BatchSplit(model, torch.distributed.get_rank(), torch.distributed.get_world_size())
    worst = 0.0
    for n in (3, 1):
        z, cond = batch(Combo("dit", "lora", False, "fp32"), 99, DIT_SHAPE)
        stages = model.decomposition.decompose(z[:n])
        t, stage = torch.rand(n, 2, generator=torch.Generator().manual_seed(n)), host_to_device(np.arange(n) % 2, "cpu")
        with torch.no_grad():
            whole, parts = model(stages, t, stage, y=cond["y"][:n]), split(stages, t, stage, y=cond["y"][:n])
        worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(whole, parts)))
    return worst


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def main(argv: list[str]) -> int:
    """Under two ranks: every FSDP2 combination, eager and compiled (``eager`` backend); rank 0 writes ``argv[0]``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    backend = argv[1] if len(argv) > 1 else "eager"
    results = []
    for combo, buckets in FSDP2_MATRIX:
        steps = steps_for(combo, buckets)
        results.append({"eager": run(combo, None, steps, buckets=buckets), "compiled": run(combo, backend, steps, buckets=buckets)})
    # HSDP's other 2-rank mesh: two replicas of one shard (train.sharding=hsdp, hsdp_shard_size=1), compiled
    hsdp = run(Combo("dit", "lora", False, "fp32", "fsdp2"), backend, 2, mesh_shape=(2, 1))
    extras = {"accumulation_max_diff": _accumulation_modes_agree(), "batch_split_max_diff": _batch_split_agrees()}
    if dist.get_rank() == 0:
        with open(argv[0], "w") as f:
            json.dump({"matrix": results, "hsdp_2x1": hsdp, **extras}, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
