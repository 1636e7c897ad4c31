"""The library type-checks clean under mypy, with the settings in pyproject.toml ([tool.mypy]).

mypy reads torch's inline annotations, so a cold run (no cache) takes about 80 s on a loaded
2-core machine; the cache lives in the repository's ``.mypy_cache/`` (git-ignored), after which a
run takes a few seconds. The library and the recipes wing (the engine and every task folder: imagenet,
kinetics, flux, demo) are checked whole; adapters are excluded, followed silently where they are imported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy comes with the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "dfm_ext"


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_library_type_checks_clean(tmp_path: Path) -> None:
    run = _mypy()
    assert run.returncode == 0, f"mypy found errors in src/dfm_ext:\n{run.stdout}{run.stderr}"
    # The check must have covered every module of the library, not an empty selection.
    checked = re.search(r"no issues found in (\d+) source files", run.stdout)
    assert checked is not None, run.stdout
    excluded = ("adapters",)
    modules = [p for p in LIBRARY.rglob("*.py") if not p.relative_to(LIBRARY).as_posix().startswith(excluded)]
    assert int(checked.group(1)) == len(modules) > 20

    # The same settings do report a real error (a tensor where an int is declared), so a clean
    # result above is not an artefact of ignored imports: torch's types are in force.
    snippet = tmp_path / "bad.py"
    snippet.write_text("import torch\n\nn: int = torch.zeros(1)\n")
    bad = _mypy(str(snippet))
    assert bad.returncode == 1 and "[assignment]" in bad.stdout, bad.stdout + bad.stderr
