"""No import circles among the core's and the bundled plugins' modules; the core imports no plugin,
and no plugin family (a folder of plugins/) imports another's modules.

The graph is read from the source (``ast``), not by importing: an edge for every import statement,
at module level, deferred inside a function (a deferred import closes a circle just the same once
both functions run) or under ``if TYPE_CHECKING:`` (two modules that name each other's types are
one design knot even when only a type checker runs the imports).
``from package import name`` is an edge to ``package.name`` when that is a module. The implicit
import of a module's parent packages is not an edge: a package's ``__init__`` may import its own
submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"sglang_core": REPO / "sglang_core", "sglang_plugins": REPO / "plugins"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(tree: ast.Module, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The ``modules`` that the import statements of ``tree`` (the source of ``module``) import."""
    found: set[str] = set()

    def add(name: str) -> None:  # the longest known module that ``name`` starts with
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(nodes: list[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".")
                    package = package[:len(package) - node.level + (1 if is_package else 0)]
                    base = ".".join(package + ([base] if base else []))
                for alias in node.names:  # ``from package import submodule`` or ``from module import name``
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            visit(list(ast.iter_child_nodes(node)))

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {module: imported_modules(ast.parse(path.read_text()), module, path.name == "__init__.py", set(modules))
            for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_counts_deferred_and_type_checking_imports():
    sources = {
        "sglang_core.a": "import sglang_core.b.x\n",
        "sglang_core.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sglang_core.d\n"
                         "else:\n    from .. import c\n",
        "sglang_core.b.x": "def f():\n    from sglang_core.c import name\n",
        "sglang_core.c": "",
        "sglang_core.d": "",
    }
    graph = {m: imported_modules(ast.parse(text), m, m == "sglang_core.b", set(sources)) for m, text in sources.items()}
    assert graph == {"sglang_core.a": {"sglang_core.b.x"}, "sglang_core.b": {"sglang_core.c", "sglang_core.d"},
                     "sglang_core.b.x": {"sglang_core.c"}, "sglang_core.c": set(), "sglang_core.d": set()}
    assert find_cycle(graph) is None
    graph["sglang_core.c"] = {"sglang_core.a"}
    assert find_cycle(graph) == ["sglang_core.a", "sglang_core.b.x", "sglang_core.c", "sglang_core.a"]


def test_no_import_cycles():
    graph = import_graph()
    assert {"sglang_core.cli", "sglang_core.bench", "sglang_core.layers.attention",
            "sglang_plugins.frontends.openai.routes"} <= set(graph)
    assert "sglang_core.bench" in graph["sglang_core.cli"]  # imported inside build_parser: deferred imports count
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def plugin_family(module: str) -> str | None:
    """The bundled plugin family a module belongs to (``sglang_plugins.frontends.openai.routes``:
    ``frontends``); None for the core's modules."""
    package, _, rest = module.partition(".")
    return rest.partition(".")[0] if package == "sglang_plugins" else None


def test_plugins_meet_only_in_the_core():
    """What two plugins share is an interface of the core (a third-party plugin can use it
    without importing a plugin): no edge from the core into a plugin, or from one family of
    plugins into another's modules."""
    graph = import_graph()
    assert "sglang_core.server.partial_json" in graph["sglang_plugins.frontends.tool_calling"]
    crossings = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                       if plugin_family(target) not in (None, plugin_family(module)))
    assert crossings == []
