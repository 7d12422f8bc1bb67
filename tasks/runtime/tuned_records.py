"""Where the tuning records live and which one a run uses: ``tuned/<dataset>.json`` in the repository.

Here, not beside the tuner (tasks/train/tuning.py), because the run fingerprint (tasks/runtime/stages.py) hashes the
record a run uses, and runtime sits below train.
"""

from __future__ import annotations

from pathlib import Path

import metarec
from metarec.config import Config
from tasks.runtime.paths import dataset_slug

BORROWED_FROM = "ml-100k"  # the record a data set without its own uses
RECORDS_DIR = Path(metarec.__file__).resolve().parent.parent / "tuned"


def records_dir(config: Config) -> Path:
    return Path(config.runtime.tuned_dir) if config.runtime.tuned_dir else RECORDS_DIR


def record_path(config: Config, dataset: str | None = None) -> Path:
    """The record of a data set (default: the config's): ``tuned/<dataset>.json``."""
    return records_dir(config) / f"{dataset_slug(dataset or config.data.dataset)}.json"


def record_in_use(config: Config) -> tuple[Path | None, bool]:
    """The record a run on this data set uses and whether it is borrowed (None: no record anywhere)."""
    own = record_path(config)
    if own.is_file():
        return own, False
    borrowed = record_path(config, BORROWED_FROM)
    return (borrowed, True) if borrowed.is_file() else (None, False)
