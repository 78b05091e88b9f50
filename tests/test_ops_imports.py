"""The ops layer's imports, read from the source (an AST walk, lazy imports inside functions included).

zu_fast/ops sits just above zu_fast.errors: an ops module imports only zu_fast.errors, other ops
modules and the kernels (zu_fast.kernels, the repository's kernels/), never the root package or
anything above. The kernels may use ops' reference helpers (argument checks, the rounding hash),
and that must not close a circle: the graph of these modules has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"zu_fast.ops": ROOT / "zu_fast" / "ops", "zu_fast.kernels": ROOT / "kernels", "zu_fast.csrc": ROOT / "csrc"}
ALLOWED = ("zu_fast.errors", "zu_fast.ops", "zu_fast.kernels")


def _modules() -> dict[str, Path]:
    mods = {"zu_fast.errors": ROOT / "zu_fast" / "errors.py"}
    for pkg, d in PACKAGES.items():
        for f in d.glob("*.py"):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every import in ``path``, at any depth; ``from X import
    y`` counts as importing X.y when that is a module, else X; importlib.import_module of a literal
    counts too."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = []

    def resolve(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(node.module, node.level)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            target = node.args[0].value
            level = len(target) - len(target.lstrip("."))
            out.append((resolve(target.lstrip(".") or None, level) if level else target, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, int]]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_ops_and_kernels_import_nothing_above_ops():
    bad = []
    for name, imports in _graph().items():
        for target, line in imports:
            if (target == "zu_fast" or target.startswith("zu_fast.")) and not target.startswith(ALLOWED):
                bad.append(f"{name}:{line} imports {target}")
    assert not bad, bad


def test_no_import_cycles_among_ops_and_kernels():
    graph = _graph()
    edges = {n: sorted({t for t, _ in imps if t in graph and t != n}) for n, imps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in edges[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in edges:
        if n not in state:
            visit(n)
    assert not cycles, cycles
    # the walk sees what it should: the lazy kernel imports and the kernels' use of ops helpers
    assert "zu_fast.kernels.multiplicative_update" in edges["zu_fast.ops.triton_backend"]
    assert "zu_fast.ops.multiplicative_update" in edges["zu_fast.kernels.multiplicative_update"]
    assert "zu_fast.ops.cov_accumulate" in edges["zu_fast.ops.multiplicative_update"]  # importlib.import_module


def test_a_root_import_would_be_caught(tmp_path):
    """The check itself: `from zu_fast import _C` (what cuda_backend did) is an import of the root."""
    f = tmp_path / "x.py"
    f.write_text("def load():\n    from zu_fast import _C\n    import zu_fast.csrc as pkg\n")
    got = [t for t, _ in _imports("zu_fast.ops.x", f, set())]
    assert got == ["zu_fast", "zu_fast.csrc"]
