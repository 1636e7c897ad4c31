"""Finetune FLUX (diffusers ``FluxTransformer2DModel``) with DFM, or plainly as the baseline.

Run::

    accelerate launch --config_file recipes/accelerate_configs/fsdp_flux_8gpu.yaml \\
        -m dfm_ext.recipes.flux_finetune --config flux_dfm model.path=/models/FLUX.1-dev data.source=/data/captioned
    python -m dfm_ext.recipes.flux_finetune cache --config flux_dfm --out /data/flux_cache ...  # optional
    python -m dfm_ext.recipes.flux_finetune --config flux_tiny model.path=... data.source=...  # CPU smoke run

The pipeline: captioned images (a folder with ``.txt`` captions or a JSONL) in aspect-ratio
buckets at 512 and 1024 px, every batch from one bucket -> latents of FLUX's ``AutoencoderKL``
(``z = (z - shift) * scale``) and CLIP/T5 text embeddings, 10% of captions replaced by the empty
prompt -> the decomposition's stages -> :class:`dfm_ext.DFMObjective` on FLUX wrapped with
:func:`dfm_ext.wrap_dit` (paper E: stage 0 reuses FLUX's patch embedding, time embedding and
head, fed at half the latent resolution with a 1x1 patch, which equals FLUX on the stage
upsampled by 2; every other stage starts at zero; guidance embedding fixed at 1.0). With
``decomposition.kind=identity`` (config ``flux_ft``) the unmodified transformer is trained with
plain Flow Matching through its own ``forward``: the baseline of paper Table 3.

``finetune.mode``: ``full``; ``lora`` (peft ``LoraConfig`` injected into the transformer's
attention projections); ``stage_lora`` (per-stage LoRA from :func:`dfm_ext.specialize`). With
LoRA the new DFM layers (patch embedding, timestep embedders, head) stay trainable.

``final/`` is the export: for DFM runs the wrapped model (``model.safetensors`` +
``dfm_config.json``, rebuilt by :func:`load_finetuned` or ``dfm_ext.load_wrapped``), with
``stage_parameters.safetensors`` for ``stage_lora``; for the baseline a diffusers folder
(``FluxTransformer2DModel.from_pretrained(final)``). LoRA is merged into the saved weights.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._common import (
    check_batch,
    check_dfm_section,
    check_sampling_section,
    dropout_mask,
    looks_local,
    parse_config_args,
    save_progressive_samples,
    stage_sampler,
    timestep_sampler,
    train_main,
)
from .config import ConfigError
from .data_captions import DEFAULT_RATIOS, AspectBuckets, BucketBatchPlan, CaptionedImages, collate_captioned
from .engine import OptimConfig, StepLoss, Trainer, TrainConfig, TrainResult
from .imagenet import DecompositionConfig, build_decomposition

__all__ = [
    "FluxFinetuneConfig",
    "FluxFlowModel",
    "FluxTask",
    "build_dataset",
    "load_finetuned",
    "main",
    "parse_args",
    "run",
]


# -- config ----------------------------------------------------------------------------------


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
    """Captioned images (``source``: folder or JSONL) or a cache from ``flux_finetune cache``."""

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
class FluxVAEConfig:
    subfolder: str = "vae"
    scaling_factor: float | None = None  # None: from the VAE config
    shift_factor: float | None = None
    sample_posterior: bool = False
    downsample: int = 8


@dataclass
class FinetuneConfig:
    """Which parameters train: everything, peft LoRA, or per-stage LoRA (``dfm_ext.specialization``)."""

    mode: Literal["full", "lora", "stage_lora"] = "full"
    lora_rank: int = 64
    lora_alpha: float | None = None  # None: = rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    stage_targets: tuple[str, ...] = ("attn", "mlp")  # dfm_ext.specialization groups
    train_dfm_layers: bool = True


@dataclass
class FluxDFMConfig:
    stage_probabilities: tuple[float, ...] | None = None
    current: tuple[float, float] = (0.0, 1.0)
    earlier: tuple[float, float] = (1.5, 1.0)
    timestep_mode: Literal["dfm", "tied", "uniform"] = "dfm"
    masking: bool = True


@dataclass
class FluxSamplingConfig:
    prompts: tuple[str, ...] = ("a photo of a cat",)
    height: int = 1024
    width: int = 1024
    steps: tuple[int, ...] = (30, 10)
    thresholds: tuple[float, ...] = (0.95,)  # the paper's tau at 1024 px
    method: Literal["euler", "heun"] = "euler"
    guidance_scale: float = 3.0  # true CFG against the empty prompt (paper E.1)
    seed: int = 0


@dataclass
class FluxFinetuneConfig:
    """The whole run: every field can be overridden as ``section.key=value``."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: FluxModelConfig = field(default_factory=FluxModelConfig)
    data: FluxDataConfig = field(default_factory=FluxDataConfig)
    vae: FluxVAEConfig = field(default_factory=FluxVAEConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    dfm: FluxDFMConfig = field(default_factory=FluxDFMConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampling: FluxSamplingConfig = field(default_factory=FluxSamplingConfig)

    @property
    def num_stages(self) -> int:
        return self.decomposition.count_stages()

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
        check_sampling_section(self.sampling, self.num_stages, kind=self.decomposition.kind)
        if not self.sampling.prompts:
            raise ConfigError("sampling.prompts is empty; give at least one prompt")
        if not math.isfinite(self.model.guidance):
            raise ConfigError(f"model.guidance must be a finite number, got {self.model.guidance}")
        check_dfm_section(self.dfm, self.num_stages)
        check_batch(self.train)
        for side in (self.sampling.height, self.sampling.width):
            if side % self.pixel_multiple:
                raise ConfigError(f"sampling.height/width {side} must be a multiple of {self.pixel_multiple}")
        if self.finetune.mode == "stage_lora" and self.num_stages < 2:
            raise ConfigError("finetune.mode=stage_lora needs a decomposition with >= 2 stages; use finetune.mode=lora")
        if self.finetune.lora_rank < 1:
            raise ConfigError(f"finetune.lora_rank must be >= 1, got {self.finetune.lora_rank}")


# -- models ----------------------------------------------------------------------------------


def _pack(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> FLUX tokens ``[B, H/2 * W/2, 4 C]`` in ``(c, p, q)`` order (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(y: Tensor, h: int, w: int) -> Tensor:
    b, _, c4 = y.shape
    return y.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class FluxFlowModel(nn.Module):
    """The unmodified FLUX transformer behind the DFM model contract, with one stage (the FT baseline).

    ``forward([x [B, C, H, W]], t [B, 1], stage [B], mask=None, encoder_hidden_states=...,
    pooled_projections=...)`` packs ``x`` into FLUX tokens, calls the transformer's own forward
    with ``timestep = 1 - t`` (FLUX multiplies by 1000 itself) and the fixed ``guidance``, and
    returns ``[-output]`` (FLUX predicts ``noise - x``; the contract is ``x - noise``).
    """

    num_stages = 1

    def __init__(self, transformer: nn.Module, guidance: float = 1.0) -> None:
        super().__init__()
        self.transformer = transformer
        self.guidance = float(guidance)

    def forward(
        self,
        stages: Sequence[Tensor],
        t: Tensor,
        stage: Tensor,
        mask: Tensor | None = None,
        *,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
    ) -> list[Tensor]:
        from dfm_ext.adapters.flux import flux_image_ids

        if len(stages) != 1 or stages[0].ndim != 4:
            raise ValueError(f"FluxFlowModel takes one stage [B, C, H, W], got {[tuple(s.shape) for s in stages]}")
        x = stages[0]
        b, _, h, w = x.shape
        if t.shape != (b, 1):
            raise ValueError(f"t must have shape [B, 1] = [{b}, 1], got {tuple(t.shape)}")
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents must have even height and width, got {tuple(x.shape)}")
        cfg = self.transformer.config
        guidance = torch.full((b,), self.guidance, device=x.device, dtype=x.dtype) if cfg.guidance_embeds else None
        out = self.transformer(
            hidden_states=_pack(x),
            timestep=1 - t[:, 0],
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=flux_image_ids((h // 2, w // 2), device=x.device, dtype=x.dtype),
            return_dict=False,
        )[0]
        return [-_unpack(out, h, w)]

    def save_pretrained(self, directory: str | Path) -> None:
        """A plain diffusers ``FluxTransformer2DModel`` folder (LoRA merged in)."""
        from dfm_ext.wrapping.io import peft_merged

        with peft_merged(self.transformer):
            self.transformer.save_pretrained(str(directory))


def _unfreeze_dfm_layers(transformer: nn.Module) -> None:
    for module in (transformer.x_embedder, transformer.proj_out, transformer.time_text_embed.timestep_embedder):
        module.requires_grad_(True)


def _add_peft_lora(transformer: nn.Module, ft: FinetuneConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha or ft.lora_rank, target_modules=list(ft.lora_targets),
                        init_lora_weights=True)
    inject_adapter_in_model(config, transformer)
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)


def load_transformer(cfg: FluxFinetuneConfig, device: torch.device | str = "cpu") -> nn.Module:
    """``FluxTransformer2DModel.from_pretrained(model.path, subfolder="transformer")``."""
    from diffusers import FluxTransformer2DModel

    from .text_encoding import check_local_subfolders

    path = cfg.model.path
    check_local_subfolders(path, ("transformer",))  # type: ignore[arg-type]
    where = str(Path(path).expanduser()) if looks_local(path) else path  # type: ignore[arg-type]
    model = FluxTransformer2DModel.from_pretrained(where, subfolder="transformer", torch_dtype=getattr(torch, cfg.model.dtype))
    return model.to(device)


def build_flux_model(cfg: FluxFinetuneConfig, transformer: nn.Module) -> nn.Module:
    """The trained model: ``wrap_dit(transformer, any_sample_shape=True)`` or the plain ``FluxFlowModel``.

    Why the baseline keeps its own small module: paper Table 3's baseline trains the unmodified
    transformer through its own ``forward`` and exports a plain diffusers folder;
    ``wrap_dit`` with ``IdentityDecomposition`` would swap in the multi-scale embedders.
    """
    from dfm_ext.adapters.flux import FluxAdapter
    from dfm_ext.wrapping.wrapper import wrap_dit

    ft = cfg.finetune
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.num_stages == 1:
        if ft.mode == "lora":
            _add_peft_lora(transformer, ft)
        return FluxFlowModel(transformer, guidance=cfg.model.guidance)
    c = transformer.config.in_channels // 4
    h, w = cfg.buckets().shapes[0]
    f = cfg.vae.downsample
    # FLUX has no position table (RoPE ids follow the grid): one wrapper serves every bucket.
    wrapped = wrap_dit(
        transformer, build_decomposition(cfg.decomposition), adapter=FluxAdapter(guidance=cfg.model.guidance),
        sample_shape=(c, h // f, w // f), init="pretrained", any_sample_shape=True,
    )
    if ft.mode == "lora":
        _add_peft_lora(transformer, ft)
    elif ft.mode == "stage_lora":
        from dfm_ext.specialization import specialize

        wrapped.specialization = specialize(
            wrapped, kind="lora", targets=list(ft.stage_targets), rank=ft.lora_rank, alpha=ft.lora_alpha,
            num_stages=cfg.num_stages, train="stage",
        )
    if ft.mode != "full" and ft.train_dfm_layers:
        _unfreeze_dfm_layers(transformer)
    return wrapped


def load_finetuned(directory: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model exported to ``final/`` (DFM or baseline) for sampling with :class:`dfm_ext.DFMSampler`.

    Returns the :class:`dfm_ext.DFMTransformer` (DFM runs, any bucket's shape; a per-stage LoRA
    re-applied, in this layout or the older one with ``stage_lora.json``) or a
    :class:`FluxFlowModel` (baseline); both follow the DFM model contract. Safetensors only.
    """
    from diffusers import FluxTransformer2DModel

    directory = Path(directory)
    if (directory / "dfm_config.json").is_file():
        from dfm_ext.wrapping.io import load_wrapped

        record = json.loads((directory / "dfm_config.json").read_text())
        base = FluxTransformer2DModel.from_config(record["base"]["config"])
        model = load_wrapped(directory, base, device=device)
        # Exports written before any_sample_shape existed came from the bucketed wrapper, which
        # accepted every bucket's shape: so does the reloaded model.
        model.any_sample_shape = True
        return model.to(device, dtype).eval()
    if (directory / "config.json").is_file():
        transformer = FluxTransformer2DModel.from_pretrained(str(directory), torch_dtype=dtype)
        return FluxFlowModel(transformer).to(device).eval()
    raise FileNotFoundError(f"{directory} holds neither a DFM export (dfm_config.json) nor a diffusers transformer (config.json)")


# -- the task --------------------------------------------------------------------------------


class FluxTask:
    """Model, loss and sampling of the FLUX finetuning recipe (a ``TrainTask``)."""

    def __init__(self, cfg: FluxFinetuneConfig) -> None:
        import dfm_ext

        self.cfg = cfg
        self.decomposition = build_decomposition(cfg.decomposition)
        s = self.decomposition.num_stages
        self.timesteps = timestep_sampler(cfg.dfm, s)
        self.objective = dfm_ext.DFMObjective(s, masking=cfg.dfm.masking)
        self._codec: Any = None
        self._text: Any = None
        self.empty_text: Any = None  # set from a cache; else encoded on first use
        # Per-stage LoRA: a micro-batch without stage s leaves stage s's LoRA unused (engine -> DDP).
        self.find_unused_parameters = cfg.finetune.mode == "stage_lora"

    def codec(self, device: torch.device) -> Any:
        if self._codec is None:
            from .latents import LatentCodec, load_vae

            vae = load_vae(self.cfg.model.path, self.cfg.vae.subfolder, device=device, dtype=self._frozen_dtype(device))  # type: ignore[arg-type]
            self._codec = LatentCodec(vae, self.cfg.vae.scaling_factor, self.cfg.vae.shift_factor, sample=self.cfg.vae.sample_posterior)
        return self._codec

    def text_encoder(self, device: torch.device) -> Any:
        if self._text is None:
            from .text_encoding import FluxTextEncoder

            self._text = FluxTextEncoder(self.cfg.model.path, max_sequence_length=self.cfg.data.max_sequence_length,  # type: ignore[arg-type]
                                         device=device, dtype=self._frozen_dtype(device))
        return self._text

    def _frozen_dtype(self, device: torch.device) -> torch.dtype:
        # bf16 matmuls are ~100x slower than fp32 on CPUs.
        return getattr(torch, self.cfg.model.frozen_dtype) if torch.device(device).type == "cuda" else torch.float32

    def empty(self, device: torch.device) -> Any:
        if self.empty_text is None:
            self.empty_text = self.text_encoder(device).empty()
        return self.empty_text.to(device)

    def build_model(self) -> nn.Module:
        return build_flux_model(self.cfg, load_transformer(self.cfg))

    def conditioning(self, batch: dict[str, Any], device: torch.device) -> Any:
        from .text_encoding import TextEmbeddings

        if "encoder_hidden_states" in batch:
            return TextEmbeddings(batch["encoder_hidden_states"].float(), batch["pooled_projections"].float()).to(device)
        return self.text_encoder(device).encode(batch["caption"]).to(device)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        if "latents" in batch:
            z = batch["latents"].to(device).float()
        else:
            z = self.codec(device).encode(batch["pixels"].to(device), generator=generator)
        b = z.shape[0]
        text = self.conditioning(batch, device)
        drop = dropout_mask(b, self.cfg.data.caption_dropout, generator=generator, device=device)
        text = text.where(drop, self.empty(device))
        stages = self.decomposition.decompose(z)
        ts = self.timesteps.sample(b, generator=generator, device=device)
        out = self.objective(model, stages, ts, generator=generator, **text.as_kwargs())
        return StepLoss(out.loss, {f"loss_stage{i}": v for i, v in enumerate(out.per_stage)})

    @torch.no_grad()
    def sample(self, model: nn.Module, prompts: Sequence[str], *, device: torch.device, generator: torch.Generator) -> Any:
        """``SampleOutput`` of the DFM sampler for ``prompts`` (latents; decode with :meth:`codec`)."""
        cfg = self.cfg.sampling
        sampler = stage_sampler(self.decomposition, cfg)
        text = self.text_encoder(device).encode(list(prompts)).to(device)
        empty = self.empty(device)
        n = len(prompts)
        uncond = {"encoder_hidden_states": empty.encoder_hidden_states.expand(n, -1, -1),
                  "pooled_projections": empty.pooled_projections.expand(n, -1)}
        net = getattr(model, "module", model)
        c = net.transformer.config.in_channels // 4 if isinstance(net, FluxFlowModel) else net.stage_shapes[-1][0]
        f = self.cfg.vae.downsample
        shape = (n, c, cfg.height // f, cfg.width // f)
        return sampler.sample(model, shape, generator=generator, device=device, uncond=uncond, **text.as_kwargs())

    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        g = torch.Generator(device=device).manual_seed(self.cfg.sampling.seed)
        out = self.sample(model, self.cfg.sampling.prompts, device=device, generator=g)
        final = save_progressive_samples(self.codec(device), out, out_dir, step)
        return {"sample_std": float(final.std())}


# -- data and entry point ---------------------------------------------------------------------


def build_dataset(cfg: FluxFinetuneConfig) -> torch.utils.data.Dataset:
    """Captioned images in buckets, or the cache (checked against the config)."""
    if cfg.data.cache is not None:
        from .flux_cache import FluxCache, cache_metadata

        return FluxCache(cfg.data.cache, expected=cache_metadata(cfg))
    return CaptionedImages(cfg.data.source, cfg.buckets(), on_missing=cfg.data.on_missing,  # type: ignore[arg-type]
                           min_area_fraction=cfg.data.min_area_fraction, max_skips=cfg.data.max_skips)


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, FluxFinetuneConfig]:
    """``--config NAME [key.sub=value ...]`` -> (name, validated config); no compute spent."""
    return parse_config_args(FluxFinetuneConfig, argv, prog="python -m dfm_ext.recipes.flux_finetune", doc=__doc__)


def prepare(argv: Sequence[str] | None = None) -> tuple[str, FluxFinetuneConfig, torch.utils.data.Dataset]:
    """Parse, validate, check the model folder and open the data: everything that fails before compute."""
    from .text_encoding import check_local_subfolders

    name, cfg = parse_args(argv)
    needed = ["transformer"] if cfg.data.cache is not None else ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    check_local_subfolders(cfg.model.path, needed)  # type: ignore[arg-type]
    dataset = build_dataset(cfg)
    stats = getattr(dataset, "stats", None)
    if stats and os.environ.get("RANK", "0") == "0":
        print(f"data: {json.dumps(stats)}", file=sys.stderr)
    return name, cfg, dataset


def run(name: str, cfg: FluxFinetuneConfig, dataset: Any) -> TrainResult:
    task = FluxTask(cfg)
    if getattr(dataset, "empty_text", None) is not None:
        task.empty_text = dataset.empty_text
    plan = functools.partial(BucketBatchPlan, buckets=tuple(dataset.bucket_of))
    trainer = Trainer(task, dataset, cfg.train, cfg.optim, full_config=cfg, name=name, random_flip=cfg.data.random_flip,
                      collate=collate_captioned, plan_factory=plan)
    return trainer.fit()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cache"]:
        from .flux_cache import main as cache_main

        return cache_main(argv[1:])
    return train_main(prepare, run, argv, lambda result: {"skipped_images": result.skipped_images})


if __name__ == "__main__":
    sys.exit(main())
