"""The import graph keeps DESIGN.md's layering (read from the source, so an
import inside a function counts as much as one at the top):

- no cycle among the library's modules;
- each module imports only its own layer or those below it (`LAYERS`);
- the library never imports train/, eval/ or bench/; eval never imports
  train (train uses eval's generator and prompts; never the reverse);
- no module uses another module's private (`_name`) names.

Each rule is also checked against a deliberately broken graph, so the test
can fail.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("flax_adapters", "train", "eval", "bench")

# Layers from the bottom; a module's layer is its longest matching prefix.
LAYERS = [
    ("flax_adapters.quant.array", "flax_adapters.quant.codes", "flax_adapters.quant",
     "flax_adapters.tree", "flax_adapters.activations", "flax_adapters.sharding",
     "flax_adapters.runtime"),
    ("flax_adapters.adapters",),
    ("flax_adapters.models",),
    ("flax_adapters.api", "flax_adapters.quant.params", "flax_adapters.step",
     "flax_adapters.generate"),
    ("flax_adapters.checkpoints",),
    ("flax_adapters",),  # the package's face, flax_adapters/__init__.py
    ("eval",),
    ("train",),
    ("bench",),
]


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _resolve(src: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = src.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a `from pkg import mod`
    counts as importing pkg.mod; `from mod import name` as importing mod)."""
    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(m, node, path.name == "__init__.py")
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in mods else base)
            for t in targets:
                t = ours(t)
                if t is not None and t != m:
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]], nodes: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v] & nodes):
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
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{name} is in no layer of LAYERS")
    return rank


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
            for a in sorted(edges) for b in sorted(edges[a]) if layer(b) > layer(a)]


def private_uses(mods: dict[str, pathlib.Path]) -> list[str]:
    """`from x import _y` and `alias._y` of another module of ours."""
    found = []
    for m, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(m, node, path.name == "__init__.py")
                if base.split(".")[0] not in PACKAGES:
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{m}: from {base} import {a.name}")
                    if f"{base}.{a.name}" in mods:
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        aliases.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{m}: {node.value.id}.{node.attr}")
    return found


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, imports(mods)


def test_no_cycle_in_the_library(graph):
    mods, edges = graph
    assert cycles(edges, {m for m in mods if m.startswith("flax_adapters")}) == []


def test_each_module_imports_only_its_layer_or_below(graph):
    _, edges = graph
    assert layer_violations(edges) == []


def test_library_and_eval_never_import_the_entry_points_above_them(graph):
    _, edges = graph
    for a, targets in edges.items():
        top = a.split(".")[0]
        for b in targets:
            assert not (top == "flax_adapters" and b.split(".")[0] != "flax_adapters"), (a, b)
            assert not (top == "eval" and b.split(".")[0] in ("train", "bench")), (a, b)
    assert any(b.startswith("eval.") for b in edges["train.loop"])  # train uses eval's generator


def test_no_private_name_is_used_outside_its_module(graph):
    mods, _ = graph
    assert private_uses(mods) == []


def test_the_checks_fail_on_a_broken_graph(graph, tmp_path):
    """Mutation controls: a lazy import that closes a cycle, an import up a
    layer, and a private name used across modules are each caught."""
    mods, edges = graph
    broken = {m: set(t) for m, t in edges.items()}
    broken["flax_adapters.adapters.registry"].add("flax_adapters.checkpoints.adapter")
    assert ["flax_adapters.adapters.registry", "flax_adapters.checkpoints.adapter"] in [
        [m for m in c if m in ("flax_adapters.adapters.registry",
                               "flax_adapters.checkpoints.adapter")]
        for c in cycles(broken, {m for m in mods if m.startswith("flax_adapters")})]
    assert any(v.startswith("flax_adapters.adapters.registry ")
               for v in layer_violations(broken))
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from flax_adapters.checkpoints.adapter import save_adapter\n"
                    "    from train import loop\n    return loop._truncate_metrics\n")
    fake = {**mods, "flax_adapters.adapters.fake": lazy}
    fake_edges = imports(fake)
    assert "flax_adapters.checkpoints.adapter" in fake_edges["flax_adapters.adapters.fake"]
    assert "train.loop" in fake_edges["flax_adapters.adapters.fake"]
    assert "flax_adapters.adapters.fake: loop._truncate_metrics" in private_uses(fake)
