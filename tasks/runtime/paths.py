"""Where each stage writes, and the key each stage's output is cached under.

A stage's key hashes what its output depends on, and nothing else:

- the config sections it reads (``Config.hash_of``), and for the prepared data
  the input files' fingerprint (each file's name and content hash, so a nightly
  run on updated ratings computes afresh even if size and mtime are kept);
- **the code it runs** (``stage_code``): its own modules and SQL files, plus every
  module of the algorithm package ``metarec/`` that they import, found by reading
  the imports, transitively. So a fix in the evaluation protocol re-runs only the
  evaluation, a fix in one baseline refits only that baseline, and a fix in the
  SQL re-prepares the data (and so everything after it);
- the key of the stage it reads from: a later stage's folder sits inside the
  prepared folder, and a trained model's key includes its task shards' key.

``stage_keys(config)`` lists every key of a pipeline run (tested in
tests/test_paths.py); the prepared data's folder is named by its key, and every
later stage writes inside that folder under its own key.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import threading
from pathlib import Path

from metarec.config import Config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("metarec", "tasks", "flows", "sql")

# The code each stage runs: modules by dotted name, "sql/" for every SQL file. The metarec modules
# these import are added by ``code_closure``; tasks/ and flows/ modules count only where listed
# (they import I/O, logging and tracking helpers that do not change what a stage computes).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "prepare": ("flows.prepare", "tasks.data.prepare", "tasks.data.datasets", "tasks.data.features", "tasks.runtime.sqlfiles", "tasks.data.prepared", "sql/"),
    "tasks": ("tasks.train.task_shards", "metarec.meta_tasks"),
    "train": ("tasks.train.training", "tasks.train.models", "metarec.models.responsive"),
    "fit": ("tasks.train.models",),  # plus the row's own module (``model_code``)
    "evaluate": ("tasks.evaluate.evaluation", "metarec.protocol", "metarec.metrics"),
    # item cold start (Table 2, opt-in eval.new_items): its split and its evaluation (refits key on the rows' own code)
    "new_items": ("tasks.data.new_items", "tasks.evaluate.new_items", "metarec.new_items"),
}
# Their code reaches results only through config values, which every key hashes already
# (``Config.hash_of`` covers each field and each row's fixed options); keying on their text
# would re-prepare the data whenever a config field is added. ``factory`` only applies a row's
# config and calls the row's module, whose code ``model_code`` keys.
CONFIG_MODULES = frozenset({"metarec.config", "metarec.models.registry", "metarec.models.factory"})


def dataset_slug(dataset: str) -> str:
    """A known name as it is; a file path by its stem, made safe for a folder name.

    Never ``.``, ``..`` or empty (``--dataset ..``, a file named ``...csv``): the data-version folders must stay
    inside the artifacts folder."""
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "dataset"


def source_fingerprint(config: Config) -> str:
    """Names and content hashes of the input files, side-feature files included (resolving, and if allowed downloading,
    the data set).

    Keyed on the bytes, not on size and mtime, which a rewrite can keep; each file's hash
    is cached by (path, size, mtime, ctime, inode) under the artifacts folder (``tasks.data.input_hashes``).
    """
    from tasks.data.datasets import resolve_source
    from tasks.data.input_hashes import content_hashes

    data = config.data
    columns = {"user_col": data.user_col, "item_col": data.item_col, "rating_col": data.rating_col, "ts_col": data.ts_col}
    source = resolve_source(data.dataset, data.data_dir, data.download, columns)
    from tasks.data.features import feature_files

    files = sorted(set([*source.ratings, *([source.titles] if source.titles else []), *(f.path for f in feature_files(source, data))]))
    hashes = content_hashes(files, config.runtime.artifacts_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{Path(path).name}:{hashes[path]};".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- code hashes
def _module_path(module: str) -> Path | None:
    """The source file of a project module (a package's __init__.py), or None when it is not ours."""
    if module.split(".")[0] not in CODE_FOLDERS:
        return None
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _source(path: Path) -> bytes:
    """The bytes hashed for a source file (one place, so a test can change a file's text without writing it)."""
    return path.read_bytes()


_PARSE_LOCK = threading.Lock()


@functools.cache
def _imports(module: str, path: Path) -> frozenset[str]:
    """Every module named by an import statement of ``path``, at any depth (relative imports resolved;
    ``from a import b`` yields a.b too, in case b is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    with _PARSE_LOCK:  # CPython 3.11.7's ast.parse fails in concurrent threads ("AST constructor recursion depth mismatch")
        statements = list(ast.parse(_source(path), str(path)).body)
    while statements:  # statements only: imports never sit inside expressions
        node = statements.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            statements.extend(getattr(node, field, ()))
    return frozenset(found)


def code_closure(modules: tuple[str, ...]) -> list[str]:
    """The modules listed plus every metarec module they import, transitively (minus CONFIG_MODULES), sorted."""
    seen: set[str] = set()
    todo = [m for m in modules if not m.endswith("/")]
    while todo:
        module = todo.pop()
        path = _module_path(module)
        if module in seen or module in CONFIG_MODULES or path is None:
            continue
        seen.add(module)
        todo.extend(m for m in _imports(module, path) if m.split(".")[0] == "metarec")
    return sorted(seen)


@functools.cache
def code_hash(modules: tuple[str, ...]) -> str:
    """Hash of the source of ``code_closure(modules)`` and of every file under the listed folders ("sql/")."""
    digest = hashlib.sha256()
    files = [_module_path(m) for m in code_closure(modules)]
    for folder in (m for m in modules if m.endswith("/")):
        files.extend(p for p in sorted((PROJECT_ROOT / folder).rglob("*")) if p.is_file() and p.suffix in (".py", ".sql"))
    for path in files:
        digest.update(f"{path.relative_to(PROJECT_ROOT).as_posix()}:".encode())
        digest.update(_source(path))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def stage_code(stage: str) -> str:
    """Hash of the code stage ``stage`` runs (``STAGE_CODE``)."""
    return code_hash(STAGE_CODE[stage])


def model_code(name: str) -> str:
    """Hash of the code a baseline row is fitted by: tasks.train.models and the row's module with what it imports."""
    from metarec.models.registry import row

    return code_hash((*STAGE_CODE["fit"], row(name).factory.split(":")[0]))


def clear_code_cache() -> None:
    """Forget the code hashes (they are computed once per process; tests change the sources)."""
    code_hash.cache_clear()
    _imports.cache_clear()


def _combine(*parts: str) -> str:
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- keys and folders
def data_version(config: Config) -> str:
    """The prepared data's key: the data config, the input files' fingerprint and the prepare stage's code."""
    return _combine(config.hash_of("data"), source_fingerprint(config), stage_code("prepare"))


def fold_configs(config: Config) -> list[Config]:
    """One config per new-user fold (``data.fold`` = 0 .. F-1); everything downstream is keyed on it."""
    return [config.model_copy(update={"data": config.data.with_fold(f)}) for f in range(config.data.new_user_folds)]


def prepared_dir(config: Config) -> Path:
    """artifacts/<dataset>/<data version>/: the split, candidates and stats."""
    return Path(config.runtime.artifacts_dir) / dataset_slug(config.data.dataset) / data_version(config)


def tasks_key(config: Config) -> str:
    """The task shards' key inside the prepared folder: data and tasks sections, the task construction's code."""
    return _combine(config.hash_of("data", "tasks"), stage_code("tasks"))


def task_shards_dir(config: Config) -> Path:
    return prepared_dir(config) / f"tasks-{tasks_key(config)}"


def train_key(config: Config) -> str:
    """Meta-training's key: data, tasks and meta sections, and the task construction's and training's code."""
    return _combine(config.hash_of("data", "tasks", "meta"), stage_code("tasks"), stage_code("train"))


def evaluation_key(config: Config) -> str:
    """What an evaluation's results depend on besides the model: every result section and the evaluation code."""
    return _combine(config.hash_of(), stage_code("evaluate"))


def run_dir(config: Config) -> Path:
    """One pipeline configuration's models, results, tables and plots."""
    return prepared_dir(config) / "runs" / config.hash_of()


def model_key(config: Config, name: str) -> str:
    """A fitted row's key: the sections its state depends on (data and the row's own, after its tuned and fixed
    values, ``Config.for_row``) and the code that fits it (``model_code``)."""
    from metarec.models.registry import row

    if row(name).is_ours:
        return train_key(config.for_row(name))  # meta-training writes the model
    return _combine(config.for_row(name).hash_of("data", *row(name).sections), model_code(name))  # tasks.train.models.model_sections


def stage_keys(config: Config) -> dict[str, str]:
    """Every cache key of a pipeline run of ``config``: prepare, tasks, train, fit:<row> per evaluated row, evaluate.

    Two runs whose keys agree compute nothing twice (ours is trained with its row's config, as the pipeline does)."""
    ours = config.for_row("responsive")
    keys = {"prepare": data_version(config), "tasks": tasks_key(ours), "train": train_key(ours)}
    keys.update({f"fit:{name}": model_key(config, name) for name in config.eval.models})
    keys["evaluate"] = evaluation_key(config)
    return keys
