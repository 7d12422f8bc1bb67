"""Where each stage writes, named by the hash of the config sections it depends on."""

from __future__ import annotations

import re
from pathlib import Path

from metarec.config import Config


def dataset_slug(dataset: str) -> str:
    """A known name as it is; a file path by its stem, made safe for a folder name."""
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "dataset"


def prepared_dir(config: Config) -> Path:
    """artifacts/<dataset>/<data-hash>/: the split, candidates and stats."""
    return Path(config.runtime.artifacts_dir) / dataset_slug(config.data.dataset) / config.hash_of("data")


def task_shards_dir(config: Config) -> Path:
    return prepared_dir(config) / f"tasks-{config.hash_of('data', 'tasks')}"


def run_dir(config: Config) -> Path:
    """One pipeline configuration's models, results, tables and plots."""
    return prepared_dir(config) / "runs" / config.hash_of()
