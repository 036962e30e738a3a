"""The layout rules that keep the daemon easy to extend, checked on the source (ast, no import).

- No import cycle inside `daemon/`, counting imports under TYPE_CHECKING too.
- Only the composition root (daemon.compose) and the task tree (daemon.app) know every part:
  reporters (daemon.status, daemon.systemd) import neither.
- The commands that must start fast import no heavy stack at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "daemon"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(daemon modules imported anywhere in the file, top-level third-party imports)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("daemon"):
                ours.add(module)
                for alias in node.names:  # `from . import db` imports daemon.db
                    candidate = f"{module}.{alias.name}"
                    if _exists(candidate):
                        ours.add(candidate)
        elif isinstance(node, ast.Import):
            ours.update(a.name for a in node.names if a.name.startswith("daemon"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            top.add(node.module.split(".")[0])
    return {m for m in ours if _exists(m) and m != name}, top


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p)[0] for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles_counting_type_checking() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            # a package's __init__ re-exporting its own modules is not a cycle
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_reporters_never_see_the_composition() -> None:
    graph = _graph()
    reporters = [m for m in graph if m.startswith("daemon.status") or m == "daemon.systemd"]
    assert reporters
    for module in reporters:
        assert not graph[module] & {"daemon.compose", "daemon.app", "daemon.scheduler"}, module


def test_fast_commands_load_no_heavy_stack_at_import() -> None:
    heavy = {"trio", "httpx", "psycopg", "prometheus_client", "loguru", "msgspec", "h11"}
    for name in ("__main__.py", "config.py", "errors.py", "timeframes.py"):
        _, top = _imports(PACKAGE / name)
        assert not top & heavy, (name, top & heavy)
