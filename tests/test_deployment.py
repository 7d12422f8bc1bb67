"""End to end with real parts: a Prefect server, the served deployment, `prefect deployment run`, MLflow, recommend.

Run alone with `pytest -m deployment`. Every process the test starts is stopped
by its own process group, pass or fail.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from flows.deploy import api_url, stop_process_group, wait_until_healthy
from tasks.track.champion import CHAMPION, SCORE_TAG, registered_model_name

BIN = Path(sys.executable).parent
DEPLOYMENT = "nightly-retrain/nightly"
# a full-preset run (a quick one never promotes), kept to a few minutes by the same cuts --quick makes, and by a short
# meta-training (one epoch over at most 10 tasks per user, ~1/7 of ml-100k's tasks): what is checked here is the
# deployment's path (served, triggered, registered, promoted, recommended), which no check ties to the model's quality;
# the tuned 3 epochs over all 62,695 tasks took 4 of the test's 6 minutes
SMALL = ["--set", "eval.models=['responsive','pop']", "--set", "eval.bootstrap=50", "--set", "data.new_user_folds=1",
         "--set", "eval.training_fraction=0.5", "--set", "meta.epochs=1", "--set", "tasks.max_tasks_per_user=10"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_deployment(env: dict, serve: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise AssertionError(f"`metarec deploy` exited early with code {serve.returncode}")
        probe = subprocess.run([BIN / "prefect", "deployment", "inspect", DEPLOYMENT], env=env, capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"deployment {DEPLOYMENT} did not appear within {timeout} s")


def _prefect(api: str, path: str, body: dict) -> list[dict]:
    response = httpx.post(f"{api}/{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _triggered_run_id(output: str) -> str:
    """The id `prefect deployment run` prints for the run it created ("UUID: ...")."""
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def _check_the_top_flow_run_page(api: str, top: str) -> None:
    """What the UI's flow run page shows, through its REST API: Table 1 with its plot inline, the summary and the
    champion decision on the nightly run itself (keys naming the data set), and a log line linking its MLflow run.

    Only the run the test triggered counts: a scheduler may add runs of the cron schedule at any moment (the
    schedule is paused here, but a test must not rest on a server's timing either way)."""
    runs = _prefect(api, "flow_runs/filter", {"flow_runs": {"id": {"any_": [top]}}, "limit": 10})
    assert len(runs) == 1 and runs[0]["parent_task_run_id"] is None and runs[0]["state_type"] == "COMPLETED"
    started = _prefect(api, "flow_runs/filter", {"flows": {"name": {"any_": ["nightly-retrain"]}},
                                                 "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}}, "limit": 10})
    assert [r["id"] for r in started] == [top], "a run the test did not trigger was started: the schedule is not paused"
    keys = ["table1-ml-100k", "summary-ml-100k", "champion-ml-100k", "mlflow-run-ml-100k"]
    artifacts = {a["key"]: a for a in _prefect(api, "artifacts/filter", {"artifacts": {"key": {"any_": keys}}, "limit": 20})
                 if a["flow_run_id"] == top}
    assert set(artifacts) == set(keys)
    table1 = artifacts["table1-ml-100k"]["data"]
    assert "| Ours (paper)" in table1 and "](data:image/png;base64," in table1
    logs = _prefect(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [top]}}, "limit": 200})
    assert any("MLflow run" in log["message"] and "/#/experiments/" in log["message"] for log in logs)
    assert any("mlflow ui --backend-store-uri sqlite:///" in log["message"] for log in logs)  # how to open the link
    # named and tagged flow runs; every task run of the pipeline named by what it does, row and fold, once
    assert runs[0]["name"] == "nightly ml-100k full" and "kind:nightly" in runs[0]["tags"]
    pipeline = [r for r in _prefect(api, "flow_runs/filter", {"flows": {"name": {"any_": ["pipeline"]}}, "limit": 10})]
    assert [r["name"] for r in pipeline] == ["pipeline ml-100k F=1 full"]
    assert {"dataset:ml-100k", "preset:full", "kind:pipeline"} <= set(pipeline[0]["tags"])
    tasks = [t["name"] for t in _prefect(api, "task_runs/filter", {"flow_runs": {"id": {"any_": [pipeline[0]["id"]]}}, "limit": 200})]
    assert len(tasks) == len(set(tasks)) and {"tasks · fold 0", "train Ours (paper) · fold 0", "fit Pop · fold 0",
                                              "evaluate Pop · fold 0", "register Ours (paper) · fold 0", "promote Ours (paper) · fold 0"} <= set(tasks)


@pytest.mark.deployment
@pytest.mark.slow
def test_deployment_run_retrains_registers_promotes_and_serves(tmp_path: Path, ml100k_dir: Path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=api_url(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        METAREC_RUNTIME__ARTIFACTS_DIR=str(tmp_path / "artifacts"),
        METAREC_DATA__DATA_DIR=str(ml100k_dir),
    )
    started: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        # `metarec deploy` as a user starts it: its own server, its Prefect home and server log under artifacts/
        deploy_env = {**{k: v for k, v in env.items() if k != "PREFECT_HOME"}, "PREFECT_LOGGING_LEVEL": "INFO"}  # what the UI shows
        serve = subprocess.Popen([BIN / "metarec", "deploy", "--port", str(port), "--no-ui", "--paused", *SMALL],
                                 env=deploy_env, stdout=open(logs / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        started.append(serve)
        wait_until_healthy(api_url(port), timeout=240, process=serve)
        _wait_for_deployment(env, serve)
        inspected = subprocess.run([BIN / "prefect", "deployment", "inspect", DEPLOYMENT], env=env, capture_output=True, text=True, timeout=300)
        assert "0 2 * * *" in inspected.stdout and re.search(r"'paused':\s*True", inspected.stdout), inspected.stdout
        home = tmp_path / "artifacts" / "prefect"
        assert (home / "prefect.db").is_file() and f"127.0.0.1:{port}" in (home / "server.log").read_text()

        run = subprocess.run([BIN / "prefect", "deployment", "run", DEPLOYMENT, "--watch", "--watch-timeout", "900"],
                             env=env, capture_output=True, text=True, timeout=1000)
        assert run.returncode == 0, run.stdout + run.stderr + (logs / "serve.log").read_text()[-3000:]
        assert "Completed" in run.stdout, run.stdout

        uri = f"sqlite:///{tmp_path / 'artifacts' / 'mlflow.db'}"
        name = registered_model_name("ml-100k")
        champion = MlflowClient(uri, uri).get_model_version_by_alias(name, CHAMPION)
        assert champion.tags["dataset"] == "ml-100k" and 0.0 <= float(champion.tags[SCORE_TAG]) <= 1.0
        assert {"kind": "nightly", "preset": "full", "row": "responsive"}.items() <= champion.tags.items() and champion.description
        assert len(MlflowClient(uri, uri).search_model_versions(f"name = '{name}'")) == 1

        _check_the_top_flow_run_page(api_url(port), _triggered_run_id(run.stdout))
        assert "not writable" not in (logs / "serve.log").read_text()  # no avoidable warning in the served run's output

        rec = subprocess.run([BIN / "metarec", "recommend", "--user", "196", "-n", "5"], env=env, capture_output=True, text=True, timeout=300)
        assert rec.returncode == 0, rec.stderr
        ranked = [line for line in rec.stdout.splitlines() if line.strip()[:1].isdigit()]
        assert len(ranked) == 5 and f"v{champion.version}" in rec.stdout

        new_user = subprocess.run([BIN / "metarec", "recommend", "--user", "no-such-user", "--recent", "50,172", "-n", "3"],
                                  env=env, capture_output=True, text=True, timeout=300)
        assert new_user.returncode == 0 and len([l for l in new_user.stdout.splitlines() if l.strip()[:1].isdigit()]) == 3
        unknown = subprocess.run([BIN / "metarec", "recommend", "--user", "no-such-user"], env=env, capture_output=True, text=True, timeout=300)
        assert unknown.returncode != 0 and "new user needs at least one interaction" in unknown.stderr
    finally:
        for process in reversed(started):
            stop_process_group(process)
    assert all(process.poll() is not None for process in started)
