"""The import graph of repo/: no module reaches itself through its imports.

Every ``import`` statement counts, at module level or inside a function (a deferred
import is still a dependency). ``from package import name`` is an edge to the
submodule ``package.name`` when there is one, else to the package itself; the
implicit import of a parent package's ``__init__`` is not an edge.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import repo

ROOT = Path(repo.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the repo modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target and target not in modules:  # repo.x.Class -> repo.x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_the_graph_sees_deferred_imports():
    graph = import_graph()
    assert "repo.train" in graph["repo.cli"]  # imported inside _train
    assert "repo.train.build" in graph["repo.train.trainer"]
    assert "repo.diagnostics.plots" in graph["repo.diagnostics.report"]


def test_no_module_imports_itself_through_others():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_training_sits_above_what_it_uses():
    """Only the command line, the demo, the experiments, the diagnostics' run reader
    and the TRL integration import repo.train; repo.train imports none of them, nor
    the diagnostics but for the checks of a fit."""
    edges = [(a, b) for a, targets in import_graph().items() for b in targets]
    users = {a for a, b in edges if b.startswith("repo.train") and not a.startswith("repo.train")}
    above = {
        "repo.cli",
        "repo.demo",
        "repo.experiments",
        "repo.diagnostics.io",
        "repo.integrations.trl",
    }
    assert users <= above, users
    used = {b for a, b in edges if a.startswith("repo.train") and not b.startswith("repo.train")}
    assert not used & (above - {"repo.diagnostics.io"}), used
    # the checks of a fit are a leaf (they import nothing of repo.train): fits and runs
    # both record their warnings
    assert "repo.train" not in " ".join(import_graph()["repo.diagnostics.checks"])
    assert not any(
        b.startswith("repo.diagnostics") and b != "repo.diagnostics.checks" for b in used
    ), used
