"""The import graph of the ``kvcomp`` package, read from the source (nothing imported).

    python -m tools.import_graph            # cycles among kvcomp's modules (none: exit 0)
    python -m tools.import_graph --mermaid  # the package diagram in docs/architecture.md

Every import counts, also one inside a function (a lazy import hides a cycle, it does not break it); only
imports under ``if TYPE_CHECKING:`` are left out (they never run). ``from pkg import name`` depends on the
submodule ``pkg.name`` where one exists, else on ``pkg`` itself (its ``__init__``).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kvcomp"
#: the diagram's nodes: kvcomp's subpackages and top-level modules, grouped into the layers of the package
LAYERS = {
    "entry points": ["api", "experiment", "engine", "generation", "sidebyside"],
    "a run's config": ["plan", "registry", "fields", "errors", "metrics", "stats", "envinfo", "interrupt"],
    "one prompt": ["session", "fidelity", "profiler", "masks"],
    "components": ["compressor", "quantizer", "scorer", "propagator", "task", "logger", "sweep"],
    "storage and kernels": ["cache", "kernels", "model", "data", "selfcheck"],
}


#: nodes nearly every module imports (their arrows would drown the rest): drawn without them
QUIET = ("errors",)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root``."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def walk(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            yield child
            yield from walk(child)

    for node in walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(base)
    return {m for m in out if m in mods and m != name}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the kvcomp modules it imports."""
    mods = modules(root)
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(g) + 100))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def package_edges(g: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges between the diagram's nodes (``kvcomp.<first part>``), self-loops left out."""
    def node(m: str) -> str | None:
        parts = m.split(".")
        return parts[1] if len(parts) > 1 else None

    edges = set()
    for m, deps in g.items():
        a = node(m)
        for d in deps:
            b = node(d)
            if a and b and a != b and b not in QUIET:
                edges.add((a, b))
    return edges


def mermaid(g: dict[str, set[str]] | None = None) -> str:
    """The package diagram: one box per subpackage / top-level module, grouped by layer, an arrow per import."""
    g = graph() if g is None else g
    edges = package_edges(g)
    nodes = {n for e in edges for n in e} | {m.split(".")[1] for m in g if "." in m}
    placed = {n for names in LAYERS.values() for n in names}
    lines = ["```mermaid", "flowchart TD"]
    for title, names in LAYERS.items():
        sid = title.replace(" ", "_").replace("'", "")
        lines.append(f'  subgraph {sid}["{title}"]')
        lines += [f"    {n}" for n in names if n in nodes]
        lines.append("  end")
    lines += [f"  {n}" for n in sorted(nodes - placed)]
    lines += [f"  {a} --> {b}" for a, b in sorted(edges)]
    lines.append("```")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    g = graph()
    if "--mermaid" in argv:
        print(mermaid(g))
        return 0
    found = cycles(g)
    for c in found:
        print("import cycle: " + " <-> ".join(c))
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, {len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
