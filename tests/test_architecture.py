"""Rules of the package's layout that a test keeps, not a reviewer's memory (docs/ARCHITECTURE.md).

* No import cycle between launcher's modules, counting imports inside functions too (most of the
  package imports lazily so that the launcher never loads torch: a cycle hidden in a function is
  still a cycle a reader has to untangle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "launcher"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The launcher modules ``path`` imports anywhere in its body (module level or in functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "launcher":
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif node.module.startswith("launcher."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("launcher.")}
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    paths = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "best" in graph["train"]  # the graph was really read
    found = cycles(graph)
    assert not found, "import cycles (module -> the modules of its cycle it imports): " + "; ".join(
        ", ".join(f"{name} -> {sorted(graph[name] & set(component))}" for name in component)
        for component in found
    )


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import launcher.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from launcher import a\n")
    (tmp_path / "c.py").write_text("from launcher.a import x\n")
    names = {"a", "b", "c"}
    graph = {name: imported_modules(tmp_path / f"{name}.py", names) for name in names}
    assert cycles(graph) == [["a", "b"]]


# What runs in the `ftlaunch` process on the login/head node (and what it reads back): importing
# any of these must not load the libraries the ranks need, so that a launch hands over to
# `accelerate launch` in under a second and the CLI answers bad input at once.
HOST_MODULES = (
    "cli", "options", "recipe", "render", "launch", "supervise", "runlock", "writable", "modelfiles",
    "console", "estimate", "diskspace", "families", "fingerprint", "checkpoint", "data", "paths", "errors",
    "sweep", "sweep_grid", "sweep_manifest", "sweep_report", "report", "card", "scoring", "rouge",
    "model_settings", "summarize", "jsonl", "metrics", "trackers", "ranklog", "progress", "compiling",
)  # fmt: skip
HEAVY = ("torch", "transformers", "deepspeed", "datasets")


def test_the_host_side_imports_no_heavy_library():
    import subprocess
    import sys

    code = (
        "import importlib, sys\n"
        f"for name in {HOST_MODULES!r}:\n"
        "    importlib.import_module('launcher.' + name)\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"host modules import {result.stdout.strip()} at import time"
    assert set(HOST_MODULES) <= set(import_graph())  # every name is a real module
