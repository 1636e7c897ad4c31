"""``benchmarks/gpu_check.py``: every part of the CPU run (``--cpu --quick``), its pieces on their own, the no-CUDA exit.

What a CPU can check of a script written for GPUs: that every part runs end to end at tiny sizes and
records what it measured, and that the numbers it derives are right (ratios are the quotients of the
measured times, the FLOP count equals a hand count and torch's own counter, the batch search finds
the largest batch under a limit, the scaling runs' global batches divide on 1..8 processes and the
engine accepts them). What it cannot check: the GPU numbers, the sync counter (CUDA only) and the
behaviour of a real out-of-memory error.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402
from _gpu_check_flops import count_forward_flops, dit_forward_flops, mfu_record, peak_bf16_flops, train_step_flops  # noqa: E402
from _gpu_check_search import FakeMemoryLimit, is_oom, largest_fitting, oom_safe  # noqa: E402

ARMS = tuple(f"{k}_{m}" for m in ("eager", "compiled") for k in ("base", "wrapped", "lora", "ckpt"))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    started = time.perf_counter()
    res = _run("--cpu", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d = json.loads(out.read_text())
    d["_test_wall_s"] = time.perf_counter() - started
    return d


def test_quick_run_writes_every_part(quick: dict) -> None:
    assert quick["ran"] is True and quick["quick"] is True and quick["device"] == "cpu"
    assert quick["ok"] is True and quick["failed_parts"] == []
    for key in ("engine", "train_step", "mfu", "memory", "sampler"):
        assert quick[key]["ok"] is True and "partial" not in quick[key], key
    assert "--scaling-procs" in quick["scaling"]["skipped"]  # on the CPU only when asked (tested below)
    assert quick["_test_wall_s"] < 180, quick["_test_wall_s"]  # about 30 s on 2 idle cores: CPU sizes, not GPU ones


# -- engine --------------------------------------------------------------------------------------


def test_engine_part_trains_the_recipe_from_a_latent_cache(quick: dict) -> None:
    e = quick["engine"]
    assert e["returncode"] == 0 and e["finite"] and e["steps"] == 3 and len(e["losses"]) == 3
    assert all(math.isfinite(x) for x in e["losses"])
    assert e["latent_cache"]["num_items"] > 0 and "dfm_ext.recipes.imagenet.cache" in e["latent_cache"]["command"]
    assert e["parallelism"] == "DDP" and e["num_processes"] == 1
    assert e["checkpoint_written"] and e["final_written"] and e["ema_decay"] == 0.99  # the tiny config's EMA
    assert "train.compile=true" in e["overrides"] and any(o.startswith("train.output_dir=") for o in e["overrides"])
    assert e["steps_recorded"] == [1, 2, 3]  # the wrapped Trainer._step ran once per step
    assert e["host_ms_per_step_median"] > 0
    assert e["syncs"]["measured"] is False and "not measurable on CPU" in e["syncs"]["reason"]
    assert e["steps_per_s"] == statistics.median(e["steps_per_s_windows"][1:])  # the engine's windows, the first (compile) left out


def test_sync_counter_counts_torchs_sync_warnings_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter's logic with torch's sync mode stubbed (CUDA only): ``warn`` mode makes c10's
    ``warn_or_error_on_sync`` issue ``TORCH_WARN("called a synchronizing CUDA operation")``, which reaches
    Python as a UserWarning; stand-ins raise that warning where a real sync would."""
    import warnings
    from types import SimpleNamespace

    import _gpu_check_engine as eng
    from dfm_ext.recipes.engine.trainer import Trainer

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    found: list = []
    with pytest.warns(UserWarning, match="unrelated"):  # other warnings go on as usual
        with eng.count_syncs(found):
            warnings.warn("called a synchronizing CUDA operation")
            warnings.warn("unrelated")
            warnings.warn("called a synchronizing CUDA operation")
    assert len(found) == 2 and modes == ["warn", 0]

    def fake_step(self, run) -> None:  # the engine's step, with as many syncs as its step number
        for _ in range(run.counters.step):
            warnings.warn("called a synchronizing CUDA operation")

    monkeypatch.setattr(Trainer, "_step", fake_step)  # restored after the test, with install()'s wrapper
    monkeypatch.setattr(eng, "calibrate", lambda device: {"counts": {}, "reliable": True})
    record = eng.install(count=True)
    for step in range(3):
        Trainer._step(None, SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), counters=SimpleNamespace(step=step)))
    assert [s["step"] for s in record["steps"]] == [1, 2, 3] and [s["syncs"] for s in record["steps"]] == [0, 1, 2]
    assert sum(record["sites"].values()) == 3 and all(k.startswith("test_gpu_check.py:") for k in record["sites"])
    assert record["calibration"] == {"counts": {}, "reliable": True}
    summary = gpu_check._sync_summary({**record, "sites": dict(record["sites"])}, steady_from=2)
    assert summary["syncs"]["steady_max"] == 2 and summary["syncs"]["zero_per_step"] is False


# -- train-step arms and their ratios ------------------------------------------------------------


def test_train_step_arms_and_ratios_are_the_measured_ratios(quick: dict) -> None:
    tp = quick["train_step"]
    arms = tp["arms"]
    assert sorted(arms) == sorted(ARMS)
    for name in ARMS:
        a = arms[name]
        assert a["ms_per_step"] > 0 and a["samples_per_s"] > 0 and a["losses_finite"], (name, a)
        assert a["compiled"] is name.endswith("compiled")
        assert a["ms_per_step"] == pytest.approx(1000 * a["seconds_per_step"], abs=1e-3)
    e = {k: arms[f"{k}_eager"] for k in ("base", "wrapped", "lora", "ckpt")}
    assert e["wrapped"]["params"] > e["base"]["params"]  # per-stage embeddings and head
    assert e["lora"]["params"] == e["wrapped"]["params"] + e["lora"]["lora"]["stage_params"] > e["wrapped"]["params"]
    assert e["ckpt"]["params"] == e["wrapped"]["params"]
    r = tp["ratios"]
    for mode in ("eager", "compiled"):
        for num, den in (("wrapped", "base"), ("lora", "wrapped"), ("ckpt", "wrapped")):
            expected = arms[f"{num}_{mode}"]["seconds_per_step"] / arms[f"{den}_{mode}"]["seconds_per_step"]
            assert r[f"{num}/{den} time ({mode})"] == pytest.approx(expected, rel=1e-12)
            assert r[f"{num}/{den} peak memory ({mode})"] is None  # CUDA-only measurement
    for kind in ("base", "wrapped", "lora", "ckpt"):
        expected = arms[f"{kind}_compiled"]["seconds_per_step"] / arms[f"{kind}_eager"]["seconds_per_step"]
        assert r[f"compiled/eager time ({kind})"] == pytest.approx(expected, rel=1e-12)
        assert arms[f"{kind}_compiled"]["graph_breaks"] == 0 and arms[f"{kind}_compiled"]["graphs_compiled"] >= 1


# -- MFU and the FLOP count ----------------------------------------------------------------------

# The tiny config by hand: D = 64, L = 2 blocks, MLP M = 256, latent 8x8x4 at patch 2 -> N = 16 tokens.
_ATTN = 2 * 16 * (2 * 64 * 192 + 2 * 64 * 64)  # L N (qkv + proj)                      = 1,048,576
_SCORES = 2 * 2 * (2 * 16 * 16 * 64)  # L (QK^T + AV)                                   =   131,072
_MLP = 2 * 16 * (2 * 64 * 256 + 2 * 256 * 64)  # L N (fc1 + fc2)                        = 2,097,152
_ADALN = 2 * 2 * 64 * 384 + 2 * 64 * 128  # L x (D -> 6D) + final (D -> 2D)             =   114,688
_TIME = 2 * 256 * 64 + 2 * 64 * 64  # one timestep embedder (256 -> D -> D)            =    40,960
TINY_BASE = _ATTN + _SCORES + _MLP + _ADALN + (2 * 16 * 16 * 64 + _TIME) + 2 * 16 * 64 * 16  # patch 4*2*2 = 16 in/out
# wrapped by LaplacianPyramid((2, 1)): stages 4x4x4 (patch 1) and 4x8x8 (patch 2) -> 4 + 16 = 20 features, 2 embedders
TINY_WRAPPED = _ATTN + _SCORES + _MLP + _ADALN + (2 * 16 * 20 * 64 + 2 * _TIME) + 2 * 16 * 64 * 20


def test_flop_count_of_the_tiny_config_by_hand() -> None:
    from dfm_ext import DiTConfig

    cfg = DiTConfig.preset("tiny", input_size=8, in_channels=4, num_classes=10)
    assert TINY_BASE == 3_497_984 and TINY_WRAPPED == 3_555_328
    assert dit_forward_flops(cfg, 1)["forward"] == TINY_BASE
    assert dit_forward_flops(cfg, 5, [(4, 4, 4), (4, 8, 8)])["forward"] == 5 * TINY_WRAPPED
    assert train_step_flops(cfg, 4, [(4, 4, 4), (4, 8, 8)]) == 3 * 4 * TINY_WRAPPED
    # DiT-XL/2 at 256x256 (32x32x4 latents): 118.6 GFLOPs in the DiT paper, which counts multiply-adds
    xl = DiTConfig.preset("XL/2", input_size=32, in_channels=4, num_classes=1000)
    assert dit_forward_flops(xl, 1)["forward"] / 2e9 == pytest.approx(118.6, abs=0.05)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("shape", [dict(input_size=8), dict(input_size=16, depth=3, mlp_ratio=2.0, hidden_size=96, num_heads=3)])
def test_flop_count_equals_torch_flop_counter(wrapped: bool, shape: dict) -> None:
    from dfm_ext import DiT, DiTConfig, LaplacianPyramid, wrap_dit

    cfg = DiTConfig.preset("tiny", in_channels=4, num_classes=10, **shape)
    b = 3
    x, t, y = torch.randn(b, 4, *cfg.image_size), torch.rand(b), torch.randint(0, 10, (b,))
    model = DiT(cfg)
    if not wrapped:
        assert count_forward_flops(lambda: model(x, t, y)) == dit_forward_flops(cfg, b)["forward"]
        return
    w = wrap_dit(model, LaplacianPyramid((2, 1)))
    stages = w.decomposition.decompose(x)
    counted = count_forward_flops(lambda: w(stages, torch.rand(b, 2), torch.ones(b, dtype=torch.long), y=y))
    assert counted == dit_forward_flops(cfg, b, w.stage_shapes)["forward"]


def test_mfu_part_of_the_quick_run(quick: dict) -> None:
    m = quick["mfu"]
    assert m["peak_bf16_flops"] is None and m["mfu_null_reason"]
    assert m["flop_checks"] and all(c["equal"] for c in m["flop_checks"].values())
    assert m["flop_checks"]["DiT-tiny base"]["analytic_forward"] == TINY_BASE  # batch 1
    assert m["flop_checks"]["DiT-tiny wrapped"]["flop_counter_forward"] == TINY_WRAPPED
    arms = quick["train_step"]["arms"]
    for name, arm in arms.items():
        rec = m["configurations"][f"DiT-tiny {name} batch 4"]
        per_sample = TINY_BASE if name.startswith("base") else TINY_WRAPPED  # LoRA / recompute are not model FLOPs
        assert rec["model_flops_per_step"] == 3 * 4 * per_sample
        assert rec["achieved_tflops"] == pytest.approx(rec["model_flops_per_step"] / arm["seconds_per_step"] / 1e12, rel=1e-3, abs=1e-6)
        assert rec["mfu"] is None
    assert any("tokens" in k for k in m["configurations"])  # the memory part's timings too


def test_peak_table_and_mfu_record() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3")["flops"] == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe")["flops"] == 756e12
    assert peak_bf16_flops("NVIDIA H200")["flops"] == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB")["flops"] == 312e12
    other = peak_bf16_flops("NVIDIA L40S")
    assert other["flops"] is None and "L40S" in other["reason"]
    assert peak_bf16_flops(None)["flops"] is None
    rec = mfu_record(int(989e12 * 0.5 * 0.25), 0.25, 989e12)  # half the peak for a quarter second
    assert rec["mfu"] == 0.5 and rec["ms_per_step"] == 250.0


# -- the largest batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("start", [1, 2, 5, 8])
def test_search_finds_the_largest_fitting_batch(start: int) -> None:
    for threshold in range(0, 70):
        r = largest_fitting(lambda b: {"fits": b <= threshold}, start=start, limit=64)
        assert r["largest"] == min(threshold, 64), (start, threshold, r)
        assert all(t["fits"] == (t["batch"] <= threshold) for t in r["tries"])
        if threshold < 64:
            assert r["first_failure"] == threshold + 1 and r["bounded"] is None
        else:
            assert r["bounded"] == "the search limit 64 fits"
        assert len(r["tries"]) <= 2 * 7 + 1


def test_search_to_a_relative_resolution_and_its_bounds() -> None:
    for threshold in (40, 100, 333, 1500):
        r = largest_fitting(lambda b: {"fits": b <= threshold}, start=32, limit=4096, relative=1 / 16)
        assert r["largest"] <= threshold < r["first_failure"] and r["first_failure"] - r["largest"] <= max(1, r["largest"] // 16)
    r = largest_fitting(lambda b: {"fits": b <= 1000}, start=1, limit=4096, max_tries=5)
    assert r["bounded"] == "max_tries (5)" and len(r["tries"]) == 5 and r["largest"] == 16
    r = largest_fitting(lambda b: {"fits": True}, start=4, limit=64, deadline=time.perf_counter() - 1)
    assert r["bounded"] == "time budget" and len(r["tries"]) == 1 and r["largest"] == 4


def test_oom_safe_catches_out_of_memory_only() -> None:
    cleaned = []

    def step(b: int) -> dict:
        if b > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if b == 3:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
        return {"b": b}

    attempt = oom_safe(step, cleanup=lambda: cleaned.append(1))
    assert attempt(2) == {"fits": True, "b": 2}
    assert attempt(5)["fits"] is False and "OutOfMemoryError" in attempt(5)["error"]
    assert attempt(3)["fits"] is False and len(cleaned) == 3
    assert is_oom(torch.cuda.OutOfMemoryError("x")) and not is_oom(ValueError("out of memory"))
    with pytest.raises(ValueError, match="not an OOM"):
        oom_safe(lambda b: (_ for _ in ()).throw(ValueError("not an OOM")))(1)
    fake = FakeMemoryLimit(static=100, per_sample=7, limit=200)
    assert fake.largest() == 14 and fake.bytes(14) <= 200 < fake.bytes(15)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fake.check(15)


def test_memory_part_finds_the_largest_batch_under_the_fake_limit(quick: dict) -> None:
    mem = quick["memory"]
    assert sorted(mem["tokens"]) == ["16", "64"]  # the quick stand-ins for 256 and 1024 tokens
    for tokens, entry in mem["tokens"].items():
        assert entry["flop_check"]["equal"]
        for key in ("no_checkpointing", "checkpointing"):
            fake = FakeMemoryLimit(**{k: entry[f"fake_{key}"][k] for k in ("static", "per_sample", "limit")})
            search = entry[key]
            assert fake.largest() == entry[f"fake_{key}"]["largest_under_limit"]
            assert search["largest"] == min(fake.largest(), 128), (tokens, key, search)
            assert search["bounded"] is None and search["first_failure"] == search["largest"] + 1
            for t in search["tries"]:  # each try failed exactly when the fake allocator said so, with a real OOM error
                assert t["fits"] == (fake.bytes(t["batch"]) <= fake.limit)
                assert t["fits"] or t["error"].startswith("OutOfMemoryError")
            assert any(not t["fits"] for t in search["tries"]) and any(t["fits"] for t in search["tries"])
        assert entry["fake_checkpointing"]["limit"] == entry["fake_no_checkpointing"]["limit"]  # one "GPU"
        assert entry["checkpointing"]["largest"] > entry["no_checkpointing"]["largest"]  # it saves activations
        assert entry["no_checkpointing"]["largest"] == 13  # the limit holds 13.5 samples of the plain step
        timed = entry["timed"]
        assert timed["ckpt/plain time"] == pytest.approx(
            timed["checkpointing"]["seconds_per_step"] / timed["no_checkpointing"]["seconds_per_step"], rel=1e-12
        )


# -- sampler -------------------------------------------------------------------------------------


def test_sampler_part(quick: dict) -> None:
    s = quick["sampler"]
    assert s["model_calls_per_batch"] == 40 and s["forward_batch"] == 2 * s["batch"]  # 30 + 10 Euler steps, CFG batched
    assert "steps=(30, 10)" in s["scheduler"]
    for mode in ("eager", "compiled"):
        m = s["modes"][mode]
        assert m["finite"] and m["images_per_s"] == pytest.approx(s["batch"] * m["timed_batches"] / m["seconds"], rel=1e-3)
    assert s["modes"]["compiled"]["graphs_compiled"] == 1 and s["modes"]["compiled"]["graph_breaks"] == 0
    assert s["compiled/eager images_per_s"] == pytest.approx(s["modes"]["compiled"]["images_per_s"] / s["modes"]["eager"]["images_per_s"])


# -- scaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("procs", range(1, 9))
def test_scaling_batches_divide_and_the_engine_accepts_them(procs: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dfm_ext.recipes.engine.config import ConfigError
    from dfm_ext.recipes.imagenet.task import parse_args

    for sizes in (gpu_check.GPU, gpu_check.QUICK):
        g = gpu_check.scaling_global_batch(sizes.scaling_per_process, procs)
        assert g % procs == 0 and g // procs == sizes.scaling_per_process
        args = gpu_check.recipe_args(cache=tmp_path, assets=tmp_path, out=tmp_path / "o", steps=5, batch=g, log_every=1, cpu=True,
                                     compile_=False, backend="eager", sample=False, extra=("train.sharding=fsdp2", "model.preset=B/2"))  # fmt: skip
        monkeypatch.setenv("WORLD_SIZE", str(procs))
        _, cfg = parse_args(args)  # the engine's own start-up check of the batch split
        assert cfg.train.global_batch_size == g
    if procs in (3, 5, 6, 7):  # what the old check's fixed batch of 8 did on such machines
        with pytest.raises(ConfigError, match="divisible"):
            parse_args([*args, "train.global_batch_size=8"])


def test_scaling_on_three_cpu_processes(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    res = _run("--cpu", "--quick", "--out", str(out), "--scaling-procs", "3", "--skip", "engine", "train_step", "memory", "sampler")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d = json.loads(out.read_text())
    sc = d["scaling"]
    assert sc["ok"] and d["ok"] and "skipped" in d["mfu"]
    runs = sc["runs"]["fsdp2"]
    for n in (1, 3):
        r = runs[str(n)]
        assert r["returncode"] == 0 and r["finite"] and r["num_processes"] == n and r["parallelism"] == "FSDP2"
        assert r["global_batch"] == 2 * n and r["steps"] == 4 and r["steps_per_s"] > 0
        assert "torch.distributed.run" in r["command"] and f"--nproc_per_node {n}" in r["command"]
        assert r["images_per_s"] == pytest.approx(r["steps_per_s"] * r["global_batch"])
    assert runs["efficiency"] == pytest.approx(runs["3"]["steps_per_s"] / runs["1"]["steps_per_s"])


# -- no CUDA -------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = _run("--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], res.stdout
    d = json.loads(out.read_text())
    assert d["cuda"] is False and d["ran"] is False
    assert not any(k in d for k in ("engine", "train_step", "memory", "sampler", "scaling", "mfu"))
