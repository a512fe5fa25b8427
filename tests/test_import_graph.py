"""No module of vllm_layered reaches back up the stack: the package's imports form a graph without cycles.

The imports are read with ``ast``, not run. Every import of one of our modules counts: at module level, under
``if TYPE_CHECKING:`` and inside functions. A lazy import that closes a cycle is one for a reader too, even
where Python resolves it, so there is no allow-list: a new cycle is fixed by moving code, not by listing it.
``from package import name`` is an import of ``package.name`` where that is a module, else of the package
itself (its ``__init__``). Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__`` first; those
implied imports are not counted (a module reaching a sibling through its package's path is not reaching up).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vllm_layered"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line of the import
    lazy: bool  # inside a function

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}{' (inside a function)' if self.lazy else ''}"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``root`` by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import of one module of ``package`` by another."""
    known = modules(root, package)
    edges = []
    for name, path in known.items():
        for node, lazy in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, name, path.name == "__init__.py", known, package):
                if target != name:
                    edges.append(Edge(name, target, f"{path.relative_to(root)}:{node.lineno}", lazy))
    return edges


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    def visit(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            yield from visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    return visit(tree, False)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path], package: str
) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    if source != package and not source.startswith(package + "."):
        return []
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (the imports that close it) for each group of modules that import each other."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
    return [_cycle_through(min(group), graph, group) for group in _strongly_connected(graph) if len(group) > 1]


def _strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules from each of which every other of the group is reachable."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _cycle_through(start: str, graph: dict[str, dict[str, Edge]], group: set[str]) -> list[Edge]:
    """The shortest cycle from ``start`` back to it within ``group`` (breadth first)."""
    reached_by: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target, edge in sorted(graph.get(node, {}).items()):
            if target == start:
                cycle = [edge]
                while cycle[0].source != start:
                    cycle.insert(0, reached_by[cycle[0].source])
                return cycle
            if target in group and target not in reached_by:
                reached_by[target] = edge
                queue.append(target)
    raise AssertionError(f"{sorted(group)} holds no cycle through {start}")


def describe(cycle: list[Edge]) -> str:
    names = " -> ".join([cycle[0].source, *(edge.target for edge in cycle)])
    return "\n".join([f"import cycle: {names}", *(f"  {edge}" for edge in cycle)])


def test_vllm_layered_has_no_import_cycles():
    edges = import_edges(ROOT, PACKAGE)
    # the walk sees imports at module level and inside functions (else an empty graph would pass)
    assert any(e.target == "vllm_layered.model_executor.denoise" and not e.lazy
               and e.source == "vllm_layered.model_executor.pipeline" for e in edges)
    assert any(e.target == "vllm_layered.serving.redis_store" and e.lazy
               and e.source == "vllm_layered.serving.launcher" for e in edges)
    cycles = find_cycles(edges)
    assert not cycles, "\n\n".join(describe(cycle) for cycle in cycles)


def test_a_cycle_is_found_and_named(tmp_path):
    """A lazy import back up the stack closes a cycle, and the message names every import of it."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.low import helper\n")
    (package / "top.py").write_text("from pkg.sub import low\nimport pkg.side\n")
    (package / "side.py").write_text("import os\n")
    (package / "sub" / "low.py").write_text("def helper():\n    from .. import top\n    return top\n")
    edges = import_edges(tmp_path, "pkg")
    assert {(e.source, e.target, e.lazy) for e in edges} == {
        ("pkg.sub", "pkg.sub.low", False),
        ("pkg.top", "pkg.sub.low", False),
        ("pkg.top", "pkg.side", False),
        ("pkg.sub.low", "pkg.top", True),
    }
    (cycle,) = find_cycles(edges)
    message = describe(cycle)
    assert message.startswith("import cycle: pkg.sub.low -> pkg.top -> pkg.sub.low")
    assert "pkg/sub/low.py:2: pkg.sub.low imports pkg.top (inside a function)" in message
    assert "pkg/top.py:1: pkg.top imports pkg.sub.low" in message


def test_every_folder_of_the_package_is_a_regular_package():
    """A folder without __init__.py ships only as a namespace package, if the build happens to include it."""
    folders = {path.parent for path in (ROOT / PACKAGE).rglob("*.py")}
    missing = sorted(str(folder.relative_to(ROOT)) for folder in folders if not (folder / "__init__.py").is_file())
    assert not missing, f"no __init__.py in {missing}"
