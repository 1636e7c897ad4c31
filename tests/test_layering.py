"""The import layering of the package, checked on the source (ast), not by importing it.

Library (src/dfm_ext) layers, each importing only itself and the layers before it:
validation, fileio -> decompositions -> process -> specialization -> models -> wrapping -> pipelines; ``metrics``
stands apart (it may use the first tier only, and no other layer imports it); the top-level
``dfm_ext/__init__`` may use every layer but ``metrics``. The library never imports
``accelerate``, ``dfm_ext.recipes`` or ``dfm_ext.adapters``, except the one lazy lookup of the
built-in adapters in ``wrapping/adapter.py`` (inside a function).

The recipes wing: ``recipes.engine`` never imports a recipe; a recipe (``recipes.imagenet``,
``recipes.kinetics``, ``recipes.flux``) imports the engine and the library, never another recipe;
the demo (``recipes.demo``, a config of the image recipe) imports the image recipe and no other.

Everywhere (library, adapters, recipes): no ``from X import _name`` of another module's private
name, and a private module (``_name.py``) is imported only by its own package, where it is listed
in ``SHARED_PRIVATE_MODULES`` below. Subpackages import one another without cycles. No module is
longer than :data:`MAX_LINES`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"dfm_ext": ROOT / "src" / "dfm_ext"}
#: Tiers of the library, lowest first; a unit may import its own tier and the ones before it.
LAYERS = [("validation", "fileio"), ("decompositions",), ("process",), ("specialization",), ("models",), ("wrapping",), ("pipelines",)]
BASE = LAYERS[0]


def tier(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"dfm_ext.{unit} is in no layer: add it to LAYERS in tests/test_layering.py")

#: Library imports of the add-ons that are allowed, and why. They must sit inside a function.
LAZY_UPWARD = {("dfm_ext.wrapping.adapter", "dfm_ext.adapters"): "the registry of built-in adapters (wrap_dit(adapter='auto'))"}

#: Private modules shared by the modules of their own package (and only there).
SHARED_PRIVATE_MODULES = {
    "dfm_ext.metrics._images": "image-set plumbing (batching, progress, checks) of the metrics",
    "dfm_ext.recipes.engine.cli": "argument parsing, error reporting and task helpers the recipe commands share",
}


#: What each part of the recipes wing may import of the wing (besides itself).
RECIPE_IMPORTS = {"engine": set(), "imagenet": {"engine"}, "kinetics": {"engine"}, "flux": {"engine"}, "demo": {"engine", "imagenet"}}
#: The longest module allowed anywhere in the package: a longer one holds more than one job.
MAX_LINES = 450


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, e.g. "dfm_ext.process.sampler"
    target: str  # the imported module, e.g. "dfm_ext.validation"
    names: tuple[str, ...]  # names taken from it ("from target import names"); empty for "import target"
    lazy: bool  # inside a function, so it runs at call time, not import time
    line: int


def module_name(package: str, root: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
    return ".".join([package, *parts])


def all_modules() -> dict[str, Path]:
    out = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            out[module_name(package, root, path)] = path
    return out


def imports_of(module: str, source: str, *, is_package: bool = False) -> Iterator[Import]:
    """Every import statement of ``module`` with relative imports resolved."""
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def lazy(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), lazy(node), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names = tuple(a.name for a in node.names)
            # "from pkg import submodule" imports the submodule: record it as such.
            yield Import(module, target, names, lazy(node), node.lineno)


def subpackage(module: str) -> str:
    """The unit of layering: ``dfm_ext`` (the top level), ``dfm_ext.<layer>``, ``dfm_ext.adapters``, ..."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def layer_violations(imp: Import) -> list[str]:
    """Why ``imp`` (made by a library module) breaks the library's layering; empty if it does not."""
    where = f"{imp.importer}:{imp.line} imports {imp.target}"
    top = imp.target.split(".")[0]
    if top == "accelerate":
        return [f"{where}: the library never imports accelerate"]
    if top != "dfm_ext":
        return []
    own, other = subpackage(imp.importer), subpackage(imp.target)
    if other in ("dfm_ext.adapters", "dfm_ext.recipes"):
        if (imp.importer, imp.target) in LAZY_UPWARD and imp.lazy:
            return []
        return [f"{where}: the library does not import the add-ons (adapters, recipes)"]
    if other == own:
        return []
    if other == "dfm_ext":
        return [f"{where}: a layer imports the top-level package (import from the layer that defines the name)"]
    own_layer, other_layer = own.split(".")[-1], other.split(".")[-1]
    if own == "dfm_ext":
        return [f"{where}: the top level does not re-export metrics"] if other_layer == "metrics" else []
    if own_layer == "metrics":
        return [] if other_layer in BASE else [f"{where}: metrics may use only {BASE}"]
    if other_layer == "metrics":
        return [f"{where}: only metrics and the add-ons use dfm_ext.metrics"]
    if tier(other_layer) > tier(own_layer):
        lower = [n for names in LAYERS[: tier(own_layer) + 1] for n in names if n != own_layer]
        return [f"{where}: {own_layer} may import only {lower}"]
    return []


def recipe_violations(imp: Import) -> list[str]:
    """Why ``imp`` breaks the recipes wing's rule (:data:`RECIPE_IMPORTS`); empty if it does not."""
    parts, target = imp.importer.split("."), imp.target.split(".")
    if parts[:2] != ["dfm_ext", "recipes"] or target[:2] != ["dfm_ext", "recipes"] or len(parts) < 3 or len(target) < 3:
        return []
    own, other = parts[2], target[2]
    if own not in RECIPE_IMPORTS:
        return [f"{imp.importer} is in no part of the recipes wing: add its folder to RECIPE_IMPORTS"]
    if other == own or other in RECIPE_IMPORTS[own]:
        return []
    what = "the engine never imports a recipe" if own == "engine" else f"recipes.{own} may import only {sorted(RECIPE_IMPORTS[own])}"
    return [f"{imp.importer}:{imp.line} imports {imp.target}: {what}"]


def privacy_violations(imp: Import, modules: dict[str, Path]) -> list[str]:
    """Private names taken from another module, or a private module used outside its package."""
    out = []
    if not imp.target.startswith("dfm_ext"):
        return out
    where = f"{imp.importer}:{imp.line}"
    for name in imp.names:
        submodule = f"{imp.target}.{name}"
        if submodule in modules:  # "from pkg import _module" is a module import
            out += _private_module(imp.importer, submodule, where)
        elif name.startswith("_") and not name.startswith("__"):
            out.append(f"{where} takes the private name {name} from {imp.target}")
    out += _private_module(imp.importer, imp.target, where)
    return out


def _private_module(importer: str, target: str, where: str) -> list[str]:
    private = [i for i, p in enumerate(target.split(".")) if p.startswith("_") and not p.startswith("__")]
    if not private:
        return []
    owner = ".".join(target.split(".")[: private[0]])  # the package the private module belongs to
    inside = importer == owner or importer.startswith(owner + ".")
    if inside and target in SHARED_PRIVATE_MODULES:
        return []
    if inside:
        return [f"{where} uses the private module {target}: list it in SHARED_PRIVATE_MODULES with its reason"]
    return [f"{where} uses {target}, private to {owner}"]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles found by a depth-first search (one per back edge)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    found = all_modules()
    assert {"dfm_ext.validation", "dfm_ext.wrapping.adapter", "dfm_ext.adapters", "dfm_ext.recipes.demo.cli"} <= set(found)
    return found


@pytest.fixture(scope="module")
def all_imports(modules: dict[str, Path]) -> list[Import]:
    return [
        imp
        for name, path in modules.items()
        for imp in imports_of(name, path.read_text(), is_package=path.name == "__init__.py")
    ]


def test_library_imports_only_lower_layers(all_imports: list[Import], modules: dict[str, Path]) -> None:
    library = [i for i in all_imports if subpackage(i.importer) not in ("dfm_ext.adapters", "dfm_ext.recipes")]
    assert len(library) > 50
    units = {subpackage(m).split(".")[-1] for m in modules} - {"dfm_ext", "adapters", "recipes", "metrics"}
    for unit in sorted(units):
        tier(unit)  # every library module belongs to a layer
    problems = [p for imp in library for p in layer_violations(imp)]
    assert not problems, "\n".join(problems)


def test_recipes_import_only_the_engine(all_imports: list[Import]) -> None:
    recipes = [i for i in all_imports if i.importer.startswith("dfm_ext.recipes.")]
    assert len(recipes) > 50
    problems = [p for imp in recipes for p in recipe_violations(imp)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("dfm_ext.recipes.engine.trainer", "from dfm_ext.recipes.imagenet.task import ImageNetTask", "the engine never imports a recipe"),
        ("dfm_ext.recipes.kinetics.task", "from dfm_ext.recipes.imagenet.task import load_codec", "recipes.kinetics may import only ['engine']"),
        ("dfm_ext.recipes.flux.task", "from ..demo import report", "recipes.flux may import only ['engine']"),
        ("dfm_ext.recipes.demo.cli", "from dfm_ext.recipes.flux import task", "recipes.demo may import only ['engine', 'imagenet']"),
    ],
)
def test_recipe_rule_rejects(module: str, source: str, message: str) -> None:
    (imp,) = imports_of(module, source)
    problems = recipe_violations(imp)
    assert len(problems) == 1 and message in problems[0], problems
    (ok,) = imports_of(module, "from dfm_ext.recipes.engine.config import ConfigError")
    assert recipe_violations(ok) == []


def test_no_module_is_longer_than_max_lines(modules: dict[str, Path]) -> None:
    long = {name: n for name, path in modules.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_no_private_names_across_modules(all_imports: list[Import], modules: dict[str, Path]) -> None:
    problems = [p for imp in all_imports for p in privacy_violations(imp, modules)]
    assert not problems, "\n".join(problems)
    for name in SHARED_PRIVATE_MODULES:
        assert name in modules, f"SHARED_PRIVATE_MODULES lists {name}, which no longer exists"


def test_no_import_cycles_between_subpackages(all_imports: list[Import]) -> None:
    edges: dict[str, set[str]] = {}
    for imp in all_imports:
        if not imp.target.startswith("dfm_ext") or (imp.importer, imp.target) in LAZY_UPWARD:
            continue
        a, b = subpackage(imp.importer), subpackage(imp.target)
        if a != b:
            edges.setdefault(a, set()).add(b)
    assert "dfm_ext.wrapping" in edges and "dfm_ext.recipes" in edges
    assert not cycles(edges), cycles(edges)


# The checker itself: each rule rejects what it should, so a clean result above means something.


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("dfm_ext.process.sampler", "from dfm_ext.wrapping import wrap_dit", "process may import only"),
        ("dfm_ext.decompositions.base", "from ..process import timesteps", "decompositions may import only"),
        ("dfm_ext.models.dit", "import accelerate", "never imports accelerate"),
        ("dfm_ext.wrapping.wrapper", "from dfm_ext.recipes.demo.run import x", "does not import the add-ons"),
        ("dfm_ext.wrapping.adapter", "from dfm_ext.adapters import builtin_adapters", "does not import the add-ons"),
        ("dfm_ext.metrics.swd", "from dfm_ext.decompositions import LaplacianPyramid", "metrics may use only"),
        ("dfm_ext.fileio", "from dfm_ext.process import conventions", "fileio may import only"),
        ("dfm_ext.wrapping.wrapper", "from dfm_ext.metrics import swd", "only metrics and the add-ons"),
        ("dfm_ext.process.sampler", "import dfm_ext", "imports the top-level package"),
    ],
)
def test_layer_rule_rejects(module: str, source: str, message: str) -> None:
    (imp,) = imports_of(module, source)
    problems = layer_violations(imp)
    assert len(problems) == 1 and message in problems[0], problems


def test_layer_rule_accepts() -> None:
    ok = {
        "dfm_ext.wrapping.wrapper": "from dfm_ext.process.conventions import time_transform",
        "dfm_ext.process.sampler": "from .objective import x",
        "dfm_ext.metrics.swd": "from dfm_ext.validation import check_value",
        "dfm_ext.specialization.io": "from dfm_ext.fileio import atomic_write_text",
        "dfm_ext.wrapping.adapter": "def f():\n    from dfm_ext.adapters import builtin_adapters",
        "dfm_ext": "from dfm_ext.wrapping import wrap_dit",
    }
    for module, source in ok.items():
        (imp,) = imports_of(module, source)
        assert layer_violations(imp) == [], (module, source)


def test_privacy_rule(modules: dict[str, Path]) -> None:
    def check(module: str, source: str) -> list[str]:
        return [p for imp in imports_of(module, source) for p in privacy_violations(imp, modules)]

    assert "private name _write" in check("dfm_ext.recipes.engine.trainer", "from .checkpointing import _write, save")[0]
    assert "private to dfm_ext.metrics" in check("dfm_ext.recipes.demo.run", "from dfm_ext.metrics._images import x")[0]
    assert "private to dfm_ext.metrics" in check("dfm_ext.adapters.sd3", "from dfm_ext.metrics import _images")[0]
    assert check("dfm_ext.recipes.demo.run", "from dfm_ext.recipes.engine.cli import helper") == []
    assert check("dfm_ext.metrics.swd", "from ._images import iter_batches") == []
    assert check("dfm_ext.wrapping.wrapper", "from dfm_ext.validation import __all__") == []


def test_cycle_finder() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
