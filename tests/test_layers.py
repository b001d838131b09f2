"""The house: data flows one way, no module of cnnpress imports back along the line.

``make test`` runs import-linter's layers contract (pyproject.toml); these tests check what
it does not: no import cycle anywhere (inside a layer too), no cnnpress import hidden in a
function, where a cycle could hide from a reader, and no method named by the runtime (a
method lowers its own layers through the hooks of its ``Method`` class).
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import cnnpress
import cnnpress.methods

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


#: What the runtime may import from ``cnnpress.methods``: the package's generic entry points
#: (``method_for``, ``get``, ...) and the contract, ``cnnpress.methods.base``.
GENERIC = {"cnnpress.methods", "cnnpress.methods.base"}


def method_imports(source: str, where: str, package: str = "cnnpress.runtime") -> list[str]:
    """``where:line name`` of every import in ``source`` (a module of ``package``) of one
    method: a module of ``cnnpress.methods`` other than the contract, or a name the package
    does not export as a generic entry point (such as its submodule ``slbf``)."""
    entry_points = set(cnnpress.methods.__all__)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) + 1 - node.level]
            module = ".".join(base + [node.module or ""]).strip(".") if node.level else node.module
            names = [f"{module}.{a.name}" for a in node.names if module == "cnnpress.methods"]
            names = [n for n in names if n.rpartition(".")[2] not in entry_points]
            names += [module] if (module or "").startswith("cnnpress.methods.") else []
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("cnnpress.methods.")]
        else:
            continue
        found += [f"{where}:{node.lineno} {n}" for n in names if n not in GENERIC]
    return found


def test_the_runtime_names_no_method():
    found = [
        hit
        for path in sorted((SRC / "runtime").rglob("*.py"))
        for hit in method_imports(path.read_text(), str(path.relative_to(SRC)))
    ]
    assert found == []


def method_comparisons(source: str, where: str) -> list[str]:
    """``where:line name`` of every comparison with a method's name (``method == "slbf"``,
    ``name in ("bwn", ...)``): a branch on one method."""
    known = set(cnnpress.methods.names())
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [
                    f"{where}:{node.lineno} {v.value}"
                    for v in values
                    if isinstance(v, ast.Constant) and v.value in known
                ]
    return found


#: The modules that hold no knowledge of a particular method (issue "every method a complete
#: plugin"); ``budget.py`` and ``format/validate.py`` still do (SLBF's size budget, the
#: manifest bounds of SLBF and k-means).
PLUGIN_CLEAN = ["run.py", "compare.py", "cli", "train"]


def test_the_run_the_comparison_the_cli_and_training_name_no_method():
    paths = [
        p
        for name in PLUGIN_CLEAN
        for p in sorted(SRC.glob(name + ("/*.py" if "." not in name else "")))
    ]
    assert len(paths) > 10
    found = []
    for path in paths:
        package = ".".join(("cnnpress", *path.relative_to(SRC).parent.parts))
        where, text = str(path.relative_to(SRC)), path.read_text()
        found += method_imports(text, where, package) + method_comparisons(text, where)
    # the generic modules of cnnpress.methods: applying any method, distilling for any method
    generic = ("cnnpress.methods.apply", "cnnpress.methods.distill")
    assert [hit for hit in found if not hit.endswith(generic)] == []


def test_the_method_comparison_check_sees_one():
    planted = 'if cfg["method"] == "slbf":\n    pass\nok = m in ("bwn", "fp32")\n'
    assert method_comparisons(planted, "m.py") == ["m.py:1 slbf", "m.py:3 bwn"]


def test_the_method_import_check_sees_one():
    planted = (
        "from cnnpress.methods import method_for, slbf\n"
        "from cnnpress.methods.base import Method\n"
        "from cnnpress.methods.slbf import SLBFConv2d\n"
        "import cnnpress.methods.binary\n"
        "from ..methods.kmeans import KMeansLayer\n"
        "from ..methods import get\n"
    )
    assert method_imports(planted, "m.py") == [
        "m.py:1 cnnpress.methods.slbf",
        "m.py:3 cnnpress.methods.slbf",
        "m.py:4 cnnpress.methods.binary",
        "m.py:5 cnnpress.methods.kmeans",
    ]
