"""The shape of lib/ as its package docstrings state it, checked on the code: layers
import only downwards; one process layer, one lock scaffold, one exception module,
and no prompt outside the console."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

LIB = ROOT / "lib"
# lowest first; a module may import its own layer and the ones before it
LAYERS = [
    {"lib.errors", "lib.files", "lib.faults", "lib.config", "lib.interaction", "lib.audit", "lib.process", "lib.logfiles"},
    {"lib.pg"},
    {"lib.sandbox"},
    {"lib.points"},
    {"lib.restore", "lib.undo"},
    {"lib.operations"},
    {"lib.migrate"},
    {"lib.api"},
    {"lib.cli", "lib"},
]


def _layer(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "lib"):
            return rank
    return len(LAYERS) - 1


def _modules():
    for path in sorted(LIB.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text())


def _imports(tree) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "lib":
                found |= {f"lib.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_layers_import_only_downwards():
    upward = []
    for name, _, tree in _modules():
        if name == "lib":
            continue
        for imported in _imports(tree):
            if imported.startswith("lib.") and _layer(imported) > _layer(name):
                upward.append(f"{name} imports {imported}")
    assert upward == []


@pytest.mark.parametrize(
    "pattern, allowed, why",
    [
        (r"^\s*(import subprocess|from subprocess)", {"lib/process.py"}, "one process layer"),
        (r"^\s*(import rich|from rich)", {"lib/cli/console.py", "lib/cli/render.py"}, "only the console talks to people"),
        (r"\bisatty\(", {"lib/cli/console.py"}, "whether to ask is the Confirmer's to know"),
        (
            r"\bDatabaseLock\(",
            {"lib/operations/scaffold.py", "lib/pg/target.py", "lib/pg/locks.py"},
            "one scaffold takes the lock",
        ),
        (r"pg_try_advisory_lock|pg_advisory_unlock", {"lib/pg/locks.py"}, "one lock primitive"),
    ],
)
def test_one_way_to_do_each_thing(pattern, allowed, why):
    found = {
        str(path.relative_to(ROOT))
        for path in LIB.rglob("*.py")
        if re.search(pattern, path.read_text(), re.M) and str(path.relative_to(ROOT)) not in allowed
    }
    assert found == set(), f"{why}: {sorted(found)}"


def test_every_exception_lives_in_errors():
    elsewhere = []
    for name, _, tree in _modules():
        if name == "lib.errors":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in ("RollbackError",) for b in bases):
                    elsewhere.append(f"{name}.{node.name}")
    assert elsewhere == []


def test_every_package_says_what_it_may_import():
    for init in LIB.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, init


def test_module_basenames_are_unique():
    """A name means one thing: no two modules of lib/ share a file name."""
    seen: dict[str, list[str]] = {}
    for path in LIB.rglob("*.py"):
        if path.name != "__init__.py":
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_the_product_never_imports_the_sandbox():
    """Throwaway servers exist for the demo, the tests and the benchmarks only."""
    product = ("lib.pg", "lib.points", "lib.restore", "lib.operations", "lib.migrate", "lib.api")
    found = [
        f"{name} imports {imported}"
        for name, _, tree in _modules()
        if name.startswith(product)
        for imported in _imports(tree)
        if imported == "lib.sandbox" or imported.startswith("lib.sandbox.")
    ]
    assert found == []


def test_no_module_is_named_by_a_string():
    """A module the toolkit starts is imported, so that a rename breaks at import, not at run time."""
    spelled = {
        str(path.relative_to(ROOT))
        for path in LIB.rglob("*.py")
        if re.search(r"""["']lib\.[a-z_]+(\.[a-z_]+)*["']""", path.read_text())
    }
    assert spelled == set()


def test_method_names_are_compared_only_in_the_registry_and_their_own_modules():
    """Callers ask a method what it does (lib/points/methods/base.py), never its name."""
    names = r"""["'](template|dump|data|pitr)["']"""
    allowed = {"lib/points/methods/registry.py", *(f"lib/points/methods/{n}.py" for n in ("template", "dump", "data", "pitr"))}
    allowed.add("lib/points/methods/base.py")  # the restore mode TABLES is "data" in the JSON a restore prints
    found = {
        f"{path.relative_to(ROOT)}:{number}"
        for path in [*LIB.rglob("*.py"), *ROOT.glob("*.py")]
        if str(path.relative_to(ROOT)) not in allowed
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(names, line) and not re.search(r"""/ ["']data["']""", line)  # a folder named data
    }
    assert found == set()


MANIFEST_MODULES = {"lib/points/catalog.py", "lib/points/manifest.py"}


def _product_sources() -> dict[str, str]:
    """lib/ and the top-level scripts, by path relative to the project."""
    paths = [*LIB.rglob("*.py"), *ROOT.glob("*.py")]
    return {str(path.relative_to(ROOT)): path.read_text() for path in sorted(paths)}


@pytest.mark.parametrize(
    "pattern, what",
    [
        (r"manifest(\.get\(|\[)", "a manifest looked up as a dict"),
        (r"json\.loads\(.*(manifest\.json|\bMANIFEST\b)", "a manifest.json parsed by hand"),
    ],
)
def test_only_the_catalog_reads_a_manifest(pattern, what):
    """A manifest is a typed record (lib/points/manifest.py) that the catalog reads and
    writes; everyone else asks its attributes."""
    found = [
        f"{path}:{number}: {line.strip()}"
        for path, text in _product_sources().items()
        if path not in MANIFEST_MODULES
        for number, line in enumerate(text.splitlines(), start=1)
        if re.search(pattern, line)
    ]
    assert found == [], f"{what} outside {sorted(MANIFEST_MODULES)}"


def test_a_points_status_and_kind_are_named_in_one_place():
    """Status and Kind are compared as enums; their values are spelled in manifest.py only."""
    found = [
        f"{path}:{number}: {line.strip()}"
        for path, text in _product_sources().items()
        if path != "lib/points/manifest.py"
        for number, line in enumerate(text.splitlines(), start=1)
        if re.search(r"""["'](completed|before_rollback|manual)["']""", line)
    ]
    assert found == []
