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
    "rundir", "atomic", "model_facts",
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


# ---------------------------------------------------------------- the run directory contract

# launcher/rundir.py is the run directory's layout in code: no other module spells a name of it.
# Names that mean nothing else are refused wherever they appear as a string (docstrings and the
# text of messages, which mention them for people, are not looked at); names that are also
# ordinary words or keys ("final" is a metrics key, "eval" a recipe section) only as a path
# component (``path / "final"``) or in a path-shaped string (``"eval/finetuned"``).
RUN_DIR_FILES = {
    "recipe.yaml", "accelerate.yaml", "deepspeed.json", "command.sh", ".ftlaunch.lock", "logs",
    "metrics.jsonl", "trackers", "checkpoints", "INTERRUPTED", "predictions.jsonl", "rouge.json",
    "report.md", "sweep.json",
}  # fmt: skip
RUN_DIR_WORDS = {
    "final",
    "eval",
    "original",
    "finetuned",
    "report",
    "latest",
    "cache",
    "status",
    "failures",
    "merged",
}
CHECKPOINT_PREFIXES = ("step_", ".tmp-step_", ".old-step_")
LAYOUT_MODULES = {"rundir"}


def docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def path_shaped(text: str) -> bool:
    parts = text.split("/")
    return len(parts) > 1 and all(part and " " not in part for part in parts)


def run_dir_names(path: Path) -> list[str]:
    """``file:line: 'name'`` for each run-directory name spelled in ``path``'s code."""
    tree = ast.parse(path.read_text())
    skipped = docstring_nodes(tree)
    found = []

    def hit(node: ast.AST, text: str) -> None:
        found.append(f"{path.name}:{node.lineno}: {text!r}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            text = node.value
            if (
                text in RUN_DIR_FILES
                or path_shaped(text)
                and set(text.split("/")) & (RUN_DIR_FILES | RUN_DIR_WORDS)
            ):
                hit(node, text)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in RUN_DIR_WORDS:
                hit(node, right.value)
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and first.value in CHECKPOINT_PREFIXES:
                hit(node, first.value + "...")
    return sorted(found, key=lambda line: int(line.split(":")[1]))


def test_only_rundir_spells_the_run_directory_layout():
    found = [
        line
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem not in LAYOUT_MODULES
        for line in run_dir_names(path)
    ]
    assert not found, "run-directory names outside launcher/rundir.py (use RunDir):\n" + "\n".join(found)
    assert run_dir_names(PACKAGE / "rundir.py")  # the checker sees the names where they are defined


def test_the_layout_checker_finds_names_but_not_messages(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        '"""A docstring about recipe.yaml and final/ is fine."""\n'
        'a = run_dir / "final"\n'
        'b = "metrics.jsonl"\n'
        'c = root / f"step_{step}"\n'
        'd = "eval/finetuned"\n'
        'e = row.get("final")\n'
        'f = f"{run_dir} has no command.sh; render it first"\n'
        'g = f"step_{step}"\n'
    )
    assert run_dir_names(source) == [
        "m.py:2: 'final'", "m.py:3: 'metrics.jsonl'", "m.py:4: 'step_...'", "m.py:5: 'eval/finetuned'",
        "m.py:8: 'step_...'",
    ]  # fmt: skip


# One way to replace a file or folder so that readers never see half of it: launcher/atomic.py.
RENAMES = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}


def renames(path: Path) -> list[str]:
    """``file:line`` for each rename in ``path`` (os.replace/rename, shutil.move, Path.rename)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = (owner.id if isinstance(owner, ast.Name) else None, node.func.attr)
            if name in RENAMES or node.func.attr == "rename":
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_one_atomic_write_helper():
    found = [line for path in sorted(PACKAGE.glob("*.py")) if path.stem != "atomic" for line in renames(path)]
    assert not found, "renames outside launcher/atomic.py (use write_text_atomic/replace_dir):\n" + "\n".join(
        found
    )
    assert renames(PACKAGE / "atomic.py")  # the checker sees the one place that renames
