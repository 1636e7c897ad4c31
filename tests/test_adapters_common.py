"""dfm_ext.adapters.common: the public helpers the built-in adapters are written with."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from dfm_ext import DiT, DiTConfig, LaplacianPyramid, VideoDiT, VideoDiTConfig, wrap_dit
from dfm_ext.adapters.common import call_block, parse_conditioning, scaled_output
from dfm_ext.adapters.dit import DiTFamilyAdapter, LabelConditioning
from dfm_ext.adapters.video_dit import VideoDiTAdapter
from dfm_ext.wrapping.embeddings import MultiScaleHead


class _Cond(NamedTuple):
    text: Tensor | None = None
    scale: float = 2.0


def test_parse_conditioning_fills_defaults_and_names_unknown_keywords() -> None:
    model = nn.Identity()
    assert parse_conditioning(model, _Cond, {"scale": 3.0}) == _Cond(None, 3.0)
    with pytest.raises(TypeError, match=r"unexpected conditioning for Identity: \['prompt', 'zz'\]"):
        parse_conditioning(model, _Cond, {"zz": 1, "text": None, "prompt": "a cat"})


def test_scaled_output_is_to_grid_times_scale() -> None:
    tokens = torch.randn(2, 6, 5)
    ref = MultiScaleHead.to_grid(tokens, (2, 3))
    assert torch.equal(scaled_output(tokens, (2, 3), 1.0), ref)
    assert torch.equal(scaled_output(tokens, (2, 3), -1.0), -ref)


def test_call_block_checkpoints_only_when_asked_and_grad_is_on() -> None:
    calls = []

    class Block(nn.Module):
        def forward(self, x: Tensor, c: Tensor) -> Tensor:
            calls.append(1)
            return x * c

    model, block = nn.Module(), Block()
    x = torch.ones(3, requires_grad=True)
    model.gradient_checkpointing = True
    out = call_block(model, block, x, torch.full((3,), 2.0))
    out.sum().backward()
    assert len(calls) == 2  # the forward, then its recompute in backward
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    calls.clear()
    model.gradient_checkpointing = False
    call_block(model, block, x, torch.full((3,), 2.0)).sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        model.gradient_checkpointing = True
        call_block(model, block, x, torch.full((3,), 2.0))
    assert len(calls) == 2  # no gradients: nothing to recompute


def test_dit_family_forward_refuses_unknown_conditioning_and_declares_its_keywords() -> None:
    assert LabelConditioning._fields == ("y", "force_drop_ids", "generator")
    model = wrap_dit(DiT(DiTConfig.preset("tiny", hidden_size=32)), LaplacianPyramid(factors=(2, 1)))
    stages = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 16, 16)]
    with pytest.raises(TypeError, match=r"unexpected conditioning for DiT: \['p'\]"):
        model(stages, torch.rand(1, 2), torch.zeros(1, dtype=torch.long), y=torch.zeros(1, dtype=torch.long), p="x")


def test_image_and_video_dit_adapters_match_only_their_patch_embedding() -> None:
    image = DiT(DiTConfig.preset("tiny", hidden_size=32))
    video = VideoDiT(VideoDiTConfig.preset("tiny"))
    assert DiTFamilyAdapter().matches(image) and not DiTFamilyAdapter().matches(video)
    assert VideoDiTAdapter().matches(video) and not VideoDiTAdapter().matches(image)
    proj = video.x_embedder.proj
    video.x_embedder.proj = nn.Conv3d(proj.in_channels, proj.out_channels, (2, *proj.kernel_size[1:]))
    assert not VideoDiTAdapter().matches(video)  # a model that merges frames is not this family
