"""Shared fixtures: one Prefect test server for the whole session (one per xdist worker), isolated stores per test."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ML100K_DIR = (PROJECT_ROOT.parent / "shared" / "datasets").resolve()

# Tests must never reach outside this machine; keep Prefect quiet and local.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DO_NOT_TRACK", "1")

# `make test` runs two pytest-xdist workers side by side (pyproject.toml). Each process gets a Prefect home of its
# own (the CLI's throw-away server keeps its database and log there; ~/.prefect is shared by every process on the
# machine) before anything imports Prefect, which reads it once; subprocesses inherit it.
_PREFECT_HOME = tempfile.mkdtemp(prefix=f"metarec-tests-prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME


def _threads_per_process() -> int:
    """The cores shared out among the xdist workers (each at least 1): the workers' torch and OpenMP teams then ask for
    no more threads than the machine has cores (oversubscribed teams spin against each other)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:
    _THREADS = str(_threads_per_process())
    os.environ["OMP_NUM_THREADS"] = _THREADS  # subprocesses (CLI runs, tuning and training workers)
    os.environ.setdefault("METAREC_RUNTIME__TORCH_THREADS", _THREADS)  # what the pipeline sets in each compute slot
    torch.set_num_threads(int(_THREADS))


# The tests that share the session's quick run (the fixture below, ~2 min idle): `make test` keeps them on one worker,
# which makes the run once; a worker that gets any of them makes its own.
QUICK_RUN_FILES = ("tests/test_pipeline.py", "tests/test_ui.py")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown where xdist is not loaded
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` (pyproject.toml): the tests go out one at a time to whichever worker is free, the largest
    group first, except that QUICK_RUN_FILES are one group. Done here, not with xdist_group marks: xdist 3.8 tags a
    marked test through an attribute pytest 9.2 no longer reads, so the marks group nothing."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class QuickRunTogether(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "quick_run" if nodeid.split("::", 1)[0] in QUICK_RUN_FILES else super()._split_scope(nodeid)

    return QuickRunTogether(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The deployment test (the longest single test) goes out first, so it does not start late and leave one worker
    running alone at the end; a quick-run test outside QUICK_RUN_FILES is named."""
    items.sort(key=lambda item: item.get_closest_marker("deployment") is None)  # stable: the rest keep their order
    strays = [item.nodeid for item in items
              if "quick_run" in getattr(item, "fixturenames", ()) and item.nodeid.split("::", 1)[0] not in QUICK_RUN_FILES]
    if strays:
        warnings.warn(f"{strays} use the quick_run fixture outside QUICK_RUN_FILES (tests/conftest.py): under xdist "
                      "their worker makes the quick run again", stacklevel=1)


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary) Prefect API, started once: it takes ~15 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def _mlflow_schema(tmp_path_factory):
    """Makes, on first use, an empty sqlite database as MLflow initialises a new store (its schema, every migration run)."""
    import threading

    path, lock = tmp_path_factory.getbasetemp() / "mlflow-schema.db", threading.Lock()

    def schema(initialize) -> Path:
        import sqlalchemy

        with lock:
            if not path.exists():
                building = path.with_suffix(".building")
                building.unlink(missing_ok=True)  # a build that failed part way
                engine = sqlalchemy.create_engine(f"sqlite:///{building}")
                initialize(engine)
                engine.dispose()
                building.rename(path)
        return path

    return schema


@pytest.fixture(autouse=True)
def _cached_mlflow_schema(_mlflow_schema, monkeypatch: pytest.MonkeyPatch):
    """A new sqlite MLflow store made in this process gets a copy of that schema instead of running MLflow's migrations
    again (3 s idle, 7 s on a loaded machine, for each of the dozens of new stores the suite makes). The copy is the
    database MLflow would build; all above the schema (the Default experiment and its artifact root, our experiment,
    the set-up lock) runs as in production. Stores made by subprocesses (the race of two first runs, CLI runs in a
    process of their own) run MLflow's own migrations."""
    import sqlite3

    import sqlalchemy
    from mlflow.store.db import utils
    from mlflow.store.model_registry import sqlalchemy_store as registry_store

    real = utils._initialize_tables

    def initialize(engine):
        if engine.url.get_backend_name() != "sqlite" or sqlalchemy.inspect(engine).get_table_names():
            return real(engine)  # another database, or a half-initialised one: MLflow's own path
        source, target = sqlite3.connect(_mlflow_schema(real)), engine.raw_connection()
        try:
            source.backup(target.driver_connection)
        finally:
            source.close()
            target.close()

    monkeypatch.setattr(utils, "_initialize_tables", initialize)
    monkeypatch.setattr(registry_store, "_initialize_tables", initialize)


@pytest.fixture()
def artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh artifacts dir and MLflow store for one test."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K_DIR / "ml-100k" / "u.data").is_file():
        pytest.fail(f"ml-100k not found under {ML100K_DIR}; tests read the shared copy")
    return ML100K_DIR


@pytest.fixture(scope="session")
def quick_run(prefect_harness, tmp_path_factory, ml100k_dir):
    """One quick run on ml-100k as `metarec run --quick` does it (the pipeline with its λ_ML sweep, and the
    registration of our candidate, which a quick run never promotes), then the pipeline once more; shared by the
    pipeline and UI tests."""
    from types import SimpleNamespace

    from flows.pipeline import pipeline
    from tasks.evaluate.evaluation import METRICS_FILE, eval_dir
    from tasks.runtime.settings import QUICK_OVERRIDES, load_config
    from tasks.train.tuning import current_fingerprint, tuned_source

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("quick-run")
    config = load_config(overrides=[*QUICK_OVERRIDES, "eval.lambda_sweep=[0.0, 1.0]"], data={"data_dir": str(ml100k_dir)},
                         runtime={"artifacts_dir": str(root / "artifacts")})
    first = pipeline(config, sweep=True)
    ran = tuned_source(config, current_fingerprint(config))[0]  # the values the run used (tuned/ml-100k.json): its stage keys
    stamps = {m: (eval_dir(ran, m) / METRICS_FILE).stat().st_mtime_ns for m in first["results"]}
    second = pipeline(config)  # as requested: a warm re-run is keyed on the config asked for
    config = ran
    promotion, promotion_again = first["champion"], second["champion"]
    return SimpleNamespace(config=config, first=first, second=second, stamps=stamps, score=promotion["score"], promotion=promotion,
                           promotion_again=promotion_again, swept=first["sweep"])


@pytest.fixture()
def ratings_csv(tmp_path: Path) -> Path:
    """A planted log of 200 users in the generic CSV format (the champion and nightly tests' small full runs)."""
    from metarec.synthetic import planted_interactions

    data = planted_interactions(n_users=200, n_items=300, per_user=24, seed=5).interactions
    path = tmp_path / "planted.csv"
    rows = ["user_id,item_id,rating,timestamp"] + [f"{u},{i},4,{t}" for u, i, t in zip(data.users, data.items, data.ts)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture()
def one_thread():
    """Small tensors: one torch thread is faster and does not fight other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
