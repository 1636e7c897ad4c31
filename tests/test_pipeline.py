"""DFMDiTPipeline: a tiny wrapped DiT round-trips through save_pretrained -> from_pretrained -> pipe(...)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from dfm_ext import DFMSampler, DiT, DiTConfig, LaplacianPyramid, StageScheduler, wrap_dit
from dfm_ext.pipelines import DFMDiTPipeline
from dfm_ext.pipelines.dit import _steps_per_stage


def _saved(tmp_path: Path, channels: int = 3) -> tuple[Path, Any]:
    torch.manual_seed(0)
    model = wrap_dit(DiT(DiTConfig.preset("tiny", in_channels=channels)), LaplacianPyramid(factors=(2, 1)))
    with torch.no_grad():  # a freshly wrapped model predicts zero for stage 1: give it something to say
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_stage_scales([1.0, 0.5])
    return model.save_pretrained(tmp_path / "final"), model.eval()


def test_pipeline_round_trips_a_saved_model(tmp_path: Path) -> None:
    folder, model = _saved(tmp_path)
    pipe = DFMDiTPipeline.from_pretrained(folder)
    labels = torch.tensor([1, 2, 7])
    out = pipe(class_labels=labels, num_inference_steps=(3, 2), generator=torch.Generator().manual_seed(0), output_type="pt")
    # The same as sampling the original model directly with the same noise.
    sampler = DFMSampler(model.decomposition, StageScheduler(steps=(3, 2), thresholds=(0.9,)))
    direct = sampler.sample(model, (3, 3, 16, 16), generator=torch.Generator().manual_seed(0), y=labels)
    torch.testing.assert_close(out.images, ((direct.x + 1) / 2).clamp(0, 1))
    assert [p.shape for p in out.previews] == [(3, 3, 8, 8), (3, 3, 16, 16)]
    torch.testing.assert_close(out.previews[-1], out.images)
    pil = pipe(class_labels=[1, 2], num_inference_steps=(3, 2), generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in pil] == [(16, 16), (16, 16)] and pil[0].mode == "RGB"
    guided = pipe(class_labels=labels, num_inference_steps=(3, 2), guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert not torch.allclose(guided, out.images)


def test_callback_receives_stage_previews_and_changes_nothing(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    pipe = DFMDiTPipeline.from_pretrained(folder)
    seen: list[tuple[int, int, Any]] = []

    def callback(p: DFMDiTPipeline, step: int, t: torch.Tensor, kwargs: dict[str, Any]) -> None:
        assert p is pipe and t.shape == (2,) and len(kwargs["stages"]) == 2
        seen.append((step, kwargs["stage"], kwargs["preview"]))

    options: dict[str, Any] = dict(class_labels=[3, 4], num_inference_steps=(3, 2), output_type="pt")
    plain = pipe(generator=torch.Generator().manual_seed(1), **options)
    watched = pipe(generator=torch.Generator().manual_seed(1), callback_on_step_end=callback, **options)
    torch.testing.assert_close(watched.images, plain.images)
    assert [(s, k) for s, k, _ in seen] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)]
    previews = {s: p for s, _, p in seen if p is not None}
    assert sorted(previews) == [2, 4]  # when stage 0 reaches its threshold, and at the end
    torch.testing.assert_close(previews[2], plain.previews[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(previews[4], plain.images, rtol=1e-4, atol=1e-5)


class _ToyVAE(nn.Module):
    """decode(z).sample: 4 latent channels at 1/2 resolution -> RGB in [-1, 1]."""

    config = SimpleNamespace(scaling_factor=0.5, shift_factor=0.1)

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=torch.tanh(self.up(z)))


def test_latent_model_decodes_through_the_vae(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path, channels=4)
    with pytest.raises(ValueError, match="4 channels.*vae="):
        DFMDiTPipeline.from_pretrained(folder)(class_labels=[0], num_inference_steps=2)
    vae = _ToyVAE()
    pipe = DFMDiTPipeline.from_pretrained(folder, vae=vae)
    assert (pipe.scaling_factor, pipe.shift_factor) == (0.5, 0.1)
    out = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]
    assert [p[0].size for p in out.previews] == [(16, 16), (32, 32)]
    latent = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    with torch.no_grad():
        expected = vae.decode(latent.images / 0.5 + 0.1).sample
    pt = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(pt.images, (expected + 1) / 2)


def test_pipeline_rejects_bad_input(tmp_path: Path) -> None:
    folder, model = _saved(tmp_path)
    pipe = DFMDiTPipeline(model)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="gif")
    with pytest.raises(ValueError, match="class_labels is empty"):
        pipe(class_labels=[])
    with pytest.raises(TypeError, match="DFMTransformer"):
        DFMDiTPipeline(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        DFMDiTPipeline.from_pretrained(folder, vae=tmp_path / "no-vae")
    with pytest.raises(ValueError, match="fewer than one step per stage"):
        pipe(class_labels=[0], num_inference_steps=1)
    assert _steps_per_stage(40, (30, 10)) == (30, 10) and _steps_per_stage(8, (30, 10)) == (6, 2)
    assert _steps_per_stage(None, (30, 10)) == (30, 10) and _steps_per_stage([5, 5], (30, 10)) == (5, 5)
