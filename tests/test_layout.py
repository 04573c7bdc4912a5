"""The layout's one rule: imports flow one way. Each top-level unit of src/lmforge (a package
or a module) has a layer; a unit imports only units of lower layers (function-level imports
included: a cycle hidden in a function is still a cycle), and no two modules import each
other, however indirectly. A new unit must be placed here (and in the README's layout)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import lmforge

ROOT = Path(lmforge.__file__).parent

# Lowest first; the README's "Layout" section draws the same picture.
LAYERS: list[set[str]] = [
    {"files", "hardware", "hub", "dist"},
    {"config"},
    {"nn"},
    {"models"},
    {"tokenizer"},
    {"data"},
    {"train", "generate", "interop"},
    {"eval", "plan"},
    {"tasks", "pretrain", "inspection"},
    {"api"},
    {"__init__"},
    {"quickstart", "serve"},
    {"cli"},
    {"__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports() -> dict[str, set[str]]:
    """lmforge module -> the lmforge modules it imports (anywhere in it); `from pkg import sub`
    is an import of the submodule."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
                subs = {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
                graph[name] |= subs or {node.module}
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.startswith("lmforge")}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))}
    assert units - set(RANK) == set(), "place the new unit in LAYERS (and the README's layout)"


def test_imports_flow_down_the_layers():
    wrong = sorted(f"{a} -> {b}" for a, targets in _imports().items() for b in targets
                   if _unit(a) != _unit(b) and RANK[_unit(b)] >= RANK[_unit(a)])
    assert wrong == []


def test_no_module_imports_itself_back():
    graph = _imports()
    for modules in graph.values():
        modules.discard("lmforge")  # `import lmforge` for its version: the package root, checked by layer
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == [], "split these functions: " + ", ".join(long)
