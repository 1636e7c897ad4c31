"""The recipes' ``sample`` and ``evaluate`` commands (issue 29) on a tiny ImageNet run and a tiny Kinetics model.

``sample``: two CPU ranks write bitwise the samples of one; a crash after some shards resumes without
duplicates or gaps (and equals an uninterrupted run); a checkpoint's EMA equals ``final/``; a folder begun with
other settings is refused. ``evaluate``: a PNG folder scores exactly as the ``.npz`` of the same images; a
missing weight file is a one-line error naming the file and where it comes from. Feature networks are tiny
random ones saved as the user's files (a transformers DINOv2 folder, cd-fvd's I3D state dict).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfm_ext.metrics import SampleShards, count_images, write_npz
from dfm_ext.recipes.engine.checkpoint import save_final_model
from dfm_ext.recipes.engine.config import load_config, save_config
from dfm_ext.recipes.imagenet.task import main as imagenet_main
from dfm_ext.recipes.kinetics.task import KineticsConfig, KineticsTask
from dfm_ext.recipes.kinetics.task import main as kinetics_main
from _launch import launch_two_cpu_processes
from _recipe_fixtures import recipe_env, tiny_argv, tiny_image_assets

PY = sys.executable
NUM, BATCH = 10, 4  # three shards, the last one short


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny ImageNet run of 2 steps (EMA on), with its checkpoint and final/."""
    root = tmp_path_factory.mktemp("sample_command")
    assets = tiny_image_assets(root / "assets", per_class=2)
    out = root / "run"
    cmd = [PY, "-m", "dfm_ext.recipes.imagenet", *tiny_argv(assets / "images", assets, out, 2), "train.checkpoint_every=2",
           "train.sample_every=0", "train.trackers=[]", "train.progress=false"]  # fmt: skip
    res = subprocess.run(cmd, env=recipe_env(), capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_rank(run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank") / "samples"
    assert imagenet_main(["sample", "--run", str(run), "--num", str(NUM), "--out", str(out), "--batch-size", str(BATCH)]) == 0
    return out


def _arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "samples.npz") as data:
        return data["arr_0"], data["arr_1"]


def test_two_ranks_write_the_samples_of_one(run: Path, one_rank: Path, tmp_path: Path) -> None:
    images, labels = _arrays(one_rank)
    assert images.shape == (NUM, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 4 for i in range(NUM)]  # class-balanced: sample i has class i mod 4
    assert sorted(p.name for p in one_rank.glob("*.png")) == [f"{i:06d}.png" for i in range(NUM)]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(one_rank / f"{i:06d}.png")) for i in range(NUM)]), images)
    out = tmp_path / "two"
    res = launch_two_cpu_processes("dfm_ext.recipes.imagenet", ["sample", "--run", str(run), "--num", str(NUM), "--out", str(out),
                                                                 "--batch-size", str(BATCH)], recipe_env())  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    two_images, two_labels = _arrays(out)
    np.testing.assert_array_equal(two_images, images)  # bitwise
    np.testing.assert_array_equal(two_labels, labels)
    assert len(set(images.reshape(NUM, -1).sum(1).tolist())) == NUM  # every sample its own noise


def test_interrupted_sample_resumes_without_duplicates_or_gaps(run: Path, one_rank: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "resumed"
    argv = ["sample", "--run", str(run), "--num", str(NUM), "--out", str(out), "--batch-size", str(BATCH)]
    write = SampleShards.write

    def crash_in_second_shard(self, k, samples, labels, **kwargs):
        if k == 1:  # the shard's PNGs are written, then the process dies before its shard file
            Image.fromarray(samples[0]).save(out / f"{BATCH:06d}.png")
            raise KeyboardInterrupt("killed")
        return write(self, k, samples, labels, **kwargs)

    monkeypatch.setattr(SampleShards, "write", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        imagenet_main(argv)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.npz"] and not (out / "samples.npz").exists()
    monkeypatch.setattr(SampleShards, "write", write)
    assert imagenet_main(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(NUM)]
    for got, want in zip(_arrays(out), _arrays(one_rank)):
        np.testing.assert_array_equal(got, want)
    for i in range(NUM):  # the redrawn shard's files replaced the partial ones
        assert (out / f"{i:06d}.png").read_bytes() == (one_rank / f"{i:06d}.png").read_bytes()
    assert imagenet_main(argv) == 0  # nothing left to draw: the same set again
    assert count_images(out / "samples.npz") == NUM


def test_checkpoint_ema_equals_final_and_changed_settings_are_refused(run: Path, one_rank: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ckpt"
    argv = ["sample", "--run", str(run), "--num", str(NUM), "--out", str(out), "--batch-size", str(BATCH)]
    assert imagenet_main([*argv, "--checkpoint", str(run / "checkpoints" / "step-000002")]) == 0
    np.testing.assert_array_equal(_arrays(out)[0], _arrays(one_rank)[0])  # final/ holds the last EMA weights
    capsys.readouterr()
    assert imagenet_main(["sample", "--run", str(run), "--num", str(NUM), "--out", str(one_rank), "--batch-size", str(BATCH),
                          "sampling.guidance_scale=2.0"]) == 2  # fmt: skip
    assert "other settings" in (err := capsys.readouterr().err) and "guidance_scale" in err
    assert imagenet_main(["sample", "--run", str(tmp_path), "--num", "2", "--out", str(tmp_path / "x")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def _tiny_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(str(folder))
    return folder


def test_evaluate_folder_equals_npz_and_missing_weights_are_named(one_rank: Path, tmp_path: Path, capsys) -> None:
    reference = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    write_npz(tmp_path / "ref.npz", reference)
    dinov2 = _tiny_dinov2(tmp_path / "dinov2")
    results = []
    for samples in (one_rank, one_rank / "samples.npz"):
        out = tmp_path / f"{samples.name}.json"
        assert imagenet_main(["evaluate", "--samples", str(samples), "--reference", str(tmp_path / "ref.npz"), "--dinov2", str(dinov2),
                              "--out", str(out)]) == 0  # fmt: skip
        record = json.loads(out.read_text())
        assert record == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        results.append({k: v for k, v in record.items() if k != "samples"})
    assert results[0] == results[1] and results[0]["num_samples"] == NUM and results[0]["fdd"] > 0
    assert imagenet_main(["evaluate", "--samples", str(one_rank), "--reference", str(tmp_path / "ref.npz"),
                          "--inception", str(tmp_path / "weights-inception-2015-12-05-6726825d.pth")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "weights-inception-2015-12-05-6726825d.pth" in err and "torch-fidelity" in err
    assert kinetics_main(["evaluate", "--samples", str(one_rank), "--reference", str(one_rank), "--i3d", str(tmp_path / "i3d_pretrained_400.pt")]) == 2
    err = capsys.readouterr().err
    assert "i3d_pretrained_400.pt" in err and "TATS" in err
    assert imagenet_main(["evaluate", "--samples", str(one_rank), "--reference", str(tmp_path / "missing.npz"), "--dinov2", str(dinov2)]) == 2
    assert "VIRTUAL_imagenet256_labeled" in capsys.readouterr().err


def test_kinetics_sample_writes_mp4s_and_evaluates_fvd(tmp_path: Path, capsys) -> None:
    av = pytest.importorskip("av")
    i3d = pytest.importorskip("cdfvd.third_party.i3d.pytorch_i3d")
    from dfm_ext.recipes.kinetics.assets import make_tiny_video_vae

    # A run folder without training: the tiny config's model (fixed stage scales) as final/, and its config.
    vae = make_tiny_video_vae(tmp_path / "assets")
    cfg = load_config(KineticsConfig, "kinetics_tiny", [f"data.root={tmp_path}", f"vae.path={vae}", "dfm.scales=[0.5,0.5]"])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    save_final_model(run, KineticsTask(cfg).build_model())
    out = tmp_path / "videos"
    assert kinetics_main(["sample", "--run", str(run), "--num", "3", "--out", str(out), "--batch-size", "2"]) == 0
    with np.load(out / "samples.npz") as data:
        videos, labels = data["arr_0"], data["arr_1"]
    assert videos.shape == (3, 9, 32, 32, 3) and labels.tolist() == [0, 1, 2]
    with av.open(str(out / "000002.mp4")) as container:
        assert len(list(container.decode(video=0))) == 9
    torch.manual_seed(0)
    torch.save(i3d.InceptionI3d(400, in_channels=3).state_dict(), tmp_path / "i3d_pretrained_400.pt")
    capsys.readouterr()
    args = ["--reference", str(out / "samples.npz"), "--i3d", str(tmp_path / "i3d_pretrained_400.pt"), "--num-frames", "9"]
    assert kinetics_main(["evaluate", "--samples", str(out / "samples.npz"), *args]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["num_samples"] == 3 and record["fvd_frames"] == 9 and abs(record["fvd"]) < 1e-6  # the same set
    assert json.loads((out / "samples.metrics.json").read_text()) == record
