"""Offline datasets (IDX reader, Fashion-MNIST, scikit-image crops), pictures and checkpoint folders."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dfm_ext.recipes.demo.data import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_available,
    load_dataset,
    load_fashion_mnist,
    load_skimage_crops,
    read_idx,
)
from dfm_ext.recipes.engine.viz import make_grid, save_image_grid, save_loss_curves, save_progressive, to_uint8


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_fake_fashion(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for split, (img, lbl), n in (
        ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), n_train),
        ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), n_test),
    ):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for stem, arr in ((img, images), (lbl, labels)):
            raw = _idx_bytes(arr, 0x08)
            if gz:
                (root / (stem + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (root / stem).write_bytes(raw)
        out[split + "_images"], out[split + "_labels"] = images, labels
    return out


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    code=st.sampled_from([0x08, 0x0B, 0x0C, 0x0D]),
    gz=st.booleans(),
)
def test_read_idx_round_trips_any_shape_and_type(tmp_path_factory, shape, code, gz) -> None:
    dtype = {0x08: np.uint8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32}[code]
    arr = (np.arange(int(np.prod(shape))) * 7 - 3).astype(dtype).reshape(shape)
    raw = _idx_bytes(arr, code)
    p = tmp_path_factory.mktemp("idx") / "a.idx"
    p.write_bytes(gzip.compress(raw) if gz else raw)
    back = read_idx(p)
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_read_idx_rejects_bad_files(tmp_path) -> None:
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(p)
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    p.write_bytes(_idx_bytes(arr, 0x08)[:-1])
    with pytest.raises(ValueError, match="payload"):
        read_idx(p)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz) -> None:
    raw = _write_fake_fashion(tmp_path, gz=gz)
    assert fashion_mnist_available(tmp_path)
    ds = load_fashion_mnist("train", root=tmp_path)
    assert ds.images.shape == (12, 1, 32, 32) and ds.images.dtype == torch.float32
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.num_classes == 10
    np.testing.assert_array_equal(ds.labels.numpy(), raw["train_labels"])
    # 2-pixel black border, the 28x28 image scaled to [-1, 1] inside it.
    assert torch.all(ds.images[:, :, :2] == -1) and torch.all(ds.images[:, :, :, -2:] == -1)
    inner = ds.images[:, 0, 2:30, 2:30]
    np.testing.assert_allclose(inner.numpy(), raw["train_images"] / 127.5 - 1, atol=1e-6)
    assert len(load_dataset("fashion-mnist", "test", root=tmp_path)) == 5
    assert load_dataset("auto", "test", root=tmp_path).name == "fashion-mnist"


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path) -> None:
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    assert load_dataset("auto", "test", root=tmp_path, num=20).name == "skimage"


def test_unknown_dataset_and_split_errors() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("skimage", "val")


@pytest.mark.parametrize("channels", [1, 3])
def test_skimage_crops_shapes_range_and_determinism(channels) -> None:
    a = load_skimage_crops("train", num=30, size=32, channels=channels, seed=3)
    b = load_skimage_crops("train", num=30, size=32, channels=channels, seed=3)
    c = load_skimage_crops("test", num=30, size=32, channels=channels, seed=3)
    assert a.images.shape == (30, channels, 32, 32)
    assert a.images.min() >= -1 and a.images.max() <= 1 and a.images.std() > 0.05
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.num_classes >= 5 and set(a.labels.tolist()) == set(range(a.num_classes))


def test_dataset_batch_and_subset() -> None:
    ds = load_skimage_crops("test", num=40, seed=0)
    x, y = ds.batch(8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 1, 32, 32) and y.shape == (8,)
    with pytest.raises(ValueError, match="batch_size"):
        ds.batch(41)
    assert len(ds.subset(10)) == 10 and ds.subset(100) is ds


# ---- pictures -------------------------------------------------------------------------------


@given(n=st.integers(1, 10), nrow=st.integers(1, 5), c=st.sampled_from([1, 3]), scale=st.integers(1, 3))
def test_grid_size(n, nrow, c, scale) -> None:
    grid = make_grid(torch.zeros(n, c, 5, 7), nrow, padding=1, scale=scale)
    rows = (n + nrow - 1) // nrow
    assert grid.shape == (rows * 6 * scale + scale, nrow * 8 * scale + scale, c)


def test_to_uint8_clips_and_maps_range() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="channels"):
        to_uint8(torch.zeros(1, 2, 4, 4))


def test_pngs_are_valid_and_sized(tmp_path) -> None:
    imgs = torch.rand(6, 3, 8, 8) * 2 - 1
    p = save_image_grid(imgs, tmp_path / "g.png", nrow=3, padding=1, scale=2)
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.size == (3 * 18 + 2, 2 * 18 + 2) and im.mode == "RGB"
        arr = np.asarray(im)
    # The first tile is the first image, upscaled 2x.
    np.testing.assert_array_equal(arr[2:18:2, 2:18:2], to_uint8(imgs[:1])[0])
    p = save_progressive([torch.zeros(4, 1, 4, 4), torch.zeros(4, 1, 8, 8)], torch.zeros(4, 1, 8, 8),
                         tmp_path / "prog.png", scale=1, padding=1)  # fmt: skip
    with Image.open(p) as im:
        assert im.size == (3 * 9 + 1, 4 * 9 + 1)
    p = save_loss_curves({"stage 0": [1.0, 0.5, float("nan"), 0.3], "stage 1": [0.2] * 4}, tmp_path / "loss.png")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["g.png", "loss.png", "prog.png"]  # no temp leftovers


def test_progressive_rejects_mismatched_previews(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"previews\[0\]"):
        save_progressive([torch.zeros(3, 1, 4, 4)], torch.zeros(4, 1, 8, 8), tmp_path / "p.png")


# ---- checkpoints ----------------------------------------------------------------------------
