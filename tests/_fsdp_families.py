"""Run under ``torchrun --nproc_per_node 2``: FSDP2 on every model family, checked against one process.

For each family (reference DiT, diffusers DiT, PixArt, SD3, Flux, CogVideoX), wrapped for DFM
and with per-stage LoRA on every layer group, on a CPU mesh of 2 ranks:

* the wrap policy finds the family's blocks (``len(transformer_blocks)``);
* rank r runs samples [2r, 2r + 2) of a batch of 4 in which rank 0 holds only stage 0 and rank 1
  only stage 1 (so each rank leaves the other stage's LoRA unused): its outputs equal the
  unsharded model's on those samples and the reduce-scattered gradients equal the unsharded
  full-batch gradients;
* one SGD-with-momentum step and two :class:`EMA` updates equal ``AveragedModel`` on the unsharded model;
* a :func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint` round trip into a freshly
  sharded model gives back the weights, the EMA and the optimiser state (the next step agrees);
* a two-step guided :class:`DFMSampler` run on the sharded model (every rank) equals the unsharded one.

Writes ``<out>/result-<rank>.json`` with the largest differences per family.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _tiny_diffusers as tiny  # noqa: E402

import dfm_ext  # noqa: E402
from dfm_ext.recipes.engine.config import TrainConfig  # noqa: E402
from dfm_ext.recipes.engine.parallel import EMA, FSDP2, full_state, shard_model, transformer_blocks  # noqa: E402

gather_full_state = full_state

C = tiny.LATENT_CHANNELS
SAMPLES = {"reference": None, "dit": (C, 16, 16), "pixart": (C, 16, 16), "sd3": (C, 16, 16), "flux": (C, 16, 16),
           "cogvideox": (C, 2, 16, 16)}  # fmt: skip


def _base(family: str, root: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "reference":
        return dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", class_dropout_prob=0.0, num_classes=10))
    return tiny.FACTORIES[family](root / family)


def _cond(family: str, g: torch.Generator) -> dict:
    return {"y": torch.tensor([1, 2, 3, 4])} if family == "reference" else tiny.text_inputs(family, 4, g)


def _loss(out: list[torch.Tensor]) -> torch.Tensor:
    return sum((v.float() ** 2).mean() for v in out)


def _maxdiff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    out = Path(sys.argv[1])
    families = sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    half = slice(2 * rank, 2 * rank + 2)
    report: dict[str, dict[str, float]] = {}
    for family in families:
        model = dfm_ext.wrap_dit(_base(family, out / f"rank{rank}"), dfm_ext.LaplacianPyramid(factors=(2, 1)),
                                 sample_shape=SAMPLES[family])  # fmt: skip
        dfm_ext.specialize(model, kind="lora", targets="all", rank=2)
        with torch.no_grad():  # LoRA B starts at zero; give it values so that every LoRA gradient is non-trivial
            g0 = torch.Generator().manual_seed(7)
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=g0))
        model.eval()  # no dropout of any kind: the two paths see the same function
        pristine = copy.deepcopy(model)
        ref = copy.deepcopy(model)
        r: dict[str, float] = {"blocks": float(len(transformer_blocks(model)))}
        shard_model(model, mesh)

        g = torch.Generator().manual_seed(1)
        stages = [torch.randn(4, *s, generator=g) for s in ref.stage_shapes]
        t = torch.rand(4, 2, generator=g)
        stage = torch.tensor([0, 0, 1, 1])
        cond = _cond(family, g)
        local = {k: v[half] for k, v in cond.items()}

        ref_out = ref(stages, t, stage, **cond)
        _loss(ref_out).backward()
        got = model([s[half] for s in stages], t[half], stage[half], **local)
        _loss(got).backward()
        r["outputs"] = max(float((a - b[half]).abs().max()) for a, b in zip(got, ref_out))
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        r["grad_names_differ"] = float(set(grads) != set(ref_grads))
        # the unsharded model gives zero gradients to nothing; every LoRA was used by one rank only
        r["grads"] = _maxdiff(ref_grads, grads)

        sampler = dfm_ext.DFMSampler(dfm_ext.LaplacianPyramid(factors=(2, 1)), dfm_ext.StageScheduler(steps=[1, 1], thresholds=[0.9]),
                                     guidance_scale=1.5)  # fmt: skip
        shape = (2, *ref.sample_shape)
        uncond = {"y": torch.tensor([10, 10])} if family == "reference" else None
        scond = {k: v[:2] for k, v in cond.items()}
        with torch.no_grad():
            x_ref = sampler.sample(ref, shape, generator=torch.Generator().manual_seed(3), uncond=uncond, **scond).x
            x = sampler.sample(model, shape, generator=torch.Generator().manual_seed(3), uncond=uncond, **scond).x
        r["sample"] = float((x - x_ref).abs().max())
        ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        ref_ema = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        ema = EMA(model, 0.9)
        ref_opt.step()
        opt.step()
        for step in range(2):
            ref_ema.update_parameters(ref)
            ema.update(model, step)
        full = gather_full_state(model)
        with ema.applied(model):
            full_ema = gather_full_state(model)
        if rank == 0:
            r["weights"] = _maxdiff(ref.state_dict(), full)
            r["ema"] = _maxdiff(ref_ema.module.state_dict(), full_ema)
        again = gather_full_state(model)
        if rank == 0:  # the EMA swap gave the trained weights back exactly
            r["swap_restores"] = _maxdiff(full, again)

        ckpt_root = out / f"ckpt-{family}"
        parallel = FSDP2(SimpleNamespace(is_main_process=rank == 0, device=torch.device("cpu")), TrainConfig(keep_checkpoints=1))
        parallel.ema = ema
        parallel.save(ckpt_root, 1, model, opt, {"ema": ema})
        fresh = shard_model(copy.deepcopy(pristine), mesh)
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=1e-2, momentum=0.9)
        parallel.ema = fresh_ema = EMA(fresh, 0.9)
        parallel.load(ckpt_root / "step-000001", fresh, fresh_opt, {"ema": fresh_ema})
        loaded = gather_full_state(fresh)
        with fresh_ema.applied(fresh):
            loaded_ema = gather_full_state(fresh)
        if rank == 0:
            r["ckpt_weights"] = _maxdiff(full, loaded)
            r["ckpt_ema"] = _maxdiff(full_ema, loaded_ema)
        r["ckpt_n_averaged"] = float(fresh_ema.updates)
        # the optimiser state came back too: one more identical step on both agrees
        for m, o in ((model, opt), (fresh, fresh_opt)):
            o.zero_grad()
            _loss(m([s[half] for s in stages], t[half], stage[half], **local)).backward()
            o.step()
        a, b = gather_full_state(model), gather_full_state(fresh)
        if rank == 0:
            r["ckpt_next_step"] = _maxdiff(a, b)

        report[family] = r
    (out / f"result-{rank}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
