"""Meta-training from task shards: MLflow run and registry, resume after a crash, divergence, flow and CLI."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

import tasks.training as training
from metarec.config import Config
from metarec.synthetic import planted_interactions
from tasks.models import load_model, model_dir
from tasks.prepare import prepare_data
from tasks.task_shards import build_task_shards
from tasks.tracking import REGISTERED_MODEL, setup_mlflow
from tasks.training import load_checkpoint, load_theta, meta_train, training_dir


@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which tasks.tracking would then prefer: start each test clean."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def planted_csv(tmp_path_factory) -> Path:
    """Planted data (items shifted to 1..60) plus item 0, which only a few users have, after everything else: in the
    stream, never a positive of the history, yet inside Q (ids are dense, sorted by raw id)."""
    data = planted_interactions(n_users=80, n_items=60, per_user=15, seed=2).interactions
    late = int(data.ts.max()) + np.arange(1, 6)
    users = np.concatenate([data.users, [0, 1, 2, 3, 4]])
    table = pa.table({"user_id": users, "item_id": np.concatenate([data.items + 1, np.zeros(5, np.int64)]),
                      "rating": np.full(len(users), 5.0), "timestamp": np.concatenate([data.ts, late])})
    path = tmp_path_factory.mktemp("planted") / "planted.csv"
    pacsv.write_csv(table, path)
    return path


def _config(csv: Path, root: Path, **meta) -> Config:
    return Config(
        data={"dataset": str(csv), "n_negatives": 20},
        tasks={"k": 3, "K": 6, "shard_size": 200},  # several shards
        meta={"dim": 8, "epochs": 3, "batch_tasks": 64, **meta},
        runtime={"artifacts_dir": str(root), "progress": False},
    )


def _prepared(config: Config) -> Config:
    prepare_data(config)
    build_task_shards(config)
    return config


@pytest.fixture(scope="module")
def trained(planted_csv, tmp_path_factory):
    """One meta-training run on the pipeline's path, shared by the tests that only read it."""
    config = _prepared(_config(planted_csv, tmp_path_factory.mktemp("trained")))
    return config, meta_train(config)


def test_training_logs_params_metrics_and_a_registered_safetensors_model(trained, tmp_path):
    config, result = trained
    assert result.status == "finished" and result.epochs_done == 3
    setup_mlflow(config)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert set(config.to_flat_dict()) <= set(run.data.params)
    assert run.data.params["meta.lambda_ml"] == str(config.meta.lambda_ml)
    for name in ("support_loss", "query_loss", "tasks_per_s", "grad_norm_max", "grad_norm_mean", "clipped_steps"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [0, 1, 2]
    norms = client.get_metric_history(result.run_id, "grad_norm_max")
    assert all(m.value > 0 for m in norms) and all(r["grad_norm_max"] >= r["grad_norm_mean"] > 0 for r in result.history)
    assert run.data.tags["status"] == "finished" and run.data.tags["config_hash"] == config.hash_of()
    version = client.get_model_version(REGISTERED_MODEL, result.model_version)
    assert version.run_id == result.run_id and {"dataset", "config_hash", "git_commit"} <= set(version.tags)
    P, Q, meta = load_theta(Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="model", dst_path=str(tmp_path / "dl"))))
    model = load_model(model_dir(config, "responsive"))
    assert torch.equal(P, model.P_.detach()) and torch.equal(Q, model.Q_.detach()) and meta["dim"] == 8
    assert model.score(np.array([0]), np.array([[1, 2, 3]])).shape == (1, 3)


def test_the_pipelines_saved_model_treats_untrained_users_and_items_as_new(trained):
    """METHOD.md §11 on the pipeline's path (meta_train -> save -> load), not only fit(): rows no training step
    touched are the mean of the trained rows + noise, in the saved Θ, at serving, and still after observe() has
    indexed such a user; rows grown online average the trained rows only."""
    from tasks.prepared import load_prepared
    from tasks.paths import prepared_dir
    from metarec.interface import Interactions

    config, result = trained
    assert result.status == "finished"
    model = load_model(model_dir(config, "responsive"))
    history = load_prepared(prepared_dir(config)).history
    absent = np.setdiff1d(np.arange(model.n_users_), history.users)  # new users and stream-only users: ids inside P
    assert len(absent) >= 5 and not np.isin(0, history.items)  # item 0: stream-only, inside Q
    P, Q = model.P_.detach(), model.Q_.detach()
    # the trained rows' means (history rows no step touched sit at that mean already, so they barely move it)
    user_mean, item_mean = P[np.unique(history.users)].mean(0), Q[np.unique(history.items)].mean(0)
    bound = 4 * config.meta.new_row_std * np.sqrt(config.meta.dim)  # a random N(0, 0.1²I) row lies far outside it
    assert ((P[absent] - user_mean).norm(dim=1) < bound).all() and (Q[0] - item_mean).norm() < bound
    assert (P[np.unique(history.users)] - user_mean).norm(dim=1).median() > bound  # trained rows are not at the mean
    trained_users, trained_items = model._trained_masks()  # what the model recorded agrees
    assert not trained_users[absent].any() and trained_users.sum() > 0.8 * len(np.unique(history.users))
    assert not trained_items[0] and trained_items[np.unique(history.items)].mean() > 0.9

    # observe indexes an untrained user (one interaction: no task, so still untrained) and grows a new one
    u, beyond = int(absent[0]), model.n_users_ + 1
    t = int(history.ts.max()) + 10**6
    with torch.no_grad():
        model.P_[u] = 50.0  # whatever P holds for it, serving and the online update must not use it
    model.observe(Interactions.from_arrays([u, beyond], [5, 6], [t, t + 1]))
    gen = torch.Generator().manual_seed(0)
    rows = model._user_rows(np.array([u, beyond]), gen)
    assert ((rows - user_mean).norm(dim=1) < bound).all()
    assert (model.P_.detach()[[u, beyond]] - user_mean).norm(dim=1).max() < bound  # started there, untouched by the step
    assert np.isfinite(model.score(np.array([u, beyond]), np.array([[1, 2, 3, 0]] * 2))).all()


def test_resume_after_a_crash_equals_an_uninterrupted_run(planted_csv, tmp_path, monkeypatch):
    whole = _prepared(_config(planted_csv, tmp_path / "whole"))
    assert meta_train(whole).status == "finished"
    expected, _ = load_checkpoint(training_dir(whole) / "checkpoint", whole.hash_of("data", "tasks", "meta"))

    crashed = _prepared(_config(planted_csv, tmp_path / "crashed"))
    real_epoch = training._epoch

    def crash_in_epoch_two(model, task_dir, epoch, config, n_tasks):
        if epoch == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_epoch(model, task_dir, epoch, config, n_tasks)

    monkeypatch.setattr(training, "_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        meta_train(crashed)
    monkeypatch.setattr(training, "_epoch", real_epoch)
    _, record = load_checkpoint(training_dir(crashed) / "checkpoint", crashed.hash_of("data", "tasks", "meta"))
    assert record["epoch"] == 1
    resumed = meta_train(crashed)
    assert resumed.status == "finished" and resumed.run_id == record["run_id"] and len(resumed.history) == 3
    state, _ = load_checkpoint(training_dir(crashed) / "checkpoint", crashed.hash_of("data", "tasks", "meta"))
    assert set(state) == set(expected)
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


@pytest.mark.parametrize("meta", [{"lambda_ml": 1e38}, {"inner_lr": 1e12}])
def test_divergence_is_recorded_and_writes_no_weights(planted_csv, tmp_path, meta):
    config = _prepared(_config(planted_csv, tmp_path / "div", **meta))
    result = meta_train(config)
    assert result.status == "diverged" and result.model_version is None and ("not finite" in result.message or "inf" in result.message)
    setup_mlflow(config)
    client = MlflowClient()
    assert client.get_run(result.run_id).data.tags["status"] == "diverged"
    assert not [a.path for a in client.list_artifacts(result.run_id) if a.path == "model"]
    assert not (training_dir(config) / "checkpoint").exists() and not model_dir(config, "responsive").exists()
    assert (training_dir(config) / "status.json").read_text().count("diverged") >= 1
    assert not client.search_model_versions(f"name='{REGISTERED_MODEL}'")


def test_train_command_runs_the_flow(planted_csv, tmp_path, artifacts, prefect_harness):
    from flows.cli import app

    sets = ["--set", "tasks.k=3", "--set", "tasks.K=6", "--set", "meta.dim=8", "--set", "meta.batch_tasks=64", "--set", "data.n_negatives=20"]
    result = CliRunner().invoke(app, ["train", "--dataset", str(planted_csv), "--epochs", "2", *sets])
    assert result.exit_code == 0, result.output
    assert "epoch 1:" in result.output and "status finished" in result.output
    assert list(artifacts.glob("*/*/training/responsive-*/status.json"))
