"""Shared fixtures: one Prefect test server for the whole session, isolated stores per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ML100K_DIR = (PROJECT_ROOT.parent / "shared" / "datasets").resolve()

# Tests must never reach outside this machine; keep Prefect quiet and local.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary) Prefect API, started once: it takes ~15 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


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
