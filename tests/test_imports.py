"""The import graph of ``p2o_lightning`` and ``kernels/``: no module imports itself back through others.

Every ``import`` and ``from … import`` is counted, including those inside functions (a function-level import hides a
circle, it does not remove it). A name imported from a package that is a submodule counts as that submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# No circle is allowed: the last one (the launcher → the performance model → the AOT compiler → the catalog of
# launch spaces → the launcher) went with issue 19, the spaces now declared next to their kernels.
KNOWN: list[list[str]] = []


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package's __init__) of every module of ours, as installed."""
    out = {}
    for root, package in ((REPO / "p2o_lightning", "p2o_lightning"), (REPO / "kernels", "p2o_lightning.kernels")):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if package == "p2o_lightning" and rel.parts[0] == "kernels":  # the link to ../kernels
                continue
            parts = [p for p in rel.with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, (path, is_package) in mods.items():
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{node.module}" if node.module else anchor
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_circle():
    graph = import_graph()
    assert "p2o_lightning.kernels.functional" in graph and "p2o_lightning.tasks.world" in graph  # it sees both trees
    assert circles(graph) == KNOWN


def test_the_walk_finds_a_function_level_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert "p2o_lightning.plots" in import_graph()["p2o_lightning.outputs"]  # a module-level import is an edge
    assert "p2o_lightning.kernels.aot" in import_graph()["p2o_lightning.kernels.tuning"]  # so is a function-level one
