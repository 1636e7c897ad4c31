"""Pieces the recipe commands share: argument parsing, input checks, ``main`` wrappers, task helpers.

Kept apart from the recipes so that the image, video and FLUX commands cannot drift apart in
how they parse ``--config``, report errors (``error: ...`` on stderr, exit status 2) or draw
their label dropout and samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from dfm_ext.recipes.engine.checkpoint import CorruptCheckpointError, DiskFullError
from dfm_ext.recipes.engine.config import ConfigError, load_config
from dfm_ext.recipes.engine.latents import looks_local

__all__ = [
    "TINY_VAE_BLOCKS", "USAGE_ERRORS", "assets_main", "cache_builder_main", "cache_builder_parser", "check_batch", "check_latent_cache",
    "check_vae_path", "make_tiny_vae", "parse_config_args", "prepare_run", "save_tiny_vae", "train_main", "usage_error",
]  # fmt: skip

T = TypeVar("T")

# What a command reports as a usage error (exit status 2) instead of a traceback; ConfigError and
# CacheMismatchError are ValueErrors.
USAGE_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)

CONFIG_HELP = "a name in dfm_ext/recipes/configs or a YAML path"


# -- command line ----------------------------------------------------------------------------


def _summary_line(doc: str | None) -> str:
    return (doc or "").split("\n")[0]


def parse_config_args(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str | None,
    config_help: str = CONFIG_HELP,
    aliases: Mapping[str, str] | None = None,
) -> tuple[str, T]:
    """``--config NAME [key.sub=value ...]`` -> (run name, validated ``cls`` config).

    Args:
        cls: the recipe's config dataclass (with a ``validate()`` method).
        prog: the command shown in usage messages.
        doc: the recipe module's docstring; its first line is the description.
        aliases: short config names mapped to file names (e.g. ``tiny`` -> ``kinetics_tiny``).
    """
    parser = argparse.ArgumentParser(prog=prog, description=_summary_line(doc))
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    name = (aliases or {}).get(args.config, args.config)
    cfg = load_config(cls, name, args.overrides)
    cfg.validate()  # type: ignore[attr-defined]
    return Path(name).stem, cfg


def check_batch(train: Any, *, num_processes: int | None = None) -> None:
    """``train.global_batch_size`` must split evenly into processes x ``train.grad_accumulation``.

    ``num_processes`` defaults to ``$WORLD_SIZE`` (set by ``accelerate launch`` / ``torchrun`` before
    the recipe starts), so a launch with the wrong process count fails at start-up, not in ``fit``.
    """
    world = num_processes if num_processes is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    per = world * train.grad_accumulation
    if train.global_batch_size % per:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by {world} process(es) x "
            f"train.grad_accumulation={train.grad_accumulation} (= {per})"
        )


def cache_builder_parser(prog: str, doc: str | None, *, batch_size: int) -> argparse.ArgumentParser:
    """The flags every cache builder takes: ``--config --out --batch-size --dtype --device [overrides]``."""
    parser = argparse.ArgumentParser(prog=prog, description=_summary_line(doc))
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("overrides", nargs="*")
    return parser


def cache_builder_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str | None,
    defaults: Any,
    load: Callable[[argparse.Namespace], Any],
    build: Callable[[Any, str, Any], dict[str, Any]],
    skipped_key: str,
) -> int:
    """A cache builder's command: the flags of :func:`cache_builder_parser`, ``cfg = load(args)``,
    ``build(cfg, out, options)`` with ``defaults`` (a ``latents.CacheOptions``) updated from the
    flags, then a one-line JSON summary. Returns the exit status (2 for a usage error)."""
    import dataclasses

    args = cache_builder_parser(prog, doc, batch_size=defaults.batch_size).parse_args(argv)
    try:
        cfg = load(args)
        options = dataclasses.replace(defaults, batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype))
        index = build(cfg, args.out, options)
    except USAGE_ERRORS as e:
        return usage_error(e)
    print(json.dumps({"out": args.out, "num_items": index["num_items"], skipped_key: len(index[skipped_key])}))
    return 0


def usage_error(e: BaseException) -> int:
    """Print ``error: <e>`` on stderr; returns the exit status of a usage error (2)."""
    print(f"error: {e}", file=sys.stderr)
    return 2


def check_latent_cache(path: str) -> None:
    """Fail fast on a ``data.latent_cache`` folder without ``index.json``."""
    if not (Path(path) / "index.json").is_file():
        raise FileNotFoundError(f"data.latent_cache={path!r} has no index.json (build it first)")


def prepare_run(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], tuple[str, T]],
    check_inputs: Callable[[T], None],
    build_dataset: Callable[[T], Any],
) -> tuple[str, T, Any]:
    """``(name, config, dataset)``: parse, check the inputs, open the data (all before compute)."""
    name, cfg = parse_args(argv)
    check_inputs(cfg)
    return name, cfg, build_dataset(cfg)


def check_vae_path(path: str | None, subfolder: str | None, vae_class: str) -> None:
    """Fail fast on an unset ``vae.path`` or a local one without ``config.json`` (hub ids pass).

    Args:
        vae_class: the diffusers class the folder should hold, for the messages.
    """
    if path is None:
        raise ConfigError(f"vae.path is not set (a diffusers {vae_class} folder or hub id)")
    if looks_local(path):
        config = Path(path).expanduser() / (subfolder or "") / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"vae.path={path!r}: no {vae_class} config.json at {config}")


def train_main(
    prepare: Callable[[Sequence[str] | None], tuple[str, Any, Any]],
    run: Callable[[str, Any, Any], Any],
    argv: Sequence[str] | None,
    summary: Callable[[Any], dict[str, Any]],
) -> int:
    """A training command: ``prepare`` then ``run``; the result as one JSON line on rank 0.

    Args:
        prepare: ``argv -> (name, config, dataset)``; everything that can fail before compute.
        run: ``(name, config, dataset) -> TrainResult``.
        summary: the recipe's extra JSON fields of a ``TrainResult`` (after ``output_dir``,
            ``step`` and ``last_loss``).

    Returns:
        0; 2 after printing ``error: ...`` for a usage error; 1 after one ``error: ...`` line for a
        full disk or a damaged checkpoint.
    """
    try:
        name, cfg, dataset = prepare(argv)
    except USAGE_ERRORS as e:
        return usage_error(e)
    try:
        result = run(name, cfg, dataset)
    except ConfigError as e:  # raised while setting up (resume checks), before training
        return usage_error(e)
    except (DiskFullError, CorruptCheckpointError) as e:  # not a usage error, but one line says it all
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        line = {"output_dir": str(result.output_dir), "step": result.step, "last_loss": result.last_loss, **summary(result)}
        print(json.dumps(line))
    return 0


def assets_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str | None,
    data_dir: str,
    make_data: Callable[[Path], Any],
    make_vae: Callable[[str], Any],
) -> None:
    """The tiny-assets commands: ``OUT`` -> ``OUT/<data_dir>`` and ``OUT/vae``; prints the overrides to use."""
    parser = argparse.ArgumentParser(prog=prog, description=_summary_line(doc))
    parser.add_argument("out", help=f"folder to create ({data_dir}/ and vae/ inside)")
    args = parser.parse_args(argv)
    make_data(Path(args.out) / data_dir)
    make_vae(args.out)
    print(f"data.root={Path(args.out) / data_dir} vae.path={args.out}")


# -- tiny offline assets (the recipes' smoke-test configs) ---------------------------------------------

#: The widths of the tiny VAEs (the image one here, the video one in the Kinetics recipe).
TINY_VAE_BLOCKS: dict[str, Any] = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4)


def save_tiny_vae(cls: type, path: str | Path, seed: int, **config: Any) -> Path:
    """``cls(**TINY_VAE_BLOCKS, **config)`` initialised under ``seed`` and saved with ``save_pretrained``
    under ``path/vae`` (so it loads through ``from_pretrained``, as a real checkpoint does). Returns ``path``."""
    import torch

    torch.manual_seed(seed)
    cls(**TINY_VAE_BLOCKS, **config).save_pretrained(str(Path(path) / "vae"))
    return Path(path)


def make_tiny_vae(path: str | Path, *, seed: int = 0, latent_channels: int = 4) -> Path:
    """A 4x-downsampling ``AutoencoderKL`` (channels 8-16) saved under ``path/vae``."""
    from diffusers import AutoencoderKL

    return save_tiny_vae(
        AutoencoderKL, path, seed, in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.5, shift_factor=0.1,
    )  # fmt: skip
