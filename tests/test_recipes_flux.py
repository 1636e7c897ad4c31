"""The FLUX finetuning recipe on CPU: tiny random FLUX/VAE/CLIP/T5 saved and loaded like the real folder.

Training runs go through the real command lines (``python -m`` and ``accelerate launch -m``);
model building, equality at step 0, data errors, caches and the export are checked in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dfm_ext.recipes.engine.config import load_config
from dfm_ext.recipes.flux.data import (
    AspectBuckets,
    BucketBatchPlan,
    CaptionedImages,
    collate_captioned,
    scan_captions,
)
from dfm_ext.recipes.flux.task import (
    FluxFinetuneConfig,
    FluxFlowModel,
    FluxTask,
    _pack,
    _unpack,
    build_flux_model,
    load_finetuned,
    load_transformer,
)
from dfm_ext.recipes.flux.task import main as flux_main
from dfm_ext.recipes.flux.assets import make_captioned_images, make_tiny_flux
from dfm_ext.wrapping.wrapper import DFMTransformer

from _launch import launch_two_cpu_processes

PY = sys.executable
STEPS = 24


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flux_assets")
    make_tiny_flux(root / "flux")
    make_captioned_images(root / "images", per_photo=3)
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _overrides(assets: Path, out: Path | None = None, *extra: str) -> list[str]:
    base = [f"model.path={assets / 'flux'}", f"data.source={assets / 'images'}"]
    if out is not None:
        base += [f"train.output_dir={out}", f"train.steps={STEPS}", "train.log_every=1", f"train.checkpoint_every={STEPS}",
                 f"train.sample_every={STEPS}", "optim.lr=2e-3"]
    return [*base, *extra]


def _cfg(assets: Path, *extra: str) -> FluxFinetuneConfig:
    cfg = load_config(FluxFinetuneConfig, "flux_tiny", _overrides(assets, None, *extra))
    cfg.validate()
    return cfg


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}



def _text(assets: Path, n: int, cfg: FluxFinetuneConfig) -> dict[str, torch.Tensor]:
    from dfm_ext.recipes.flux.text_encoding import FluxTextEncoder

    prompts = ["a ginger cat looking at the camera", "a cup of coffee", "", "a rocket"][:n]
    return FluxTextEncoder(cfg.model.path, max_sequence_length=cfg.data.max_sequence_length).encode(prompts).as_kwargs()


def _base_flux(ref, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unwrapped diffusers FLUX on latents ``x``, as FluxPipeline calls it, in the paper's convention."""
    from dfm_ext.adapters.flux import flux_image_ids

    h, w = x.shape[-2:]
    out = ref(hidden_states=_pack(x), timestep=1 - t, guidance=torch.ones(x.shape[0]), img_ids=flux_image_ids((h // 2, w // 2)),
              txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3), return_dict=False, **cond)[0]
    return -_unpack(out, h, w)


# ----------------------------------------------------------------------------- step-0 equality


@pytest.mark.parametrize("latent", [(8, 8), (8, 12), (16, 8)])
def test_step0_first_stage_reproduces_flux(assets: Path, latent: tuple[int, int]) -> None:
    """Through the recipe's loading path, at init the wrapped model's stage-0 prediction is FLUX's on the
    stage upsampled by 2 (output area-downsampled, paper E), for every bucket shape; max error 1e-5."""
    cfg = _cfg(assets)
    model = FluxTask(cfg).build_model().eval()
    ref = load_transformer(cfg).eval()  # a second, independent from_pretrained
    assert isinstance(model, DFMTransformer) and model.num_stages == 2 and model.any_sample_shape
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, *latent, generator=g)
    stages = model.decomposition.decompose(z)
    t = torch.rand(3, 2, generator=g)
    cond = _text(assets, 3, cfg)
    with torch.no_grad():
        v0 = model(stages, t, torch.zeros(3, dtype=torch.long), **cond)
        v_all = model(stages, t, torch.ones(3, dtype=torch.long), **cond)
        up = stages[0].repeat_interleave(2, -1).repeat_interleave(2, -2)
        expected = F.avg_pool2d(_base_flux(ref, up, t[:, 0], cond), 2)
    assert (v0[0] - expected).abs().max() <= 1e-5
    assert (v_all[0] - expected).abs().max() <= 1e-5  # stage 1's zero-initialised layers change nothing
    assert torch.equal(v0[1], torch.zeros_like(v0[1])) and torch.equal(v_all[1], torch.zeros_like(v_all[1]))
    assert expected.abs().mean() > 1e-3  # not trivially zero


def test_baseline_model_is_plain_flux(assets: Path) -> None:
    cfg = _cfg(assets, "decomposition.kind=identity", "decomposition.factors=[1]", "sampling.steps=[4]", "sampling.thresholds=[]")
    model = FluxTask(cfg).build_model().eval()
    ref = load_transformer(cfg).eval()
    assert isinstance(model, FluxFlowModel)
    g = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(2, 4, 8, 12, generator=g), torch.rand(2, 1, generator=g), _text(assets, 2, cfg)
    with torch.no_grad():
        assert torch.equal(model([x], t, torch.zeros(2, dtype=torch.long), **cond)[0], _base_flux(ref, x, t[:, 0], cond))


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def reference(assets: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux_runs") / "reference"
    cmd = [PY, "-m", "dfm_ext.recipes.flux", "--config", "flux_tiny", *_overrides(assets, out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_tiny_config_end_to_end(reference: Path) -> None:
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in (1, 2, 3, 4)) / 4
    last = sum(losses[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < 0.8 * first, losses
    with Image.open(reference / "samples" / f"step-{STEPS:06d}.png") as im:  # 2 prompts x (stage-0 preview, final)
        assert im.height > 0 and im.width > im.height
    assert (reference / "final" / "dfm_config.json").is_file()
    model = load_finetuned(reference / "final")
    assert isinstance(model, DFMTransformer) and model.num_stages == 2 and model.any_sample_shape


def test_two_processes_agree_and_match_one_with_accumulation(assets: Path, tmp_path: Path) -> None:
    ddp, single = tmp_path / "ddp", tmp_path / "accum"
    extra = ["train.steps=4", "train.sample_every=0", "train.checkpoint_every=4"]
    args = ["--config", "flux_tiny", *_overrides(assets, ddp, *extra)]
    res = launch_two_cpu_processes("dfm_ext.recipes.flux", args, _env())
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = [PY, "-m", "dfm_ext.recipes.flux", "--config", "flux_tiny", *_overrides(assets, single, *extra, "train.grad_accumulation=2")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s_ddp = json.loads((ddp / "summary.json").read_text())
    digests = s_ddp["param_sha256_per_rank"]
    assert s_ddp["num_processes"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    l_ddp, l_one = _losses(ddp), _losses(single)
    assert sorted(l_ddp) == [1, 2, 3, 4]
    for step in l_one:
        assert l_ddp[step] == pytest.approx(l_one[step], rel=1e-4, abs=1e-6)


def test_two_processes_with_per_stage_lora(assets: Path, tmp_path: Path) -> None:
    """Per-stage LoRA under DDP without ``find_unused_parameters``: a rank whose micro-batch lacks a
    stage still runs that stage's LoRA (zero gradients), so the ranks' collectives stay in step."""
    out = tmp_path / "stage_lora"
    extra = ["train.steps=8", "train.sample_every=0", "train.checkpoint_every=8", "finetune.mode=stage_lora",
             "finetune.lora_rank=2"]  # fmt: skip
    res = launch_two_cpu_processes("dfm_ext.recipes.flux", ["--config", "flux_tiny", *_overrides(assets, out, *extra)], _env())
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["param_sha256_per_rank"]
    assert summary["step"] == 8 and len(digests) == 2 and digests[0] == digests[1]
    stage_lora = load_file(str(out / "final" / "stage_parameters.safetensors"))
    for stage in (0, 1):  # LoRA B starts at zero: both stages' adapters have trained
        b = [v for k, v in stage_lora.items() if k.endswith(f"stage_params.{stage}.lora_B")]
        assert b and any(bool(v.abs().max() > 0) for v in b), stage


# ----------------------------------------------------------------------------- finetuning modes and export


@pytest.mark.parametrize(
    "extra",
    [
        ("finetune.mode=full",),
        ("finetune.mode=stage_lora", "finetune.lora_rank=2"),
        ("finetune.mode=lora", "finetune.lora_rank=2"),
        ("finetune.mode=lora", "finetune.lora_rank=2", "decomposition.kind=identity", "decomposition.factors=[1]",
         "sampling.steps=[4]", "sampling.thresholds=[]"),
    ],
    ids=["dfm-full", "dfm-stage-lora", "dfm-peft-lora", "ft-peft-lora"],
)
def test_modes_train_the_right_parameters_and_export_round_trips(assets: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    cfg = _cfg(assets, *extra)
    task = FluxTask(cfg)
    torch.manual_seed(0)
    model = build_flux_model(cfg, load_transformer(cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if cfg.finetune.mode == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable and len(trainable) < len(list(model.parameters()))
        lora = {n for n in trainable if "lora" in n}
        assert lora and all(("lora" in n) or ("x_embedder" in n or "proj_out" in n or "timestep_embedder" in n) for n in trainable)
    # One optimiser step stands in for training (LoRA B starts at zero).
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ds = CaptionedImages(assets / "images", cfg.buckets(), min_area_fraction=0.0)
    batch = collate_captioned([ds[(0, False)], ds[(0, False)]])
    for _ in range(2):
        out = task.loss(model, batch, generator=torch.Generator().manual_seed(3), device=torch.device("cpu"))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "export")
    loaded = load_finetuned(tmp_path / "export")
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 12, generator=g)
    stages = model.decomposition.decompose(z) if isinstance(model, DFMTransformer) else [z]
    t, k = torch.rand(2, len(stages), generator=g), torch.tensor([0, len(stages) - 1])
    cond = _text(assets, 2, cfg)
    with torch.no_grad():
        a, b = model(stages, t, k, **cond), loaded(stages, t, k, **cond)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    if cfg.num_stages == 1:  # the baseline exports a plain diffusers transformer
        from diffusers import FluxTransformer2DModel

        plain = FluxTransformer2DModel.from_pretrained(str(tmp_path / "export"))
        assert not any("lora" in n for n, _ in plain.named_parameters())


# ----------------------------------------------------------------------------- data


def test_missing_captions_are_an_error_or_skipped_and_counted(assets: Path, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_captioned_images(root, per_photo=2)
    (root / "coffee_1.txt").unlink()
    with pytest.raises(ValueError, match=r"1 image without a same-name \.txt caption.*coffee_1"):
        scan_captions(root)
    scan = scan_captions(root, on_missing="skip")
    assert len(scan.items) == 7 and len(scan.missing) == 1
    # Every image keeps its own caption: the caption file's stem names the image.
    for item in scan.items:
        assert Path(item.path).with_suffix(".txt").read_text().strip() == item.caption
    # The command line refuses before building anything (exit 2, the reason on stderr).
    assert flux_main(["--config", "flux_tiny", f"model.path={assets / 'flux'}", f"data.source={root}"]) == 2


def test_unreadable_images_are_skipped_and_counted_never_mispaired(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_captioned_images(root, per_photo=3)
    (root / "rocket_0.jpg").write_text("not a jpeg")  # unreadable header: left out at scan time
    victim = root / "chelsea_2.jpg"  # readable header, truncated data: fails while training
    victim.write_bytes(victim.read_bytes()[:800])
    buckets = AspectBuckets((32,), (1.0, 1.5, 1 / 1.5), 16)
    ds = CaptionedImages(root, buckets, min_area_fraction=0.0)
    assert ds.stats["unreadable"] == 1 and ds.stats["images"] == 11
    bad = next(j for j, (i, _) in enumerate(ds.entries) if ds.items[i].path == str(victim))
    item = ds[(bad, False)]
    assert item["bad"] == [bad] and item["index"] != bad
    assert ds.bucket_of[item["index"]] == ds.bucket_of[bad]  # same bucket: the batch keeps one shape
    read = ds.items[ds.entries[item["index"]][0]]
    assert item["caption"] == read.caption == Path(read.path).with_suffix(".txt").read_text().strip()


def test_jsonl_source(tmp_path: Path) -> None:
    make_captioned_images(tmp_path / "imgs", per_photo=1)
    lines = [json.dumps({"image": f"imgs/{p.name}", "caption": f"caption of {p.stem}"}) for p in sorted((tmp_path / "imgs").glob("*.[jp]*g"))]
    (tmp_path / "data.jsonl").write_text("\n".join([*lines, json.dumps({"path": "imgs/nope.png", "text": "gone"})]) + "\n")
    with pytest.raises(ValueError, match="missing image file"):
        scan_captions(tmp_path / "data.jsonl")
    scan = scan_captions(tmp_path / "data.jsonl", on_missing="skip")
    assert [Path(i.path).stem for i in scan.items] == [i.caption.removeprefix("caption of ") for i in scan.items]
    assert scan.missing == [str(tmp_path / "imgs" / "nope.png")]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        scan_captions(tmp_path / "bad.jsonl")


@given(
    bucket_sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    world=st.sampled_from([1, 2]),
    accumulation=st.sampled_from([1, 2]),
    step=st.integers(0, 40),
    seed=st.integers(0, 3),
)
def test_bucket_plan_batches_share_a_bucket_and_split_like_batch_plan(bucket_sizes, world, accumulation, step, seed) -> None:
    buckets = tuple(b for b, n in enumerate(bucket_sizes) for _ in range(n))
    g = 4
    one = BucketBatchPlan(len(buckets), g, accumulation=world * accumulation, seed=seed, buckets=buckets)
    batch = one.global_batch(step)
    assert len(batch) == g and len({buckets[i] for i, _ in batch}) == 1
    assert one.global_batch(step) == BucketBatchPlan(len(buckets), g, seed=seed, buckets=buckets).global_batch(step)
    ranks = [BucketBatchPlan(len(buckets), g, world_size=world, accumulation=accumulation, seed=seed, rank=r, buckets=buckets)
             for r in range(world)]
    assert sum((p.micro_batches(step) for p in ranks), []) == one.micro_batches(step)
    # One epoch visits every item of every bucket.
    seen = {i for s in range(one.steps_per_epoch) for i, _ in one.global_batch(one.steps_per_epoch * 2 + s)}
    assert seen == set(range(len(buckets)))


# ----------------------------------------------------------------------------- cache


def test_cache_pairs_latents_with_captions_and_refuses_a_mismatch(assets: Path, tmp_path: Path, capsys) -> None:
    from dfm_ext.recipes.flux.data import load_bucket_image
    from dfm_ext.recipes.flux.cache import FluxCache, cache_metadata
    from dfm_ext.recipes.engine.latents import CacheMismatchError

    cache = tmp_path / "cache"
    base = ["--config", "flux_tiny", *_overrides(assets)]
    assert flux_main(["cache", *base, "--out", str(cache), "--dtype", "float32", "--device", "cpu"]) == 0
    cfg = _cfg(assets)
    ds = FluxCache(cache, expected=cache_metadata(cfg))
    task = FluxTask(cfg)
    for j in (0, len(ds) - 1):
        e, item = ds.entries[j], ds[j]
        shape = ds.meta["buckets"][e["bucket"]]
        z = task.codec(torch.device("cpu")).encode(load_bucket_image(e["source"], tuple(shape))[None])
        txt = task.text_encoder(torch.device("cpu")).encode([Path(e["source"]).with_suffix(".txt").read_text().strip()])
        torch.testing.assert_close(item["latents"], z[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item["encoder_hidden_states"], txt.encoder_hidden_states[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item["pooled_projections"], txt.pooled_projections[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(CacheMismatchError, match="max_sequence_length: cache has 8, config wants 16"):
        FluxCache(cache, expected=cache_metadata(_cfg(assets, "data.max_sequence_length=16")))
    capsys.readouterr()
    args = ["--config", "flux_tiny", f"model.path={assets / 'flux'}", f"data.cache={cache}"]
    assert flux_main([*args, "data.resolutions=[32]"]) == 2
    assert "resolutions: cache has [32, 48]" in capsys.readouterr().err
    (cache / "index.json").unlink()
    assert flux_main(args) == 2 and "index.json missing" in capsys.readouterr().err
