"""VideoDiT (per-frame patches, 3-D RoPE), its wrap_dit adapter, and the recipe's CogVideoX path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext import LaplacianPyramid, load_wrapped, wrap_dit
from dfm_ext.models.dit_layers import apply_rope
from dfm_ext.models.video_dit import VideoDiT, VideoDiTConfig, rope_3d


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(**kw) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(VideoDiTConfig.preset("tiny", in_channels=4, num_classes=3, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave the zero init so outputs depend on the inputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@given(frames=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4))
def test_shapes_any_grid(frames: int, h: int, w: int) -> None:
    model = _model()
    x = torch.randn(2, 4, frames, 2 * h, 2 * w)
    assert model(x, torch.rand(2), torch.tensor([0, 3])).shape == x.shape


def test_frames_are_patchified_independently() -> None:
    model = _model()
    x = torch.randn(1, 4, 3, 8, 8)
    y = x.clone()
    y[:, :, 1] += 1.0
    a, b = model.x_embedder(x).view(1, 3, 16, -1), model.x_embedder(y).view(1, 3, 16, -1)
    assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2]) and not torch.equal(a[:, 1], b[:, 1])


def test_rope_3d_logits_depend_only_on_offsets() -> None:
    head_dim, grid = 32, (3, 4, 5)
    cos, sin = rope_3d(head_dim, grid, dtype=torch.float64)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    n = cos.shape[0]
    rq = apply_rope(q.expand(1, 1, n, head_dim), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, n, head_dim), cos, sin)[0, 0]
    idx = torch.arange(n).view(grid)
    # The same offset (1, 1, 2) from two different tokens gives the same logit ...
    a = rq[idx[0, 0, 0]] @ rk[idx[1, 1, 2]]
    b = rq[idx[1, 2, 1]] @ rk[idx[2, 3, 3]]
    torch.testing.assert_close(a, b)
    # ... and every axis moves the logit (time, rows and columns all have rotation pairs).
    for other in (idx[1, 0, 0], idx[0, 1, 0], idx[0, 0, 1]):
        assert not torch.allclose(rq[idx[0, 0, 0]] @ rk[idx[0, 0, 0]], rq[idx[0, 0, 0]] @ rk[other])


def test_bad_inputs_are_named() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"\[B, 4, T, H, W\]"):
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divisible by patch"):
        model(torch.randn(2, 4, 3, 7, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="head dim"):
        VideoDiTConfig(hidden_size=40, num_heads=4)


@given(frames=st.integers(1, 3), temporal=st.booleans())
def test_wrapped_stage0_equals_base_at_pretrained_init(frames: int, temporal: bool) -> None:
    base = _model()
    decomposition = LaplacianPyramid((2, 1), temporal_factors=(1, 1) if temporal else None)
    x0 = torch.randn(2, 4, frames, 4, 4)
    t, y = torch.rand(2), torch.tensor([0, 2])
    up = x0.repeat_interleave(2, -1).repeat_interleave(2, -2)
    ref = F.avg_pool3d(base(up, t, y), (1, 2, 2))  # stage 0 uses half the base patch
    wrapped = wrap_dit(base, decomposition, sample_shape=(4, frames, 8, 8))
    assert wrapped.adapter.name == "video_dit" and wrapped.packer.grid == (frames, 4, 4)
    out = wrapped([x0, torch.randn(2, 4, frames, 8, 8)], torch.stack([t, torch.zeros(2)], 1), torch.zeros(2, dtype=torch.long), y=y)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # masked stage


def test_wrapped_gradients_and_save_load(tmp_path) -> None:
    wrapped = wrap_dit(_model(), LaplacianPyramid((2, 1)), init="scratch")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # scratch init zeroes the head; perturb so every input reaches the output
        for p in wrapped.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    stages = [torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 8, 8)]
    t, stage = torch.rand(2, 2), torch.tensor([1, 1])
    out = wrapped(stages, t, stage, y=torch.tensor([1, 2]))
    sum(o.square().sum() for o in out).backward()
    emb = wrapped.base.x_embedder.proj.weight.grad
    assert emb is not None and all(emb[:, wrapped.base.x_embedder.stage_slice(s)].abs().sum() > 0 for s in range(2))
    wrapped.save_pretrained(tmp_path)
    again = load_wrapped(tmp_path, VideoDiT(VideoDiTConfig.from_dict(wrapped.base.config.to_dict())))
    wrapped.eval(), again.eval()  # no label dropout
    with torch.no_grad():
        ref = wrapped(stages, t, stage, y=torch.tensor([1, 2]))
        got = again(stages, t, stage, y=torch.tensor([1, 2]))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)


def test_recipe_cogvideox_transformer_trains(tmp_path) -> None:
    pytest.importorskip("diffusers")
    from dfm_ext.recipes.engine.config import load_config
    from dfm_ext.recipes.engine.trainer import step_generator
    from dfm_ext.recipes.kinetics.task import KineticsConfig, KineticsTask

    cfg = load_config(
        KineticsConfig,
        "kinetics_tiny",
        [
            "data.root=/unused",
            f"train.output_dir={tmp_path}",
            "model.kind=cogvideox",
            "dfm.scales=[0.5, 0.25]",
            (
                "model.overrides={num_attention_heads: 2, attention_head_dim: 16, num_layers: 1, text_embed_dim: 16,"
                " time_embed_dim: 16, max_text_seq_length: 4, patch_size: 2}"
            ),
        ],
    )
    cfg.validate()
    task = KineticsTask(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    assert model.dfm.adapter.name == "cogvideox" and model.label_tokens is not None
    assert torch.equal(model.stage_scales, torch.tensor([0.5, 0.25]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = {"latents": torch.randn(4, *cfg.latent_shape), "label": torch.tensor([0, 1, 2, 3])}
    losses = []
    for step in range(8):
        out = task.loss(model, batch, generator=step_generator(0, 0, 0), device=torch.device("cpu"))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    assert model.label_tokens.table.weight.grad is not None
