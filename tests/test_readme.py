"""README.md keeps its promises: the two commands at the top, and runnable examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dfm_ext.wrapping.adapter import registered_adapters, unregister_adapter

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Sections whose ```python blocks run as written (in one namespace per section, from a temp dir).
# Not run: the introduction (it names the reader's own model and data) and the metrics section
# (EfficientNet at 224 px on 2000 images takes minutes; tests/test_metrics.py covers the same calls).
RUNNABLE = [
    "Decompositions",
    "The DFM process in your own training loop",
    "Wrapping a DiT: `wrap_dit`",
    "Wrapping diffusers DiTs: DiT, PixArt, SD3, Flux, CogVideoX",
    "Per-stage parameter specialisation",
    "Where DFM wins: budgets, levers and automatic allocation",
]


def _sections() -> dict[str, str]:
    parts = re.split(r"^## ", README, flags=re.MULTILINE)[1:]
    return {p.split("\n", 1)[0].strip(): p for p in parts}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == "make test", "CI must run exactly README's test command, last"


@pytest.mark.parametrize("title", RUNNABLE)
def test_section_examples_run(title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    sections = _sections()
    assert title in sections, f"README has no section {title!r}; sections: {list(sections)}"
    blocks = _python_blocks(sections[title])
    assert blocks, f"section {title!r} has no python example"
    monkeypatch.chdir(tmp_path)
    before = {a.name for a in registered_adapters()}
    namespace: dict = {"__name__": "readme"}
    try:
        for block in blocks:  # later blocks use names from earlier ones, as a reader would
            exec(compile(block, f"README.md: {title}", "exec"), namespace)
    finally:
        for adapter in registered_adapters():  # examples may register adapters; keep the registry clean
            if adapter.name not in before:
                unregister_adapter(adapter.name)
    if title == "The DFM process in your own training loop":
        result = namespace["result"]
        assert result.x.shape == (4, 3, 16, 16)
        assert [tuple(p.shape) for p in result.previews] == [(4, 3, 8, 8), (4, 3, 16, 16)]
        assert torch.isfinite(result.x).all()
        assert namespace["objective"].scales.shape == (2,)
        assert "tensor([999, 749,   0])" in capsys.readouterr().out
