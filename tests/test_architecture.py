"""The package's layering: import-linter's contracts (pyproject.toml) hold, and no module of
src/medlens takes part in an import cycle, counting imports made inside functions too."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "medlens"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/medlens (packages by their name)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import target lives in (``medlens.core.engine.explain`` -> ``medlens.core.engine``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(path: Path, module: str, is_package: bool) -> set[str]:
    """Every ``medlens...`` name imported anywhere in the file, at any depth, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "medlens" or n.startswith("medlens.")}


def import_graph() -> dict[str, set[str]]:
    """module -> modules it imports (a package's imports of its own children left out: those
    are the package re-exporting its contents, not a dependency)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = {_resolve(n, modules) for n in _imported(path, module, is_package)}
        graph[module] = {t for t in targets if t and t != module and not (is_package and t.startswith(module + "."))}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def _is_root_face(component: list[str]) -> bool:
    """``medlens/__init__.py`` imports its subpackages to re-export them; a loop through the bare
    root package is that, not a real cycle (no subpackage imports ``medlens`` itself here)."""
    return "medlens" in component


def test_no_import_cycles_including_function_level_imports() -> None:
    graph = import_graph()
    assert "medlens.core.engine" in graph and len(graph) > 40
    real = [c for c in cycles(graph) if not _is_root_face(c)]
    assert real == [], f"import cycles: {real}"


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_imports_nothing_above_it_even_inside_functions() -> None:
    graph = import_graph()
    above = [(m, t) for m, ts in graph.items() if m.startswith("medlens.core") for t in ts
             if not (t.startswith("medlens.core") or t == "medlens.errors")]
    assert above == []


def test_metrics_import_no_method_and_no_private_helper() -> None:
    graph = import_graph()
    assert [(m, t) for m, ts in graph.items() if m.startswith("medlens.metrics") for t in ts if t.startswith("medlens.methods")] == []
    for module, path in _modules().items():
        if not module.startswith("medlens.metrics"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medlens."):
                assert not [a.name for a in node.names if a.name.startswith("_")], (module, node.module)


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    command = [str(lint)] if lint.exists() else [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command + ["--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
