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

import tasks.train.training as training
from metarec.config import Config, TaskConfig
from metarec.synthetic import planted_interactions
from tasks.train.models import load_model, model_dir
from tasks.data.prepare import prepare_data
from tasks.train.task_shards import build_task_shards
from tasks.track.champion import registered_model_name
from tasks.track.tracking import setup_mlflow
from tasks.track.model_registry import THETA_FILE, Candidate, load_theta, register_candidate
from tasks.train.training import load_checkpoint, meta_train, training_dir


@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which tasks.track.tracking would then prefer: start each test clean."""
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
    """One finished meta-training on the pipeline's path, shared by the checks of its run, model and registration."""
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    config = _prepared(_config(planted_csv, tmp_path_factory.mktemp("trained")))
    return config, meta_train(config)


def test_training_logs_the_rows_params_metrics_and_theta_as_a_pyfunc_model(trained, tmp_path):
    config, result = trained
    assert result.status == "finished" and result.epochs_done == 3 and result.model_version is None
    setup_mlflow(config)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.params["meta.lambda_ml"] == str(config.meta.lambda_ml) and run.data.params["model"] == "responsive"
    assert not [key for key in run.data.params if key.startswith(("baselines.", "eval.", "runtime."))]  # only the row's sections
    for name in ("support_loss", "query_loss", "tasks_per_s", "grad_norm_max", "grad_norm_mean", "clipped_steps"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [0, 1, 2]
    norms = client.get_metric_history(result.run_id, "grad_norm_max")
    assert all(m.value > 0 for m in norms) and all(r["grad_norm_max"] >= r["grad_norm_mean"] > 0 for r in result.history)
    assert run.data.tags["status"] == "finished" and run.data.tags["config_hash"] == config.hash_of()
    assert run.info.run_name == "Ours (paper) · fold 0 · train"  # the row and fold first: what tells runs apart
    logged = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{result.run_id}'")
    assert [m.name for m in logged] == ["responsive-fold0"]  # named by row and fold
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, dst_path=str(tmp_path / "dl")))
    P, Q, meta = load_theta(local)
    model = load_model(model_dir(config, "responsive"))
    assert torch.equal(P, model.P_.detach()) and torch.equal(Q, model.Q_.detach()) and meta["dim"] == 8
    assert model.score(np.array([0]), np.array([[1, 2, 3]])).shape == (1, 3)
    # loadable as an MLflow model, without pickle: models from code, weights in safetensors, the rest JSON
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel and "signature" in mlmodel
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib")]
    assert not client.search_model_versions(f"name='{registered_model_name(config.data.dataset)}'")  # training registers nothing


def test_a_finished_training_is_returned_as_it_is_without_reopening_its_run(trained):
    config, result = trained
    setup_mlflow(config)
    before = MlflowClient().get_run(result.run_id).info
    again = meta_train(config)
    after = MlflowClient().get_run(result.run_id).info
    assert again.run_id == result.run_id and again.model_uri == result.model_uri and again.history == result.history
    assert (after.end_time, after.status) == (before.end_time, "FINISHED")


def test_registered_once_per_run_with_description_tags_and_a_pyfunc_that_scores_like_serving(trained):
    import pandas as pd

    from tasks.track.champion import CaseScores
    from tasks.track.model_registry import Candidate, register_candidate
    from tasks.serve.serving import load_served, recommend

    config, result = trained
    setup_mlflow(config)
    client = MlflowClient()
    name = registered_model_name(config.data.dataset)
    cases = CaseScores(np.arange(4), np.array([0.25, 0.5, 0.0, 0.25]), "d1")  # mean 0.25
    version = register_candidate(config, result.run_id, "pipeline", Candidate("responsive", 0, 5, cases))
    assert register_candidate(config, result.run_id, "nightly", Candidate("responsive", 0, 5, cases)) == version  # a re-run registers nothing new
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    registered = client.get_model_version(name, version)
    assert registered.run_id == result.run_id and "pipeline run" in registered.description and "**0.250** on fold 0's 4 new users" in registered.description
    assert "**Ours (paper)** (row `responsive`), fold 0 of 5" in registered.description
    assert {"dataset": str(config.data.dataset), "kind": "pipeline", "preset": "full", "new_n5_ndcg10": "0.250", "row": "responsive",
            "fold": "0", "users": "4"}.items() <= registered.tags.items()

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    served = load_served(config, version)
    users, items = served.raw_users, served.raw_items
    candidates = [str(items[i]) for i in range(10)]
    scored = pyfunc.predict(pd.DataFrame({"user": [str(users[3])] * 10, "item": candidates}))["score"].to_numpy()
    expected = served.model.score(np.array([3]), np.arange(10)[None, :])[0]
    np.testing.assert_allclose(scored, expected, rtol=1e-5, atol=1e-6)
    # a new user adapted to what they just showed: the same top items as `metarec recommend`
    recent = [str(items[0]), str(items[5])]
    frame = pd.DataFrame({"user": "nobody", "item": [str(i) for i in items], "recent": ",".join(recent)})
    scores = pyfunc.predict(frame)["score"].to_numpy(copy=True)
    scores[[0, 5]] = -np.inf
    top = [str(items[i]) for i in np.argsort(-scores, kind="stable")[:5]]
    assert top == [row["item"] for row in recommend(served, "nobody", recent, n=5)]
    with pytest.raises(Exception, match="unknown item"):
        pyfunc.predict(pd.DataFrame({"user": ["nobody"], "item": ["no-such-item"]}))


def test_fomaml_row_trains_through_the_same_path_in_its_own_folder(planted_csv, tmp_path):
    """Row responsive_fo (issue 11): meta_train with checkpoints and an MLflow run of its own, the first-order option
    fixed, saved where the evaluation looks for it (the pipeline registers only ours, as here)."""
    config = _prepared(_config(planted_csv, tmp_path / "fo"))
    result = meta_train(config, row="responsive_fo")
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
    assert not client.search_model_versions(f"name='{registered_model_name(config.data.dataset)}'")


def test_the_pipelines_saved_model_treats_untrained_users_and_items_as_new(trained):
    """docs/method.md §11 on the pipeline's path (meta_train -> save -> load), not only fit(): rows no training step
    touched are the mean of the trained rows + noise, in the saved Θ, at serving, and still after observe() has
    indexed such a user; rows grown online average the trained rows only."""
    from tasks.data.prepared import load_prepared
    from tasks.runtime.paths import prepared_dir
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
    run = client.get_run(result.run_id)
    assert run.data.tags["status"] == "diverged" and run.info.status == "FAILED"  # not FINISHED with a tag (issue 14, item 7)
    assert not client.search_logged_models([run.info.experiment_id], f"source_run_id = '{result.run_id}'")
    assert not (training_dir(config) / "checkpoint").exists() and not model_dir(config, "responsive").exists()
    assert (training_dir(config) / "status.json").read_text().count("diverged") >= 1
    assert not client.search_model_versions(f"name='{registered_model_name(config.data.dataset)}'")


def test_train_command_runs_the_flow(planted_csv, tmp_path, artifacts, prefect_harness):
    from flows.cli import app

    sets = ["--set", "tasks.k=3", "--set", "tasks.K=6", "--set", "meta.dim=8", "--set", "meta.batch_tasks=64", "--set", "data.n_negatives=20"]
    result = CliRunner().invoke(app, ["train", "--dataset", str(planted_csv), "--epochs", "2", *sets])
    assert result.exit_code == 0, result.output
    assert "epoch 1:" in result.output and "status finished" in result.output
    assert list(artifacts.glob("*/*/training/responsive-*/status.json"))


@pytest.mark.parametrize("damaged", [training.STATE_FILE, training.STATE_META])
def test_unreadable_checkpoint_is_moved_aside_and_training_starts_afresh(planted_csv, tmp_path, damaged, caplog):
    """Issue 14, item 6: a truncated checkpoint crashed every later run with a traceback."""
    config = _prepared(_config(planted_csv, tmp_path / "a", epochs=2))
    stopped = meta_train(config, max_epochs=1)
    assert stopped.status == "stopped"
    ckpt = training_dir(config) / "checkpoint"
    broken = ckpt / damaged
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        result = meta_train(config)
    assert result.status == "finished" and len(result.history) == 2 and result.run_id != stopped.run_id  # afresh: both epochs
    (aside,) = ckpt.parent.glob("checkpoint.corrupt-*")
    assert (aside / damaged).is_file()
    assert str(broken) in caplog.text and str(aside) in caplog.text
    setup_mlflow(config)
    if damaged == training.STATE_FILE:  # its record still names the run: ended FAILED rather than left RUNNING
        assert MlflowClient().get_run(stopped.run_id).info.status == "FAILED"


def test_recommend_rejects_bad_versions_and_names_a_damaged_theta(planted_csv, tmp_path, monkeypatch):
    """Issue 14, item 6: `recommend --version abc|999` and a damaged champion Θ ended in tracebacks."""
    from flows.cli import app

    root = tmp_path / "a"
    config = _prepared(_config(planted_csv, root, epochs=1))
    assert register_candidate(config, meta_train(config).run_id, "pipeline", Candidate("responsive", 0, 1, None)) == "1"
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(root))
    runner = CliRunner()
    served = ["--dataset", str(planted_csv)]  # each data set has its own registered model
    for version, words in (("abc", "--version 'abc': expected a version number"), ("999", "has no version 999; registered versions: 1")):
        result = runner.invoke(app, ["recommend", "--user", "1", "--version", version, *served])
        assert result.exit_code == 1 and words in result.output, result.output
    (theta,) = (root / "mlruns").rglob(THETA_FILE)
    theta.write_bytes(theta.read_bytes()[:64])
    result = runner.invoke(app, ["recommend", "--user", "1", "--version", "1", *served])
    assert result.exit_code == 1 and "registered version 1" in result.output and THETA_FILE in result.output, result.output


@pytest.mark.slow
def test_two_data_parallel_workers_train_the_same_theta_as_one(planted_csv, tmp_path):
    one = _prepared(_config(planted_csv, tmp_path / "one", epochs=2))
    two = _prepared(_config(planted_csv, tmp_path / "two", epochs=2).model_copy(
        update={"runtime": one.runtime.model_copy(update={"artifacts_dir": tmp_path / "two", "workers": 2})}))
    first, second = meta_train(one), meta_train(two)
    assert first.status == second.status == "finished" and len(second.history) == 2
    a, b = load_model(model_dir(one, "responsive")), load_model(model_dir(two, "responsive"))
    assert torch.allclose(a.P_, b.P_, atol=1e-5) and torch.allclose(a.Q_, b.Q_, atol=1e-5)
    state, record = load_checkpoint(training_dir(two) / "checkpoint", two.hash_of("data", "tasks", "meta"))
    trained = state["trained_users"]  # the saved model's untrained rows were reset after the last checkpoint (§11)
    assert trained.any() and torch.equal(trained, b.trained_users_)
    assert record["epoch"] == 1 and torch.allclose(state["P"][trained], b.P_.detach()[trained])


def test_task_shards_without_neighbours_hold_the_users_own_k_triples(planted_csv, tmp_path):
    """Ours+'s pipeline path: the shards meta-training reads have K = k, every support triple the task user's own."""
    from tasks.train.task_shards import iter_task_shards, read_manifest

    config = _config(planted_csv, tmp_path / "own").model_copy(update={"tasks": TaskConfig(k=3, K=6, shard_size=200, support_neighbours=False)})
    prepare_data(config)
    out = build_task_shards(config)
    assert read_manifest(out)["K"] == 3
    for part in iter_task_shards(out):
        assert part.K == 3 and (part.support_users == part.query_user[:, None]).all()


def test_a_diverged_sweep_point_is_failed_like_its_training_and_named_on_the_papers_scale(planted_csv, tmp_path):
    from flows.lambda_sweep import sweep_point
    from tasks.runtime.paths import task_shards_dir

    config = _prepared(_config(planted_csv, tmp_path / "sweep", inner_lr=1e12))
    setup_mlflow(config)
    point = sweep_point.fn(config, 2.0, task_shards_dir(config.for_row("responsive")))
    assert point["status"] == "diverged"
    client = MlflowClient()
    training = client.get_run(point["run_id"])
    swept = client.get_run(training.data.tags["mlflow.parentRunId"])
    assert swept.info.run_name == "sweep λ_paper=12" and training.info.run_name == "sweep λ_paper=12 · train"  # K = 6
    assert (swept.info.status, training.info.status) == ("FAILED", "FAILED")
