"""The package's structure, checked: dtune's own imports form no cycle, sit at the top of each module, and no
module outgrows what one can hold in one's head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "dtune"
LARGEST_MODULE = 350  # lines; the Triton kernels (dtune/kernels) are exempt: a kernel and its launcher stay together


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def own_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported dtune module, line, at module level) for every import of a dtune module in ``path``, including
    imports inside functions. Module level includes ``if`` blocks outside functions (e.g. ``if HAS_TRITON:``)."""
    tree = ast.parse(path.read_text())
    nested = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for inner in ast.walk(node)
        if inner is not node
    }
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from dtune.data import load` imports the module dtune.data.load when there is one.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
        for name in names:
            if name == "dtune" or name.startswith("dtune."):
                found.append((name, node.lineno, id(node) not in nested))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {imp for imp, _, _ in own_imports(path) if imp in MODULES and imp != name} for name, path in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` as a closed path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_dtune_imports_form_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_own_imports_are_at_the_top_of_each_module():
    """Lazy imports are for heavy third-party libraries; a lazy import of dtune's own module hides a cycle."""
    inner = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in MODULES.values()
        for name, line, at_top in own_imports(path)
        if not at_top
    ]
    assert not inner, "\n".join(inner)


def test_no_module_outgrows_350_lines():
    large = {
        str(p.relative_to(REPO)): n
        for name, p in MODULES.items()
        if not name.startswith("dtune.kernels") and (n := len(p.read_text().splitlines())) > LARGEST_MODULE
    }
    assert not large, f"modules over {LARGEST_MODULE} lines: {large}"


def test_every_package_and_config_group_ships():
    """pyproject lists packages explicitly (conf/ is remapped into dtune/conf); a new folder missing from the list
    would be left out of the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    conf = {"dtune.conf." + ".".join(d.relative_to(REPO / "conf").parts) for d in (REPO / "conf").rglob("*") if d.is_dir()}
    assert listed == code | conf | {"dtune.conf"}
