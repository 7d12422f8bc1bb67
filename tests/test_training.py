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
    data = planted_interactions(n_users=80, n_items=60, per_user=15, seed=2).interactions
    path = tmp_path_factory.mktemp("planted") / "planted.csv"
    table = pa.table({"user_id": data.users, "item_id": data.items, "rating": np.full(len(data), 5.0), "timestamp": data.ts})
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


def test_training_logs_params_metrics_and_a_registered_safetensors_model(planted_csv, tmp_path):
    config = _prepared(_config(planted_csv, tmp_path / "a"))
    result = meta_train(config)
    assert result.status == "finished" and result.epochs_done == 3
    setup_mlflow(config)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert set(config.to_flat_dict()) <= set(run.data.params)
    assert run.data.params["meta.lambda_ml"] == str(config.meta.lambda_ml)
    for name in ("support_loss", "query_loss", "tasks_per_s"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [0, 1, 2]
    assert run.data.tags["status"] == "finished" and run.data.tags["config_hash"] == config.hash_of()
    version = client.get_model_version(REGISTERED_MODEL, result.model_version)
    assert version.run_id == result.run_id and {"dataset", "config_hash", "git_commit"} <= set(version.tags)
    P, Q, meta = load_theta(Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="model", dst_path=str(tmp_path / "dl"))))
    model = load_model(model_dir(config, "responsive"))
    assert torch.equal(P, model.P_.detach()) and torch.equal(Q, model.Q_.detach()) and meta["dim"] == 8
    assert model.score(np.array([0]), np.array([[1, 2, 3]])).shape == (1, 3)
    again = meta_train(config)  # the same key: the finished training is returned, nothing re-registered
    assert (again.status, again.run_id, again.model_version, again.history) == ("finished", result.run_id, result.model_version, result.history)
    assert len(client.search_model_versions(f"name='{REGISTERED_MODEL}'")) == 1


def test_fomaml_row_trains_through_the_same_path_in_its_own_folder(planted_csv, tmp_path):
    """Row responsive_fo (issue 11): meta_train with checkpoints and an MLflow run of its own, the first-order option
    fixed, saved where the evaluation looks for it (the pipeline registers only ours, as here)."""
    config = _prepared(_config(planted_csv, tmp_path / "fo"))
    result = meta_train(config, row="responsive_fo", register=False)
    assert result.status == "finished" and result.epochs_done == 3 and result.model_version is None
    fo = config.for_row("responsive_fo")
    assert fo.meta.first_order and training_dir(fo) != training_dir(config.for_row("responsive"))
    assert (training_dir(fo) / "checkpoint").is_dir()
    model = load_model(model_dir(config, "responsive_fo"))
    assert model.meta.first_order and result.model_path == str(model_dir(config, "responsive_fo"))
    setup_mlflow(config)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["model"] == "responsive_fo" and run.data.params["meta.first_order"] == "True"
    assert [m.step for m in client.get_metric_history(result.run_id, "epoch_seconds")] == [0, 1, 2]
    assert not client.search_model_versions(f"name='{REGISTERED_MODEL}'")


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


def test_two_data_parallel_workers_train_the_same_theta_as_one(planted_csv, tmp_path):
    one = _prepared(_config(planted_csv, tmp_path / "one", epochs=2))
    two = _prepared(_config(planted_csv, tmp_path / "two", epochs=2).model_copy(
        update={"runtime": one.runtime.model_copy(update={"artifacts_dir": tmp_path / "two", "workers": 2})}))
    first, second = meta_train(one), meta_train(two)
    assert first.status == second.status == "finished" and len(second.history) == 2
    a, b = load_model(model_dir(one, "responsive")), load_model(model_dir(two, "responsive"))
    assert torch.allclose(a.P_, b.P_, atol=1e-5) and torch.allclose(a.Q_, b.Q_, atol=1e-5)
    state, record = load_checkpoint(training_dir(two) / "checkpoint", two.hash_of("data", "tasks", "meta"))
    assert record["epoch"] == 1 and torch.allclose(state["P"], b.P_.detach())
