"""Where each stage writes, named by the hash of what it depends on.

The prepared data depends on the data config *and* the input files: its folder
name hashes both (each rating file's name, size and modification time), so a
nightly run on updated ratings prepares afresh instead of reusing stale data.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from metarec.config import Config


def dataset_slug(dataset: str) -> str:
    """A known name as it is; a file path by its stem, made safe for a folder name."""
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "dataset"


def source_fingerprint(config: Config) -> str:
    """Names, sizes and mtimes of the input files (resolving, and if allowed downloading, the data set)."""
    from tasks.datasets import resolve_source

    data = config.data
    columns = {"user_col": data.user_col, "item_col": data.item_col, "rating_col": data.rating_col, "ts_col": data.ts_col}
    source = resolve_source(data.dataset, data.data_dir, data.download, columns)
    files = [*source.ratings, *([source.titles] if source.titles else [])]
    digest = hashlib.sha256()
    for path in sorted(files):
        stat = Path(path).stat()
        digest.update(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def data_version(config: Config) -> str:
    """The prepared data's identity: hash of the data config and the input files' fingerprint."""
    return hashlib.sha256(f"{config.hash_of('data')}:{source_fingerprint(config)}".encode()).hexdigest()[:12]


def prepared_dir(config: Config) -> Path:
    """artifacts/<dataset>/<data version>/: the split, candidates and stats."""
    return Path(config.runtime.artifacts_dir) / dataset_slug(config.data.dataset) / data_version(config)


def task_shards_dir(config: Config) -> Path:
    return prepared_dir(config) / f"tasks-{config.hash_of('data', 'tasks')}"


def run_dir(config: Config) -> Path:
    """One pipeline configuration's models, results, tables and plots."""
    return prepared_dir(config) / "runs" / config.hash_of()
