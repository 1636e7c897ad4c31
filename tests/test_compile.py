"""torch.compile: the training and sampling steps of a wrapped model trace as one graph.

Value checks must not add device-to-host syncs to the step (dfm_ext.validation): any ``.item()``,
``int(t)``, ``bool(t)`` or data-dependent branch would show as a graph break here. The explain and
equality tests use the smallest DiT and the ``eager`` / ``aot_eager`` backends (tracing and
autograd, no code generation); one test compiles with inductor and compares the loss with eager.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from dfm_ext import DFMObjective, DFMSampler, DiT, DiTConfig, LaplacianPyramid, StageScheduler, StageTimestepSampler, wrap_dit

B = 2


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    # Hidden 32, depth 1: the smallest DiT whose trace still covers every code path of the step.
    model = wrap_dit(DiT(DiTConfig.preset("tiny", hidden_size=32, depth=1)), LaplacianPyramid((2, 1)))
    with torch.no_grad():  # pretrained init zeroes stage 1's slices; make every path carry signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    stages = model.decomposition.decompose(torch.randn(B, 4, 16, 16, generator=g))
    # Sampled on the CPU (as data loading does): its values are checked there, once.
    ts = StageTimestepSampler(2, probabilities=(0.5, 0.5)).sample(B, generator=g)
    noise = [torch.randn(x.shape, generator=g) for x in stages]
    y = torch.randint(0, 10, (B,), generator=g)
    return model, stages, ts, noise, y


def _train_step(model, objective):
    def step(stages, ts, noise, y, drop):
        return objective(model, stages, ts, noise=noise, y=y, force_drop_ids=drop).loss

    return step


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_training_step_has_no_graph_breaks() -> None:
    model, stages, ts, noise, y = _setup()
    model.train()
    objective = DFMObjective(2)

    # Noise drawn inside the step and label dropout in train mode: both must trace too.
    def step(stages, ts, y):
        return objective(model, stages, ts, y=y).loss

    explained = torch._dynamo.explain(step)(stages, ts, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


# The step specialises on the stage k (one graph per stage); each method at one stage keeps it short.
@pytest.mark.parametrize(("method", "k"), [("euler", 1), ("heun", 0)])
def test_sampling_step_has_no_graph_breaks(method: str, k: int) -> None:
    model, stages, _, _, y = _setup()
    model.eval()
    sampler = DFMSampler(model.decomposition, StageScheduler((2, 2), (0.9,)), method=method, guidance_scale=2.0)
    times = sampler.scheduler.timesteps(dtype=torch.float64)
    guided = sampler._guidance_inputs(model, {"y": y}, None, B)

    def step(state, t, t_next, y, guided, k):
        with torch.no_grad():
            return sampler.step(model, state, t, t_next, k, cond={"y": y}, guided_cond=guided)

    row = 1 if k == 0 else 3
    explained = torch._dynamo.explain(step)(stages, times[row], times[row + 1], y, guided, k)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_training_step_matches_eager_loss_and_gradients() -> None:
    """fullgraph=True (fails on any break), forward and backward through AOTAutograd."""
    model, stages, ts, noise, y = _setup()
    twin = copy.deepcopy(model)
    objective = DFMObjective(2, stage_weights=(1.0, 0.5))
    drop = torch.tensor([0, 1])

    eager = _train_step(model, objective)(stages, ts, noise, y, drop)
    eager.backward()
    compiled_step = torch.compile(_train_step(twin, objective), fullgraph=True, backend="aot_eager")
    compiled = compiled_step(stages, ts, noise, y, drop)
    compiled.backward()

    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    grads, twin_grads = _grads(model), _grads(twin)
    assert len(grads) == len(twin_grads) > 0
    for a, b in zip(grads, twin_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_inductor_training_loss_matches_eager() -> None:
    """One real (inductor) compile of the training step: the loss equals eager to 1e-5."""
    model, stages, ts, noise, y = _setup()
    objective = DFMObjective(2)
    drop = torch.tensor([1, 0])
    step = _train_step(model, objective)
    eager = step(stages, ts, noise, y, drop)
    compiled = torch.compile(step, fullgraph=True)(stages, ts, noise, y, drop)
    assert compiled.requires_grad
    torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=0, atol=1e-5)


def test_compiled_sampling_step_matches_eager() -> None:
    model, stages, _, _, y = _setup()
    model.eval()
    sampler = DFMSampler(model.decomposition, StageScheduler((2, 2), (0.9,)), guidance_scale=1.5)
    times = sampler.scheduler.timesteps(dtype=torch.float64)
    guided = sampler._guidance_inputs(model, {"y": y}, None, B)
    with torch.no_grad():
        eager = sampler.step(model, stages, times[3], times[4], 1, cond={"y": y}, guided_cond=guided)
        step = torch.compile(sampler.step, fullgraph=True, backend="aot_eager")
        compiled = step(model, stages, times[3], times[4], 1, cond={"y": y}, guided_cond=guided)
    for a, b in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_value_checks_survive_compilation() -> None:
    """Under compile the checks are device-side asserts: a bad stage still fails, with the message."""
    model, stages, ts, _, y = _setup()
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(stages, ts.t, ts.stage, y=y), model(stages, ts.t, ts.stage, y=y))
        with pytest.raises(RuntimeError, match=r"stage values must be in \[0, 1\]"):
            compiled(stages, ts.t, torch.tensor([0, 2]), y=y)
        with pytest.raises(RuntimeError, match=r"t must lie in \[0, 1\]"):
            compiled(stages, ts.t * 1000, ts.stage, y=y)


# ------------------------------------------------------------------------ diffusers families

_FAMILIES = {"dit": (4, 16, 16), "sd3": (4, 16, 16), "flux": (4, 16, 16), "cogvideox": (4, 2, 16, 16)}


@pytest.mark.parametrize("fam", sorted(_FAMILIES))
def test_wrapped_diffusers_forward_has_no_graph_breaks(tmp_path: Path, fam: str) -> None:
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(Path(__file__).parent))
    import _tiny_diffusers as tiny  # noqa: PLC0415

    model = wrap_dit(tiny.FACTORIES[fam](tmp_path / fam), LaplacianPyramid(factors=(2, 1)), sample_shape=_FAMILIES[fam])
    model.train()
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(B, *s, generator=g) for s in model.stage_shapes]
    t = torch.rand(B, 2, generator=g)
    k = torch.tensor([0, 1])
    cond = tiny.text_inputs(fam, B, g)

    def forward(stages, t, k, cond):
        return model(stages, t, k, **cond)

    explained = torch._dynamo.explain(forward)(stages, t, k, cond)
    assert explained.graph_break_count == 0, explained.break_reasons
