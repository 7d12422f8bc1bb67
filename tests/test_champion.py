"""The champion per data set, guarded: against a real (sqlite) MLflow registry, and end to end through the pipeline."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.track.champion import (
    CHAMPION, CaseScores, champion_uri, current_champion, log_case_scores, promote_if_better, registered_model_name,
)

USERS = np.arange(200, dtype=np.int64)


@pytest.fixture()
def client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def _cases(ndcg: np.ndarray, data_hash: str = "d1", users: np.ndarray = USERS) -> CaseScores:
    return CaseScores(users, np.asarray(ndcg, dtype=np.float64), data_hash)


def _planted(mean: float, seed: int, noise: float = 0.2) -> np.ndarray:
    return np.clip(mean + np.random.default_rng(seed).normal(0.0, noise, len(USERS)), 0.0, 1.0)


def _version(client: MlflowClient, name: str, tmp_path: Path, cases: CaseScores | None = None) -> str:
    """A registered version whose run stores ``cases`` (as the pipeline's registration does)."""
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    exp = client.get_experiment_by_name("x") or client.get_experiment(client.create_experiment("x", artifact_location=tmp_path.as_uri()))
    run = client.create_run(exp.experiment_id)
    if cases is not None:
        log_case_scores(client, run.info.run_id, cases)
    return client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version


def never(*_):
    pytest.fail("a champion scored on the same data version must be compared on its stored cases, not re-scored")


def test_one_registered_model_and_champion_uri_per_data_set():
    assert registered_model_name("ml-100k") == "responsive-mf-ml-100k"
    assert registered_model_name("/data/My Ratings.csv") == "responsive-mf-My-Ratings"
    assert champion_uri("ml-1m") == "models:/responsive-mf-ml-1m@champion"
    assert champion_uri("ml-100k") != champion_uri("ml-1m")


def test_a_tied_candidate_keeps_the_champion_a_clearly_better_one_takes_it(client, tmp_path):
    name = registered_model_name("ml-100k")
    first = _cases(_planted(0.50, seed=1))
    v1 = _version(client, name, tmp_path, first)
    assert promote_if_better(client, name, v1, first, never).promoted  # the first full version
    # a tie: other noise around the same mean (the candidate's mean may even be a little higher)
    tied = _cases(np.clip(first.ndcg + np.random.default_rng(2).normal(0.0, 0.2, len(USERS)), 0, 1))
    v2 = _version(client, name, tmp_path, tied)
    kept = promote_if_better(client, name, v2, tied, never, resamples=500)
    assert not kept.promoted and "kept, tie" in kept.reason and kept.gain_low <= 0 <= kept.gain_high
    assert current_champion(client, name).version == v1
    worse = _cases(first.ndcg - 0.1)
    v3 = _version(client, name, tmp_path, worse)
    assert not promote_if_better(client, name, v3, worse, never, resamples=500).promoted
    better = _cases(np.clip(first.ndcg + 0.05, 0, 1))
    v4 = _version(client, name, tmp_path, better)
    moved = promote_if_better(client, name, v4, better, never, resamples=500)
    assert moved.promoted and moved.gain_low > 0 and moved.cases == len(USERS)
    assert client.get_model_version_by_alias(name, CHAMPION).version == v4


def test_a_quick_run_never_promotes_even_a_much_better_model(client, tmp_path):
    name = registered_model_name("ml-100k")
    full = _cases(_planted(0.3, seed=3))
    v1 = _version(client, name, tmp_path, full)
    promote_if_better(client, name, v1, full, never)
    quick = _cases(np.ones(len(USERS)))
    v2 = _version(client, name, tmp_path, quick)
    decision = promote_if_better(client, name, v2, quick, never, preset="quick")
    assert not decision.promoted and "never a champion candidate" in decision.reason
    assert current_champion(client, name).version == v1
    # nor does a quick run become the first champion of a data set
    other = registered_model_name("ml-1m")
    v = _version(client, other, tmp_path, quick)
    assert not promote_if_better(client, other, v, quick, never, preset="quick").promoted and current_champion(client, other) is None


def test_a_candidate_on_another_data_set_leaves_this_data_set_s_champion_alone(client, tmp_path):
    ours, theirs = registered_model_name("ml-100k"), registered_model_name("ml-1m")
    weak = _cases(_planted(0.2, seed=4))
    v1 = _version(client, ours, tmp_path, weak)
    promote_if_better(client, ours, v1, weak, never)
    strong = _cases(_planted(0.9, seed=5), data_hash="other-data")
    w1 = _version(client, theirs, tmp_path, strong)
    decision = promote_if_better(client, theirs, w1, strong, never)
    assert decision.promoted and decision.champion_before is None  # its own data set's first champion, not a challenger
    assert current_champion(client, ours).version == v1 and current_champion(client, ours).name == ours


def test_a_champion_of_another_data_version_is_rescored_on_the_candidate_s_cases(client, tmp_path):
    name = registered_model_name("ml-100k")
    old = _cases(_planted(0.9, seed=6), data_hash="old-data")
    v1 = _version(client, name, tmp_path, old)
    promote_if_better(client, name, v1, old, never)
    candidate = _cases(_planted(0.4, seed=7), data_hash="new-data", users=USERS + 1000)
    v2 = _version(client, name, tmp_path, candidate)
    asked = []

    def rescore(champion, cases):
        asked.append((champion.version, cases.data_hash, tuple(cases.users[:3])))
        return _cases(candidate.ndcg - 0.2, data_hash="new-data", users=cases.users)

    decision = promote_if_better(client, name, v2, candidate, rescore, resamples=300)
    assert asked == [(v1, "new-data", (1000, 1001, 1002))]  # on the candidate's cases, never the stale 0.9
    assert decision.promoted and "re-scored" in decision.reason


def test_an_unloadable_champion_does_not_block_promotion(client, tmp_path):
    name = registered_model_name("ml-100k")
    first = _cases(_planted(0.5, seed=8), data_hash="d1")
    v1 = _version(client, name, tmp_path, first)
    promote_if_better(client, name, v1, first, never)
    candidate = _cases(_planted(0.1, seed=9), data_hash="d2")
    v2 = _version(client, name, tmp_path, candidate)

    def broken(*_):
        raise FileNotFoundError("no theta.safetensors")

    decision = promote_if_better(client, name, v2, candidate, broken)
    assert decision.promoted and "could not be re-scored" in decision.reason
    assert current_champion(client, name).version == v2


# ------------------------------------------------------------------ end to end: the pipeline registers and decides
SMALL = ["eval.models=['responsive','pop']", "meta.epochs=1", "eval.bootstrap=50", "data.new_user_ns=[1,5]", "data.new_user_folds=1"]


@pytest.mark.slow
def test_a_quick_run_after_a_full_run_leaves_the_full_run_s_champion_in_place(prefect_harness, artifacts, ratings_csv):
    from flows.pipeline import pipeline
    from tasks.runtime.settings import QUICK_OVERRIDES, load_config
    from tasks.track.tracking import setup_mlflow

    data = {"dataset": str(ratings_csv)}
    full = load_config(overrides=SMALL, data=data)
    first = pipeline(full)
    assert first["champion"]["promoted"], first["champion"]
    setup_mlflow(full)
    client = MlflowClient()
    name = registered_model_name(full.data.dataset)
    version = client.get_model_version(name, first["champion"]["version"])
    assert version.tags["preset"] == "full" and version.tags["row"] == "responsive" and version.tags["fold"] == "0"
    assert len(version.tags["new_n5_ndcg10"].split(".")[1]) == 3  # rounded to 3 decimals, as the page shows it
    assert "**Ours (paper)** (row `responsive`), fold 0 of 1" in version.description and "new users" in version.description
    logged = client.search_logged_models([client.get_run(first["training"]["run_id"]).info.experiment_id],
                                         f"source_run_id = '{first['training']['run_id']}'")
    assert [m.name for m in logged] == ["responsive-fold0"] and "new_n5_ndcg10" in {m.key for m in logged[0].metrics}
    parent = client.get_run(first["training"]["run_id"]).data.tags["mlflow.parentRunId"]  # the row's pooled run
    pipeline_run = client.get_run(client.get_run(parent).data.tags["mlflow.parentRunId"])
    assert pipeline_run.data.tags["champion_decision"] == first["champion"]["reason"] and pipeline_run.data.tags["promoted"] == "true"

    quick = load_config(overrides=[*QUICK_OVERRIDES, *SMALL, "meta.epochs=4"], data=data)  # another model: 2 epochs after quick's halving
    second = pipeline(quick)
    assert not second["champion"]["promoted"] and "quick" in second["champion"]["reason"]
    assert second["champion"]["version"] != first["champion"]["version"]  # registered, servable with --version
    assert str(current_champion(client, name).version) == str(first["champion"]["version"])
