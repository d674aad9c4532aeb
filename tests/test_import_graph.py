"""No import cycles between kvcomp's modules, counting imports inside functions too (ast, no import runs)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = Path(REPO) / "kvcomp"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and name.startswith("kvcomp"):
                    graph[mod].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _packages(graph: dict[str, set[str]], names: tuple[str, ...]) -> dict[str, set[str]]:
    def pkg(m: str) -> str | None:
        return next((p for p in names if m == p or m.startswith(p + ".")), None)

    out: dict[str, set[str]] = {p: set() for p in names}
    for m, deps in graph.items():
        a = pkg(m)
        for d in deps:
            b = pkg(d)
            if a and b and a != b:
                out[a].add(b)
    return out


def test_no_cycle_between_cache_kernels_and_model_packages() -> None:
    graph = _packages(_graph(), ("kvcomp.cache", "kvcomp.kernels", "kvcomp.model"))
    assert _cycle(graph) is None, _cycle(graph)
    assert not graph["kvcomp.kernels"], f"kernels import {graph['kvcomp.kernels']}: they read blocks duck-typed"


def test_no_module_cycle_in_cache_kernels_and_model() -> None:
    full = _graph()
    sub = {m: {d for d in deps if d.startswith(("kvcomp.cache", "kvcomp.kernels", "kvcomp.model"))}
           for m, deps in full.items() if m.startswith(("kvcomp.cache", "kvcomp.kernels", "kvcomp.model"))}
    # a package's __init__ re-exporting its own modules is not a cycle
    for m in sub:
        sub[m] = {d for d in sub[m] if not (d in sub and m.startswith(d + ".") and d.count(".") == 1)}
    assert _cycle(sub) is None, _cycle(sub)
