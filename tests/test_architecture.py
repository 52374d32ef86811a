"""Rules of the package's layout that a test keeps, not a reviewer's memory (docs/ARCHITECTURE.md).

* No import cycle between launcher's modules, counting imports inside functions too (most of the
  package imports lazily so that the launcher never loads torch: a cycle hidden in a function is
  still a cycle a reader has to untangle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "launcher"
PARTS = ("core", "host", "rank", "results")


def package_modules() -> dict[str, Path]:
    """Every module of the package by its name under ``launcher`` (``rank.train``)."""
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts): path
        for path in PACKAGE.rglob("*.py")
        if path.stem != "__init__" and "assets" not in path.parts
    }


def imports_in(path: Path, modules: set[str], module_level_only: bool = False) -> set[str]:
    """The launcher modules ``path`` imports (anywhere in its body, or only at module level)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # imports under a module-level ``if``/``try`` count as module level too
        nodes = [
            n
            for top in tree.body
            if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
            for n in ast.walk(top)
        ]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("launcher"):
            base = node.module.removeprefix("launcher").removeprefix(".")
            for alias in node.names:  # ``from launcher.rank import train`` names a module
                found.add(f"{base}.{alias.name}" if base else alias.name)
            found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("launcher.") for a in node.names if a.name.startswith("launcher.")}
    own = ".".join(path.relative_to(PACKAGE).with_suffix("").parts) if PACKAGE in path.parents else path.stem
    return (found & modules) - {own}


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    return imports_in(path, modules)


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    paths = package_modules()
    return {name: imports_in(path, set(paths), module_level_only) for name, path in paths.items()}


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
    assert len(graph) > 30 and "rank.best" in graph["rank.train"]  # the graph was really read
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


# Which part may import which (docs/ARCHITECTURE.md, "The parts and their rules"). core is the
# contract both processes share; results reads a run; the ranks use both; the host launches ranks and
# reads results, and reaches rank code only inside a function (an in-process command such as
# `ftlaunch export`), never at module import.
MAY_IMPORT = {
    "core": {"core"},
    "results": {"core", "results"},
    "rank": {"core", "results", "rank"},
    "host": {"core", "results", "host"},
}
HOST_MAY_IMPORT_LAZILY = {"rank"}


def part(module: str) -> str:
    return module.split(".")[0]


def layering_violations() -> list[str]:
    everywhere, module_level = import_graph(), import_graph(module_level_only=True)
    found = []
    for module, imported in sorted(everywhere.items()):
        for other in sorted(imported):
            allowed = MAY_IMPORT[part(module)]
            if part(module) == "host" and other not in module_level[module]:
                allowed = allowed | HOST_MAY_IMPORT_LAZILY
            if part(other) not in allowed:
                found.append(f"{module} -> {other}")
    return found


def test_every_module_lives_in_one_of_the_four_parts():
    assert {part(name) for name in package_modules()} == set(PARTS), sorted(package_modules())
    assert all("." in name for name in package_modules()), "a module outside core/host/rank/results"


def test_every_module_has_its_concern_in_the_architecture_note():
    """A newcomer finds each module in docs/ARCHITECTURE.md's "Where each concern lives" table."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Where each concern lives", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name, path in package_modules().items()
        if f"`{path.relative_to(PACKAGE).as_posix()}" not in table
    ]
    assert not missing, f"modules docs/ARCHITECTURE.md's concern table does not name: {missing}"


def test_each_part_imports_only_the_parts_below_it():
    assert not layering_violations(), "imports across the parts' rules: " + "; ".join(layering_violations())


def test_the_layering_rule_sees_a_module_level_import_of_rank_code_from_the_host(monkeypatch, tmp_path):
    fake = tmp_path / "launcher"
    for name, body in {
        "host/a.py": "from launcher.rank.b import x\n",
        "rank/b.py": "",
        "host/c.py": "",
    }.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(body)
    (fake / "host/c.py").write_text("def f():\n    from launcher.rank import b\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert layering_violations() == ["host.a -> rank.b"]


# What runs in the `ftlaunch` process on the login/head node (and what it reads back): importing
# any of these must not load the libraries the ranks need, so that a launch hands over to
# `accelerate launch` in under a second and the CLI answers bad input at once.
LIGHT_PARTS = ("core", "host", "results")
HEAVY = ("torch", "transformers", "deepspeed", "datasets")


def test_the_host_side_imports_no_heavy_library():
    import subprocess
    import sys

    light = sorted(name for name in package_modules() if part(name) in LIGHT_PARTS)
    assert len(light) > 25
    code = (
        "import importlib, sys\n"
        f"for name in {light!r}:\n"
        "    importlib.import_module('launcher.' + name)\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", (
        f"host, core or results modules import {result.stdout.strip()} at import time"
    )


# ---------------------------------------------------------------- the run directory contract

# launcher/core/rundir.py is the run directory's layout in code: no other module spells a name of it.
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
        for path in sorted(package_modules().values())
        if path.stem not in LAYOUT_MODULES
        for line in run_dir_names(path)
    ]
    assert not found, "run-directory names outside launcher/core/rundir.py (use RunDir):\n" + "\n".join(found)
    assert run_dir_names(PACKAGE / "core" / "rundir.py")  # the checker sees the names where they are defined


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


# One way to replace a file or folder so that readers never see half of it: launcher/core/atomic.py.
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
    found = [
        line for path in sorted(package_modules().values()) if path.stem != "atomic" for line in renames(path)
    ]
    assert not found, (
        "renames outside launcher/core/atomic.py (use write_text_atomic/replace_dir):\n" + "\n".join(found)
    )
    assert renames(PACKAGE / "core" / "atomic.py")  # the checker sees the one place that renames
