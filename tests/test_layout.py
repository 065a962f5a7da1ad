"""The package layout (docs/ARCHITECTURE.md): nothing in blip/ imports upward, no import
circle, one method per file, trainers that name no method. Checked on the source (ast), so
lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "blip"

# blip.validate is core: nn and optim check their arguments with it (it imports only numpy)
CORE = {"blip", "blip.nn", "blip.optim", "blip.fisher", "blip.allocation", "blip.strategy",
        "blip.models", "blip.modes", "blip.validate", "blip.distributed"}
TOP = {"blip.cli", "blip.data", "blip.__main__"}
#: layer -> the layers it may import (itself included)
ALLOWED = {
    "kernels": {"kernels"},
    "core": {"kernels", "core"},
    "methods": {"kernels", "core", "methods"},
    "runs": {"kernels", "core", "runs"},
    "classification": {"kernels", "core", "methods", "runs", "classification"},
    "rl": {"kernels", "core", "methods", "runs", "rl"},
    "top": {"kernels", "core", "methods", "runs", "classification", "rl", "top"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    if module.split(".")[0] == "blip_kernels":
        return "kernels"
    if module in CORE:
        return "core"
    if module in TOP:
        return "top"
    sub = module.split(".")[1]
    if sub not in ("methods", "runs", "classification", "rl"):
        raise AssertionError(f"{module}: not in any layer of docs/ARCHITECTURE.md; add it there "
                             "and to tests/test_layout.py")
    return sub


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its source (relative ones resolved;
    ``from X import name`` counts as importing X.name when that is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ("blip", "blip_kernels"):
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_nothing_imports_upward() -> None:
    bad = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
           for m, targets in _graph().items() for t in sorted(targets)
           if _layer(t) not in ALLOWED[_layer(m)]]
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_no_import_circle() -> None:
    graph = {m: {t for t in ts if t in _modules()} for m, ts in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [m, t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_upward_imports_and_circles(tmp_path: Path) -> None:
    """The two checks above can fail: an upward import and a circle are both found."""
    known = {"blip.nn", "blip.classification.trainer", "blip.methods.base"}
    src = tmp_path / "nn.py"
    src.write_text("from .classification.trainer import Trainer\n"
                   "def f():\n    from .methods import base\n")
    found = _imports("blip.nn", src, known)
    assert found == {"blip.classification.trainer", "blip.methods.base"}
    assert {_layer(t) for t in found} - ALLOWED["core"] == {"classification", "methods"}


def test_one_registered_method_per_file() -> None:
    shared = {"__init__.py", "base.py", "importance.py", "quadratic.py", "trunk.py"}
    for path in sorted((PKG / "methods").glob("*.py")):
        tree = ast.parse(path.read_text())
        registered = [n.name for n in tree.body if isinstance(n, ast.ClassDef)
                      and any(getattr(d, "id", None) == "register" for d in n.decorator_list)]
        assert len(registered) == (0 if path.name in shared else 1), (path.name, registered)


@pytest.mark.parametrize("path", ["classification/trainer.py", "classification/compare.py",
                                  "rl/runner.py"])
def test_the_trainers_branch_on_no_method_name(path: str) -> None:
    from blip.methods import METHODS
    from blip.rl.methods import METHODS as RL_METHODS

    names = set(METHODS) | set(RL_METHODS)
    tree = ast.parse((PKG / path).read_text())
    branches = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(c, ast.Constant) and c.value in names
                        for c in [n.left, *n.comparators])]
    assert not branches, f"{path} branches on a method name: {branches}"


def test_public_aliases() -> None:
    import blip
    import blip.classification.data
    import blip.data
    import blip.methods

    assert blip.data.load_benchmark is blip.classification.data.load_benchmark
    assert callable(blip.methods.make_method) and callable(blip.convert)
    assert blip.BLIP is blip.strategy.BLIP
