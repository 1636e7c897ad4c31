"""The config of the FLUX finetuning recipe, apart so that the cache builder reads it without the training module."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from dfm_ext.recipes.engine.config import ConfigError
from dfm_ext.recipes.engine.sections import RecipeConfig, SamplingConfig, VAESection
from dfm_ext.recipes.flux.data import DEFAULT_RATIOS, AspectBuckets

__all__ = ["FinetuneConfig", "FluxDataConfig", "FluxFinetuneConfig", "FluxModelConfig", "FluxVAEConfig", "PromptSamplingConfig"]


@dataclass
class FluxModelConfig:
    """A FLUX folder (FLUX.1-dev layout) or hub id; dtypes of the trained and the frozen parts."""

    path: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"  # trained weights (autocast does bf16 compute)
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # VAE and text encoders
    gradient_checkpointing: bool = True
    guidance: float = 1.0  # FLUX-dev's distilled-guidance input, fixed during training (paper E.1)


@dataclass
class FluxDataConfig:
    """Captioned images (``source``: folder or JSONL) or a ``cache``; captions dropped with ``caption_dropout``."""

    source: str | None = None
    cache: str | None = None
    resolutions: tuple[int, ...] = (512, 1024)
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    bucket_multiple: int = 64
    min_area_fraction: float = 1.0
    on_missing: Literal["error", "skip"] = "error"
    caption_dropout: float = 0.1
    max_sequence_length: int = 512
    random_flip: bool = False  # off: captions say "left" and "right"
    max_skips: int = 64


@dataclass
class FluxVAEConfig(VAESection):
    """The VAE in the FLUX folder, downsampling by ``downsample``."""

    downsample: int = 8


@dataclass
class FinetuneConfig:
    """Which parameters train: everything, peft LoRA, or per-stage LoRA (``dfm_ext.specialize``)."""

    mode: Literal["full", "lora", "stage_lora"] = "full"
    lora_rank: int = 64
    lora_alpha: float | None = None  # None: = rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    stage_targets: tuple[str, ...] = ("attn", "mlp")  # dfm_ext.specialize groups
    train_dfm_layers: bool = True


@dataclass
class PromptSamplingConfig(SamplingConfig):
    """Plus the ``prompts`` to sample at ``height`` x ``width`` px."""

    thresholds: tuple[float, ...] = (0.95,)  # the paper's tau at 1024 px
    guidance_scale: float = 3.0  # true CFG against the empty prompt (paper E.1)
    prompts: tuple[str, ...] = ("a photo of a cat",)
    height: int = 1024
    width: int = 1024


@dataclass
class FluxFinetuneConfig(RecipeConfig[FluxDataConfig, FluxVAEConfig, FluxModelConfig, PromptSamplingConfig]):
    """A FLUX finetuning run: the shared sections, the FLUX folder (``model``), captioned aspect-ratio buckets
    (``data``), the latent normalisation (``vae``), what is trained (``finetune``), the prompts sampled."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def pixel_multiple(self) -> int:
        """Bucket sides must divide by this: VAE x FLUX's 2x2 packing x the coarsest factor."""
        return self.vae.downsample * 2 * self.decomposition.sample_multiple

    def buckets(self) -> AspectBuckets:
        return AspectBuckets(self.data.resolutions, self.data.ratios, self.data.bucket_multiple)

    def validate(self) -> None:
        """Cross-field checks that need no files and no compute."""
        if self.model.path is None:
            raise ConfigError("model.path is not set (a FLUX folder with transformer/, vae/, text_encoder*/, tokenizer*/, or a hub id)")
        if (self.data.source is None) == (self.data.cache is None):
            raise ConfigError("set exactly one of data.source (images + captions) and data.cache (a built cache)")
        if self.data.cache is not None and self.data.random_flip:
            raise ConfigError("data.random_flip is not supported with data.cache (latents are cached unflipped)")
        if not 0.0 <= self.data.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.data.caption_dropout}")
        if self.data.bucket_multiple % self.pixel_multiple:
            raise ConfigError(
                f"data.bucket_multiple={self.data.bucket_multiple} must be a multiple of {self.pixel_multiple} "
                f"(vae.downsample {self.vae.downsample} x 2 (FLUX packing) x the decomposition's sample multiple)"
            )
        try:
            self.buckets()
        except ValueError as e:
            raise ConfigError(f"data buckets: {e}") from e
        self.check_shared("flux_finetune", reads=())
        if not self.sampling.prompts:
            raise ConfigError("sampling.prompts is empty; give at least one prompt")
        if not math.isfinite(self.model.guidance):
            raise ConfigError(f"model.guidance must be a finite number, got {self.model.guidance}")
        for side in (self.sampling.height, self.sampling.width):
            if side % self.pixel_multiple:
                raise ConfigError(f"sampling.height/width {side} must be a multiple of {self.pixel_multiple}")
        if self.finetune.mode == "stage_lora" and self.num_stages < 2:
            raise ConfigError("finetune.mode=stage_lora needs a decomposition with >= 2 stages; use finetune.mode=lora")
        if self.finetune.lora_rank < 1:
            raise ConfigError(f"finetune.lora_rank must be >= 1, got {self.finetune.lora_rank}")
