"""Finetune FLUX (diffusers ``FluxTransformer2DModel``) with DFM, or plainly as the baseline: the training script.

Commands, configs and the pipeline (captioned images in aspect-ratio buckets -> VAE latents and CLIP/T5 embeddings ->
stages -> FLUX wrapped with :func:`dfm_ext.wrap_dit`, paper E; one stage: the unmodified transformer, the baseline of
paper Table 3): docs/recipes/flux.md.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from dfm_ext.adapters.flux import FluxAdapter, flux_image_ids
from dfm_ext.metrics.commands import evaluate_images_command
from dfm_ext.recipes.engine.cli import parse_config_args, train_main
from dfm_ext.recipes.engine.data import dropout_mask, stage_generator
from dfm_ext.recipes.engine.latents import looks_local
from dfm_ext.recipes.engine.parallel import unwrap
from dfm_ext.recipes.engine.sampling import SampleJob, dispatch, sample_command
from dfm_ext.recipes.engine.trainer import StepLoss, Trainer, TrainResult, TrainTask
from dfm_ext.recipes.engine.viz import save_progressive_samples
from dfm_ext.recipes.flux.cache import FluxCache, cache_metadata
from dfm_ext.recipes.flux.cache import main as cache_main
from dfm_ext.recipes.flux.config import FinetuneConfig, FluxFinetuneConfig
from dfm_ext.recipes.flux.data import BucketBatchPlan, CaptionedImages, collate_captioned
from dfm_ext.recipes.flux.text_encoding import SUBFOLDERS, FluxEncoders, TextEmbeddings, check_local_subfolders
from dfm_ext.specialization import specialize
from dfm_ext.wrapping.record import peft_merged
from dfm_ext.wrapping.adapter import DiTAdapter
from dfm_ext.wrapping.wrapper import DFMTransformer, load_wrapped, wrap_dit

__all__ = ["FluxFinetuneConfig", "FluxFlowModel", "FluxTask", "build_dataset", "load_finetuned", "main", "parse_args", "run", "sample_job"]


def _pack(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> FLUX tokens ``[B, H/2 * W/2, 4 C]`` in ``(c, p, q)`` order (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(y: Tensor, h: int, w: int) -> Tensor:
    b, _, c4 = y.shape
    return y.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class FluxFlowModel(nn.Module):
    """The unmodified FLUX transformer behind the DFM model contract, one stage ``[B, C, H, W]`` (the FT baseline):
    ``timestep = 1 - t`` (FLUX multiplies by 1000 itself), and ``-output`` (FLUX predicts ``noise - x``)."""

    num_stages = 1
    #: a diffusers ``FluxTransformer2DModel``; Any: its ``config`` and submodules are not typed for mypy
    transformer: Any

    def __init__(self, transformer: nn.Module, guidance: float = 1.0) -> None:
        super().__init__()
        self.transformer, self.guidance = transformer, float(guidance)

    def forward(
        self, stages: Sequence[Tensor], t: Tensor, stage: Tensor, mask: Tensor | None = None, *, encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
    ) -> list[Tensor]:  # fmt: skip
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
            hidden_states=_pack(x), timestep=1 - t[:, 0], guidance=guidance, pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states, txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=flux_image_ids((h // 2, w // 2), device=x.device, dtype=x.dtype), return_dict=False,
        )[0]  # fmt: skip
        return [-_unpack(out, h, w)]

    def save_pretrained(self, directory: str | Path) -> None:
        """A plain diffusers ``FluxTransformer2DModel`` folder (LoRA merged in)."""
        with peft_merged(self.transformer):
            self.transformer.save_pretrained(str(directory))


def _add_peft_lora(transformer: nn.Module, ft: FinetuneConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=ft.lora_rank,
        lora_alpha=ft.lora_alpha or ft.lora_rank,  # type: ignore[arg-type]  # peft says int; it scales by alpha / r
        target_modules=list(ft.lora_targets), init_lora_weights=True,
    )
    inject_adapter_in_model(config, transformer)
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)


def load_transformer(cfg: FluxFinetuneConfig, device: torch.device | str = "cpu") -> nn.Module:
    """``FluxTransformer2DModel.from_pretrained(model.path, subfolder="transformer")``."""
    from diffusers import FluxTransformer2DModel

    path = cfg.model.path
    check_local_subfolders(path, ("transformer",))  # type: ignore[arg-type]
    where = str(Path(path).expanduser()) if looks_local(path) else path  # type: ignore[arg-type]
    return FluxTransformer2DModel.from_pretrained(where, subfolder="transformer", torch_dtype=getattr(torch, cfg.model.dtype)).to(device)


def build_flux_model(cfg: FluxFinetuneConfig, transformer: nn.Module) -> nn.Module:
    """The trained model: ``wrap_dit(transformer, any_sample_shape=True)``, or for one stage the plain
    :class:`FluxFlowModel` (``wrap_dit`` with one stage would swap in the multi-scale embedders)."""
    ft = cfg.finetune
    dit: Any = transformer  # a diffusers FluxTransformer2DModel: its config and submodules are not typed for mypy
    if cfg.model.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    if cfg.num_stages == 1:
        if ft.mode == "lora":
            _add_peft_lora(transformer, ft)
        return FluxFlowModel(transformer, guidance=cfg.model.guidance)
    c, (h, w), f = dit.config.in_channels // 4, cfg.buckets().shapes[0], cfg.vae.downsample
    # FLUX has no position table (RoPE ids follow the grid): one wrapper serves every bucket.
    wrapped = wrap_dit(
        transformer, cfg.decomposition.build(), adapter=cast(DiTAdapter, FluxAdapter(guidance=cfg.model.guidance)),
        sample_shape=(c, h // f, w // f), init="pretrained", any_sample_shape=True,
    )
    if ft.mode == "lora":
        _add_peft_lora(transformer, ft)
    elif ft.mode == "stage_lora":
        wrapped.specialization = specialize(
            wrapped, kind="lora", targets=list(ft.stage_targets), rank=ft.lora_rank, alpha=ft.lora_alpha,
            num_stages=cfg.num_stages, train="stage",
        )
    if ft.mode != "full" and ft.train_dfm_layers:  # the new DFM layers
        for module in (dit.x_embedder, dit.proj_out, dit.time_text_embed.timestep_embedder):
            module.requires_grad_(True)
    return wrapped


def load_finetuned(directory: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model exported to ``final/`` for :class:`dfm_ext.DFMSampler`: the :class:`dfm_ext.DFMTransformer`
    (DFM runs, any bucket's shape, a per-stage LoRA re-applied) or a :class:`FluxFlowModel` (baseline)."""
    from diffusers import FluxTransformer2DModel

    directory = Path(directory)
    if (directory / "dfm_config.json").is_file():
        record = json.loads((directory / "dfm_config.json").read_text())
        base = FluxTransformer2DModel.from_config(record["base"]["config"])
        return load_wrapped(directory, base, device=device).to(device, dtype).eval()
    if (directory / "config.json").is_file():
        transformer = FluxTransformer2DModel.from_pretrained(str(directory), torch_dtype=dtype)
        return FluxFlowModel(transformer).to(device).eval()
    raise FileNotFoundError(f"{directory} holds neither a DFM export (dfm_config.json) nor a diffusers transformer (config.json)")


class FluxTask(FluxEncoders, TrainTask):
    """What one step of FLUX finetuning computes: the DFM (or plain FM) loss on a captioned, bucketed batch."""

    def __init__(self, cfg: FluxFinetuneConfig, buckets: Sequence[int] = ()) -> None:
        super().__init__(cfg)
        self.buckets, self.random_flip = tuple(buckets), cfg.data.random_flip  # every item's bucket: a batch comes from one
        self.decomposition = cfg.decomposition.build()
        self.timesteps = cfg.dfm.timestep_sampler(self.decomposition.num_stages)
        self.objective = cfg.dfm.objective(self.decomposition.num_stages)

    def batch_plan(self, num_items: int, global_batch_size: int, **kwargs: Any) -> BucketBatchPlan:
        return BucketBatchPlan(num_items, global_batch_size, random_flip=self.random_flip, buckets=self.buckets, **kwargs)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_captioned(items)

    def build_model(self) -> nn.Module:
        return build_flux_model(self.cfg, load_transformer(self.cfg))

    def conditioning(self, batch: dict[str, Any], device: torch.device) -> TextEmbeddings:
        if "encoder_hidden_states" in batch:
            # to the device first (non-blocking from the loader's pinned memory), then widened there
            return TextEmbeddings(*(batch[k].to(device, non_blocking=True).float() for k in ("encoder_hidden_states", "pooled_projections")))
        return self.text_encoder(device).encode(batch["caption"]).to(device)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generator: torch.Generator, device: torch.device) -> StepLoss:
        if "latents" in batch:
            z = batch["latents"].to(device, non_blocking=True).float()
        else:
            z = self.codec(device).encode(batch["pixels"].to(device, non_blocking=True), generator=generator)
        drop = dropout_mask(z.shape[0], self.cfg.data.caption_dropout, generator=generator, device=device)
        text = self.conditioning(batch, device).where(drop, self.empty(device))
        ts = self.timesteps.sample(z.shape[0], generator=generator, device=device, stage_generator=stage_generator(generator))
        out = self.objective(model, self.decomposition.decompose(z), ts, generator=generator, **text.as_kwargs())
        return StepLoss(out.loss, {f"loss_stage{i}": v for i, v in enumerate(out.per_stage)})

    @torch.no_grad()
    def sample(
        self, model: nn.Module, prompts: Sequence[str], *, device: torch.device, generator: torch.Generator | None, noise: list[Tensor] | None = None
    ) -> Any:  # fmt: skip
        """``SampleOutput`` of the DFM sampler for ``prompts`` (latents; decode with :meth:`codec`), from ``noise`` per
        stage or drawn from ``generator``."""
        cfg, n, f, net = self.cfg.sampling, len(prompts), self.cfg.vae.downsample, unwrap(model)
        text = self.text_encoder(device).encode(list(prompts)).to(device)
        uncond = {k: v.expand(n, *v.shape[1:]) for k, v in self.empty(device).as_kwargs().items()}
        c = (
            net.transformer.config.in_channels // 4 if isinstance(net, FluxFlowModel)
            else cast(DFMTransformer, net).stage_shapes[-1][0]
        )
        shape = (n, c, cfg.height // f, cfg.width // f)
        return cfg.sampler(self.decomposition).sample(model, noise or shape, generator=generator, device=device, uncond=uncond, **text.as_kwargs())

    def evaluate(self, model: nn.Module, *, step: int, out_dir: Path, device: torch.device) -> dict[str, float]:
        g = torch.Generator(device=device).manual_seed(self.cfg.sampling.seed)
        out = self.sample(model, self.cfg.sampling.prompts, device=device, generator=g)
        final = save_progressive_samples(self.codec(device), out, out_dir, step)
        return {"sample_std": float(final.std())}


def build_dataset(cfg: FluxFinetuneConfig) -> torch.utils.data.Dataset:
    """Captioned images in buckets, or the cache (checked against the config)."""
    if cfg.data.cache is not None:
        return FluxCache(cfg.data.cache, expected=cache_metadata(cfg))
    return CaptionedImages(cfg.data.source, cfg.buckets(), on_missing=cfg.data.on_missing,  # type: ignore[arg-type]
                           min_area_fraction=cfg.data.min_area_fraction, max_skips=cfg.data.max_skips)


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, FluxFinetuneConfig]:
    """``--config NAME [key.sub=value ...]`` -> (name, validated config)."""
    return parse_config_args(FluxFinetuneConfig, argv, prog="python -m dfm_ext.recipes.flux", doc=__doc__)


def prepare(argv: Sequence[str] | None = None) -> tuple[str, FluxFinetuneConfig, torch.utils.data.Dataset]:
    """Parse, validate, check the model folder and open the data: everything that fails before compute."""
    name, cfg = parse_args(argv)
    check_local_subfolders(cfg.model.path, ["transformer"] if cfg.data.cache is not None else SUBFOLDERS)  # type: ignore[arg-type]
    dataset = build_dataset(cfg)
    stats = getattr(dataset, "stats", None)
    if stats and os.environ.get("RANK", "0") == "0":
        print(f"data: {json.dumps(stats)}", file=sys.stderr)
    return name, cfg, dataset


def run(name: str, cfg: FluxFinetuneConfig, dataset: Any) -> TrainResult:
    task = FluxTask(cfg, buckets=dataset.bucket_of)
    task.empty_text = dataset.empty_text  # a cache holds the empty prompt's embeddings; else None (encoded on first use)
    return Trainer(task, dataset, cfg, name=name).fit()


def sample_job(cfg: FluxFinetuneConfig, *, prompts: str) -> SampleJob:
    """What ``sample`` draws: sample ``i`` from line ``i mod P`` of the prompt file ``prompts`` (its number kept as the
    label), at ``sampling.height`` x ``sampling.width``, true CFG against the empty prompt; ``final/`` of DFM or FT runs."""
    lines = [line for line in Path(prompts).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"the prompt file {prompts} holds no prompt (one per line)")
    from diffusers import FluxTransformer2DModel

    task, f = FluxTask(cfg), cfg.vae.downsample
    channels = FluxTransformer2DModel.load_config(cfg.model.path, subfolder="transformer")["in_channels"] // 4

    def draw(model: nn.Module, noise: list[Tensor], numbers: np.ndarray, device: torch.device) -> Tensor:
        return task.codec(device).decode(task.sample(model, [lines[n] for n in numbers], device=device, generator=None, noise=noise).x)

    shape = (channels, cfg.sampling.height // f, cfg.sampling.width // f)
    return SampleJob(task.decomposition, shape, lambda i: i % len(lines), draw, task.build_model, load_finetuned)


def main(argv: Sequence[str] | None = None) -> int:
    """The command (``python -m dfm_ext.recipes.flux [cache | sample | evaluate]``); returns the exit status (2: a usage error)."""
    prog, options = "python -m dfm_ext.recipes.flux", {"--prompts": "a text file, one prompt per line (sample i: line i mod lines)"}
    return dispatch(argv, {
        "cache": cache_main, "evaluate": lambda a: evaluate_images_command(a, prog=f"{prog} evaluate"),
        "sample": lambda a: sample_command(a, prog=prog, config_cls=FluxFinetuneConfig, make_job=sample_job, options=options),
    }, lambda a: train_main(prepare, run, a, lambda result: {"skipped_images": result.skipped_images}))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
