"""examples/write_your_own_adapter.py: a complete adapter for a DiT dfm_ext does not ship, in at most 40 lines."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from dfm_ext import LaplacianPyramid, wrap_dit  # noqa: E402
from dfm_ext.wrapping.adapter import unregister_adapter  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "write_your_own_adapter.py"


def test_the_example_runs_and_its_adapter_is_exact_and_auto_registered(capsys) -> None:
    assert len(EXAMPLE.read_text().splitlines()) <= 40
    try:
        env = runpy.run_path(str(EXAMPLE), run_name="example")
        out = capsys.readouterr().out
        assert out.startswith("adapter mydit: stage 0 matches MyDiT to ") and float(out.split()[-1]) < 1e-5
        # The registration makes adapter="auto" find it for a fresh model; 3 stages at stage 0's native grid.
        model = wrap_dit(env["MyDiT"](), LaplacianPyramid(factors=(4, 2, 1)), sample_shape=(4, 32, 32), patch_sizes=[2, 4, 8])
        assert model.adapter.name == "mydit" and model.packer.grid == (4, 4)
        v = model([torch.randn(1, *s) for s in model.stage_shapes], torch.rand(1, 3), torch.tensor([2]))
        assert [tuple(x.shape[1:]) for x in v] == [tuple(s) for s in model.stage_shapes]
    finally:
        unregister_adapter("mydit")


def test_the_adapters_guide_shows_this_very_file() -> None:
    page = (EXAMPLE.parents[1] / "docs" / "guides" / "adapters.md").read_text()
    assert f"```python\n{EXAMPLE.read_text()}```" in page
