"""Pieces the recipe tests share: tiny ImageNet assets, the subprocess environment, the
overrides every run of a ``tiny`` config starts with, and the losses a run logged."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from dfm_ext.recipes.engine.cli import make_tiny_vae
from dfm_ext.recipes.imagenet.assets import make_image_folder


def tiny_image_assets(root: Path, per_class: int = 4) -> Path:
    """``root/images`` (``per_class`` 40x40 crops of each photo) and the tiny VAE under ``root/vae``."""
    make_image_folder(root / "images", per_class=per_class, size=40)
    make_tiny_vae(root)
    return root


def recipe_env() -> dict[str, str]:
    """This environment with one thread per rank and unbuffered output (the runs are tiny)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def tiny_argv(data_root: Path, assets: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """``--config tiny`` with data, VAE, output folder and step count set, then ``extra``."""
    return [
        "--config", "tiny", f"data.root={data_root}", f"vae.path={assets}", f"train.output_dir={out}",
        f"train.steps={steps}", *extra,
    ]  # fmt: skip


def logged_losses(out: Path) -> dict[int, float]:
    """The last logged training loss of every step (a resumed run re-logs replayed steps)."""
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, name: str = "step-000004", timeout: float = 300) -> None:
    """Poll until ``out/checkpoints/latest`` names ``name``; fail if ``proc`` ended first."""
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == name:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
