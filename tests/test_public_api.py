"""The public API: explicit, grouped imports; every public name documented; a small top level.

Public names are those in ``__all__`` of ``dfm_ext``, of each library subpackage and of
``dfm_ext.adapters``. Classes, functions and modules need a docstring of their own; a constant
needs a ``#:`` comment above its assignment (or a string right below it), the form Sphinx and
mkdocstrings read.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dfm_ext"
#: The library's subpackages and public top-level modules (validation, fileio, ...).
#: The add-ons (``adapters``: lazily imported families; ``recipes``: commands) follow their own rules below.
ADDONS = ("adapters", "recipes")
SUBPACKAGES = sorted(
    [p.parent.name for p in SRC.glob("*/__init__.py") if p.parent.name not in ADDONS]
    + [p.stem for p in SRC.glob("*.py") if not p.stem.startswith("_")]
)
RECIPES = sorted(f"dfm_ext.recipes.{p.parent.name}" for p in (SRC / "recipes").glob("*/__init__.py"))
PUBLIC = ["dfm_ext", *(f"dfm_ext.{p}" for p in SUBPACKAGES), "dfm_ext.adapters", *RECIPES]


def _source_of(module_name: str) -> Path:
    module = importlib.import_module(module_name)
    assert module.__file__ is not None
    return Path(module.__file__)


def _documented_constants(path: Path) -> set[str]:
    """Module-level names assigned with a ``#:`` comment above or a string literal below."""
    lines = path.read_text().splitlines()
    body = ast.parse(path.read_text()).body
    out = set()
    for i, node in enumerate(body):
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        comment = node.lineno >= 2 and lines[node.lineno - 2].lstrip().startswith("#:")
        nxt = body[i + 1] if i + 1 < len(body) else None
        string_below = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        if comment or string_below:
            out.update(names)
    return out


def _undocumented(package: str) -> list[str]:
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__  # a class's own, not inherited
            if not (isinstance(doc, str) and doc.strip()):
                missing.append(f"{package}.{name} has no docstring")
            continue
        # A constant: find the module of the package that assigns it.
        pkg_dir = _source_of(package).parent if _source_of(package).name == "__init__.py" else None
        paths = sorted(pkg_dir.rglob("*.py")) if pkg_dir else [_source_of(package)]
        if not any(name in _documented_constants(p) for p in paths):
            missing.append(f"{package}.{name} ({type(obj).__name__}) has no '#:' comment where it is assigned")
    return missing


@pytest.mark.parametrize("package", PUBLIC)
def test_every_public_name_is_documented(package: str) -> None:
    module = importlib.import_module(package)
    names = list(module.__all__)
    assert names and len(names) == len(set(names)), f"{package}.__all__ is empty or has duplicates"
    for name in names:
        assert hasattr(module, name), f"{package}.__all__ names {name}, which it does not define"
    assert not _undocumented(package), "\n".join(_undocumented(package))


def test_public_modules_found() -> None:
    assert {"validation", "decompositions", "process", "specialization", "models", "wrapping", "metrics"} <= set(SUBPACKAGES)


def test_documentation_check_finds_gaps(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text('#: documented\nA = 1\nB = 2\nC = 3\n"""documented below"""\n')
    assert _documented_constants(source) == {"A", "C"}


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(SRC.rglob("*.py")) if p.name != "__main__.py" and p != SRC / "adapters" / "__init__.py"],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_every_library_module_declares_all(path: Path) -> None:
    """``__all__`` is a literal list of names the module binds (defined or imported)."""
    tree = ast.parse(path.read_text())
    declared = None
    bound: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            declared = ast.literal_eval(node.value)
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(sub.name)
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                bound.add(sub.id)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in sub.names)
    assert isinstance(declared, list), f"{path} has no literal __all__ list"
    assert not set(declared) - bound, f"{path}: __all__ names {sorted(set(declared) - bound)}, which it does not bind"


def _init_imports(path: Path) -> dict[str, list[str]]:
    """``{module: [names]}`` of a package ``__init__``'s ``from module import names`` lines."""
    out: dict[str, list[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            assert node.level == 0, f"{path}: use absolute imports in a package's __init__"
            out.setdefault(node.module or "", []).extend(a.asname or a.name for a in node.names)
    return out


def test_top_level_is_small_grouped_and_explicit() -> None:
    import dfm_ext

    path = SRC / "__init__.py"
    assert len(path.read_text().splitlines()) <= 120
    body = ast.parse(path.read_text()).body
    allowed = (ast.ImportFrom, ast.Expr, ast.Assign, ast.AnnAssign)
    assert all(isinstance(node, allowed) for node in body), "dfm_ext/__init__.py holds imports, __version__ and __all__ only"
    imports = _init_imports(path)
    # One import per subpackage, from the subpackage itself (its __all__ is the public surface).
    assert set(imports) <= {f"dfm_ext.{p}" for p in SUBPACKAGES} - {"dfm_ext.metrics"}, sorted(imports)
    exported = [name for names in imports.values() for name in names]
    assert len(set(dfm_ext.__all__)) == len(dfm_ext.__all__) == len(exported)
    assert set(dfm_ext.__all__) == set(exported), "__all__ lists exactly what the top level imports"
    for module, names in imports.items():
        sub_all = importlib.import_module(module).__all__
        assert not set(names) - set(sub_all), f"dfm_ext re-exports names {module} keeps private: {set(names) - set(sub_all)}"


@pytest.mark.parametrize("sub", [p for p in SUBPACKAGES if (SRC / p / "__init__.py").exists()])
def test_subpackage_init_exports_exactly_its_imports(sub: str) -> None:
    """A subpackage ``__init__`` imports its public names explicitly from its own modules, and ``__all__`` lists them."""
    package = f"dfm_ext.{sub}"
    path = SRC / sub / "__init__.py"
    tree = ast.parse(path.read_text())
    imported: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            module = node.module or ""
            resolved = module if node.level == 0 else f"{package}.{module}" if module else package
            assert resolved == package or resolved.startswith(package + "."), f"{path} imports from {resolved}"
            imported.extend(a.asname or a.name for a in node.names)
    assert sorted(importlib.import_module(package).__all__) == sorted(imported)
