"""The documentation keeps its promises: every Python block of README.md and docs/ runs, the site builds.

One mechanism for README.md and every page under docs/: a page's ```python blocks run in order,
in one namespace (later blocks use names from earlier ones, as a reader would), from a temporary
directory. A block is left out only with an explicit marker on the line before its fence,

    <!-- skip: the reason, e.g. trains for minutes -->

and the reason is reported. The terminal summary (tests/conftest.py) prints how many blocks ran.
``mkdocs build --strict`` runs here too: a broken link, a missing reference or a docstring that
does not render fails it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    code: str
    skip: str | None  # the reason, for a block marked <!-- skip: ... -->


def pages() -> list[Path]:
    """README.md and every Markdown page of the site (not the hooks' and scripts' folders)."""
    found = sorted(p for p in DOCS.rglob("*.md") if not {"hooks", "scripts"} & set(p.relative_to(DOCS).parts))
    return [ROOT / "README.md", *found]


def python_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for m in _FENCE.finditer(text):
        if m.group("lang") != "python":
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        indent = m.group("indent")
        code = "".join(line[len(indent) :] if line.startswith(indent) else line for line in m.group("body").splitlines(True))
        page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        blocks.append(Block(page, text.count("\n", 0, m.start()) + 2, code,
                            skip.group("reason") if skip else None))  # fmt: skip
    return blocks


def block_summary(passed_pages: set[str] | None = None) -> str:
    """For the terminal summary: how many blocks ran (in the pages whose test passed), which were skipped and why."""
    blocks = [b for p in pages() for b in python_blocks(p) if passed_pages is None or b.page in passed_pages]
    run = [b for b in blocks if b.skip is None]
    skipped = [b for b in blocks if b.skip is not None]
    lines = [f"docs: ran {len(run)} python code blocks of {len({b.page for b in blocks})} pages "
             f"(README.md and docs/); {len(skipped)} skipped:"]  # fmt: skip
    lines += [f"  {b.page}:{b.line}: {b.skip}" for b in skipped]
    return "\n".join(lines)


# ---- checks a page's results must pass, beyond running without error ----------------------------


def _training_loop(ns: dict, out: str) -> None:
    result = ns["result"]
    assert result.x.shape == (4, 3, 16, 16)
    assert [tuple(p.shape) for p in result.previews] == [(4, 3, 8, 8), (4, 3, 16, 16)]
    assert torch.isfinite(result.x).all()


def _time(ns: dict, out: str) -> None:
    assert "tensor([999, 749,   0])" in out


def _training(ns: dict, out: str) -> None:
    assert ns["objective"].scales.shape == (2,)


CHECKS: dict[str, Callable[[dict, str], None]] = {
    "docs/guides/training-loop.md": _training_loop,
    "docs/concepts/time.md": _time,
    "docs/concepts/training.md": _training,
}

PAGES = [p for p in pages() if python_blocks(p)]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from dfm_ext.wrapping.adapter import registered_adapters, unregister_adapter

    blocks = python_blocks(path)
    monkeypatch.chdir(tmp_path)
    before = {a.name for a in registered_adapters()}
    namespace: dict = {"__name__": "docs"}
    ran = 0
    try:
        for block in blocks:
            if block.skip is None:
                exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)  # noqa: S102
                ran += 1
    finally:
        for adapter in registered_adapters():  # pages may register adapters; keep the registry clean
            if adapter.name not in before:
                unregister_adapter(adapter.name)
    assert ran == sum(b.skip is None for b in blocks)
    check = CHECKS.get(str(path.relative_to(ROOT)))
    if check is not None:
        check(namespace, capsys.readouterr().out)


def test_every_checked_page_exists_and_runs_code() -> None:
    runnable = {str(p.relative_to(ROOT)) for p in PAGES if any(b.skip is None for b in python_blocks(p))}
    assert set(CHECKS) <= runnable, sorted(set(CHECKS) - runnable)


def test_skips_give_a_reason_and_most_blocks_run() -> None:
    blocks = [b for p in pages() for b in python_blocks(p)]
    assert all(b.skip is None or len(b.skip) > 10 for b in blocks), [b for b in blocks if b.skip is not None]
    run = sum(b.skip is None for b in blocks)
    # 22 blocks ran when this test was written; the count may grow, never fall silently
    assert run >= 20 and run > 2 * (len(blocks) - run), block_summary()


def test_skip_marker_and_indented_blocks_are_parsed(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n<!-- skip: trains for minutes -->\n```python\nb = 2\n```\n"
                    "- item\n\n  ```python\n  c = a + 1\n  ```\n\n```bash\nmake test\n```\n")  # fmt: skip
    blocks = python_blocks(page)
    assert [(b.code, b.skip) for b in blocks] == [("a = 1\n", None), ("b = 2\n", "trains for minutes"), ("c = a + 1\n", None)]
    assert [b.line for b in blocks] == [4, 9, 14]


def test_figures_script_draws_from_the_library(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("_docs_figures", DOCS / "scripts" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    written = figures.draw(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in (DOCS / "assets").glob("*.png"))
    assert all(p.stat().st_size > 10_000 for p in written)
    table = figures.schedule_tables()["2 stages: steps (30, 10), thresholds (0.9,)"]
    assert table.shape == (41, 2) and torch.equal(table[-1], torch.ones(2))


# ---- the site --------------------------------------------------------------------------------------


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]'): the strict site build cannot run")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    site = tmp_path / "site"
    # generated pages really hold generated content, and the API pages rendered docstrings
    quality = (site / "results" / "quality.html").read_text()
    assert "{{" not in quality and "quality.png" in quality
    assert (site / "results" / "img" / "quality.png").is_file()
    api = (site / "api" / "index.html").read_text()
    assert "wrap_dit" in (site / "api" / "wrapping.html").read_text() and "dfm_ext" in api
    assert ":func:" not in (site / "api" / "wrapping.html").read_text()  # reST roles were rewritten
    print(f"mkdocs build --strict: {seconds:.1f} s")


def test_results_hook_renders_expressions_and_names_the_page_of_a_bad_one() -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    from mkdocs.exceptions import PluginError

    spec = importlib.util.spec_from_file_location("_docs_results_hook2", DOCS / "hooks" / "results.py")
    hook = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = hook
    spec.loader.exec_module(hook)
    steps = hook.q_steps()
    assert hook.render("at {{ q_steps()[0] }}: {{ pct(0.82) }}", "p.md") == f"at {steps[0]}: -18 %"
    assert hook.render("{{ num(ab('baseline')) }}", "p.md") == f"{hook.record('ablations')['variants']['baseline']['swd']['mean']:.2f}"
    with pytest.raises(PluginError, match=r"results/x\.md: \{\{ ab\('no such variant'\) \}\} failed: KeyError"):
        hook.render("{{ ab('no such variant') }}", "results/x.md")
