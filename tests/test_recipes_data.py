"""Recipe data pipeline: image folders with corrupt files, the resumable batch plan, latents and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dfm_ext.recipes.engine.data import (
    BatchPlan,
    ImageFolder,
    LatentCache,
    LatentCodec,
    PlanBatchSampler,
    collate_items,
    scan_image_folder,
)
from dfm_ext.recipes.engine.latents import CacheMismatchError, load_vae, write_latent_cache
from dfm_ext.recipes.engine.cli import make_tiny_vae
from dfm_ext.recipes.imagenet.assets import make_image_folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    make_image_folder(root / "images", per_class=3, size=40, photos=("astronaut", "coffee"))
    make_tiny_vae(root)
    return root


def _corrupt_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    first = sorted((dst / "astronaut").iterdir())[0]
    first.write_bytes(first.read_bytes()[:60])  # truncated image
    (dst / "astronaut" / "zz_not_an_image.png").write_text("this is text, not a PNG")
    (dst / "coffee" / "empty.jpg").write_bytes(b"")
    return dst


def test_image_folder_reads_real_images(assets: Path) -> None:
    ds = ImageFolder(assets / "images", 32)
    assert ds.classes == ["astronaut", "coffee"] and len(ds) == 6
    item = ds[(0, False)]
    assert item["pixels"].shape == (3, 32, 32) and item["bad"] == []
    assert -1.0 <= item["pixels"].min() < item["pixels"].max() <= 1.0
    assert torch.equal(ds[(0, True)]["pixels"], item["pixels"].flip(-1))
    assert item["pixels"].std() > 0.05  # a real photo, not a constant


def test_corrupt_images_are_skipped_and_counted(assets: Path, tmp_path: Path) -> None:
    root = _corrupt_copy(assets / "images", tmp_path / "corrupt")
    ds = ImageFolder(root, 32)
    assert len(ds) == 8
    items = [ds[(i, False)] for i in range(len(ds))]
    bad = sorted({b for it in items for b in it["bad"]})
    names = sorted(Path(ds.items[i][0]).name for i in bad)
    assert names == ["000.jpg", "empty.jpg", "zz_not_an_image.png"]
    for it in items:
        assert it["pixels"].shape == (3, 32, 32) and it["index"] not in bad
    batch = collate_items(items)
    assert batch["pixels"].shape == (8, 3, 32, 32) and len(batch["bad"]) >= 3


def test_all_corrupt_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="consecutive unreadable"):
        ImageFolder(tmp_path, 8)[0]


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        scan_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path)


@given(
    n=st.integers(1, 40),
    world=st.sampled_from([1, 2, 4]),
    acc=st.sampled_from([1, 2, 3]),
    per=st.integers(1, 3),
    step=st.integers(0, 50),
    seed=st.integers(0, 3),
)
def test_plan_is_layout_independent(n: int, world: int, acc: int, per: int, step: int, seed: int) -> None:
    g = world * acc * per
    single = BatchPlan(n, g, world_size=1, accumulation=world * acc, seed=seed, random_flip=True)
    ranks = [BatchPlan(n, g, world_size=world, accumulation=acc, seed=seed, random_flip=True, rank=r) for r in range(world)]
    merged = [mb for p in ranks for mb in p.micro_batches(step)]
    assert merged == single.micro_batches(step)
    assert [i for mb in merged for i in mb] == single.global_batch(step)
    # Resuming at `step` replays exactly what an uninterrupted sampler yields from there.
    full = list(PlanBatchSampler(ranks[0], 0, step + 2))
    assert full[step * acc :] == list(PlanBatchSampler(ranks[0], step, step + 2))


@given(n=st.integers(1, 30), g=st.integers(1, 12), seed=st.integers(0, 5))
def test_plan_covers_each_epoch_once(n: int, g: int, seed: int) -> None:
    plan = BatchPlan(n, g, seed=seed)
    stream = [i for s in range(-(-2 * n // g)) for i, _ in plan.global_batch(s)]
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n : 2 * n]) == list(range(n))


def test_plan_rejects_bad_layout() -> None:
    with pytest.raises(ValueError, match="divisible by world_size"):
        BatchPlan(10, 6, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        BatchPlan(10, 4, world_size=2, rank=2)


def test_vae_normalisation_from_config(assets: Path) -> None:
    vae = load_vae(str(assets), "vae")
    codec = LatentCodec(vae)
    assert (codec.scaling, codec.shifting) == (0.5, 0.1)
    x = ImageFolder(assets / "images", 32)[0]["pixels"][None]
    raw = vae.encode(x).latent_dist.mode()
    z = codec.encode(x)
    assert z.shape == (1, 4, 8, 8)
    torch.testing.assert_close(z, (raw - 0.1) * 0.5)
    torch.testing.assert_close(codec.decode(z), vae.decode(raw).sample.clamp(-1, 1))
    assert LatentCodec(vae, scale=2.0, shift=0.0).scaling == 2.0
    with pytest.raises(FileNotFoundError, match="no VAE"):
        load_vae(str(assets / "nothing"), "vae")


def test_latent_cache_round_trip_and_mismatch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(10, 4, 8, 8, generator=g)
    flipped = lat.flip(-1)
    labels = torch.arange(10) % 3
    meta = {"vae_path": "v", "resolution": 32, "flipped": True}
    batches = [(lat[i : i + 4], labels[i : i + 4], flipped[i : i + 4]) for i in range(0, 10, 4)]
    path = write_latent_cache(tmp_path / "cache", batches, meta, shard_size=3)
    index = json.loads((path / "index.json").read_text())
    assert index["num_items"] == 10 and len(index["shards"]) == 3 and index["latent_shape"] == [4, 8, 8]
    cache = LatentCache(path, expected={"vae_path": "v", "resolution": 32, "latent_shape": [4, 8, 8]})
    for i in range(10):
        assert torch.equal(cache[(i, False)]["latents"], lat[i]) and cache[i]["label"] == labels[i]
        assert torch.equal(cache[(i, True)]["latents"], flipped[i])
    with pytest.raises(CacheMismatchError, match="resolution: cache has 32, config wants 64"):
        LatentCache(path, expected={"resolution": 64, "vae_path": "v"})
    (path / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json missing"):
        LatentCache(path)


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    """A 16-bit grey PNG decodes like its 8-bit version (convert("RGB") alone clips it to white)."""
    from PIL import Image

    from dfm_ext.recipes.engine.data import load_image

    ramp8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(ramp8).save(tmp_path / "a8.png")
    Image.fromarray(ramp8.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    a8, a16 = load_image(str(tmp_path / "a8.png"), 64), load_image(str(tmp_path / "a16.png"), 64)
    assert torch.allclose(a8, a16, atol=2 / 255), (a16.mean(), a8.mean())


def _plan_before_the_epoch_cache(plan: BatchPlan, step: int) -> list[tuple[int, bool]]:
    """BatchPlan.global_batch as it was before the per-epoch cache (runs started then resume on it)."""
    start, n, out = step * plan.global_batch_size, plan.num_items, []
    for pos in range(start, start + plan.global_batch_size):
        epoch, offset = divmod(pos, n)
        rng = np.random.default_rng([plan.seed, epoch])
        order, flips = rng.permutation(n), rng.integers(0, 2, n).astype(bool) if plan.random_flip else np.zeros(n, bool)
        out.append((int(order[offset]), bool(flips[int(order[offset])])))
    return out


@given(n=st.integers(1, 25), g=st.integers(1, 40), seed=st.integers(0, 3), flip=st.booleans(),
       steps=st.lists(st.integers(0, 30), min_size=1, max_size=6))  # fmt: skip
def test_plan_order_is_the_same_as_before_the_epoch_cache(n: int, g: int, seed: int, flip: bool, steps: list[int]) -> None:
    plan = BatchPlan(n, g, seed=seed, random_flip=flip)
    for step in steps:  # any order of steps, batches spanning several epochs (g > n)
        assert plan.global_batch(step) == _plan_before_the_epoch_cache(plan, step)


def test_one_folder_scan_is_shared(assets: Path, monkeypatch) -> None:
    main = ImageFolder(assets / "images", 32)
    monkeypatch.setenv("RANK", "1")
    scans = []
    monkeypatch.setattr("dfm_ext.recipes.engine.data.scan_class_folders", lambda *a, **k: scans.append(a) or ([], []))
    other = ImageFolder(assets / "images", 32)  # a non-zero rank lists the class folders only
    assert other.classes == main.classes and other._items is None
    sent: list = []
    main.share_scan(True, lambda payload: sent.append(payload) or payload)
    other.share_scan(False, lambda payload: sent[0])
    assert other.items == main.items and len(other) == 6 and scans == []
    assert all("/" not in name for group in sent[0][0] for name in group)  # names relative to their class folder
