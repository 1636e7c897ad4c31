"""Gradient memory held between micro-batches under FSDP2 with gradient accumulation, per rank.

Runs under ``torchrun --nproc_per_node 2`` (gloo, CPU): a DiT (hidden 256, depth 4) wrapped for DFM,
sharded as the engine does (``shard_model``), two micro-batches per step through the engine's own
``FSDP2.gradient_sync`` with ``train.fsdp_accumulation`` ``unsharded`` (gradients reduced at the last
micro-batch only) and ``reduce_scatter`` (the default: every micro-batch). After the first
micro-batch's backward it sums the bytes of every gradient tensor the rank holds: the sharded ``.grad``
of each parameter and FSDP2's unsharded gradients (``FSDPParam._unsharded_param.grad``,
``unsharded_accumulated_grad``). Rank 0 writes ``benchmarks/results/fsdp_accumulation.json``. Usage::

    torchrun --nproc_per_node 2 benchmarks/fsdp_accumulation.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import dfm_ext
from dfm_ext.fileio import atomic_write_text
from dfm_ext.recipes.engine.parallel import FSDP2, shard_model

OUT = Path(__file__).resolve().parent / "results" / "fsdp_accumulation.json"


def held_gradient_bytes(model: torch.nn.Module) -> dict[str, int]:
    sharded = sum((g.to_local() if hasattr(g, "to_local") else g).nbytes for p in model.parameters() if (g := p.grad) is not None)
    unsharded = 0
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if callable(state) else None
        for fp in getattr(group, "fsdp_params", []) or []:
            for t in (fp._unsharded_param.grad if hasattr(fp, "_unsharded_param") else None, fp.unsharded_accumulated_grad):
                unsharded += t.nbytes if t is not None else 0
    return {"sharded_grad_bytes": sharded, "unsharded_grad_bytes": unsharded}


def measure(mode: str) -> dict[str, int]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    base = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=16, in_channels=4, num_classes=10, class_dropout_prob=0.0,
                                                hidden_size=256, depth=4, num_heads=4))  # fmt: skip
    model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(4, 16, 16))
    shard_model(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    parallel = FSDP2.__new__(FSDP2)
    parallel.train = SimpleNamespace(fsdp_accumulation=mode)  # gradient_sync reads this one key
    objective, times = dfm_ext.DFMObjective(2), dfm_ext.StageTimestepSampler(2)
    out = {}
    for micro in range(2):
        g = torch.Generator().manual_seed(dist.get_rank() * 2 + micro)
        x, y = torch.randn(8, 4, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        with parallel.gradient_sync(model, micro == 1):
            objective(model, model.decomposition.decompose(x), times.sample(8, generator=g), generator=g, y=y).loss.backward()
        if micro == 0:
            out = held_gradient_bytes(model)
    out["params"] = sum(p.numel() for p in base.parameters())
    return out


def main() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {mode: measure(mode) for mode in ("unsharded", "reduce_scatter")}
    if dist.get_rank() == 0:
        record = {"meta": {"torch": torch.__version__, "world_size": dist.get_world_size(), "backend": "gloo (CPU)",
                           "command": "torchrun --nproc_per_node 2 benchmarks/fsdp_accumulation.py"}, "results": results}  # fmt: skip
        atomic_write_text(OUT, json.dumps(record, indent=2) + "\n")
        print(json.dumps(results), file=sys.stderr)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
