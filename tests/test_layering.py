"""The layering, read from the import statements: flows -> tasks -> metarec, never back up, and no circles.

Every import counts, wherever it sits (module level, inside a function, under ``TYPE_CHECKING``): a lazy
import still ties two modules together, and a circle drawn with lazy imports is still a circle. The rules:

- ``metarec/`` (the pure algorithms) imports neither Prefect nor MLflow nor ``tasks`` nor ``flows``;
- ``tasks/`` never imports ``flows``;
- the ``tasks`` packages are layered (``TASK_LAYERS``, lowest first): a module imports its own or a
  lower package, apart from the lazy imports listed in ``UPWARD_LAZY`` (each package's ``__init__``
  names its exception);
- no import cycle between project modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("metarec", "tasks", "flows")
TASK_LAYERS = ("runtime", "data", "track", "train", "evaluate", "serve")
# Imports that reach a higher tasks package, allowed only inside a function: (importer, imported package).
UPWARD_LAZY = {
    ("tasks.runtime.paths", "tasks.data"),  # the prepared data's key hashes the input files
    ("tasks.track.tracking", "tasks.train"),  # model_params reads a row's config sections
}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages under ``root``."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> list[tuple[str, bool]]:
    """(name, at module level) for every import statement in ``path``; ``from a import b`` gives a.b and a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(nodes, top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((alias.name, top) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                found.append((base, top))
                found.extend((f"{base}.{alias.name}", top) for alias in node.names)
            # a class body runs at import time; a function body does not
            inner_top = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                visit(getattr(node, field, ()), inner_top)

    visit(ast.parse(path.read_text(), str(path)).body, True)
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[tuple[str, str], bool]]:
    """(project edges, external top-level names imported, whether each project edge is at module level).

    ``from a import b`` is an edge to a (a package's ``__init__`` runs too) and to a.b when that is a module."""
    modules = project_modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    top_level: dict[tuple[str, str], bool] = {}
    for module, path in modules.items():
        names = _imported_names(module, path)
        for name, top in names:
            if name.split(".")[0] not in PACKAGES:
                external[module].add(name.split(".")[0])
                continue
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if not target or target == module:
                continue
            edges[module].add(target)
            top_level[(module, target)] = top_level.get((module, target), False) or top
    return edges, external, top_level


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(found)


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return TASK_LAYERS.index(parts[1]) if parts[0] == "tasks" and len(parts) > 2 and parts[1] in TASK_LAYERS else None


def violations(root: Path) -> list[str]:
    """Every broken rule of the module docstring, one line each (empty when the layering holds)."""
    edges, external, top_level = import_graph(root)
    problems = []
    for module in sorted(edges):
        top = module.split(".")[0]
        if top == "metarec":
            problems += [f"{module} imports {name}" for name in sorted(external[module] & {"prefect", "mlflow"})]
            problems += [f"{module} imports {t}" for t in sorted(edges[module]) if t.split(".")[0] in ("tasks", "flows")]
        if top == "tasks":
            problems += [f"{module} imports {t}" for t in sorted(edges[module]) if t.split(".")[0] == "flows"]
            for target in sorted(edges[module]):
                mine, theirs = layer_of(module), layer_of(target)
                if mine is None or theirs is None or theirs <= mine:
                    continue
                allowed = (module, ".".join(target.split(".")[:2])) in UPWARD_LAZY and not top_level[(module, target)]
                if not allowed:
                    problems.append(f"{module} imports {target} from a higher package")
    problems += [f"import cycle: {' <-> '.join(component)}" for component in cycles(edges)]
    return problems


def test_the_project_keeps_its_layers_and_has_no_import_circles():
    assert violations(PROJECT_ROOT) == []


def test_every_tasks_module_sits_in_a_stage_package():
    packages = {f"tasks.{layer}" for layer in TASK_LAYERS}
    loose = [m for m in project_modules(PROJECT_ROOT) if m.startswith("tasks.") and m not in packages and layer_of(m) is None]
    assert loose == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def clean_tree(tmp_path: Path) -> Path:
    """A small project laid out like ours, whose layering holds."""
    _write(tmp_path, {
        "metarec/__init__.py": "", "metarec/config.py": "import json\n",
        "metarec/models/__init__.py": "", "metarec/models/registry.py": "from metarec import config\n",
        "tasks/__init__.py": "", "tasks/runtime/__init__.py": "", "tasks/data/__init__.py": "",
        "tasks/runtime/paths.py": "from metarec.config import x\n\ndef f():\n    from tasks.data.datasets import y\n",
        "tasks/data/datasets.py": "import duckdb\n", "tasks/data/prepare.py": "from tasks.runtime.paths import z\n",
        "flows/__init__.py": "", "flows/deploy.py": "def serve():\n    from flows.nightly import run\n",
        "flows/nightly.py": "from tasks.data.prepare import y\nENV = 'X'\n",
    })
    return tmp_path


def test_the_checker_passes_a_clean_tree(clean_tree: Path):
    assert violations(clean_tree) == []


@pytest.mark.parametrize("files, expected", [
    ({"flows/nightly.py": "def check():\n    from flows.deploy import ENV\n"}, "import cycle: flows.deploy <-> flows.nightly"),
    ({"metarec/models/registry.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from metarec.config import Config\n",
      "metarec/config.py": "from metarec.models.registry import ROWS\n"}, "import cycle: metarec.config <-> metarec.models.registry"),
    ({"metarec/config.py": "import mlflow\n"}, "metarec.config imports mlflow"),
    ({"metarec/config.py": "def f():\n    from prefect import task\n"}, "metarec.config imports prefect"),
    ({"metarec/config.py": "from tasks.runtime import paths\n"}, "metarec.config imports tasks.runtime.paths"),
    ({"tasks/data/prepare.py": "def f():\n    from flows.nightly import ENV\n"}, "tasks.data.prepare imports flows.nightly"),
    ({"tasks/runtime/paths.py": "from tasks.data.datasets import y\n"}, "tasks.runtime.paths imports tasks.data.datasets from a higher package"),
    ({"tasks/runtime/paths.py": "def f():\n    from tasks.data.prepare import y\n"}, "import cycle: tasks.data.prepare <-> tasks.runtime.paths"),
])
def test_the_checker_names_each_broken_rule(clean_tree: Path, files: dict[str, str], expected: str):
    _write(clean_tree, files)
    assert expected in violations(clean_tree)
