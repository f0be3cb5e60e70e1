"""The package's layout: imports flow one way (parser → lang → ir → passes → backends/lowering/train).

Read from the source (every ``import`` and ``from … import``, lazy ones inside functions included), so a
cycle or a backward import fails here before anyone meets it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "cnds_compiler"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of cnds_compiler that ``path`` imports (resolved, submodules named where given)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cnds_compiler"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("cnds_compiler"):
                continue
            for alias in node.names:  # `from . import ast` names a module; `from .ir import Node` does not
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return {m for m in found if m != module}


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    graph = _graph()
    packages = {m for m in graph if (ROOT / Path(*m.split(".")) / "__init__.py").exists()}
    # a package's __init__ re-exporting its own modules is not a cycle of the layout
    edges = {m: {t for t in ts if t in graph and not (m in packages and t.startswith(m + "."))}
             for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t):] + [m, t] if t in stack else [m, t])
                return True
            if state.get(t) is None and visit(t, stack + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(edges):
        if state.get(m) is None and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_stages_import_downstream_only():
    graph = _graph()
    lowering = {t for m, ts in graph.items() if m.startswith("cnds_compiler.lowering") for t in ts}
    assert not {t for t in lowering if t.startswith("cnds_compiler.train")}, "lowering reaches into train/"
    checking = ("cnds_compiler.parser", "cnds_compiler.lang", "cnds_compiler.ir", "cnds_compiler.passes",
                "cnds_compiler.serialize")
    for m, ts in graph.items():
        if m.startswith(checking):
            later = {t for t in ts if t.startswith(("cnds_compiler.backends", "cnds_compiler.train",
                                                    "cnds_compiler.lowering", "cnds_compiler.probe"))}
            assert not later, f"{m} imports a later stage: {sorted(later)}"
