"""MLflow conventions in one place: the store, the run tree, the tags, the params a run shows.

Default store: a sqlite database inside ``artifacts/`` (embedded, nothing to
start), artifacts beside it in ``artifacts/mlruns/``; ``MLFLOW_TRACKING_URI``
or ``runtime.mlflow_tracking_uri`` override it.

The first set-up of a store (MLflow creates its sqlite schema on first use, which two
processes must not do at once) and of the experiment runs under a file lock beside the
artifacts, once per process. A damaged ``mlflow.db`` is named in a clear error; it is
not a cache (it holds every run and the registry), so it is never moved aside for you.

The run tree: a flow opens one parent run when its work starts and closes it
when the work ends (``parent_run``), so its duration is the run's; every run
opened while it is open, in any thread, nests under it (``child_run``). The
parent's id travels in a context variable, which Prefect copies into the
threads of its task runner; MLflow's own active-run stack is per thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from sqlalchemy.exc import DatabaseError

from metarec.config import Config
from metarec.models.registry import ROWS
from metarec.redaction import redact, redact_value
from tasks.runtime.locks import first_time_lock
from tasks.runtime.paths import prepared_dir

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
# MLflow 3's UI opens an experiment on its GenAI overview unless the link asks for the "Model training" view.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# The main config values a parent run shows: what a reader needs to tell two runs apart at a glance.
MAIN_PARAMS = (
    "data.dataset", "data.new_user_folds", "data.fold", "data.seed", "eval.models", "eval.max_new_users", "eval.bootstrap",
    "tasks.k", "tasks.K", "tasks.max_tasks_per_user", "meta.dim", "meta.lambda_ml", "meta.inner_lr", "meta.inner_steps",
    "meta.epochs", "runtime.preset",
)


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


def _artifact_root(uri: str) -> str | None:
    """artifacts/mlruns beside a sqlite store; None for other stores (they have their own)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()


def _create_store(uri: str, root: str) -> None:
    """Create a new sqlite store with ``root`` as its default artifact root, so that even MLflow's own
    Default experiment keeps its artifacts inside artifacts/ (a client left to itself would use ./mlruns)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, root)._dispose_engine()


def setup_mlflow(config: Config) -> str:
    """Point MLflow at the store and experiment; artifacts go beside the sqlite file."""
    uri = tracking_uri(config)
    _SET_BY_US.add(uri)
    name = config.runtime.experiment
    mlflow.set_tracking_uri(uri)  # only names the store: nothing is opened yet
    mlflow.set_registry_uri(uri)
    try:
        with _READY_GUARD:
            ready = (uri, name) in _READY
        if not ready and _already_set_up(uri, name):  # reading needs no write lock (a read-only artifacts folder serves)
            with _READY_GUARD:
                _READY.add((uri, name))
            ready = True
            close_runs_of_dead_processes(name)
        if not ready:
            with first_time_lock(Path(config.runtime.artifacts_dir) / "mlflow-setup", f"setting up the MLflow store {redact(uri)}"):
                _create_experiment(uri, name)
            with _READY_GUARD:
                _READY.add((uri, name))
        _check_not_moved(uri, name)
        mlflow.set_experiment(name)
    except (DatabaseError, sqlite3.DatabaseError) as exc:
        raise _store_error(uri, exc) from None
    return uri


def _already_set_up(uri: str, name: str) -> bool:
    """A sqlite store that exists, is not empty and holds the experiment: nothing to create, so no lock to take."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        if path.stat().st_size == 0:
            return False  # being created by another process, or truncated: decided under the lock
    except OSError:
        return False
    return mlflow.get_experiment_by_name(name) is not None


def _check_not_moved(uri: str, name: str) -> None:
    """A sqlite store records its artifacts folder by absolute path: after the artifacts folder moved, runs would
    find no artifacts ("No such artifact: ''") and new ones would write into the old place."""
    expected = _artifact_root(uri)
    if expected is None:
        return
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None or not experiment.artifact_location.startswith("file://"):
        return
    recorded = Path(experiment.artifact_location.removeprefix("file://"))
    here = Path(expected.removeprefix("file://"))
    if recorded != here and not recorded.exists():
        raise TrackingStoreError(
            f"{uri.removeprefix('sqlite:///')}: the MLflow store records its artifacts in {recorded}, which no longer exists: "
            f"the artifacts folder was moved (its artifacts are now in {here}?). Move it back to {recorded.parent}, or start "
            "from a new store (move mlflow.db aside)")


def _create_experiment(uri: str, name: str) -> None:
    """Create the store if it is new (MLflow creates or migrates its schema here) and the experiment if it is missing."""
    root = _artifact_root(uri)
    if root is not None:
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            _create_store(uri, root)
        elif path.stat().st_size == 0:  # sqlite would silently make it a new, empty store: every run and version lost
            raise TrackingStoreError(
                f"{path}: the MLflow store is empty (0 bytes), so its runs and registered models are gone (a full disk, or a "
                "copy that failed?). It is not re-created silently: restore it from a backup, or delete it to start a new store")
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=root)


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


# ------------------------------------------------------------------------ runs of killed processes
PROCESS_TAG = "metarec.process"  # host:pid:start time of the process that opened the run


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    return {PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or ''}"}


def _process_dead(tag: str) -> bool:
    """True when the process named by a PROCESS_TAG value ran on this host and is gone (its pid unused or reused)."""
    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's runs are not ours to judge
    now = _start_time(int(pid))
    if now is not None:
        return bool(started) and now != started
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def close_runs_of_dead_processes(experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose process died (kill -9, a crash), and their RUNNING children: else a killed
    evaluation or tuning stays RUNNING in the UI for ever. Returns their ids."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    running = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    dead = {r.info.run_id for r in running if _process_dead(r.data.tags.get(PROCESS_TAG, ""))}
    grew = True
    while grew:  # children opened without the tag (a trial, a model child) die with their parent
        more = {r.info.run_id for r in running if r.info.run_id not in dead and PROCESS_TAG not in r.data.tags
                and r.data.tags.get("mlflow.parentRunId") in dead}
        dead |= more
        grew = bool(more)
    try:
        for run_id in sorted(dead):
            client.set_tag(run_id, "killed", "its process died while it was RUNNING; marked KILLED by the next start")
            client.set_terminated(run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - a read-only store (recommend) still serves; the next writer closes them
        logger.warning("could not mark %d run(s) of killed processes KILLED: %s", len(dead), str(exc).splitlines()[0][:200])
        return []
    return sorted(dead)


# ------------------------------------------------------------------------ the run tree
_PARENT: ContextVar[str | None] = ContextVar("metarec_mlflow_parent", default=None)


def current_parent_id(parent_run_id: str | None = None) -> str | None:
    """The run a new run nests under: this thread's active run, else ``parent_run_id``, else the ``parent_run`` open
    in the calling context (None: top level)."""
    active = mlflow.active_run()
    return active.info.run_id if active is not None else (parent_run_id or _PARENT.get())


@contextmanager
def parent_run(config: Config, name: str, kind: str, parent_run_id: str | None = None, **tags: str) -> Iterator[str]:
    """An MLflow run opened now and closed when the block ends (FAILED, with an ``error`` tag, if it raises), so its
    duration is true; yields its id.

    Nested under the calling thread's active run (a nightly run holding a pipeline run), else under
    ``parent_run_id``, else under the parent open in the calling context. While open it is that context's parent:
    runs opened in Prefect task threads (``child_run``, ``meta_train``) nest under it without being passed its id.
    """
    setup_mlflow(config)
    parent = current_parent_id(parent_run_id)
    with mlflow.start_run(run_name=name, tags={**run_tags(config, kind=kind, **tags), **process_tags()}, nested=True, parent_run_id=parent) as run:
        token = _PARENT.set(run.info.run_id)
        try:
            yield run.info.run_id
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            raise
        finally:
            _PARENT.reset(token)


@contextmanager
def child_run(run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None, parent_run_id: str | None = None) -> Iterator[str]:
    """A run nested under ``current_parent_id(parent_run_id)``, in any thread; ``run_id``: resume that run where it is.
    Yields its id; it is this thread's active run for the block."""
    if run_id is not None:
        with mlflow.start_run(run_id=run_id, nested=True) as run:
            yield run.info.run_id
        return
    with mlflow.start_run(run_name=run_name, nested=True, parent_run_id=current_parent_id(parent_run_id), tags={**(tags or {}), **process_tags()}) as run:
        yield run.info.run_id


def ui_url(config: Config | None = None) -> str:
    """Base URL of the MLflow UI for links: the configured one, the tracking server when the store is one, else the
    address `mlflow ui` starts on by default (``ui_command`` says how to start it on this store).

    Links land in logs, Prefect artifacts and the terminal: credentials in either address are masked."""
    if config is not None and config.runtime.mlflow_ui_url:
        return redact(config.runtime.mlflow_ui_url.rstrip("/"))
    uri = tracking_uri(config) if config is not None else mlflow.get_tracking_uri()
    return redact(uri.rstrip("/")) if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


def ui_command(config: Config | None = None) -> str | None:
    """The command that starts a UI on this store (``mlflow ui --backend-store-uri ...``); None when the store is a
    tracking server (it serves its own UI) or a UI URL is configured."""
    if config is not None and config.runtime.mlflow_ui_url:
        return None
    uri = tracking_uri(config) if config is not None else mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {redact(uri)}"


def run_link(run_id: str, config: Config | None = None) -> str:
    """Where a run opens in the MLflow UI (its "Model training" view)."""
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    return f"{ui_url(config)}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


# ------------------------------------------------------------------------ what runs show
def _param_value(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's limit on a param value


def paper_lambda(lambda_ours: float, K: int) -> float:
    """docs/method.md §11: with L^K a mean over its K triples, λ_paper = K · λ_ours (the paper sums over the K triples)."""
    return K * lambda_ours


def _reads(name: str, key: str) -> bool:
    """Whether row ``name`` reads config field ``key`` (its ``Row.reads`` globs; none: every field of its sections)."""
    globs = ROWS[name].reads
    return key.startswith("data.") or not globs or any(fnmatch(key, pattern) for pattern in globs)


def model_params(config: Config, name: str, pooled: bool = False) -> dict[str, str]:
    """The hyperparameters row ``name`` actually runs with, flat (``section.field``).

    Resolved with ``Config.for_row`` (tuned values, then the row's fixed options) and limited to the fields the row
    reads (its sections, narrowed by ``Row.reads``), so comparing two models' runs shows exactly the values that differ
    between them. Rows of ours also show λ_ML on the paper's scale (``meta.lambda_paper``). ``pooled``: a run over
    every fold, which has no ``data.fold``.
    """
    from tasks.train.models import model_sections

    resolved = config.for_row(name)
    flat = {f"{section}.{key}": redact_value(value) for section in model_sections(name)
            for key, value in getattr(resolved, section).model_dump(mode="json").items()}
    flat = {key: value for key, value in flat.items() if _reads(name, key) and not (pooled and key == "data.fold")}
    if "meta.lambda_ml" in flat:
        flat["meta.lambda_paper"] = paper_lambda(resolved.meta.lambda_ml, resolved.tasks.K)
    return {"model": name, "model.label": ROWS[name].label, **{key: _param_value(value) for key, value in flat.items()}}


# ------------------------------------------------------------------------ a row's pooled run
SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit", "mlflow.user")


def pooled_run_name(name: str) -> str:
    """``Ours+ · pooled``: the row first, so the UI's narrow name column tells the runs apart."""
    return f"{ROWS[name].label} · pooled"


@contextmanager
def open_model_runs(config: Config, parent_id: str, models) -> Iterator[dict[str, str]]:
    """One run per row under ``parent_id``, opened now, before the row's fits and evaluations start, so that its
    duration is the work's; yields {row: run id}. ``close_model_run`` ends each; a failure ends the open ones FAILED."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    source = {key: parent.data.tags[key] for key in SOURCE_TAGS if key in parent.data.tags}
    tags = {key: value for key, value in run_tags(config, kind="model").items() if key != "data_hash"}  # pooled: every fold's data
    runs = {name: client.create_run(parent.info.experiment_id, run_name=pooled_run_name(name), tags={
        "mlflow.parentRunId": parent_id, "model": name, "folds": str(config.data.new_user_folds), **source, **tags}).info.run_id
        for name in models}
    try:
        yield runs
    except BaseException:
        for run_id in runs.values():
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")
        raise


def close_model_run(client: mlflow.MlflowClient, run_id: str, record: dict, tags: dict[str, str], params: dict[str, str]) -> None:
    """A row's pooled results (the shared metric names, so the compare view lines rows up) on its run, then ended."""
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value["mean"]), now, 0) for key, value in record["metrics"].items() if math.isfinite(value["mean"])]
    metrics += [Metric(f"seconds_{key}", float(value), now, 0) for key, value in record["seconds"].items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     tags=[RunTag("status", "evaluated"), *(RunTag(k, v) for k, v in tags.items())])
    client.log_dict(run_id, record, "metrics.json")
    client.set_terminated(run_id)


# ------------------------------------------------------------------------ what a person reads first
GLOSSARY = """\
Metric names: `<part>_n<n>_<metric>` or `stream_<metric>_mean`.

- **new**: new users (a fold's users unseen in training), scored on their next item against sampled candidates after
  their first **n** interactions (`n1`, `n5`, `n10`, ...); **full**: the same cases ranked against every item;
- **stream**: the evaluation stream's users, batch by batch (`stream_b3_auc`: batch 3); **seen**: users met before
  the batch; **cold**: first-time users;
- **hr10**: hit rate at 10 (is the true item in the top 10), **ndcg10**: NDCG at 10 (rewards a higher rank),
  **auc**: the share of candidates ranked below the true item;
- on a pipeline run: **ours_paper_** Ours (paper), **ours_plus_** Ours+, **best_other_** the best other row;
  `seconds_*`: wall time of a stage. λ_paper = K · λ_ML is λ on the paper's scale (docs/method.md §11).
"""


def run_description(config: Config) -> str:
    """The parent run's description (markdown): what it ran, and the glossary of metric names."""
    rows = ", ".join(ROWS[name].label if name in ROWS else name for name in config.eval.models)
    return (f"Table 1 on `{redact(config.data.dataset)}`, {config.data.new_user_folds} new-user fold(s) pooled, "
            f"{config.runtime.preset} preset; rows: {rows}. Children: one run per row (`<row> · pooled`) with the "
            f"meta-trainings of ours per fold under it (`<row> · fold k · train`), and the λ_ML sweep.\n\n" + GLOSSARY)
def main_params(config: Config) -> dict[str, str]:
    """The main config values, for a flow's parent run (those of ``MAIN_PARAMS`` the config has)."""
    flat = config.to_flat_dict()
    out = {key: _param_value(flat[key]) for key in MAIN_PARAMS if key in flat}
    if "meta.lambda_ml" in out:  # λ as the paper, README and findings give it
        out["meta.lambda_paper"] = _param_value(paper_lambda(config.meta.lambda_ml, config.tasks.K))
    return out
