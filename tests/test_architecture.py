"""The house rules, checked: no import circles (lazy imports count), layers that point one way, a lean core.

Every ``import`` and ``from ... import`` statement of the package is read with ``ast`` — at module level,
inside functions or under ``if TYPE_CHECKING`` alike — and resolved to the module it names (``from . import x``
names the submodule ``x`` when there is one, else the package). Importing a submodule runs its parents'
``__init__``; that implicit edge is not counted (it is how every package works).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (package prefix, folder): kernels/ and csrc/ are installed as zu_fast.kernels and zu_fast.csrc
SOURCES = (("zu_fast", ROOT / "zu_fast"), ("zu_fast.kernels", ROOT / "kernels"), ("zu_fast.csrc", ROOT / "csrc"))

# Layers, bottom to top: a module may import its own layer and the layers below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("zu_fast.errors", "zu_fast._version"),
    ("zu_fast.ops", "zu_fast.kernels", "zu_fast.csrc"),
    ("zu_fast.model", "zu_fast.atomic"),
    ("zu_fast.config", "zu_fast.requests", "zu_fast.metrics"),
    ("zu_fast.provenance",),
    ("zu_fast.edit", "zu_fast.stats"),
    ("zu_fast.method",),
    ("zu_fast", "zu_fast.unlearner", "zu_fast.compat", "zu_fast.eval"),
    ("zu_fast.cli",),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, folder in SOURCES:
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            parts = prefix.split(".") + [p for p in rel if p != "__init__"]
            mods[".".join(parts)] = path
    return mods


def _import_module_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else subs + [name]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif _import_module_call(node):  # importlib.import_module("zu_fast.x") counts too
                name = node.args[0].value
                targets = [package + name if name.startswith(".") else name]  # relative: to __package__
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import zu_fast.eval.tinylm.x` names the deepest known module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
    return edges


def _layer(mod: str) -> int:
    best, rank = -1, None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{mod} is in no layer of tests/test_architecture.py: place it"
    return rank


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_lazy_and_relative_imports():
    edges = _edges(_modules())
    # a lazy import inside a function counts (unlearn imports gd only when method="gd")
    assert "zu_fast.method.gd" in edges["zu_fast.method.unlearn"]
    # `from . import x` of a submodule names the submodule, `from .pkg import name` the package
    assert "zu_fast.provenance" in edges["zu_fast.edit"]
    assert "zu_fast.config" in edges["zu_fast.method.unlearn"]
    # an ops module reaches only errors, ops and the kernels (the layer just above errors)
    assert {e for m in edges if m.startswith("zu_fast.ops") for e in edges[m]} <= (
        {"zu_fast.errors"} | {m for m in edges if m.startswith(("zu_fast.ops", "zu_fast.kernels", "zu_fast.csrc"))})
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_circles():
    cycles = _cycles(_edges(_modules()))
    assert not cycles, "import circles (lazy imports count): " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_layers_point_one_way():
    edges = _edges(_modules())
    up = sorted(f"{a} → {b}" for a, bs in edges.items() for b in bs
                if b.startswith("zu_fast") and _layer(b) > _layer(a))
    assert not up, "modules reaching up a layer (see LAYERS): " + ", ".join(up)


def test_nothing_below_eval_imports_eval():
    edges = _edges(_modules())
    bad = sorted(f"{a} → {b}" for a, bs in edges.items() for b in bs
                 if b.startswith("zu_fast.eval") and not a.startswith(("zu_fast.eval", "zu_fast.cli")))
    assert not bad, "the core imports the offline benchmark: " + ", ".join(bad)


@pytest.mark.slow
def test_the_core_runs_without_importing_eval(tmp_path):
    """Importing zu_fast and calling collect_stats, unlearn, Edit.save/load/apply and Unlearner.forget on a
    tiny random model never imports zu_fast.eval (checked in a fresh interpreter)."""
    code = f"""
import sys, warnings
sys.path.insert(0, {str(Path(__file__).parent)!r})
warnings.simplefilter("ignore")
import zu_fast
from tiny_models import REQUESTS, corpus, llama
TEMPLATES = [["{{}}"], ["Because I. {{}}"]]
model, tok = llama()
cfg = zu_fast.UnlearnConfig(layers=[1, 2], v_num_grad_steps=2, progress=False)
stats = zu_fast.collect_stats(model, tok, corpus(16), cfg, cache=False)
edit = zu_fast.unlearn(model, tok, REQUESTS[:1], cfg, stats=stats, context_templates=TEMPLATES)
edit.save({str(tmp_path / 'edit')!r})
edit.restore()
zu_fast.Edit.load({str(tmp_path / 'edit')!r}).apply(model).restore()
res = zu_fast.Unlearner(model, tok, cfg, stats=stats).forget(requests=REQUESTS[:1])
res.edit.restore()
print(sorted(m for m in sys.modules if m.startswith("zu_fast.eval")))
"""
    env = {**os.environ, "ZU_FAST_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
