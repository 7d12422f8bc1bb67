"""The whole pipeline in --quick mode on ml-100k, with real Prefect flows, DuckDB, Parquet and MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from metarec.models.registry import DEFAULT_MODELS
from tasks.evaluate.evaluation import METRICS_FILE, eval_dir, new_user_metric
from tasks.runtime.paths import prepared_dir
from tasks.track.champion import current_champion, registered_model_name
from tasks.track.tracking import tracking_uri

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_every_output_file_is_written(quick_run):
    config, first = quick_run.config, quick_run.first
    run = Path(first["run_dir"])
    for name in ("table1.md", "table1.csv", "summary.md", "stream_auc.png", "config.json"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "stream_auc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (run / "table1.md").read_text()
    assert "Ours (paper)" in table and "RKMF" in table and "0.599" in table  # the paper's figure beside ours
    assert set(first["results"]) == set(config.eval.models) == set(DEFAULT_MODELS)  # the opt-in rows only when asked


@pytest.mark.slow
def test_metrics_are_probabilities_and_case_counts_match_stats(quick_run):
    config, first = quick_run.config, quick_run.first
    stats = json.loads((prepared_dir(config) / "stats.json").read_text())  # quick: one fold, fold 0
    for model, record in first["results"].items():
        for key, value in record["metrics"].items():
            assert 0.0 <= value["mean"] <= 1.0, (model, key, value)
        for n in config.data.new_user_ns:
            assert record["metrics"][new_user_metric(n, "hr")]["cases"] == stats["new_users_evaluable"]
        assert record["metrics"]["stream_auc_mean"]["cases"] == stats["parts"]["stream"]["rows"]


@pytest.mark.slow
def test_one_mlflow_child_run_per_model_with_shared_metric_names(quick_run):
    config, first = quick_run.config, quick_run.first
    uri = tracking_uri(config)
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name(config.runtime.experiment)
    parents = client.search_runs([experiment.experiment_id], "tags.kind = 'pipeline'")
    assert parents
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parents[-1].info.run_id}' and tags.kind = 'model'")
    assert sorted(run.data.tags["model"] for run in children) == sorted(config.eval.models)
    for run in children:
        assert {"new_n1_hr10", "new_n5_ndcg10", "new_n10_auc", "stream_auc_mean", "full_n5_ndcg10"} <= set(run.data.metrics)
        assert run.data.tags["config_hash"] == config.hash_of()


@pytest.mark.slow
def test_rerun_reuses_finished_steps(quick_run):
    config, first, second, stamps = quick_run.config, quick_run.first, quick_run.second, quick_run.stamps
    assert {m: (eval_dir(config, m) / METRICS_FILE).stat().st_mtime_ns for m in second["results"]} == stamps
    assert second["results"]["pop"]["metrics"] == first["results"]["pop"]["metrics"]
    # the finished training is reused as it is: same MLflow run, no second registered version
    assert (second["training"]["run_id"], second["training"]["model_version"]) == (first["training"]["run_id"], first["training"]["model_version"])


@pytest.mark.slow
def test_warm_cli_run_prints_the_cached_results_without_starting_prefect(quick_run, ml100k_dir, monkeypatch):
    import flows.runners
    from typer.testing import CliRunner

    from flows.cli import app

    first = quick_run.first
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(quick_run.config.runtime.artifacts_dir))
    monkeypatch.setattr(flows.runners, "with_runner", lambda *a, **k: pytest.fail("a flow was started on a warm re-run"))
    result = CliRunner().invoke(app, ["run", "--quick", "--no-sweep", "--data-dir", str(ml100k_dir), "--set", "eval.lambda_sweep=[0.0, 1.0]"])
    assert result.exit_code == 0, result.output
    assert "every step cached" in result.output and "Ours (paper)" in result.output
    assert first["run_dir"] in result.output


@pytest.mark.slow
def test_lambda_sweep_draws_its_curve(quick_run):
    swept = quick_run.swept
    assert [p["lambda_ml"] for p in swept["points"]] == [0.0, 1.0]
    assert Path(swept["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert all(p["status"] in ("finished", "diverged") for p in swept["points"])


@pytest.mark.slow
def test_a_run_registers_one_candidate_once_and_never_a_sweep_point(quick_run):
    config = quick_run.config
    uri = tracking_uri(config)
    client = MlflowClient(uri, uri)
    name = registered_model_name(config.data.dataset)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [str(quick_run.promotion["version"])] == [str(quick_run.promotion_again["version"])]
    assert versions[0].run_id == quick_run.first["training"]["run_id"] == quick_run.second["training"]["run_id"]
    assert {"kind": "pipeline", "preset": "quick", "dataset": "ml-100k", "row": "responsive_plus", "fold": "0"}.items() <= versions[0].tags.items()
    # a quick run never promotes: the version is there to serve with --version, the data set has no champion
    assert not quick_run.promotion["promoted"] and not quick_run.promotion_again["promoted"] and "quick" in quick_run.promotion["reason"]
    assert current_champion(client, name) is None


@pytest.mark.parametrize("override, words", [
    ("eval.models=['responsive','nope']", "unknown model"),
    ("data.new_user_ns=[0,5]", "new_user_ns"),
    ("meta.lambda_ml=-0.5", "meta.lambda_ml"),
])
def test_bad_config_rejected_before_any_work(tmp_path, override, words):
    env_root = tmp_path / "artifacts"
    import os

    env = {**os.environ, "METAREC_RUNTIME__ARTIFACTS_DIR": str(env_root)}
    # 10 min: only a deadline (importing the CLI is slow on a busy machine), the check is the exit code and the message
    done = subprocess.run([BIN / "metarec", "run", "--quick", "--set", override], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and words in done.stderr
    assert not env_root.exists()  # nothing was started


QUICK_MARGIN = 0.05  # issue 15: in quick mode ours may trail MF-FT (the same MF without the meta loss) by at most this


@pytest.mark.slow
def test_quick_gives_every_model_the_same_share_and_draws_no_verdict(quick_run):
    """One shortened budget for all (eval.training_fraction of each row's passes): our model is not starved against
    MF-FT at new-user NDCG@10, n = 5, and the quick outputs say what they are and draw no verdicts."""
    results = quick_run.first["results"]
    key = new_user_metric(5, "ndcg")
    ours, mf_ft = results["responsive"]["metrics"][key]["mean"], results["mf_ft"]["metrics"][key]["mean"]
    assert ours >= mf_ft - QUICK_MARGIN, (ours, mf_ft)
    run = Path(quick_run.first["run_dir"])
    for name in ("table1.md", "summary.md"):
        assert "quick preset: a smoke run, not a comparison" in (run / name).read_text()[:300]  # at the top
    assert "## Verdicts" not in (run / "summary.md").read_text()
