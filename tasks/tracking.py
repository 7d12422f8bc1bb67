"""MLflow conventions in one place: the store, the tags, the metric names.

Default store: a sqlite database inside ``artifacts/`` (embedded, nothing to
start); ``MLFLOW_TRACKING_URI`` or ``runtime.mlflow_tracking_uri`` override it.

The first set-up of a store (MLflow creates its sqlite schema on first use, which two
processes must not do at once) and of the experiment runs under a file lock beside the
artifacts, once per process. A damaged ``mlflow.db`` is named in a clear error; it is
not a cache (it holds every run and the registry), so it is never moved aside for you.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from sqlalchemy.exc import DatabaseError

from metarec.config import Config
from metarec.redaction import redact
from tasks.locks import first_time_lock
from tasks.paths import prepared_dir

REGISTERED_MODEL = "responsive-mf"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; a value we exported ourselves
# must not outrank the config of a later run in the same process.
_SET_BY_US: set[str] = set()
# (uri, experiment) pairs this process has set up already: later calls skip the lock
_READY: set[tuple[str, str]] = set()
_READY_GUARD = threading.Lock()


class TrackingStoreError(ValueError):
    """The MLflow store cannot be opened; names the store (never its credentials)."""


def tracking_uri(config: Config) -> str:
    if config.runtime.mlflow_tracking_uri:
        return config.runtime.mlflow_tracking_uri
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env and from_env not in _SET_BY_US:
        return from_env
    root = Path(config.runtime.artifacts_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def setup_mlflow(config: Config) -> str:
    """Point MLflow at the store and experiment; artifacts go beside the sqlite file."""
    uri = tracking_uri(config)
    _SET_BY_US.add(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = config.runtime.experiment
    try:
        with _READY_GUARD:
            ready = (uri, name) in _READY
        if not ready:
            with first_time_lock(Path(config.runtime.artifacts_dir) / "mlflow-setup", f"setting up the MLflow store {redact(uri)}"):
                _create_experiment(uri, name)
            with _READY_GUARD:
                _READY.add((uri, name))
        mlflow.set_experiment(name)
    except (DatabaseError, sqlite3.DatabaseError) as exc:
        raise _store_error(uri, exc) from None
    return uri


def _create_experiment(uri: str, name: str) -> None:
    """Open the store (MLflow creates or migrates its schema here) and create the experiment if it is missing."""
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=location)


def _store_error(uri: str, exc: Exception) -> TrackingStoreError:
    where = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else redact(uri)
    problem = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return TrackingStoreError(
        f"{where}: the MLflow store cannot be read ({problem}). It holds every run and the model registry, so it is "
        "not replaced automatically: move it aside to start a new store (or restore a backup), or point "
        "runtime.mlflow_tracking_uri / MLFLOW_TRACKING_URI elsewhere"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(config: Config, **extra: str) -> dict[str, str]:
    return {
        "dataset": redact(config.data.dataset),
        "config_hash": config.hash_of(),
        "data_hash": prepared_dir(config).name,
        "git_commit": git_commit(),
        "preset": config.runtime.preset,
        **extra,
    }


def run_link(run_id: str) -> str:
    """Where a run opens in the MLflow UI started as README says (the link is only useful with that UI running)."""
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    return f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"


@contextmanager
def parent_run(config: Config, name: str, kind: str, parent_run_id: str | None = None, **tags: str) -> Iterator[str]:
    """An MLflow run opened now and closed when the block ends (FAILED if it raises), so its duration is true.

    Nested under the calling thread's active run (a nightly run holding a pipeline run), else under
    ``parent_run_id``. Work done in other threads nests under it by passing the yielded id as their parent.
    """
    setup_mlflow(config)
    active = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, tags=run_tags(config, kind=kind, **tags), nested=active, parent_run_id=None if active else parent_run_id) as run:
        yield run.info.run_id
