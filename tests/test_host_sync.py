"""No host reads in a training or sampling step (tests/_host_sync.py counts them on this CPU machine).

Each step below runs with the library's value checks on their accelerator route; a value read
back to the host (``.item()``, ``bool(t)``, ``tolist()``, ``nonzero`` ...) would be a device sync
per step on a GPU. The tests assert there are none, and that the detector does see one.
"""

from __future__ import annotations

import pytest
import torch

import dfm_ext
from _host_sync import count_host_reads


def _model(specialize: str | None = None) -> dfm_ext.DFMTransformer:
    torch.manual_seed(0)
    base = dfm_ext.DiT(dfm_ext.DiTConfig.preset("tiny", input_size=16, in_channels=4, num_classes=10, class_dropout_prob=0.0))
    model = dfm_ext.wrap_dit(base, dfm_ext.LaplacianPyramid(factors=(2, 1)), sample_shape=(4, 16, 16))
    if specialize:
        dfm_ext.specialize(model, kind=specialize, targets="all", rank=2 if specialize == "lora" else None)
    return model


def test_the_detector_sees_reads(monkeypatch) -> None:
    x = torch.randn(3)
    with count_host_reads(monkeypatch) as reads:
        float(x.sum()), bool((x > 0).any()), x.tolist(), x.nonzero(), torch.equal(x, x)  # noqa: B018
    assert len(reads) == 5, reads.report()
    assert "test_host_sync.py" in reads.found[0][1]
    model = _model()
    with count_host_reads(monkeypatch) as reads:  # the library's value checks: their device route
        dfm_ext.StageTimestepSampler(2).sample(4, generator=torch.Generator().manual_seed(0))
        with pytest.raises(RuntimeError, match=r"t must lie in \[0, 1\]"):  # an async assert, raised on the CPU
            model([torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 16, 16)], torch.full((1, 2), 2.0), torch.zeros(1, dtype=torch.long), y=torch.zeros(1, dtype=torch.long))
    assert len(reads) == 0, reads.report()


@pytest.mark.parametrize("allocation", ["fixed", "progress", "reducible"])
@pytest.mark.parametrize("specialize", [None, "lora", "full"])
def test_a_training_step_reads_nothing_back(monkeypatch, allocation: str, specialize: str | None) -> None:
    from dfm_ext.process.allocation import make_allocation
    from dfm_ext.process.reducible import stage_errors

    model = _model(specialize)
    alloc = None if allocation == "fixed" else make_allocation(allocation, 2, prior=(0.9, 0.1))
    times = dfm_ext.StageTimestepSampler(2, allocation=alloc)
    objective = dfm_ext.DFMObjective(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 4, 16, 16), torch.randint(0, 10, (8,))
    with count_host_reads(monkeypatch) as reads:
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            ts = times.sample(8, generator=g)
            out = objective(model, model.decomposition.decompose(x), ts, generator=g, y=y)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if allocation == "reducible":
                times.update(out.per_stage, timesteps=ts, errors=stage_errors(out))
            else:
                times.update(out.per_stage)
    assert len(reads) == 0, reads.report()


@pytest.mark.parametrize("specialize", [None, "lora"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_a_sampling_run_reads_nothing_back(monkeypatch, specialize: str | None, method: str) -> None:
    model = _model(specialize).eval()
    sampler = dfm_ext.DFMSampler(model.decomposition, dfm_ext.StageScheduler(steps=(3, 2), thresholds=(0.9,)), method=method,
                                 guidance_scale=2.0)  # fmt: skip
    y = torch.tensor([1, 2, 3])
    with count_host_reads(monkeypatch) as reads:
        out = sampler.sample(model, (3, 4, 16, 16), generator=torch.Generator().manual_seed(0), uncond={"y": torch.full((3,), 10)}, y=y)
    assert out.x.shape == (3, 4, 16, 16) and len(reads) == 0, reads.report()
