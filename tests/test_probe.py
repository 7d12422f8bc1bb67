"""The hostile probe's cases of issue 19: each failed (silently, with a traceback, or leaking a secret) before its fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import flows.cli as cli
from metarec.config import Config, MetaConfig, TaskConfig, SECTION_TYPES, RuntimeConfig
from metarec.models.responsive import ResponsiveMF
from tasks.runtime.integrity import CorruptFileError
from tasks.runtime.paths import dataset_slug
from tasks.runtime.settings import ConfigError, load_config
from tasks.track.model_registry import THETA_FILE, THETA_HASH, THETA_META, load_theta, save_theta
from tasks.track.tracking import ui_url


# ------------------------------------------------------------------ silent wrong results
@pytest.fixture
def theta_dir(tmp_path) -> Path:
    model = ResponsiveMF(MetaConfig(dim=4), TaskConfig())
    model.init_params(5, 6)
    return save_theta(model, tmp_path / "theta", Config())


def _poison_q(folder: Path) -> None:
    """Θ's Q set to NaN in place: the same shapes, so the same file size."""
    tensors = load_file(str(folder / THETA_FILE))
    before = (folder / THETA_FILE).stat().st_size
    tensors["Q"] = torch.full_like(tensors["Q"], float("nan"))
    save_file(tensors, str(folder / THETA_FILE))
    assert (folder / THETA_FILE).stat().st_size == before


def test_theta_records_its_hash_and_a_nan_q_is_refused_naming_the_file(theta_dir):
    assert THETA_HASH in json.loads((theta_dir / THETA_META).read_text())
    load_theta(theta_dir)  # whole: loads
    _poison_q(theta_dir)
    with pytest.raises(CorruptFileError, match=rf"{THETA_FILE}.*SHA-256"):
        load_theta(theta_dir)


def test_a_nan_theta_without_a_recorded_hash_is_still_refused(theta_dir):
    described = json.loads((theta_dir / THETA_META).read_text())
    del described[THETA_HASH]  # as a version registered before hashes were recorded
    (theta_dir / THETA_META).write_text(json.dumps(described))
    _poison_q(theta_dir)
    with pytest.raises(CorruptFileError, match=rf"{THETA_FILE}.*Q holds NaN"):
        load_theta(theta_dir)


def test_a_damaged_theta_json_names_the_file(theta_dir):
    described = json.loads((theta_dir / THETA_META).read_text())
    described["meta"]["dim"] = "sixty-four"
    (theta_dir / THETA_META).write_text(json.dumps(described))
    with pytest.raises(CorruptFileError, match=rf"{THETA_META}.*meta.dim"):
        load_theta(theta_dir)


def test_folds_zero_is_rejected_with_exit_2(monkeypatch):
    def ran(*args, **kwargs):
        raise AssertionError("--folds 0 reached the pipeline")

    monkeypatch.setattr(cli, "_run_config", ran)
    result = CliRunner().invoke(cli.app, ["run", "--folds", "0"])
    assert result.exit_code == 2, result.output
    assert "--folds" in result.output


@pytest.mark.parametrize("override, roles", [("data.ts_col=rating", ("rating_col", "ts_col")),
                                             ("data.item_col=user_id", ("user_col", "item_col"))])
def test_one_column_plays_one_role(override, roles):
    with pytest.raises(ConfigError, match=rf"data.{roles[0]} and data.{roles[1]} both name the column"):
        load_config(None, [override])


def _float_fields():
    sections = {**SECTION_TYPES, "runtime": RuntimeConfig}
    for section, model in sections.items():
        for name, field in model.model_fields.items():
            text = str(field.annotation)
            if "float" in text:
                yield section, name, "tuple" in text


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_rejected_in_every_float_field(value):
    fields = list(_float_fields())
    assert ("eval", "lambda_sweep", True) in fields and ("meta", "inner_lr", False) in fields
    accepted = []
    for section, name, is_tuple in fields:
        try:
            load_config(None, [f"{section}.{name}={'[' + value + ']' if is_tuple else value}"])
            accepted.append(f"{section}.{name}")
        except ConfigError as exc:
            assert f"{section}.{name}" in str(exc)
    assert not accepted, f"{value} accepted in {accepted}"


# ------------------------------------------------------------------ security
SECRET = "hunter2"


def test_credentials_in_the_mlflow_ui_url_are_masked_everywhere(tmp_path):
    config = load_config(None, [f'runtime.mlflow_ui_url="https://alice:{SECRET}@mlflow.example:5000/"',
                                f'runtime.artifacts_dir="{tmp_path}"'])
    assert SECRET not in config.model_dump_json()  # Prefect stores flow parameters as JSON
    assert SECRET not in json.dumps(config.to_record()) and SECRET not in json.dumps(config.to_flat_dict())
    assert SECRET not in ui_url(config) and ui_url(config).startswith("https://alice:***@mlflow.example:5000")


def test_credentials_in_a_tracking_server_uri_are_masked_in_links(tmp_path):
    config = load_config(None, [f'runtime.mlflow_tracking_uri="https://bob:{SECRET}@tracking.example"',
                                f'runtime.artifacts_dir="{tmp_path}"'])
    assert SECRET not in ui_url(config) and "tracking.example" in ui_url(config)


@pytest.mark.parametrize("dataset", ["..", ".", "...csv", "data/...csv", "../..", "/", "..parquet", "-"])
def test_dataset_slug_stays_inside_the_artifacts_folder(dataset, tmp_path):
    slug = dataset_slug(dataset)
    assert slug not in ("", ".", "..") and "/" not in slug
    assert (tmp_path / slug / "version").resolve().parent.parent == tmp_path.resolve()


def test_known_names_keep_their_slug():
    assert [dataset_slug(name) for name in ("ml-100k", "ml-1m-first2999", "/data/my.ratings.csv")] == ["ml-100k", "ml-1m-first2999", "my.ratings"]


# ------------------------------------------------------------------ deploy's options, before anything starts
@pytest.fixture
def no_server(monkeypatch):
    import flows.deploy as deploy

    def started(*args, **kwargs):
        raise AssertionError("a server was started")

    monkeypatch.setattr(deploy, "local_server", started)
    monkeypatch.setattr(deploy, "serve_nightly", started)


@pytest.mark.parametrize("port", ["70000", "-1", "0"])
def test_deploy_rejects_a_port_outside_1_to_65535(port, no_server):
    result = CliRunner().invoke(cli.app, ["deploy", "--port", port])
    assert result.exit_code == 2, result.output
    assert "--port" in result.output and "Traceback" not in result.output


def test_deploy_rejects_a_bad_cron_before_the_server_starts(no_server):
    result = CliRunner().invoke(cli.app, ["deploy", "--cron", "61 25 * * *"])
    assert result.exit_code == 2, result.output
    assert "not a valid cron schedule" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ tracebacks instead of errors
@pytest.fixture
def clean_tracking():
    import os

    from tasks.track import tracking

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tracking._READY.clear()
    yield tracking
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tracking._READY.clear()


@pytest.mark.parametrize("name", ["missing.csv", "folder", "loop.csv", "fifo.csv"])
@pytest.mark.parametrize("command", ["prepare", "run"])
def test_a_bad_ratings_path_is_named_before_prefect_starts(name, command, tmp_path, monkeypatch):
    import os

    (tmp_path / "folder").mkdir()
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop2.csv")
    (tmp_path / "loop2.csv").symlink_to(tmp_path / "loop.csv")
    os.mkfifo(tmp_path / "fifo.csv")

    def started(*args, **kwargs):
        raise AssertionError("Prefect was started for a path that cannot be read")

    monkeypatch.setattr(cli, "_prefect_api", started)
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    result = CliRunner().invoke(cli.app, [command, "--dataset", str(tmp_path / name)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # an error message, not an exception's traceback
    assert str(tmp_path / name) in result.output and result.output.startswith("error: ")


def test_an_artifacts_path_that_is_a_file_or_too_long_is_rejected(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    for path, expected in ((tmp_path / "a-file" / "artifacts", "is a file, not a folder"),
                           (tmp_path / ("x" * 300), "longer than the 255"),
                           (tmp_path.joinpath(*["y" * 200] * 20), "path limit")):
        monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(path))
        result = CliRunner().invoke(cli.app, ["prepare", "--dataset", "ml-100k"])
        assert result.exit_code == 2 and expected in result.output, result.output


def test_a_zero_byte_mlflow_store_is_named_not_recreated(tmp_path, clean_tracking):
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "mlflow.db").write_bytes(b"")
    with pytest.raises(clean_tracking.TrackingStoreError, match=r"mlflow.db: the MLflow store is empty \(0 bytes\)"):
        clean_tracking.setup_mlflow(Config(runtime=RuntimeConfig(artifacts_dir=root)))
    assert (root / "mlflow.db").stat().st_size == 0


def test_a_set_up_store_is_read_without_the_write_lock(tmp_path, monkeypatch, clean_tracking):
    """A read-only artifacts folder: the set-up lock file cannot be created, and reading needs none."""
    config = Config(runtime=RuntimeConfig(artifacts_dir=tmp_path / "artifacts"))
    clean_tracking.setup_mlflow(config)
    clean_tracking._READY.clear()  # a new process

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "artifacts" / ".mlflow-setup.lock"))

    monkeypatch.setattr(clean_tracking, "first_time_lock", read_only)
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("metarec").experiment_id
    client.create_run(experiment, tags={clean_tracking.PROCESS_TAG: f"{clean_tracking.socket.gethostname()}:999999999:1"})

    def readonly_database(*args, **kwargs):
        raise RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database")

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", readonly_database)
    clean_tracking.setup_mlflow(config)  # neither the lock nor closing a killed process's run may stop a reader


def test_a_moved_artifacts_folder_is_named(tmp_path, clean_tracking):
    import mlflow

    old = tmp_path / "old"
    clean_tracking.setup_mlflow(Config(runtime=RuntimeConfig(artifacts_dir=old)))
    with mlflow.start_run():
        mlflow.log_text("x", "x.txt")
    old.rename(tmp_path / "new")
    clean_tracking._READY.clear()
    with pytest.raises(clean_tracking.TrackingStoreError, match=rf"records its artifacts in {old / 'mlruns'}, which no longer exists"):
        clean_tracking.setup_mlflow(Config(runtime=RuntimeConfig(artifacts_dir=tmp_path / "new")))


# ------------------------------------------------------------------ unclear or silent
def test_runs_of_a_killed_process_are_marked_killed_on_the_next_start(tmp_path, clean_tracking):
    import subprocess
    import sys

    import mlflow

    config = Config(runtime=RuntimeConfig(artifacts_dir=tmp_path / "artifacts"))
    clean_tracking.setup_mlflow(config)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("metarec").experiment_id
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = f"{clean_tracking.socket.gethostname()}:{gone.stdout.strip()}:1"  # a pid that ended (or was reused since)
    killed = client.create_run(experiment, run_name="evaluation", tags={clean_tracking.PROCESS_TAG: dead}).info.run_id
    child = client.create_run(experiment, run_name="trial", tags={"mlflow.parentRunId": killed}).info.run_id
    alive = client.create_run(experiment, run_name="ours", tags=clean_tracking.process_tags()).info.run_id
    elsewhere = client.create_run(experiment, run_name="other host", tags={clean_tracking.PROCESS_TAG: "another-host:1:1"}).info.run_id
    clean_tracking._READY.clear()  # the next start
    clean_tracking.setup_mlflow(config)
    status = {run_id: client.get_run(run_id).info.status for run_id in (killed, child, alive, elsewhere)}
    assert status == {killed: "KILLED", child: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}


def test_a_resumed_tuning_counts_trials_by_counted_ones_and_fails_abandoned_ones(tmp_path):
    import logging

    import optuna

    from metarec.config import BaselineConfig
    from tasks.train.tuning import tune_row

    config = Config(baselines=BaselineConfig(dim=8, tune_budget=3), meta=MetaConfig(dim=8), tuned={})
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    calls = []

    def killed_in_the_second(name, values, report):
        calls.append(values)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as kill -9 between ask and tell: the trial stays RUNNING
        return {"objective": 0.1, "seconds": 0.0}

    with pytest.raises(KeyboardInterrupt):
        tune_row("mf_ft", config, killed_in_the_second, storage)
    messages: list[str] = []
    listener = logging.Handler(logging.INFO)
    listener.emit = lambda record: messages.append(record.getMessage())
    tuning_logger = logging.getLogger("tasks.train.tuning")
    tuning_logger.addHandler(listener)
    level = tuning_logger.level
    tuning_logger.setLevel(logging.INFO)
    try:
        result = tune_row("mf_ft", config, lambda name, values, report: {"objective": 0.2, "seconds": 0.0}, storage)
    finally:
        tuning_logger.removeHandler(listener)
        tuning_logger.setLevel(level)
    assert result["n_trials"] == 3
    study = optuna.load_study(study_name=result["study"], storage=storage)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))  # the abandoned one is FAIL
    counted = [int(m.group(1)) for m in re.finditer(r"trial (\d+)/3:", "\n".join(messages))]
    assert counted == [2, 3], messages  # never "4/3", though the study holds 4 trials


def test_a_theta_too_large_for_memory_is_refused_naming_the_field(monkeypatch):
    from tasks.train import training

    monkeypatch.setattr(training, "_available_memory", lambda: 8 * 2**30)
    huge = load_config(None, ["meta.dim=100000"])
    with pytest.raises(ValueError, match=r"meta.dim = 100000 .* needs at least .* GiB .* lower meta.dim"):
        training.check_memory(huge, 943, 1682)
    training.check_memory(load_config(None, []), 943, 1682)  # the default fits


def test_an_allocation_failure_names_the_fields():
    from tasks.train.training import _out_of_memory

    config = load_config(None, ["meta.dim=100000"])
    failure = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    assert "meta.dim = 100000" in str(_out_of_memory(config, failure))
    other = RuntimeError("shape mismatch")
    assert _out_of_memory(config, other) is other


def test_losing_the_prefect_server_mid_run_is_a_short_error(monkeypatch, artifacts):  # its run log: not in ./artifacts
    import contextlib

    import httpx

    import flows.deploy as deploy

    monkeypatch.setattr(deploy, "temporary_server", contextlib.nullcontext)
    monkeypatch.setattr(cli, "_checked_input", lambda cfg: None)
    monkeypatch.setattr(cli, "_print_cached", lambda cfg, sweep: False)

    def server_gone(*args, **kwargs):
        raise httpx.ConnectError("All connection attempts failed")

    import flows.pipeline

    monkeypatch.setattr(flows.pipeline, "pipeline", type("Flow", (), {"with_options": lambda self, **kw: server_gone})())
    result = CliRunner().invoke(cli.app, ["run", "--no-sweep"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "error: lost the Prefect API (ConnectError: All connection attempts failed)" in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) <= 3


def test_a_read_only_home_moves_prefect_home_into_the_artifacts(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("HOME", str(tmp_path / "a-file" / "home"))  # cannot be created: as a read-only HOME
    config = load_config(None, [f'runtime.artifacts_dir="{tmp_path / "artifacts"}"'])
    environ: dict[str, str] = {}
    cli.ensure_prefect_home(config, environ)
    assert environ == {"PREFECT_HOME": str(tmp_path / "artifacts" / "prefect")}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    environ = {}
    cli.ensure_prefect_home(config, environ)
    assert environ == {}  # a writable HOME keeps Prefect's default


def test_recommend_dataset_serves_only_a_version_trained_on_it():
    """Each data set has its own registered model, so --dataset picks that model's champion and never another's."""
    from types import SimpleNamespace

    from tasks.serve.serving import version_to_serve
    from tasks.track.champion import registered_model_name

    champions = {registered_model_name("ml-1m"): SimpleNamespace(version="2", tags={"dataset": "ml-1m"}),
                 registered_model_name("ml-100k"): SimpleNamespace(version="1", tags={"dataset": "ml-100k"})}
    client = SimpleNamespace(get_model_version_by_alias=lambda name, alias: champions[name],
                             get_model_version=lambda name, version: champions[name])
    assert len(champions) == 2  # two names, not one global 'responsive-mf'
    assert version_to_serve(client, registered_model_name("ml-100k")).tags["dataset"] == "ml-100k"
    assert version_to_serve(client, registered_model_name("ml-1m")).tags["dataset"] == "ml-1m"
    assert version_to_serve(client, registered_model_name("ml-100k"), "1").tags["dataset"] == "ml-100k"


def test_a_full_disk_is_named_behind_the_errors_it_causes(monkeypatch, tmp_path):
    import contextlib
    import errno

    import flows.deploy as deploy
    import flows.pipeline

    monkeypatch.setattr(deploy, "temporary_server", contextlib.nullcontext)
    monkeypatch.setattr(cli, "_checked_input", lambda cfg: None)
    monkeypatch.setattr(cli, "_print_cached", lambda cfg, sweep: False)
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(tmp_path / "artifacts"))

    def disk_fills(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "artifacts" / "forest.png"))
        except OSError:
            try:
                raise RuntimeError("sqlite3.OperationalError: database or disk is full")  # MLflow's failing tag on top
            except RuntimeError as wrapped:
                raise LookupError("UnfinishedRun: Run is in PENDING state") from wrapped

    monkeypatch.setattr(flows.pipeline, "pipeline", type("Flow", (), {"with_options": lambda self, **kw: disk_fills})())
    result = CliRunner().invoke(cli.app, ["run", "--no-sweep"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"error: no space left on the device (OSError ENOSPC writing {tmp_path / 'artifacts' / 'forest.png'}" in result.output
    assert "PENDING" not in result.output
