"""The direction of curvscope's imports, read from the sources with ``ast`` (every import
counts, also those inside functions and under TYPE_CHECKING): no module imports itself back
through others, the command line (``curvscope.cli``) is imported by nothing but the program
that runs it, no command of the CLI imports another, and no CLI module grows past ~400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "curvscope"
#: The only module outside the CLI that may import it: the ``curvscope`` program.
PROGRAM = "curvscope.program"
MAX_CLI_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: Every module of the package by name, and its file.
FILES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def import_graph() -> tuple[dict[str, set[str]], dict[str, ast.Module]]:
    """{module: the curvscope modules it imports}, and each module's syntax tree."""
    trees = {name: ast.parse(path.read_text()) for name, path in FILES.items()}
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        package = name if FILES[name].name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                for alias in node.names:  # "from . import x": module x, else the module base
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in trees else base)
        graph[name] = {module for module in found if module in trees and module != name}
    return graph, trees


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_command(tree: ast.Module) -> bool:
    """A CLI command module: it defines both ``register`` and ``run``."""
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return {"register", "run"} <= names


def test_no_import_cycle():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_nothing_outside_the_cli_imports_it():
    graph, _ = import_graph()
    outside = {
        name: sorted(m for m in imported if m == "curvscope.cli" or m.startswith("curvscope.cli."))
        for name, imported in graph.items()
        if not (name == "curvscope.cli" or name.startswith("curvscope.cli.") or name == PROGRAM)
    }
    assert {name: found for name, found in outside.items() if found} == {}
    assert graph[PROGRAM] == {"curvscope.cli"}


def test_no_command_imports_another_and_cli_modules_stay_small():
    graph, trees = import_graph()
    cli = {name: tree for name, tree in trees.items() if name.startswith("curvscope.cli.")}
    commands = {name for name, tree in cli.items() if is_command(tree)}
    assert {"curvscope.cli.density", "curvscope.cli.track", "curvscope.cli.plot"} <= commands
    crossing = {name: sorted(graph[name] & commands) for name in cli if graph[name] & commands}
    assert crossing == {}  # only curvscope.cli (the package: parse, dispatch) imports commands
    sizes = {name: len(FILES[name].read_text().splitlines()) for name in [*cli, "curvscope.cli"]}
    assert {name: n for name, n in sizes.items() if n > MAX_CLI_LINES} == {}


#: The design's direction (../shared/DESIGN.md): numerics know only the operator interface,
#: operators only PyTorch, analyses and tracking combine the two, CLI and plots sit on top.
#: A module may import its own layer and those below, never one above. Leaf utilities
#: (results, resources, distributed, rng, losses, _version, zoo, model_cache) import no
#: layer at all.
LAYERS = {
    "curvscope.linalg": 1,
    "curvscope.operators": 2,
    "curvscope.analysis": 3,
    "curvscope.tracking": 4,
    "curvscope.plot": 4,
    "curvscope.html_report": 4,
    "curvscope.cli": 5,
    "curvscope.program": 6,
    "curvscope.__main__": 6,
}
LEAVES = (
    "curvscope.results",
    "curvscope.resources",
    "curvscope.distributed",
    "curvscope.rng",
    "curvscope.losses",
    "curvscope._version",
    "curvscope.zoo",
    "curvscope.model_cache",
)


def layer(module: str) -> int | None:
    """The layer of a module (0 for a leaf utility), None for the package root."""
    if module in LEAVES:
        return 0
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    return None


def test_no_upward_import():
    graph, _ = import_graph()
    upward = sorted(
        f"{name} -> {imported}"
        for name, imports in graph.items()
        for imported in imports
        if layer(name) is not None and layer(imported) is not None and layer(imported) > layer(name)
    )
    assert upward == []
    unplaced = sorted(name for name in graph if name != "curvscope" and layer(name) is None)
    assert unplaced == [], "place every new top-level module in LAYERS or LEAVES"
