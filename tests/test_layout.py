"""The package's layering, read from the source with ``ast`` (nothing is imported): no import cycles between modules,
and every import goes to the importer's own subpackage or to a lower layer.

Layers: config (0) < data (1) < split (2) < evaluation, flower, export (3; none imports another) < study (4: runs
and reports over many runs) < cli, __main__ (5).
``cli`` is imported by ``__main__`` only. Imports inside functions and under ``TYPE_CHECKING`` count like any other.
The helpers are checked first on hand-written packages and graphs whose answer is known.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "collafuse"

# The first name below ``collafuse`` -> (layer, group). A module may import its own group or a lower layer.
LAYERS = {
    "": (0, "root"),  # collafuse/__init__.py
    "config": (0, "config"),
    "data": (1, "data"),
    "split": (2, "split"),
    "evaluation": (3, "evaluation"),
    "flower": (3, "flower"),
    "export": (3, "export"),  # diffusers folders of trained runs, and the pipeline that samples them
    "study": (4, "study"),
    "cli": (5, "entry"),
    "__main__": (5, "entry"),
}
ONLY_IMPORTED_BY = {f"{PACKAGE}.cli": {f"{PACKAGE}.__main__"}}


# -- the helpers ------------------------------------------------------------------------------------------------------


def find_modules(src: Path, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every ``.py`` file below ``src/package``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name that ``from <level dots><target> import ...`` in ``module`` refers to."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(base) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package (level {level})")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, is_package: bool, known: set[str], package: str = PACKAGE) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file (also inside functions).

    ``from X import name`` counts as importing ``X.name`` when that is a module, else ``X``; ``import X.Y`` as X.Y.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, is_package, node.level, node.module)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name == package or name.startswith(package + "."):
                if name not in known:
                    raise ValueError(f"{module} imports {name}, which is not a module of {package}")
                found.add(name)
    found.discard(module)
    return found


def import_graph(src: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = find_modules(src, package)
    known = set(modules)
    return {m: imports_of(m, path, is_pkg, known, package) for m, (path, is_pkg) in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:
        members = set(comp)
        start = min(comp)
        if len(comp) == 1 and start not in graph.get(start, ()):
            continue
        # a shortest way back to start inside the component (breadth first)
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start])
    return sorted(cycles)


def layer_of(module: str, package: str = PACKAGE) -> tuple[int, str]:
    rest = module[len(package) + 1:] if module != package else ""
    top = rest.split(".")[0]
    if top not in LAYERS:
        raise KeyError(f"{module} has no layer: add '{top}' to LAYERS in tests/test_layout.py")
    return LAYERS[top]


def layer_violations(graph: dict[str, set[str]], package: str = PACKAGE) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for every import that breaks the layering."""
    out = []
    for importer in sorted(graph):
        lo, group = layer_of(importer, package)
        for imported in sorted(graph[importer]):
            li, igroup = layer_of(imported, package)
            allowed = ONLY_IMPORTED_BY.get(imported)
            if allowed is not None and importer not in allowed:
                out.append((importer, imported, f"{imported} may be imported only by {', '.join(sorted(allowed))}"))
            elif igroup != group and li >= lo:
                out.append((importer, imported, f"layer {lo} ({group}) imports layer {li} ({igroup})"))
    return out


def show_cycles(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(c) for c in cycles)


def show_violations(violations: list[tuple[str, str, str]]) -> str:
    return "\n".join(f"{a} imports {b}: {why}" for a, b, why in violations)


# -- the helpers on inputs whose answer is known ----------------------------------------------------------------------


def test_imports_are_resolved_relative_absolute_and_inside_functions(tmp_path):
    files = {
        "__init__.py": "",
        "config.py": "import json\n",
        "data/__init__.py": "",
        "data/common.py": "from ..config import X\n",
        "data/idx.py": "from .common import DataError\nfrom . import common as c\n",
        "split/__init__.py": "",
        "split/client.py": ("import collafuse.data.idx as idx\nfrom collafuse.split import server\n"
                            "def f():\n    from ..data import idx, common\n    from .. import config\n"),
        "split/server.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .client import Client\n",
    }
    for name, text in files.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text)
    assert import_graph(tmp_path) == {
        "collafuse": set(),
        "collafuse.config": set(),
        "collafuse.data": set(),
        "collafuse.data.common": {"collafuse.config"},
        "collafuse.data.idx": {"collafuse.data.common"},
        "collafuse.split": set(),
        "collafuse.split.client": {"collafuse.data.idx", "collafuse.data.common", "collafuse.split.server",
                                   "collafuse.config"},
        "collafuse.split.server": {"collafuse.split.client"},
    }
    assert resolve("collafuse.data", True, 1, "idx") == "collafuse.data.idx"  # in a package's __init__
    assert resolve("collafuse.data.idx", False, 2, None) == "collafuse"
    with pytest.raises(ValueError, match="beyond the top-level package"):
        resolve("collafuse.data.idx", False, 3, "x")


def test_cycles_are_found_and_named():
    g = {
        "collafuse.split.a": {"collafuse.split.b", "collafuse.config"},
        "collafuse.split.b": {"collafuse.split.c"},
        "collafuse.split.c": {"collafuse.split.a", "collafuse.data.x"},
        "collafuse.data.x": {"collafuse.data.y"},
        "collafuse.data.y": {"collafuse.data.x"},
        "collafuse.config": set(),
        "collafuse.data.self": {"collafuse.data.self"},
    }
    assert find_cycles(g) == [
        ["collafuse.data.self", "collafuse.data.self"],
        ["collafuse.data.x", "collafuse.data.y", "collafuse.data.x"],
        ["collafuse.split.a", "collafuse.split.b", "collafuse.split.c", "collafuse.split.a"],
    ]
    assert show_cycles(find_cycles({"a": {"b"}, "b": {"a"}})) == "a -> b -> a"
    # a diamond is not a cycle
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []


def test_layer_violations_are_found_and_named():
    g = {
        "collafuse": set(),
        "collafuse.config": {"collafuse.data.common"},  # 0 -> 1
        "collafuse.data.common": set(),
        "collafuse.data.partition": {"collafuse.data.common", "collafuse.config", "collafuse.split.runner"},  # 1 -> 2
        "collafuse.split.client": {"collafuse.evaluation.accounting", "collafuse.data.partition", "collafuse"},
        "collafuse.split.runner": {"collafuse.split.client"},
        "collafuse.evaluation.accounting": {"collafuse.split.client"},
        "collafuse.evaluation.report": {"collafuse.flower.task"},  # same layer, other group
        "collafuse.flower.task": {"collafuse.evaluation.report", "collafuse.cli", "collafuse.split.runner"},
        "collafuse.cli": {"collafuse.evaluation.report", "collafuse.flower.task", "collafuse.config"},
        "collafuse.__main__": {"collafuse.cli"},
    }
    assert [(a, b) for a, b, _ in layer_violations(g)] == [
        ("collafuse.config", "collafuse.data.common"),
        ("collafuse.data.partition", "collafuse.split.runner"),
        ("collafuse.evaluation.report", "collafuse.flower.task"),
        ("collafuse.flower.task", "collafuse.cli"),
        ("collafuse.flower.task", "collafuse.evaluation.report"),
        ("collafuse.split.client", "collafuse.evaluation.accounting"),
    ]
    text = show_violations(layer_violations(g))
    assert "collafuse.split.client imports collafuse.evaluation.accounting: layer 2 (split) imports layer 3" in text
    assert ("collafuse.flower.task imports collafuse.cli: collafuse.cli may be imported only by collafuse.__main__"
            in text)
    with pytest.raises(KeyError, match="add 'plugins' to LAYERS"):
        layer_violations({"collafuse.plugins.x": set()})


# -- the real package -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    return import_graph(SRC)


def test_the_graph_is_the_real_package(graph):
    # a parser that silently found nothing would pass everything below
    assert {"collafuse.cli", "collafuse.config", "collafuse.split.client", "collafuse.data.sources",
            "collafuse.evaluation.evaluate", "collafuse.flower.task"} <= set(graph)
    client = graph["collafuse.split.client"]
    assert {"collafuse.split.upload", "collafuse.data.partition", "collafuse.split.fedavg"} <= client
    assert "collafuse.study.sweep" in graph["collafuse.cli"]  # imported inside a function
    assert sum(len(v) for v in graph.values()) > 100


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles: {show_cycles(cycles)}"


def test_every_import_respects_the_layers(graph):
    violations = layer_violations(graph)
    assert not violations, f"imports that break the layering:\n{show_violations(violations)}"
