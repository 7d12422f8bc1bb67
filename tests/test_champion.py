"""Champion promotion against a real (sqlite) MLflow registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tasks.track.champion import CHAMPION, SCORE_TAG, current_champion, promote_if_better

NAME = "responsive-mf-test"


@pytest.fixture()
def client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    client.create_registered_model(NAME)
    return client


def _new_version(client: MlflowClient, tmp_path: Path) -> str:
    exp = client.get_experiment_by_name("x") or client.get_experiment(client.create_experiment("x", artifact_location=tmp_path.as_uri()))
    run = client.create_run(exp.experiment_id)
    return client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id).version


def test_first_version_becomes_champion_then_only_better_or_equal_moves_it(client, tmp_path):
    never = lambda v: pytest.fail("champion scored on the same data must not be re-scored")
    v1 = _new_version(client, tmp_path)
    assert promote_if_better(client, v1, 0.30, "d1", never, NAME).promoted
    v2 = _new_version(client, tmp_path)
    kept = promote_if_better(client, v2, 0.29, "d1", never, NAME)
    assert not kept.promoted and "kept" in kept.reason and current_champion(client, NAME).version == v1
    v3 = _new_version(client, tmp_path)
    assert promote_if_better(client, v3, 0.30, "d1", never, NAME).promoted  # ties promote the newer
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == v3


def test_champion_from_other_data_is_rescored_on_the_current_data(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    promote_if_better(client, v1, 0.90, "old-data", lambda v: 0.0, NAME)
    v2 = _new_version(client, tmp_path)
    calls = []
    decision = promote_if_better(client, v2, 0.40, "new-data", lambda v: calls.append(v) or 0.50, NAME)
    assert calls == [v1]
    assert not decision.promoted and decision.champion_score == 0.50


def test_an_unloadable_champion_does_not_block_promotion(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    promote_if_better(client, v1, 0.5, "d1", lambda v: 0.0, NAME)
    v2 = _new_version(client, tmp_path)

    def broken(version):
        raise FileNotFoundError("no theta.safetensors")

    decision = promote_if_better(client, v2, 0.1, "d2", broken, NAME)
    assert decision.promoted and "could not be re-scored" in decision.reason
    assert current_champion(client, NAME).version == v2


def test_stored_score_round_trips_so_an_exact_tie_promotes(client, tmp_path):
    never = lambda v: pytest.fail("champion scored on the same data must not be re-scored")
    score = 0.07363556297788664  # rounds up at six digits: a rounded tag would beat its own equal
    v1 = _new_version(client, tmp_path)
    promote_if_better(client, v1, score, "d1", never, NAME)
    assert float(client.get_model_version(NAME, v1).tags[SCORE_TAG]) == score
    v2 = _new_version(client, tmp_path)
    assert promote_if_better(client, v2, score, "d1", never, NAME).promoted
