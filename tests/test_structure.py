"""The house rules a test can hold: no import cycle, every module imports, the architecture diagram matches the
code, no internal work-item numbers in the tree, a short README."""

from __future__ import annotations

import importlib
import re
import subprocess

from conftest import REPO

from tools.import_graph import cycles, graph, mermaid, modules


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_imports() -> None:
    for name in modules():
        importlib.import_module(name)


def test_architecture_diagram_matches_the_code() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- import-graph:begin -->\n(.*)\n<!-- import-graph:end -->", text, re.S)
    assert block is not None, "docs/architecture.md lost its import-graph markers"
    assert block.group(1) == mermaid(), "regenerate it: python -m tools.import_graph --mermaid"


def test_no_work_item_numbers_in_the_tree() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"issues? ?#?[0-9]|issue[_-][0-9]", re.I)
    hits = []
    for f in files:
        path = REPO / f
        if not path.is_file() or path.suffix in (".png", ".db"):
            continue
        if pattern.search(f):
            hits.append(f)
        text = path.read_text(encoding="utf-8", errors="ignore")
        hits += [f"{f}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert hits == [], "name things by what they are: " + ", ".join(hits[:20])


def test_readme_is_short() -> None:
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines; details go to docs/"
