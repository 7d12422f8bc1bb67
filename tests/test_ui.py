"""The MLflow UI a user opens after a quick run: a real `mlflow server` on 127.0.0.1, read through its REST API
(the calls its pages make), and a screenshot of the compare view in headless Chromium where Chromium is installed.

Shares the session's quick run (tests/conftest.py); adds the server start and one screenshot (~20-60 s).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from flows.deploy import stop_process_group
from metarec.models.registry import ROWS
from tasks.track.champion import CHAMPION, registered_model_name
from tasks.track.tracking import MODEL_TRAINING_VIEW, pooled_run_name, tracking_uri

BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(quick_run, tmp_path_factory):
    """`mlflow server` on the quick run's store; yields its base URL; stopped (its process group) afterwards."""
    import time

    work = tmp_path_factory.mktemp("mlflow-ui")
    port = _free_port()
    artifacts = Path(quick_run.config.runtime.artifacts_dir).resolve() / "mlruns"
    process = subprocess.Popen(
        [BIN / "mlflow", "server", "--backend-store-uri", tracking_uri(quick_run.config), "--default-artifact-root", artifacts.as_uri(),
         "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=work, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # slow on a busy 2-core machine
        while True:
            assert process.poll() is None, (work / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer"
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(process)


@contextmanager
def _through(url: str):
    """MLflow's client pointed at ``url`` for the block, then back (the URI it exports included)."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        if before[2] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before[2]


def _api(url: str, path: str, body: dict | None = None, **query) -> dict:
    call = httpx.post(f"{url}/api/2.0/mlflow/{path}", json=body, timeout=30) if body is not None else \
        httpx.get(f"{url}/api/2.0/mlflow/{path}", params=query, timeout=30)
    assert call.status_code == 200, call.text
    return call.json()


def _runs(url: str, experiment_id: str, where: str) -> list[dict]:
    return _api(url, "runs/search", {"experiment_ids": [experiment_id], "filter": where, "max_results": 200}).get("runs", [])


def _experiment(url: str, quick_run) -> str:
    return _api(url, "experiments/get-by-name", experiment_name=quick_run.config.runtime.experiment)["experiment"]["experiment_id"]


def _params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def _first_pipeline(url: str, quick_run) -> dict:
    parents = _runs(url, _experiment(url, quick_run), "tags.kind = 'pipeline'")
    assert len(parents) == 2  # the quick run and its re-run
    return parents[-1]  # newest first


def _pipeline_children(url: str, quick_run, kind: str = "model") -> list[dict]:
    parent = _first_pipeline(url, quick_run)["info"]["run_id"]
    return _runs(url, _experiment(url, quick_run), f"tags.mlflow.parentRunId = '{parent}' and tags.kind = '{kind}'")


@pytest.mark.slow
def test_the_pipeline_parent_has_one_child_per_model_and_their_params_differ(mlflow_ui, quick_run):
    children = _pipeline_children(mlflow_ui, quick_run)
    assert sorted(run["info"]["run_name"] for run in children) == sorted(pooled_run_name(m) for m in quick_run.config.eval.models)
    params = {_params(run)["model"]: _params(run) for run in children}
    assert not [name for name, p in params.items() if "data.fold" in p]  # pooled over the folds: no fold
    for a in params:
        for b in params:
            if a != b:
                assert any(params[a].get(key) != params[b].get(key) for key in params[a].keys() | params[b].keys() if key != "model"), (a, b)
    config = quick_run.config
    assert params["rkmf"]["baselines.lr"] == str(config.for_row("rkmf").baselines.lr) != params["spmf"]["baselines.lr"]
    assert "meta.lambda_ml" in params["responsive"] and "baselines.lr" not in params["responsive"]
    # the training and the sweep ran inside the parent's span, nested under it
    # each row's run spans its work: our rows' trainings (one per fold) nest under it, inside its span
    parent = _first_pipeline(mlflow_ui, quick_run)["info"]
    ours_rows = sorted(name for name in quick_run.config.eval.models if ROWS[name].is_ours)
    rows = {_params(run)["model"]: run for run in children}
    trainings = []
    for name in ours_rows:
        under = _runs(mlflow_ui, _experiment(mlflow_ui, quick_run), f"tags.mlflow.parentRunId = '{rows[name]['info']['run_id']}' and tags.kind = 'training'")
        assert [run["info"]["run_name"] for run in under] == [f"{ROWS[name].label} · fold 0 · train"]
        span = [int(rows[name]["info"]["start_time"]), int(under[0]["info"]["start_time"]), int(under[0]["info"]["end_time"]), int(rows[name]["info"]["end_time"])]
        assert span == sorted(span), (name, span)
        trainings += under
    for kind, children in (("training", trainings), ("lambda_sweep", _pipeline_children(mlflow_ui, quick_run, "lambda_sweep"))):
        assert children, kind
        for child in children:
            span = [int(parent["start_time"]), int(child["info"]["start_time"]), int(child["info"]["end_time"]), int(parent["end_time"])]
            assert span == sorted(span), (kind, span)


@pytest.mark.slow
def test_sweep_points_are_runs_named_by_lambda_with_lambda_as_a_param(mlflow_ui, quick_run):
    experiment = _experiment(mlflow_ui, quick_run)
    sweep = _pipeline_children(mlflow_ui, quick_run, "lambda_sweep")
    assert len(sweep) == 1
    points = _runs(mlflow_ui, experiment, f"tags.mlflow.parentRunId = '{sweep[0]['info']['run_id']}'")
    K = quick_run.config.tasks.K
    assert sorted(run["info"]["run_name"] for run in points) == sorted(["sweep λ_paper=0", f"sweep λ_paper={K}"])  # the paper's scale
    for run in points:
        assert float(_params(run)["lambda_paper"]) == float(run["info"]["run_name"].split("=")[1]) == K * float(_params(run)["lambda_ml"])
    metrics = {m["key"]: m for m in sweep[0]["data"].get("metrics", [])}
    assert not [key for key in metrics if key.startswith("sweep_")]  # no metric whose step stands in for λ
    files = _api(mlflow_ui, "artifacts/list", run_id=sweep[0]["info"]["run_id"])["files"]
    assert "lambda_ml.png" in {f["path"] for f in files}


@pytest.mark.slow
def test_the_registry_holds_one_described_quick_candidate_never_champion_that_loads_as_pyfunc(mlflow_ui, quick_run):
    name = registered_model_name("ml-100k")
    versions = _api(mlflow_ui, "model-versions/search", filter=f"name = '{name}'")["model_versions"]
    assert len(versions) == 1
    version = versions[0]
    assert str(version["version"]) == str(quick_run.promotion["version"]) and not version.get("aliases")  # quick: never champion
    alias = httpx.get(f"{mlflow_ui}/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": CHAMPION}, timeout=30)
    assert alias.status_code in (400, 404) and "error_code" in alias.json()  # the server: no such alias
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert {"dataset": "ml-100k", "kind": "pipeline", "preset": "quick", "row": "responsive_plus", "fold": "0"}.items() <= tags.items()
    assert tags["new_n5_ndcg10"] == f"{quick_run.score:.3f}" and "pyfunc.load_model" in version["description"]
    assert f"**Ours+** (row `responsive_plus`), fold 0 of 1" in version["description"] and f"{tags['users']} new users" in version["description"]

    with _through(mlflow_ui):  # as a user would: the registry's version, resolved and downloaded by the server
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version['version']}")
        example = model.input_example
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["user", "item", "recent"]
    frame = pd.DataFrame(example)
    scores = model.predict(frame)["score"].to_numpy()
    assert scores.shape == (len(frame),) and np.isfinite(scores).all() and len(set(scores.round(6))) > 1


@pytest.mark.slow
def test_the_default_experiment_keeps_its_artifacts_inside_artifacts(mlflow_ui, quick_run):
    default = _api(mlflow_ui, "experiments/get", experiment_id="0")["experiment"]
    assert default["artifact_location"].startswith(Path(quick_run.config.runtime.artifacts_dir).resolve().as_uri())


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(url: str, out: Path, size: str = "1600,1000") -> Path:
    """A headless Chromium screenshot of ``url`` (its JavaScript given up to 20 s of virtual time)."""
    profile = out.parent / f"{out.stem}-profile"
    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=20000",
                    f"--screenshot={out}", url], capture_output=True, timeout=600, check=True)  # a deadline: 240 s ran out under load
    return out


@pytest.mark.slow
def test_the_compare_view_renders_in_a_browser(mlflow_ui, quick_run, tmp_path):
    if chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run installs it): no screenshot of the compare view")
    from PIL import Image

    children = _pipeline_children(mlflow_ui, quick_run)
    runs = urllib.parse.quote(json.dumps([run["info"]["run_id"] for run in children]))
    experiments = urllib.parse.quote(json.dumps([children[0]["info"]["experiment_id"]]))
    shot = screenshot(f"{mlflow_ui}/#/compare-runs?runs={runs}&experiments={experiments}&{MODEL_TRAINING_VIEW}", tmp_path / "compare.png")
    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    content = image[100:900, 300:1100]  # the run table and parameters, right of the side bar
    assert image.shape == (1000, 1600)
    assert content.std() > 12, "the compare view is blank"
    assert len(np.unique(content.round(-1))) > 10 and (content < 128).mean() > 0.005, "no text in the compare view"
