"""What the recipe commands share, so that they cannot drift apart: parsing ``--config``, input checks,
reporting errors (``error: ...`` on stderr, exit status 2), the cache and tiny-asset commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from dfm_ext.recipes.engine.checkpoint import CorruptCheckpointError, DiskFullError, disk_full
from dfm_ext.recipes.engine.config import ConfigError, load_config
from dfm_ext.recipes.engine.latents import looks_local

__all__ = [
    "USAGE_ERRORS", "assets_main", "cache_builder_main", "check_latent_cache", "check_vae_path", "make_tiny_vae",
    "parse_config_args", "photo", "save_tiny_vae", "train_main", "usage_error",
]  # fmt: skip

T = TypeVar("T")

#: What a command reports as a usage error (exit status 2) instead of a traceback (ConfigError is a ValueError).
USAGE_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


def parse_config_args(
    cls: type[T], argv: Sequence[str] | None, *, prog: str, doc: str | None,
    config_help: str = "a name in dfm_ext/recipes/configs or a YAML path", aliases: Mapping[str, str] | None = None,
) -> tuple[str, T]:  # fmt: skip
    """``--config NAME [key.sub=value ...]`` -> (run name, ``cls`` config after its ``validate()``); ``doc``'s first
    line describes the command, ``aliases`` maps short config names."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    name = (aliases or {}).get(args.config, args.config)
    cfg = load_config(cls, name, args.overrides)
    cfg.validate()  # type: ignore[attr-defined]
    return Path(name).stem, cfg


def usage_error(e: BaseException) -> int:
    """Print ``error: <e>`` on stderr; returns the exit status of a usage error (2)."""
    print(f"error: {e}", file=sys.stderr)
    return 2


def cache_builder_main(
    argv: Sequence[str] | None, *, prog: str, doc: str | None, defaults: Any, load: Callable[[argparse.Namespace], Any],
    build: Callable[[Any, str, Any], dict[str, Any]], skipped_key: str, count: str = "num_items",
) -> int:  # fmt: skip
    """A cache builder's command: ``--config --out --batch-size --dtype --device [overrides]``; ``cfg = load(args)``,
    ``build(cfg, out, options)`` (``defaults``, a ``CacheOptions``, updated from the flags), then one JSON line
    with ``index[count]`` (a number, or a list's length) and the number of ``index[skipped_key]``."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load(args)
        options = dataclasses.replace(defaults, batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype))
        index = build(cfg, args.out, options)
    except USAGE_ERRORS as e:
        return usage_error(e)
    n = index[count]
    print(json.dumps({"out": args.out, count: len(n) if isinstance(n, list) else n, skipped_key: len(index[skipped_key])}))
    return 0


def check_latent_cache(path: str) -> None:
    """Fail fast on a ``data.latent_cache`` folder without ``index.json``."""
    if not (Path(path) / "index.json").is_file():
        raise FileNotFoundError(f"data.latent_cache={path!r} has no index.json (build it first)")


def check_vae_path(path: str | None, subfolder: str | None, vae_class: str) -> None:
    """Fail fast on an unset ``vae.path`` or a local one without the ``vae_class``'s ``config.json`` (hub ids pass)."""
    if path is None:
        raise ConfigError(f"vae.path is not set (a diffusers {vae_class} folder or hub id)")
    if looks_local(path):
        config = Path(path).expanduser() / (subfolder or "") / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"vae.path={path!r}: no {vae_class} config.json at {config}")


def train_main(
    prepare: Callable[[Sequence[str] | None], tuple[str, Any, Any]], run: Callable[[str, Any, Any], Any], argv: Sequence[str] | None,
    summary: Callable[[Any], dict[str, Any]],
) -> int:  # fmt: skip
    """A training command: ``prepare(argv) -> (name, config, dataset)`` (all that can fail before compute), ``run(...)``,
    one JSON line on rank 0 with ``summary(result)``. Exit status 2 for a usage error, 1 for a full disk or a damaged checkpoint."""
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
    except OSError as e:  # a full disk met outside a checkpoint (the log, samples): the same one line
        full = disk_full(e, e.filename or cfg.train.output_dir, "")
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"output_dir": str(result.output_dir), "step": result.step, "last_loss": result.last_loss, **summary(result)}))
    return 0


def assets_main(argv: Sequence[str] | None, *, prog: str, doc: str | None, makers: Mapping[str, tuple[str, Callable[[Path], Any]]]) -> None:
    """A tiny-assets command: ``OUT``; ``makers``: config key -> (folder under ``OUT``, what writes it); prints the overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    parser.add_argument("out", help="the folder to create")
    out = Path(parser.parse_args(argv).out)
    for sub, make in makers.values():
        make(out / sub)
    print(" ".join(f"{key}={out / sub}" for key, (sub, _) in makers.items()))


def photo(name: str) -> Any:
    """scikit-image's bundled photo ``name`` as ``[H, W, 3]`` uint8 (grey ones repeated, alpha dropped)."""
    from skimage import data as skdata

    img = getattr(skdata, name)()
    return np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]


def save_tiny_vae(cls: type, path: str | Path, seed: int, **config: Any) -> Path:
    """``cls(**config)`` with the tiny VAEs' widths (8-16), initialised under ``seed``, saved under ``path/vae`` as a real one is."""
    torch.manual_seed(seed)
    cls(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, **config).save_pretrained(str(Path(path) / "vae"))
    return Path(path)


def make_tiny_vae(path: str | Path, *, seed: int = 0, latent_channels: int = 4) -> Path:
    """A 4x-downsampling ``AutoencoderKL`` (channels 8-16, FLUX-style ``shift_factor``) saved under ``path/vae``."""
    from diffusers import AutoencoderKL

    return save_tiny_vae(
        AutoencoderKL, path, seed, in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.5, shift_factor=0.1,
    )  # fmt: skip
