"""The code in docs/sections/30-process.md runs as written (so the documentation cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

SECTION = Path(__file__).resolve().parents[1] / "docs" / "sections" / "30-process.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_process_section_runs(capsys) -> None:
    blocks = _python_blocks(SECTION.read_text())
    assert len(blocks) >= 3, "the section should show training, standardisation and time conventions"
    namespace: dict = {"__name__": "readme_process"}
    for block in blocks:  # one namespace: later blocks use names from earlier ones, as a reader would
        exec(compile(block, str(SECTION), "exec"), namespace)
    result = namespace["result"]
    assert result.x.shape == (4, 3, 16, 16)
    assert [tuple(p.shape) for p in result.previews] == [(4, 3, 8, 8), (4, 3, 16, 16)]
    assert torch.isfinite(result.x).all()
    assert namespace["objective"].scales.shape == (2,)
    printed = capsys.readouterr().out
    assert "tensor([999, 749,   0])" in printed
