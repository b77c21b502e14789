"""The imports among cure_hub's modules, and every circle they close (docs/architecture.md).

Reads the source (top-level imports and those inside functions alike) and runs nothing of it:

    python benchmarks/import_graph.py          # every module's arrows, then the circles
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cure_hub"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (dotted names relative to the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        home = list(parts[:-1])  # the package the module's relative imports start from
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(home[: len(home) - (node.level - 1)] + ([node.module] if node.module else []))
                targets |= {f"{base}.{alias.name}".strip(".") for alias in node.names} if node.module is None else {base}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name):
                targets.add(node.module.removeprefix(package.name).strip("."))
        modules[name] = targets
    return {name: {t for t in targets if t in modules and t != name} for name, targets in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or around a circle (Tarjan's strongly
    connected components of more than one module)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in graph:
        if module not in index:
            visit(module)
    return groups


def main() -> int:
    graph = import_graph()
    for module, targets in sorted(graph.items()):
        print(f"{module or '(package)'} -> {', '.join(sorted(targets)) or '-'}")
    cycles = import_cycles(graph)
    print("\n".join(f"circle: {' <-> '.join(sorted(group))}" for group in cycles) or "no circles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
