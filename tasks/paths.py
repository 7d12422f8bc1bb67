"""Where each stage writes, named by the hash of what it depends on.

The prepared data depends on the data config, the input files and the code: its
folder name hashes all three (each rating file's name and content hash; every
source file), so a nightly run on updated ratings, or any run after
a code change, computes afresh instead of reusing stale outputs. Every later
stage writes inside that folder.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from metarec.config import Config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("metarec", "tasks", "flows", "sql")


def dataset_slug(dataset: str) -> str:
    """A known name as it is; a file path by its stem, made safe for a folder name."""
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "dataset"


def source_fingerprint(config: Config) -> str:
    """Names and content hashes of the input files, side-feature files included (resolving, and if allowed downloading,
    the data set).

    Keyed on the bytes, not on size and mtime, which a rewrite can keep; each file's hash
    is cached by (path, size, mtime, ctime, inode) under the artifacts folder (``tasks.input_hashes``).
    """
    from tasks.datasets import resolve_source
    from tasks.input_hashes import content_hashes

    data = config.data
    columns = {"user_col": data.user_col, "item_col": data.item_col, "rating_col": data.rating_col, "ts_col": data.ts_col}
    source = resolve_source(data.dataset, data.data_dir, data.download, columns)
    from tasks.features import feature_files

    files = sorted(set([*source.ratings, *([source.titles] if source.titles else []), *(f.path for f in feature_files(source, data))]))
    hashes = content_hashes(files, config.runtime.artifacts_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{Path(path).name}:{hashes[path]};".encode())
    return digest.hexdigest()


@functools.cache
def code_version() -> str:
    """Hash of the source every output is computed by (the packages and the SQL files).

    Part of every cached output's folder name: after a change to the code, a
    re-run computes afresh instead of reusing models or results the old code made.
    """
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((PROJECT_ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".sql") and path.is_file():
                digest.update(f"{path.relative_to(PROJECT_ROOT).as_posix()}:".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def data_version(config: Config) -> str:
    """The prepared data's identity: hash of the data config, the input files' fingerprint and the code version."""
    return hashlib.sha256(f"{config.hash_of('data')}:{source_fingerprint(config)}:{code_version()}".encode()).hexdigest()[:12]


def prepared_dir(config: Config) -> Path:
    """artifacts/<dataset>/<data version>/: the split, candidates and stats."""
    return Path(config.runtime.artifacts_dir) / dataset_slug(config.data.dataset) / data_version(config)


def task_shards_dir(config: Config) -> Path:
    return prepared_dir(config) / f"tasks-{config.hash_of('data', 'tasks')}"


def run_dir(config: Config) -> Path:
    """One pipeline configuration's models, results, tables and plots."""
    return prepared_dir(config) / "runs" / config.hash_of()
