"""The package ships as a wheel: every subpackage, the recipes' configs, the ``dfm-ext`` command; no build warnings."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # Build from a copy so the source tree gets no build/ or egg-info litter.
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            dst = build / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out), str(build)],
        check=True,
        capture_output=True,
        text=True,
    )
    BUILD_LOG.append(res.stdout + res.stderr)
    (whl,) = out.glob("dfm_ext-*.whl")
    return whl


BUILD_LOG: list[str] = []


def test_build_prints_no_setuptools_warnings(wheel: Path) -> None:
    # Each was seen once: the licence's table form, package data outside any package, a namespace folder.
    warnings = [line for line in BUILD_LOG[0].splitlines() if "Warning" in line or line.strip() == "!!"]
    assert not warnings, "\n".join(warnings)


def test_wheel_contains_subpackages_and_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dfm_ext/__init__.py" in names
    assert "dfm_ext/adapters/__init__.py" in names
    assert "dfm_ext/recipes/__init__.py" in names
    assert "dfm_ext/metrics/__init__.py" in names
    configs = [*ROOT.glob("src/dfm_ext/recipes/*/configs/*.yaml"), *ROOT.glob("src/dfm_ext/recipes/accelerate_configs/*.yaml")]
    assert len(configs) > 10
    for cfg in configs:
        assert cfg.relative_to(ROOT / "src").as_posix() in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dfm-ext = dfm_ext.recipes.demo.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_outside_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import dfm_ext, dfm_ext.adapters, dfm_ext.recipes, dfm_ext.metrics; "
        "assert dfm_ext.__file__.startswith(%r), dfm_ext.__file__; "
        "print(dfm_ext.IdentityDecomposition().num_stages)" % str(target)
    )
    # Only the wheel's copy may be importable: run from an empty dir with the target first on the path.
    res = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"
