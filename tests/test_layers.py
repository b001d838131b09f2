"""The house: data flows one way, no module of cnnpress imports back along the line.

``make test`` runs import-linter's layers contract (pyproject.toml); these tests check what
it does not: no import cycle anywhere (inside a layer too), and no cnnpress import hidden in a
function, where a cycle could hide from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import cnnpress

SRC = Path(cnnpress.__file__).parent


def function_level_imports() -> list[str]:
    """``path:line`` of every import of cnnpress inside a function or method."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] if node.level == 0 else ["(relative)"]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if any(n == "cnnpress" or n.startswith(("cnnpress.", "(relative)")) for n in names):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_no_cnnpress_import_inside_a_function():
    assert function_level_imports() == []


def test_the_function_level_import_check_sees_one(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("def f():\n    from cnnpress.errors import ConfigError\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    assert function_level_imports() == ["m.py:2"]


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import cycles between modules (a depth-first search over direct imports)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == 1:
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m)
    return found


def test_no_import_cycle():
    graph = grimp.build_graph("cnnpress")
    # the package's __init__ files re-export their children; a child importing a sibling
    # through the parent is not a cycle of modules, so packages are left out
    for package in [m for m in graph.modules if graph.find_children(m)]:
        graph.remove_module(package)
    assert cycles(graph) == []


def test_the_cycle_check_sees_one():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a")):
        graph.add_import(importer=a, imported=b)
    assert cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]


def long_functions(limit: int = 80) -> list[str]:
    """``path:name (lines)`` of every function in src longer than ``limit`` lines."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = fn.end_lineno - fn.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(SRC)}:{fn.name} ({lines})")
    return found


def test_functions_are_short_enough_to_read_at_once():
    assert long_functions() == []
