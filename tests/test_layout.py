"""The package's dependency rule (bnexplore/__init__.py), kept by walking its imports.

Every ``import`` and ``from … import`` of a bnexplore module is read from the source
(those under ``if TYPE_CHECKING:`` are not run, and are skipped), including the ones
inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnexplore"

LAYERS = {
    "settings": 0,
    "engines.registry": 0,
    "files": 1,
    "scenario": 2,
    "engines": 3,
    "runs": 4,
    "judge": 5,
    "porting": 6,
    "page": 7,
    "tools": 9,
    "": 9,  # the package itself: the public API at its edge, beside the tools
    "__main__": 9,
}
"""Each room's height: a module imports only from its own room or lower ones."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The room a module lives in: 'runs', 'engines.registry', or '' for the package."""
    inner = module.removeprefix("bnexplore").removeprefix(".")
    if inner in LAYERS:
        return inner
    return inner.split(".")[0]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The bnexplore modules a file imports (a name imported from a package counts as
    that submodule when it is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bnexplore")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not node.module.startswith("bnexplore"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, known) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_lives_in_a_room() -> None:
    homeless = [m for m in modules() if room(m) not in LAYERS]
    assert homeless == []


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_no_import_against_the_dependency_rule() -> None:
    against = [
        f"{module} ({room(module) or 'bnexplore'}) imports {target} ({room(target)})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if LAYERS[room(target)] > LAYERS[room(module)]
    ]
    assert against == []


def test_nothing_but_the_tools_and_the_edge_imports_the_page() -> None:
    importers = {
        module
        for module, targets in graph().items()
        if any(room(t) == "page" for t in targets) and room(module) != "page"
    }
    assert {room(m) for m in importers} <= {"tools", ""}, importers


def test_the_walk_finds_a_circle_and_an_upward_import() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert LAYERS[room("bnexplore.page.view")] > LAYERS[room("bnexplore.runs.runner")]
    assert room("bnexplore.engines.registry") == "engines.registry"
    assert room("bnexplore") == ""
