"""Digests of the tiny recipe runs, to show a refactor changed no result (compare two trees' JSON).

Runs, in subprocesses with one thread: the tiny ImageNet config (12 steps, checkpoints and a sample grid), ImageNet
with per-stage LoRA, the tiny Kinetics and FLUX configs, and ImageNet on two CPU processes under DDP and FSDP2; then
records the SHA-256 of every tensor of each run's ``final/`` and the per-process weight digests of ``summary.json``.
Two checkouts give the same JSON exactly when their runs are bitwise equal::

    PYTHONPATH=treeA/src python benchmarks/bitwise_runs.py --assets /tmp/assets --out /tmp/a.json   # assets made once
    PYTHONPATH=treeB/src python benchmarks/bitwise_runs.py --assets /tmp/assets --out /tmp/b.json
    cmp /tmp/a.json /tmp/b.json

A change of the random stream (e.g. cdc1b7b drew the stage on the host) changes every digest on purpose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def tensor_digest(path: Path) -> str:
    h = hashlib.sha256()
    tensors = load_file(str(path))
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_assets(root: Path) -> None:
    from dfm_ext.recipes.engine.cli import make_tiny_vae
    from dfm_ext.recipes.flux.assets import make_captioned_images, make_tiny_flux
    from dfm_ext.recipes.imagenet.assets import make_image_folder
    from dfm_ext.recipes.kinetics.assets import make_tiny_video_vae, make_video_folder

    make_image_folder(root / "img" / "images", per_class=4, size=40)
    make_tiny_vae(root / "img")
    make_video_folder(root / "vid" / "videos", per_class=2, frames=20, height=40)
    make_tiny_video_vae(root / "vid")
    make_tiny_flux(root / "flux" / "flux")
    make_captioned_images(root / "flux" / "images", per_photo=3)


def runs(a: Path) -> dict[str, tuple[int, list[str]]]:
    """name -> (processes, command line after ``-m``)."""
    img = ["dfm_ext.recipes.imagenet", "--config", "tiny", f"data.root={a / 'img' / 'images'}", f"vae.path={a / 'img'}"]
    return {
        "imagenet": (1, [*img, "train.steps=12", "train.checkpoint_every=6", "train.sample_every=12"]),
        "imagenet_lora": (1, [*img, "train.steps=8", "train.checkpoint_every=8", "train.sample_every=0", "specialize.kind=lora",
                              "specialize.rank=4"]),  # fmt: skip
        "kinetics": (1, ["dfm_ext.recipes.kinetics", "--config", "tiny", f"data.root={a / 'vid' / 'videos'}", f"vae.path={a / 'vid'}",
                         "train.steps=6", "train.global_batch_size=8", "train.checkpoint_every=6", "train.sample_every=6"]),  # fmt: skip
        "flux": (1, ["dfm_ext.recipes.flux", "--config", "flux_tiny", f"model.path={a / 'flux' / 'flux'}",
                     f"data.source={a / 'flux' / 'images'}", "train.steps=6", "train.checkpoint_every=6", "train.sample_every=6"]),  # fmt: skip
        "ddp2": (2, [*img, "train.steps=8", "train.checkpoint_every=4", "train.sample_every=8", "train.sharding=none"]),
        "fsdp2": (2, [*img, "train.steps=8", "train.checkpoint_every=4", "train.sample_every=8", "train.sharding=fsdp2"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, required=True, help="folder of the tiny assets (made when missing)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON of digests")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: next to --out)")
    args = parser.parse_args()
    if not (args.assets / "img").is_dir():
        make_assets(args.assets)
    work = args.work or args.out.with_suffix("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["train.progress=false", "train.trackers=[]", "train.log_every=2"]
    result: dict[str, object] = {}
    for name, (procs, argv) in runs(args.assets).items():
        run = work / name
        if procs == 1:
            launch = [sys.executable, "-m"]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", str(procs),
                      "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m"]  # fmt: skip
        done = subprocess.run([*launch, *argv, f"train.output_dir={run}", *common], env=env, capture_output=True, text=True)
        if done.returncode:
            print(name, "FAILED", done.stderr[-3000:], file=sys.stderr)
            result[name] = "failed"
            continue
        final = {f.relative_to(run / "final").as_posix(): tensor_digest(f) for f in sorted((run / "final").rglob("*.safetensors"))}
        result[name] = {"final": final, "params": json.loads((run / "summary.json").read_text())["param_sha256_per_rank"]}
        print(name, "ok", flush=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 1 if "failed" in result.values() else 0


if __name__ == "__main__":
    raise SystemExit(main())
