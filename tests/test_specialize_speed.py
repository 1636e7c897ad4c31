"""The sync-free per-stage LoRA path for mixed-stage batches: exact against a per-sample reference.

Every sample ``b`` must run ``W x + (alpha / r) B_{s_b} A_{s_b} x`` (``stage[b] = s_b``); the
reference below computes that one sample at a time with plain matmuls. Outputs and gradients
(of the input, the shared weights and every stage's ``A``/``B``) must agree to 1e-6, relative to
the largest magnitude (float32 sums in another order round differently).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfm_ext.specialization import specialize


class _Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, stage):
        return self.layer(x)


def _reference(layer: nn.Module, x: torch.Tensor, stage: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per-sample loop with the stage's own A, B (a stage without LoRA runs the base layer)."""
    outs = []
    for b in range(x.shape[0]):
        xb, s = x[b : b + 1], str(int(stage[b]))
        p = layer.stage_params[s] if s in layer.stage_params else None
        if isinstance(layer, nn.Linear):
            y = F.linear(xb, layer.weight, layer.bias)
            if p is not None:
                y = y + scaling * (xb @ p.lora_A.t() @ p.lora_B.t())
        elif isinstance(layer, nn.Conv2d):
            y = F.conv2d(xb, layer.weight, layer.bias, layer.stride, layer.padding)
            if p is not None:
                h = F.conv2d(xb, p.lora_A, None, layer.stride, layer.padding)
                y = y + scaling * F.conv2d(h, p.lora_B)
        else:
            y = F.embedding(xb, layer.weight)
            if p is not None:
                y = y + scaling * (p.lora_A.t()[xb] @ p.lora_B.t())
        outs.append(y)
    return torch.cat(outs)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    a, b = a.detach(), b.detach()
    err, scale = float((a - b).abs().max()), max(1.0, float(b.abs().max()))
    assert err <= tol * scale, f"differs by {err} (largest magnitude {scale})"


LAYERS = {
    "linear_tokens": (lambda: nn.Linear(6, 5), lambda g: torch.randn(5, 7, 6, generator=g)),
    # few rows for a wide layer: the majority stage runs as base + LoRA pair, not a merged weight
    "linear_wide": (lambda: nn.Linear(24, 20), lambda g: torch.randn(5, 24, generator=g)),
    # the same without a bias: the base weight's one matmul over all rows takes no bias
    "linear_wide_nobias": (lambda: nn.Linear(24, 20, bias=False), lambda g: torch.randn(5, 24, generator=g)),
    "linear_vector": (lambda: nn.Linear(6, 5), lambda g: torch.randn(5, 6, generator=g)),
    "linear_video": (lambda: nn.Linear(6, 5, bias=False), lambda g: torch.randn(5, 2, 3, 6, generator=g)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 2, stride=2), lambda g: torch.randn(5, 3, 6, 6, generator=g)),
    "embedding": (lambda: nn.Embedding(7, 5), lambda g: torch.randint(0, 7, (5, 3), generator=g)),
}


@pytest.mark.parametrize(
    ("route", "alpha"),
    [("host", 4.5), ("device", 4.5), ("host", 3.0), ("ordered", 4.5)],
    ids=["host", "device", "host_scale1", "host_ordered"],
)
@pytest.mark.parametrize("train", ["all", "stage"])
@pytest.mark.parametrize("owned", [None, (0, 2)], ids=["all_stages", "stage1_plain"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_mixed_batch_lora_equals_per_sample_reference(name: str, owned, train: str, route: str, alpha: float, monkeypatch) -> None:
    """Both routes: stage counts read on the host (a CPU ``stage``: majority stage merged, the
    other stages' rows corrected) and the sync-free masked route (as for a device ``stage`` or
    under torch.compile); with the base trainable (merged weight) and frozen (LoRA pair).
    ``alpha = rank`` (scale 1, the default) skips the scaling multiplies in backward.
    ``host_ordered``: a batch already grouped by stage, where each stage's rows are one block."""
    if route == "device":
        from dfm_ext.specialization import routing as S

        monkeypatch.setattr(S.torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    make_layer, make_x = LAYERS[name]
    model = _Net(make_layer())
    spec = specialize(model, kind="lora", targets=lambda n, m: n == "layer", rank=3, alpha=alpha, num_stages=3, stages=owned, train=train)
    layer = model.layer
    for p in spec.stage_parameters():
        p.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    x = make_x(g)
    stage = torch.tensor([0, 0, 1, 2, 2] if route == "ordered" else [2, 0, 1, 2, 0])
    floating = x.is_floating_point()
    x1 = x.clone().requires_grad_(floating)
    x2 = x.clone().requires_grad_(floating)
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(x1, stage)
    ref = _reference(layer, x2, stage, alpha / 3)
    assert out.shape == ref.shape
    _close(out, ref)
    w = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w).sum(), params + ([x1] if floating else []), allow_unused=True)
    exp = torch.autograd.grad((ref * w).sum(), params + ([x2] if floating else []), allow_unused=True)
    for a, b in zip(got, exp):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        _close(a, b)


def test_mixed_batch_lora_reads_no_stage_value_on_the_host(monkeypatch) -> None:
    """Off the host-checked path (a device tensor, or under torch.compile), routing never reads
    ``stage`` back: ``Tensor.tolist``/``item`` are made to fail and the result is still exact."""
    from dfm_ext.specialization import routing as S

    torch.manual_seed(0)
    model = _Net(nn.Linear(6, 5))
    spec = specialize(model, kind="lora", targets=lambda n, m: n == "layer", rank=2, num_stages=2)
    for p in spec.stage_parameters():
        p.data.normal_(0, 0.3)
    x, stage = torch.randn(4, 3, 6), torch.tensor([1, 0, 0, 1])
    expected = _reference(model.layer, x, stage, 1.0)
    monkeypatch.setattr(S.torch.compiler, "is_compiling", lambda: True)  # as under torch.compile

    def refuse(*a, **k):
        raise AssertionError("device-to-host read of stage")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    out = model(x, stage)
    _close(out, expected)


def test_mixed_batch_lora_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = _Net(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5)))
    specialize(model, kind="lora", targets=lambda n, m: isinstance(m, nn.Linear), rank=2, num_stages=2)
    x, stage = torch.randn(4, 3, 6), torch.tensor([1, 0, 0, 1])
    torch._dynamo.reset()
    # through a function, so that the module call (stage pre-hook included) is traced as one frame
    explained = torch._dynamo.explain(lambda a, b: model(a, b))(x, stage)
    assert explained.graph_break_count == 0, explained.break_reasons


# ---------------------------------------------------------------------------------------------
# the host-counted route against the masked route on a whole wrapped DiT; identity at attach


def _wrapped_tiny():
    from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit

    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, class_dropout_prob=0.0)
    return wrap_dit(DiT(cfg), LaplacianPyramid(factors=(2, 1)), init="scratch")


def _wrapped_inputs(model, stage: list[int]):
    g = torch.Generator().manual_seed(0)
    b = len(stage)
    stages = [torch.randn(b, *s, generator=g) for s in model.stage_shapes]
    return stages, torch.rand(b, 2, generator=g), torch.tensor(stage), torch.arange(b) % 10


@pytest.mark.parametrize("stage", [[0, 0, 1, 0, 0, 0], [1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], ids=["major0", "major1", "single"])
def test_wrapped_dit_host_route_equals_masked_route(stage: list[int], monkeypatch) -> None:
    """The same model, batch and LoRA weights: outputs and every gradient agree to 1e-5 (relative to
    the largest magnitude) between the host-counted route with the batch grouped by stage (the
    default for a DFMTransformer: inputs reordered, output put back), the host-counted route in
    the caller's order, and the masked route."""
    from dfm_ext.specialization import lora_ops as L
    from dfm_ext.specialization import routing as S
    from dfm_ext.specialization.state import stage_context

    calls = {"blocks": 0}
    blocks_apply = L.StageLoRABlocks.apply

    def counting_apply(*args):
        calls["blocks"] += 1
        return blocks_apply(*args)

    monkeypatch.setattr(L.StageLoRABlocks, "apply", counting_apply)
    model = _wrapped_tiny()
    spec = specialize(model, kind="lora", targets="all", rank=4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in spec.stage_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    stages, t, st, y = _wrapped_inputs(model, stage)
    params = list(model.parameters())
    results = []
    for route in ("grouped", "caller_order", "masked"):
        stage_context(model).group_batch = route == "grouped"
        before = calls["blocks"]
        with monkeypatch.context() as m:
            if route == "masked":
                m.setattr(S.torch.compiler, "is_compiling", lambda: True)
            out = model(stages, t, st, y=y)
            loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        # stage blocks run wherever the batch is grouped by stage: reordered by the routing, or
        # already in stage order as the caller gave it
        expected = route == "grouped" or (route == "caller_order" and stage == sorted(stage))
        assert (calls["blocks"] > before) == expected, route
        results.append((out, grads))
    (out_h, g_h), *others = results
    for out_o, g_o in others:
        for a, b in zip(out_h, out_o):
            _close(a, b, tol=1e-5)
        for p, a, b in zip(params, g_h, g_o):
            assert a is not None and b is not None  # every parameter takes part on every route
            _close(a, b, tol=1e-5)


def test_wrapped_dit_keeps_the_callers_order_when_a_condition_is_not_per_sample() -> None:
    """``permute_batch`` reorders only inputs whose per-sample layout it knows: a tensor with the
    batch first. A container in ``cond`` leaves the batch in the caller's order (no guess)."""
    model = _wrapped_tiny()
    specialize(model, kind="lora", targets="all", rank=4)
    stages, t, st, y = _wrapped_inputs(model, [1, 0, 1, 0])
    perm = torch.tensor([1, 3, 0, 2])
    args, kwargs = model.permute_batch((stages, t, st), {"y": y, "mask": None}, perm)
    assert args == () and kwargs["mask"] is None
    assert torch.equal(kwargs["y"], y[perm]) and torch.equal(kwargs["stage"], st[perm]) and torch.equal(kwargs["t"], t[perm])
    assert all(torch.equal(a, b[perm]) for a, b in zip(kwargs["stages"], stages))
    assert model.permute_batch((stages, t, st), {"y": y, "extra": {"a": y}}, perm) is None
    assert model.permute_batch((stages, t, st), {"y": y[:3]}, perm) is None  # not batch-first
    assert model.permute_batch((stages[0], t, st), {"y": y}, perm) is None  # stages not a list


def test_wrapped_dit_lora_is_bit_exact_at_attach() -> None:
    """B = 0 at attach: the merged weight is W itself and the row corrections add exact zeros."""
    model = _wrapped_tiny()
    stages, t, st, y = _wrapped_inputs(model, [0, 0, 1, 0, 1, 0])
    with torch.no_grad():
        before = model(stages, t, st, y=y)
        specialize(model, kind="lora", targets="all", rank=4)
        after = model(stages, t, st, y=y)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
