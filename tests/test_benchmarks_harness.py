"""The benchmarks' stepping harness trains exactly as the demo's engine run (bit for bit).

Benchmarks interleave several arms a chunk of steps at a time (``benchmarks/harness.py``); the
demo trains through the one engine. If they drifted apart, benchmark numbers would no longer be
the demo's. Same seed, same config: same EMA weights, to the bit.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from dfm_ext.recipes.demo.run import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import Trainer  # noqa: E402

from test_demo import TINY, _data  # noqa: E402


def test_harness_equals_the_engine_run_bitwise(tmp_path):
    cfg = replace(TINY, steps=6)
    data = _data()
    engine = train(cfg, data, progress=False)
    harness = Trainer(cfg, data)
    for _ in range(cfg.steps):
        harness.step()
    a, b = engine.ema.state_dict(), harness.ema.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert engine.history["loss"] == harness.history["loss"]
