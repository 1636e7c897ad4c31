"""DFMFluxPipeline: a tiny wrapped FLUX (the FLUX recipe's model) round-trips through the pipeline and samples
exactly as the recipe's own sampler does, with the same prompt encoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dfm_ext.pipelines import DFMFluxPipeline  # noqa: E402
from dfm_ext.recipes.engine.config import load_config  # noqa: E402
from dfm_ext.recipes.flux.assets import make_tiny_flux  # noqa: E402
from dfm_ext.recipes.flux.task import FluxFinetuneConfig, FluxTask, build_flux_model, load_transformer  # noqa: E402

PROMPTS = ["a ginger cat looking at the camera", "a rocket on the launch pad"]


@pytest.fixture(scope="module")
def final(tmp_path_factory) -> tuple[Path, Path, FluxFinetuneConfig]:
    """A FLUX recipe's ``final/`` (the wrapped tiny FLUX, every weight perturbed so that each matters) and its FLUX folder."""
    root = tmp_path_factory.mktemp("flux_pipeline")
    flux = make_tiny_flux(root / "flux")
    cfg = load_config(FluxFinetuneConfig, "flux_tiny", [f"model.path={flux}", f"data.source={root}", "sampling.steps=[3,2]"])
    torch.manual_seed(0)
    model = build_flux_model(cfg, load_transformer(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "final")
    return root / "final", flux, cfg


def test_pipeline_equals_the_recipe_sampler_and_round_trips(final: tuple[Path, Path, FluxFinetuneConfig], tmp_path: Path) -> None:
    folder, flux, cfg = final
    pipe = DFMFluxPipeline.from_pretrained(folder, flux=flux, max_sequence_length=cfg.data.max_sequence_length)
    s = cfg.sampling
    kwargs = dict(height=s.height, width=s.width, num_inference_steps=s.steps, thresholds=s.thresholds, guidance_scale=s.guidance_scale)
    latents = pipe(PROMPTS, **kwargs, generator=torch.Generator().manual_seed(3), output_type="latent").images
    # The recipe's sampler on the same weights, prompts and noise: the same encoding, guidance and schedule.
    task = FluxTask(cfg)
    expected = task.sample(pipe.transformer, PROMPTS, device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latents, expected.x, rtol=0, atol=0)

    seen: list[tuple[int, int, object]] = []
    out = pipe(PROMPTS[0], **kwargs, generator=torch.Generator().manual_seed(3),
               callback_on_step_end=lambda p, step, t, kw: seen.append((step, kw["stage"], kw["preview"])))  # fmt: skip
    assert [im.size for im in out.images] == [(s.width, s.height)]
    assert [p[0].size for p in out.previews] == [(s.width // 2, s.height // 2), (s.width, s.height)]
    previews = [(step, stage) for step, stage, preview in seen if preview is not None]
    assert previews == [(s.steps[0] - 1, 0), (sum(s.steps) - 1, 1)] and len(seen) == sum(s.steps)

    pipe.save_pretrained(tmp_path / "pipe")  # the FLUX.1-dev layout with the wrapped transformer
    again = DFMFluxPipeline.from_pretrained(tmp_path / "pipe", max_sequence_length=cfg.data.max_sequence_length)
    same = again(PROMPTS, **kwargs, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(same, pipe(PROMPTS, **kwargs, generator=torch.Generator().manual_seed(3), output_type="pt").images, rtol=0, atol=0)
    assert same.shape == (2, 3, s.height, s.width) and 0 <= float(same.min()) and float(same.max()) <= 1


def test_pipeline_asks_for_what_is_missing(final: tuple[Path, Path, FluxFinetuneConfig], tmp_path: Path) -> None:
    folder, flux, _ = final
    with pytest.raises(ValueError, match="pass flux="):
        DFMFluxPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="dfm_config.json"):
        DFMFluxPipeline.from_pretrained(tmp_path, flux=flux)
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['vae'"):
        DFMFluxPipeline.from_pretrained(folder, flux=tmp_path)
