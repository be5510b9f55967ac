"""The package's layering, checked on its import graph: imports run only downwards, and there are no circles.

Every ``import`` in ``mmclin/`` counts, including the lazy ones inside functions: a lazy import is
still a dependency. Layers, top to bottom (ARCHITECTURE.md):

    interfaces   mmclin (the public API), mmclin.interfaces.*
    evaluation   mmclin.evaluation.*, mmclin.explain.*, mmclin.testing.*
    training     mmclin.training.*
    components   mmclin.encoders.*, mmclin.fusion.*, mmclin.tasks.*
    data         mmclin.datasets.*, mmclin.wsi.*
    persistence  mmclin.persistence.*
    contracts    mmclin.registry, mmclin.config, mmclin.cohort, mmclin.batch
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mmclin"
LAYERS = [  # (layer, module prefixes), lowest first
    ("contracts", ("mmclin.registry", "mmclin.config", "mmclin.cohort", "mmclin.batch")),
    ("persistence", ("mmclin.persistence",)),
    ("data", ("mmclin.datasets", "mmclin.wsi")),
    ("components", ("mmclin.encoders", "mmclin.fusion", "mmclin.tasks")),
    ("training", ("mmclin.training",)),
    ("evaluation", ("mmclin.evaluation", "mmclin.explain", "mmclin.testing")),
    ("interfaces", ("mmclin.interfaces", "mmclin._compat")),
]
# The registries' own pattern: creating a component by name first imports the packages that register them.
REGISTRATION = {("mmclin.registry", "mmclin.encoders"), ("mmclin.registry", "mmclin.fusion"),
                ("mmclin.registry", "mmclin.tasks")}
# 0.1 names kept working through mmclin._compat (CHANGELOG.md): a lazy re-export, not a dependency.
COMPAT = {("mmclin.datasets", "mmclin._compat")}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer_of(module: str) -> int:
    if module == "mmclin":
        return len(LAYERS) - 1
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS in tests/test_layers.py "
                         "and to ARCHITECTURE.md's layout")


def imports(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the mmclin modules it imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and t.split(".")[0] == "mmclin":
                    found.add(t)
        graph[name] = found
    return graph


def _allowed(src: str, dst: str) -> bool:
    pairs = REGISTRATION | COMPAT
    return any((src == a or src.startswith(a + ".")) and (dst == b or dst.startswith(b + ".")) for a, b in pairs)


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_runs_upwards():
    graph = imports(modules())
    upward = sorted(f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
                    for src, dsts in graph.items() for dst in dsts
                    if layer_of(dst) > layer_of(src) and not _allowed(src, dst))
    assert not upward, "imports that run from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    """No strongly connected set of modules, except a package's ``__init__`` importing its members (and those
    members importing siblings through the package), and the registration pattern."""
    mods = modules()
    graph = {s: {d for d in ds if not _allowed(s, d) and not (mods[d].name == "__init__.py" and s.startswith(d + "."))}
             for s, ds in imports(mods).items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a core module that imports an interface is reported."""
    fake = dict(modules())
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mmclin.interfaces.experiment import Experiment\n")
    fake["mmclin.training.bad"] = bad
    graph = imports(fake)
    assert "mmclin.interfaces.experiment" in graph["mmclin.training.bad"]
    assert layer_of("mmclin.interfaces.experiment") > layer_of("mmclin.training.bad")


@pytest.mark.parametrize("name", sorted(n for n in modules() if not n.rsplit(".", 1)[-1].startswith("_")))
def test_every_public_module_says_what_it_is_for(name):
    path = modules()[name]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.strip(), f"{path} has no module docstring: open it with one sentence saying what it is for"
    first = doc.strip().split("\n\n")[0]
    assert first.rstrip().endswith((".", ":", ")")) or len(first) > 20, f"{path}: the docstring's first line should be a sentence"
