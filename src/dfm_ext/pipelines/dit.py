"""A diffusers-style pipeline for a wrapped class-conditional DiT: ``from_pretrained(folder)`` then ``pipe(...).images``.

It loads any folder written by ``DFMTransformer.save_pretrained`` (a recipe's ``final/``) with
:func:`~dfm_ext.wrapping.wrapper.load_wrapped`, samples with :class:`~dfm_ext.process.sampler.DFMSampler`
over a :class:`~dfm_ext.process.schedule.StageScheduler` (``num_inference_steps`` per stage), and
decodes with an optional VAE (a diffusers ``AutoencoderKL`` or anything with ``decode(z).sample``).
Latents are taken as ``(vae_latent - shift) * scale``, the recipes' convention.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfm_ext.process.sampler import DFMSampler
from dfm_ext.process.schedule import StageScheduler
from dfm_ext.validation import parse_device
from dfm_ext.wrapping.wrapper import load_wrapped
from dfm_ext.wrapping.wrapper import DFMTransformer

__all__ = ["DFMDiTPipeline", "DFMPipelineOutput"]

_OUTPUT_TYPES = ("pil", "pt", "np", "latent")


def _steps_per_stage(steps: int | Sequence[int] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """Steps per stage: as given, or an int total split in the default's proportions (40 -> 30 + 10)."""
    if steps is None:
        return default
    if isinstance(steps, bool):
        raise TypeError(f"num_inference_steps must be an int or one int per stage, got {steps!r}")
    if not isinstance(steps, int):
        return tuple(steps)
    if steps < len(default):
        raise ValueError(f"num_inference_steps={steps} is fewer than one step per stage ({len(default)} stages)")
    split = [max(1, round(steps * d / sum(default))) for d in default]
    split[0] += steps - sum(split)
    return tuple(split)


@dataclass(frozen=True)
class DFMPipelineOutput:
    """What :class:`DFMDiTPipeline` returns.

    Attributes:
        images: ``output_type="pil"``: a list of ``PIL.Image``; ``"pt"``: float ``[B, C, H, W]`` in
            ``[0, 1]``; ``"np"``: float ``[B, H, W, C]`` in ``[0, 1]``; ``"latent"``: the raw sample.
        previews: one entry per stage, in the same type: the sample rebuilt from stages ``0..k``
            when stage ``k`` reached its threshold (the last is the final sample).
    """

    images: Any
    previews: list[Any]


class DFMDiTPipeline:
    """Class-conditional sampling from a wrapped DiT, with the diffusers call signature.

    Args:
        transformer: the wrapped model (``DFMTransformer``).
        vae: decodes latents to pixels (``vae.decode(z).sample`` in ``[-1, 1]``); ``None`` for a
            pixel-space model whose samples lie in ``value_range``.
        scaling_factor: latent scale; default ``vae.config.scaling_factor`` (1 without).
        shift_factor: latent shift; default ``vae.config.shift_factor`` (0 without).
        value_range: the range of the decoded samples.

    Example:
        >>> import tempfile
        >>> from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit
        >>> folder = tempfile.mkdtemp()
        >>> _ = wrap_dit(DiT(DiTConfig.preset("tiny", in_channels=3)), LaplacianPyramid(factors=(2, 1))).save_pretrained(folder)
        >>> pipe = DFMDiTPipeline.from_pretrained(folder)
        >>> out = pipe(class_labels=[1, 2], num_inference_steps=(2, 1), generator=torch.Generator().manual_seed(0))
        >>> [image.size for image in out.images], [p[0].size for p in out.previews]
        ([(16, 16), (16, 16)], [(8, 8), (16, 16)])
    """

    def __init__(
        self,
        transformer: DFMTransformer,
        *,
        vae: Any = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        if not isinstance(transformer, DFMTransformer):
            raise TypeError(f"transformer must be a DFMTransformer (wrap_dit / load_wrapped), got {type(transformer).__name__}")
        if vae is not None and not callable(getattr(vae, "decode", None)):
            raise TypeError(f"vae must have a decode(latents) method, got {type(vae).__name__}")
        config = getattr(vae, "config", None)
        self.transformer = transformer.eval()
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(shift_factor if shift_factor is not None else getattr(config, "shift_factor", None) or 0.0)
        self.value_range = (float(value_range[0]), float(value_range[1]))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        vae: Any = None,
        base_model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> DFMDiTPipeline:
        """Load a ``save_pretrained`` folder of a wrapped model (e.g. a recipe's ``final/``).

        Args:
            folder: the saved folder.
            vae: a VAE object, or the path of a local diffusers ``AutoencoderKL`` folder.
            base_model: an unwrapped instance of the base class when it is not :class:`dfm_ext.DiT`.
            device: where the model (and a VAE loaded here) lives.
            **kwargs: ``scaling_factor``, ``shift_factor``, ``value_range``.
        """
        device = parse_device(device)
        transformer = load_wrapped(os.fspath(folder), base_model, device=device)
        if isinstance(vae, (str, os.PathLike)):
            if not os.path.isfile(os.path.join(vae, "config.json")):
                raise FileNotFoundError(f"no diffusers AutoencoderKL folder (config.json) at {os.fspath(vae)!r}")
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(os.fspath(vae)).to(device).eval().requires_grad_(False)
        return cls(transformer, vae=vae, **kwargs)

    def to(self, device: str | torch.device) -> DFMDiTPipeline:
        """Move the model (and the VAE) to ``device``; returns ``self``."""
        device = parse_device(device)
        self.transformer.to(device)
        if isinstance(self.vae, nn.Module):
            self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.transformer.parameters()).device

    def _decode(self, x: Tensor, output_type: str) -> Any:
        """Sample (latent or pixel) ``[B, C, H, W]`` -> images of ``output_type``."""
        if output_type == "latent":
            return x
        if self.vae is not None:
            vae_dtype = getattr(self.vae, "dtype", x.dtype)
            pixels = self.vae.decode((x / self.scaling_factor + self.shift_factor).to(vae_dtype)).sample.float()
            lo, hi = -1.0, 1.0
        else:
            pixels, (lo, hi) = x.float(), self.value_range
        unit = ((pixels - lo) / (hi - lo)).clamp(0, 1).cpu()
        if output_type == "pt":
            return unit
        if unit.shape[1] not in (1, 3):
            raise ValueError(
                f"samples have {unit.shape[1]} channels; images need 1 or 3 (pass vae= for a latent model, or output_type='latent')"
            )
        array = unit.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        from PIL import Image

        uint8 = (array * 255 + 0.5).astype("uint8")
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in uint8]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | Tensor,
        *,
        num_inference_steps: int | Sequence[int] | None = None,
        thresholds: Sequence[float] | None = None,
        guidance_scale: float | Sequence[float] = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        method: str = "euler",
        callback_on_step_end: Callable[[DFMDiTPipeline, int, Tensor, dict[str, Any]], Any] | None = None,
    ) -> DFMPipelineOutput:
        """Generate one image per class label.

        Args:
            class_labels: ``B`` class indices.
            num_inference_steps: steps per stage, e.g. ``(30, 10)`` (the paper's 40); an int is split
                like :meth:`StageScheduler.default`. Default: ``StageScheduler.default``.
            thresholds: ``S - 1`` times at which the next stage joins (default 0.9 each).
            guidance_scale: classifier-free guidance, one scale or one per stage (1: off).
            generator: the noise's randomness (drawn on its device).
            output_type: ``"pil"``, ``"pt"``, ``"np"`` or ``"latent"``.
            method: ``"euler"`` (the paper) or ``"heun"``.
            callback_on_step_end: ``callback(pipe, step, t [S], callback_kwargs)`` after every step;
                ``callback_kwargs`` has ``"stages"`` (the state, data units), ``"stage"`` (the stage
                being generated) and ``"preview"``: when this step finished a stage, that stage's
                preview in ``output_type`` (else ``None``).
        """
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(self.device)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        return self._generate(
            (labels.shape[0], *self.transformer.sample_shape), {"y": labels}, None, num_inference_steps=num_inference_steps,
            thresholds=thresholds, guidance_scale=guidance_scale, generator=generator, output_type=output_type, method=method,
            callback_on_step_end=callback_on_step_end,
        )  # fmt: skip

    def _generate(
        self, shape: tuple[int, ...], cond: dict[str, Any], uncond: dict[str, Any] | None, *, num_inference_steps: int | Sequence[int] | None,
        thresholds: Sequence[float] | None, guidance_scale: float | Sequence[float], generator: torch.Generator | None, output_type: str,
        method: str, callback_on_step_end: Callable[[Any, int, Tensor, dict[str, Any]], Any] | None,
    ) -> DFMPipelineOutput:  # fmt: skip
        """Sample ``shape`` (full resolution) under ``cond`` (guided against ``uncond``, default the model's null
        condition), with previews and the callback; the arguments are :meth:`__call__`'s."""
        model = self.transformer
        device = self.device
        dtype = next(model.parameters()).dtype
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        s = model.num_stages
        default = StageScheduler.default(s)
        scheduler = StageScheduler(
            steps=_steps_per_stage(num_inference_steps, default.steps),
            thresholds=tuple(thresholds) if thresholds is not None else default.thresholds,
        )
        sampler = DFMSampler(model.decomposition, scheduler, method=method, guidance_scale=guidance_scale)

        callback = None
        noise: Any = shape
        if callback_on_step_end is not None:
            table = scheduler.timesteps(dtype=torch.float64)
            active = scheduler.active_stage().tolist()
            ends = {e - 1 for e in scheduler.boundaries}
            scales = (model.stage_scales if model.stage_scales is not None else torch.ones(s)).to(device)
            previous: list[list[Tensor]] = []

            def callback(step: int, t: Tensor, state: list[Tensor]) -> None:
                k = active[step]
                preview = None
                if step in ends:
                    # The clean estimate z + (1 - t) v of every active stage, with the step's own
                    # velocity v = (z_next - z) / dt (dt > 0 for active stages): the sampler's preview.
                    old, clean = previous[0], []
                    for j, z in enumerate(state):
                        if j > k:
                            clean.append(torch.zeros_like(z))
                            continue
                        v = (z - old[j]) / float(table[step + 1, j] - table[step, j])
                        clean.append((z + float(1 - table[step + 1, j]) * v) * scales[j])
                    preview = self._decode(model.decomposition.preview(clean, k), output_type)
                previous[:] = [list(state)]
                data = [z * scales[j] for j, z in enumerate(state)]
                callback_on_step_end(self, step, t, {"stages": data, "stage": k, "preview": preview})

            # The first step needs the initial noise to difference against: draw it here, as the sampler would.
            noise = [torch.randn(sh, generator=generator, device=generator.device if generator is not None else device).to(device, dtype)
                     for sh in model.decomposition.stage_shapes(shape)]  # fmt: skip
            previous.append(list(noise))
        out = sampler.sample(model, noise, generator=generator, device=device, dtype=dtype, uncond=uncond, callback=callback, **cond)
        return DFMPipelineOutput(
            images=self._decode(out.x, output_type), previews=[self._decode(p, output_type) for p in out.previews]
        )
