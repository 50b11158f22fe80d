"""No import cycles inside emlens: every import counts, at module level, inside functions or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import emlens

ROOT = Path(emlens.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The emlens modules ``path`` imports (``from emlens.x import y`` counts ``emlens.x.y`` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target in modules and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in files}
    edges = {module_name(p): imports_of(p, modules) for p in files}
    # importing a submodule runs its packages' __init__ first, but that is not a dependency of ours:
    # only count a package when it is imported by name
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def is_package_reexport(a: str, b: str) -> bool:
    """A package's ``__init__`` re-exporting its own submodule, which imports a sibling through the package."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycles():
    edges = graph()
    # a package importing its own submodules (to re-export them) is how packages work, not a cycle of concepts
    pruned = {a: {b for b in targets if not is_package_reexport(a, b)} for a, targets in edges.items()}
    cycle = find_cycle(pruned)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_plotting_imports_nothing_else_from_emlens():
    assert graph()["emlens.plotting"] == set()
