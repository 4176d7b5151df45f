"""Print skipgpt's import graph health: module cycles, upward imports from the core, and
imports of private names across modules (the layering that `lint-imports` enforces in CI).

    python3 scripts/import_graph.py          # counts and the offending edges
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp

# the layers of pyproject.toml's import contract, lowest first (a module not listed is core)
LAYERS = (
    ("skipgpt.eval",),
    ("skipgpt.train",),
    ("skipgpt.baselines", "skipgpt.serving"),
    ("skipgpt.experiments",),
    ("skipgpt.commands",),
    ("skipgpt.cli", "skipgpt.__main__"),
)


def tier(module: str) -> int:
    """0 for the core, then 1.. by the layers above."""
    return next((i + 1 for i, names in enumerate(LAYERS) if module.startswith(names)), 0)


def strongly_connected(graph: grimp.ImportGraph, modules: list[str]) -> list[list[str]]:
    """Tarjan's SCCs of the module graph (function-level imports included), size > 1."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    return out


def private_imports(src: Path) -> list[str]:
    """``from skipgpt.x import _name`` (or relative) where the importer is another module."""
    found = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("skipgpt")):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(src.parent)}: {node.module} -> {alias.name}")
    return found


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    graph = grimp.build_graph("skipgpt")
    modules = sorted(m for m in graph.modules if m.startswith("skipgpt"))
    cycles = strongly_connected(graph, modules)
    upward = [
        (a, b)
        for a in modules
        for b in graph.find_modules_directly_imported_by(a)
        if b.startswith("skipgpt") and tier(b) > tier(a)
    ]
    private = private_imports(root / "src" / "skipgpt") + private_imports(root / "benchmarks")
    print(
        f"modules: {len(modules)}  import edges: {sum(len(graph.find_modules_directly_imported_by(m)) for m in modules)}"
    )
    print(f"cycles (strongly connected groups of modules): {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print(f"upward imports (a module importing from a layer above its own): {len(upward)}")
    for a, b in sorted(upward):
        print(f"  {a} -> {b}")
    print(f"private names imported from another module: {len(private)}")
    for p in private:
        print("  " + p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
