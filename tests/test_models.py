"""The reference DiT: original module names, init, unpatchify order, label dropout, RoPE, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dfm_ext.models.dit import DiT, DiTConfig, rope_2d
from dfm_ext.models.dit_layers import apply_rope


def _tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig.preset("tiny", **kw))


def _randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize(
    "name,hidden,depth,heads,patch",
    [("S/2", 384, 12, 6, 2), ("S/4", 384, 12, 6, 4), ("B/2", 768, 12, 12, 2), ("L/2", 1024, 24, 16, 2),
     ("XL/2", 1152, 28, 16, 2)],
)
def test_presets_have_dit_sizes(name, hidden, depth, heads, patch):
    cfg = DiTConfig.preset(name)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (hidden, depth, heads, patch)
    assert DiTConfig.preset(name, in_channels=3).in_channels == 3
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg


def test_original_module_names():
    model = _tiny()
    names = dict(model.named_modules())
    assert isinstance(names["x_embedder.proj"], nn.Conv2d)
    assert names["x_embedder.proj"].kernel_size == names["x_embedder.proj"].stride == (2, 2)
    mlp = names["t_embedder.mlp"]
    assert [type(m) for m in mlp] == [nn.Linear, nn.SiLU, nn.Linear]
    assert isinstance(names["y_embedder.embedding_table"], nn.Embedding)
    for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
        assert f"blocks.1.{n}" in names
    for n in ("norm_final", "linear", "adaLN_modulation.1"):
        assert f"final_layer.{n}" in names
    assert model.pos_embed.shape == (1, 64, 64)
    assert _tiny(rope=True).pos_embed is None


def test_adaln_zero_init_gives_zero_output():
    model = _tiny()
    out = model(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(model.blocks[0].adaLN_modulation[1].weight) == 0


@given(gh=st.integers(1, 3), gw=st.integers(1, 3), p=st.integers(1, 3), c=st.integers(1, 3))
def test_unpatchify_is_pqc_order(gh, gw, p, c):
    model = DiT(DiTConfig(input_size=(gh * p, gw * p), patch_size=p, in_channels=c, hidden_size=8, depth=1,
                          num_heads=2))
    x = torch.randn(2, c, gh * p, gw * p)
    # patchify with channels fastest: token (i, j) holds x[c, i*p + a, j*p + b] at index (a, b, c)
    tokens = x.reshape(2, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(2, gh * gw, p * p * c)
    assert torch.equal(model.unpatchify(tokens, (gh, gw)), x)


def test_non_square_and_learn_sigma_shapes():
    model = _randomise(_tiny(input_size=(8, 16), learn_sigma=True))
    out = model(torch.randn(3, 4, 8, 16), torch.rand(3), torch.tensor([0, 1, 9]))
    assert out.shape == (3, 8, 8, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_label_dropout_paths():
    model = _randomise(_tiny(class_dropout_prob=0.5)).train()
    x, t, y = torch.randn(4, 4, 16, 16), torch.rand(4), torch.tensor([1, 2, 3, 4])
    null = torch.full_like(y, 10)
    forced = model(x, t, y, force_drop_ids=torch.tensor([1, 1, 1, 1]))
    torch.testing.assert_close(forced, model.eval()(x, t, null))
    model.train()
    a = model(x, t, y, generator=torch.Generator().manual_seed(3))
    b = model(x, t, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    off = _randomise(_tiny(class_dropout_prob=0.0))
    torch.testing.assert_close(off.train()(x, t, y), off.eval()(x, t, y))


@given(shift=st.tuples(st.integers(-3, 3), st.integers(-3, 3)), seed=st.integers(0, 2**16))
def test_rope_scores_depend_on_relative_position_only(shift, seed):
    g = torch.Generator().manual_seed(seed)
    grid = (8, 8)
    cos, sin = rope_2d(8, grid)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(pq, pk):
        iq, ik = pq[0] * grid[1] + pq[1], pk[0] * grid[1] + pk[1]
        return (apply_rope(q, cos[iq], sin[iq]) * apply_rope(k, cos[ik], sin[ik])).sum()

    a, b = (3, 4), (2, 5)
    sa, sb = (a[0] + shift[0], a[1] + shift[1]), (b[0] + shift[0], b[1] + shift[1])
    if all(0 <= v < 8 for v in (*sa, *sb)):
        torch.testing.assert_close(score(a, b), score(sa, sb), atol=1e-5, rtol=1e-5)


def test_rope_model_forward_is_finite():
    model = _randomise(_tiny(rope=True))
    x = torch.randn(1, 4, 16, 16)
    out = model(x, torch.rand(1), torch.tensor([1]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_inputs_raise():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\(12, 12\).*\(16, 16\)"):
        model(torch.randn(1, 4, 12, 12), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 4, 16, 16), torch.rand(2, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y must be a long"):
        model(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(input_size=15, patch_size=2)
    with pytest.raises(ValueError, match="preset"):
        DiTConfig.preset("M/2")
    with pytest.raises(NotImplementedError, match="num_frames"):
        DiTConfig(num_frames=8)
