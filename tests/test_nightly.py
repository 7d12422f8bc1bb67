"""Nightly retraining: promotion, and failure half-way leaves the champion untouched (real flows, real MLflow)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import numpy as np

from tasks.track.champion import CHAMPION, DATA_TAG, SCORE_TAG, CaseScores, current_champion, log_case_scores, registered_model_name
from tasks.runtime.paths import prepared_dir
from tasks.runtime.settings import load_config
from tasks.track.tracking import setup_mlflow

# one new-user fold: what is checked (divergence, a bad file, a clean promotion) is the nightly's path, which registers
# and promotes fold 0 alone; five folds prepared, trained and evaluated three times were half of the test's time
SMALL = ["eval.models=['responsive','pop']", "meta.epochs=1", "eval.bootstrap=20", "data.new_user_ns=[1,5]", "data.new_user_folds=1"]


def _fake_champion(client: MlflowClient, name: str, data_hash: str, score: float) -> str:
    """A champion that scored ``score`` on every case of this data version (its stored cases cover every user id)."""
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    run = client.create_run(client.get_experiment_by_name("metarec").experiment_id)
    log_case_scores(client, run.info.run_id, CaseScores(np.arange(10_000), np.full(10_000, score), data_hash))
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    client.set_model_version_tag(name, version, SCORE_TAG, str(score))
    client.set_model_version_tag(name, version, DATA_TAG, data_hash)
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def _nightly_runs(client: MlflowClient):
    exp = client.get_experiment_by_name("metarec")
    return client.search_runs([exp.experiment_id], "tags.kind = 'nightly'", order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_failure_half_way_keeps_champion_then_next_run_starts_clean(prefect_harness, artifacts, ratings_csv):
    from flows.nightly import nightly_retrain

    config = load_config(overrides=SMALL, data={"dataset": str(ratings_csv)})
    setup_mlflow(config)
    client = MlflowClient()
    name = registered_model_name(config.data.dataset)
    champion = _fake_champion(client, name, prepared_dir(config).name, 0.0)

    # 1. training blows up half-way (the paper's own failure mode: a huge step explodes the gradients)
    with pytest.raises(Exception, match="diverged"):
        nightly_retrain(dataset=str(ratings_csv), overrides=[*SMALL, "meta.outer_lr=1e12", "meta.inner_lr=1e6", "meta.grad_clip=1e30"])
    assert str(current_champion(client, name).version) == str(champion)
    failed = _nightly_runs(client)[-1]
    assert failed.info.status == "FAILED" and "diverged" in failed.data.tags["error"]

    # 2. a corrupt input file: clear error, champion untouched, run FAILED
    good, stat = ratings_csv.read_text(), ratings_csv.stat()
    ratings_csv.write_text(good.replace(",4,", ",four,", 1))
    with pytest.raises(ValueError, match="rating"):
        nightly_retrain(dataset=str(ratings_csv), overrides=SMALL)
    assert str(current_champion(client, name).version) == str(champion)
    assert _nightly_runs(client)[-1].info.status == "FAILED"

    # 3. the next run on good data starts clean, registers a version and promotes it: it beats the champion's 0.0 on
    # every one of the same cases (its stored ones: same data version), by the paired CI
    ratings_csv.write_text(good)
    os.utime(ratings_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the very same input file as before
    result = nightly_retrain(dataset=str(ratings_csv), overrides=SMALL)
    assert result["promotion"]["promoted"], result["promotion"]
    assert str(current_champion(client, name).version) == str(result["version"]) != str(champion)
    assert _nightly_runs(client)[-1].info.status == "FINISHED"
    assert "stored cases" in result["promotion"]["reason"] and result["promotion"]["gain_low"] > 0
    version = client.get_model_version(name, str(result["version"]))
    assert float(version.tags[SCORE_TAG]) == pytest.approx(result["score"], abs=5e-4)
