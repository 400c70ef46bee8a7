"""No import cycles inside the glmport package.

A cycle makes import order matter, hides a module's real dependencies and forces imports into function
bodies to dodge the ``ImportError``. The graph below counts every ``import`` statement of glmport/,
backends/ (installed as ``glmport.backends``) and patches/ (installed as ``glmport.patches``): at module
level and inside functions alike, since a function-level import is a cycle waiting for its first call.
Imports under ``if TYPE_CHECKING:`` are skipped: they never run. ``importlib.import_module`` calls are
not followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# source folder -> the package it installs as (pyproject.toml, [tool.setuptools] package-dir)
TREES = {"glmport": "glmport", "backends": "glmport.backends", "patches": "glmport.patches"}

# Cycles tolerated for the moment, each written as the modules along it, e.g.
# ("glmport.plugins", "glmport.backend") for plugins -> backend -> plugins. The import edges of an entry
# are ignored; an entry that is no longer a cycle fails test_known_cycles_are_still_cycles, so it gets
# deleted once fixed. Add one only with a comment saying which change removes it.
KNOWN_CYCLES: tuple[tuple[str, ...], ...] = ()


def module_files() -> dict[str, Path]:
    """Every module name of the installed package, mapped to its source file."""
    modules = {}
    for folder, package in TREES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Import statements anywhere under ``node``, except the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.orelse:
                yield from _import_nodes(ast.Module(body=[branch], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The glmport modules an import statement loads (``from pkg import submodule`` loads the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in known:  # `import glmport.x.y` where only glmport.x is ours: the nearest
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    # Loading a submodule runs its packages' __init__ first; the importer's own packages already ran.
    own = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)} | ({module} if is_package else set())
    for name in list(found):
        while "." in name:
            name = name.rpartition(".")[0]
            if name in known and name not in own:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in _import_nodes(tree):
            targets |= _imported(module, path.name == "__init__.py", node, known)
        graph[module] = targets - {module}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not (size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def one_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group: the cycle to read."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{group} is not a cycle")


def cycles_in(graph: dict[str, set[str]], allowed: tuple[tuple[str, ...], ...] = ()) -> list[str]:
    """One line per group of mutually importing modules, after dropping the edges of ``allowed`` cycles."""
    tolerated = {(cycle[i], cycle[(i + 1) % len(cycle)]) for cycle in allowed for i in range(len(cycle))}
    pruned = {module: {t for t in targets if (module, t) not in tolerated} for module, targets in graph.items()}
    return [" -> ".join(one_cycle(pruned, group)) + f"   (all of: {', '.join(group)})"
            for group in strongly_connected(pruned)]


def test_no_import_cycles():
    found = cycles_in(import_graph(), KNOWN_CYCLES)
    assert not found, (
        "import cycles in glmport (move the shared names into a module both sides import, or pass the "
        "object in instead of importing its module):\n  " + "\n  ".join(found)
    )


def test_known_cycles_are_still_cycles():
    graph = import_graph()
    stale = [" -> ".join(cycle) for cycle in KNOWN_CYCLES
             if not all(cycle[(i + 1) % len(cycle)] in graph.get(cycle[i], ()) for i in range(len(cycle)))]
    assert not stale, "no longer cycles: remove them from KNOWN_CYCLES:\n  " + "\n  ".join(stale)


def test_the_check_finds_a_cycle_through_a_function_level_import():
    sources = {
        "glmport.a": "from glmport.b import thing\n",
        "glmport.b": "from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from glmport.a import Other\n"
                     "def f():\n    from glmport import c\n",
        "glmport.c": "import glmport.a as a\n",
    }
    known = set(sources) | {"glmport"}
    graph = {module: set().union(*(_imported(module, False, node, known) for node in _import_nodes(ast.parse(text))))
             for module, text in sources.items()}
    assert graph["glmport.b"] == {"glmport.c"}, "the TYPE_CHECKING import must not count"
    assert cycles_in(graph) == [
        "glmport.a -> glmport.b -> glmport.c -> glmport.a   (all of: glmport.a, glmport.b, glmport.c)"
    ]
    assert cycles_in(graph, allowed=(("glmport.a", "glmport.b", "glmport.c"),)) == []


def test_imports_resolve_like_python():
    known = {"glmport", "glmport.patches", "glmport.patches.int32", "glmport.patches.compat", "glmport.cli"}
    (node,) = ast.parse("from .int32 import narrow\n").body
    assert _imported("glmport.patches.compat", False, node, known) == {"glmport.patches.int32"}
    (node,) = ast.parse("from . import int32\n").body
    assert _imported("glmport.patches", True, node, known) == {"glmport.patches.int32"}
    (node,) = ast.parse("from glmport.patches.int32 import narrow\n").body  # runs glmport/patches/__init__ too
    assert _imported("glmport.cli", True, node, known) == {"glmport.patches.int32", "glmport.patches"}
