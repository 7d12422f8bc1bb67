"""Issue 14: no silent wrong data, no lost work, no stuck states, no secrets in logs.

Each test reproduces one failure the probe found (the item number is in its docstring)
with real DuckDB, Parquet, MLflow stores, processes and (where a flow must run) Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.train.models import fit_and_save, load_model
from tasks.runtime.paths import prepared_dir
from tasks.data.prepare import ingest, is_prepared, prepare_data
from tasks.data.prepared import load_prepared
from tasks.runtime.settings import ConfigError, load_config
from tasks.track.tracking import setup_mlflow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HEADER = "user_id,item_id,rating,timestamp\n"


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; keep it from leaking into later tests."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def ratings_lines(n_users: int = 30, per_user: int = 12, rating: int = 4, sep: str = ",") -> list[str]:
    """Every user rates ``per_user`` items of their own (so there are negatives to sample), all positives."""
    return [sep.join(map(str, (u, per_user * u + i, rating, 880_000_000 + 1000 * u + i))) for u in range(n_users) for i in range(per_user)]


def write_csv(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "\n".join(ratings_lines(**kwargs)) + "\n")
    return path


def small_config(dataset: Path | str, root: Path, **data) -> Config:
    return Config(data=DataConfig(dataset=str(dataset), download=False, n_negatives=5, **data),
                  runtime=RuntimeConfig(artifacts_dir=root, progress=False))


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def dead_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


# ---------------------------------------------------------------------------- 1. literal paths


def test_data_dir_with_brackets_is_read_literally_not_as_a_glob(tmp_path: Path):
    """Item 1: --data-dir '/x/dd[1]' read /x/dd1/... instead."""
    for folder, n in (("dd[1]", 3), ("dd1", 5)):
        (tmp_path / folder / "ml-100k").mkdir(parents=True)
        (tmp_path / folder / "ml-100k" / "u.data").write_text("".join(f"1\t{i}\t4\t{880_000_000 + i}\n" for i in range(n)))
    config = Config(data=DataConfig(dataset="ml-100k", data_dir=tmp_path / "dd[1]", download=False), runtime=RuntimeConfig(artifacts_dir=tmp_path / "a"))
    (tmp_path / "out").mkdir()
    assert ingest(config, tmp_path / "out")["ratings_read"] == 3


@pytest.mark.parametrize("name, decoys", [("star*.csv", ["star1.csv", "starry.csv"]), ("q?.csv", ["qa.csv"]), ("p[1].parquet", ["p1.parquet"])])
def test_dataset_file_with_glob_characters_is_read_alone(tmp_path: Path, name: str, decoys: list[str]):
    """Item 1: --dataset 'star*.csv' merged 3 files."""
    def write(path: Path, n_rows: int) -> None:
        rows = ratings_lines(n_users=1, per_user=n_rows)
        if path.suffix == ".parquet":
            cols = list(zip(*(map(int, row.split(",")) for row in rows)))
            pq.write_table(pa.table(dict(zip(("user_id", "item_id", "rating", "timestamp"), cols))), path)
        else:
            path.write_text(HEADER + "\n".join(rows) + "\n")

    write(tmp_path / name, 4)
    for decoy in decoys:
        write(tmp_path / decoy, 7)
    (tmp_path / "out").mkdir()
    ingested = ingest(small_config(tmp_path / name, tmp_path / "a"), tmp_path / "out")
    assert ingested["ratings_read"] == 4


def test_feature_file_with_brackets_is_read_alone(tmp_path: Path):
    """Item 1: side-feature files reach DuckDB literally too."""
    for name, country in (("users[1].csv", "fr"), ("users1.csv", "de")):
        (tmp_path / name).write_text("user_id,country\n" + "".join(f"{u},{country}\n" for u in range(30)))
    config = small_config(write_csv(tmp_path / "planted.csv"), tmp_path / "artifacts", user_features=tmp_path / "users[1].csv")
    out = prepare_data(config)
    assert set(pq.read_table(out / "user_features.parquet").column("value").to_pylist()) == {"fr"}


def test_artifacts_folder_with_brackets_prepares(tmp_path: Path):
    """Item 1: the prepared Parquet files are read back literally too (they live under the artifacts folder)."""
    csv = write_csv(tmp_path / "planted.csv")
    out = prepare_data(small_config(csv, tmp_path / "art[1]"))
    assert "art[1]" in str(out) and load_prepared(out).stats["ratings_read"] == 360


# ---------------------------------------------------------------------------- 2. prepared folder integrity

LATER_STAGES = ("models/pop-abc/state.npz", "training/responsive-abc/checkpoint/state.json", "tasks-abc/manifest.json", "runs/abc/table1.md")


def test_rebuilding_a_prepared_folder_keeps_what_later_stages_wrote(tmp_path: Path):
    """Item 2: one missing prepared file used to delete the whole folder, models and checkpoints with it."""
    config = small_config(write_csv(tmp_path / "planted.csv"), tmp_path / "artifacts")
    out = prepare_data(config)
    before = (out / "candidates.parquet").read_bytes()
    for relative in LATER_STAGES:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text("kept")
    (out / "candidates.parquet").unlink()
    assert not is_prepared(out)
    assert prepare_data(config) == out
    assert [(out / relative).read_text() for relative in LATER_STAGES] == ["kept"] * len(LATER_STAGES)
    assert (out / "candidates.parquet").read_bytes() == before
    assert is_prepared(out)


@pytest.mark.parametrize("damage", ["truncate", "same size"])
def test_a_damaged_prepared_file_is_detected_named_and_rebuilt(tmp_path: Path, damage: str):
    """Item 2: a truncated history.parquet was reported 'already prepared'."""
    config = small_config(write_csv(tmp_path / "planted.csv"), tmp_path / "artifacts")
    out = prepare_data(config)
    history = out / "history.parquet"
    good = history.read_bytes()
    middle = len(good) // 2
    history.write_bytes(good[:middle] if damage == "truncate" else good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1:])
    assert not is_prepared(out)
    if damage == "truncate":  # sizes are checked on every load (hashes only before reuse, see tasks/runtime/integrity.py)
        with pytest.raises(ValueError, match=re.escape(str(history))):
            load_prepared(out)
    prepare_data(config)
    assert history.read_bytes() == good and is_prepared(out)


# ---------------------------------------------------------------------------- 3. content-keyed inputs


def test_input_rewritten_with_the_same_size_and_mtime_gets_a_new_data_version(tmp_path: Path):
    """Item 3: the input was keyed on size and mtime, so stale data was reused."""
    csv = write_csv(tmp_path / "planted.csv")
    config = small_config(csv, tmp_path / "artifacts")
    before = prepared_dir(config)
    old = csv.stat()
    csv.write_text(csv.read_text().replace(",4,", ",5,", 1))
    os.utime(csv, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (csv.stat().st_size, csv.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert prepared_dir(config) != before


def test_input_hashes_are_cached_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Item 3: the content hash costs one read per file change, not one per run."""
    import tasks.data.input_hashes as input_hashes

    reads: list[Path] = []
    real = input_hashes.file_sha256
    monkeypatch.setattr(input_hashes, "file_sha256", lambda path: reads.append(path) or real(path))
    csv = write_csv(tmp_path / "planted.csv")
    config = small_config(csv, tmp_path / "artifacts")
    first = prepared_dir(config)
    assert prepared_dir(config) == first and len(reads) == 1
    assert (tmp_path / "artifacts" / ".cache" / "input-hashes.json").is_file()
    os.utime(csv, ns=(0, time.time_ns()))  # touched: re-read, same content, same version
    assert prepared_dir(config) == first and len(reads) == 2


# ---------------------------------------------------------------------------- 5. first-time set-up under a lock


def test_mlflow_first_setup_waits_for_the_set_up_lock(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Item 5: the store's first set-up runs under a file lock (here held by the test, so it must wait)."""
    from tasks.runtime.locks import first_time_lock

    root = tmp_path / "artifacts"
    errors: list[BaseException] = []

    def set_up() -> None:
        try:
            setup_mlflow(Config(runtime=RuntimeConfig(artifacts_dir=root)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger="tasks.runtime.locks"), first_time_lock(root / "mlflow-setup", "a test holding the lock"):
        worker = threading.Thread(target=set_up)
        worker.start()
        deadline = time.monotonic() + 120
        while worker.is_alive() and "waiting for another process" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "waiting for another process to finish setting up the MLflow store" in caplog.text  # blocked, not done
        assert worker.is_alive() and not (root / "mlflow.db").exists()
    worker.join(120)
    assert not worker.is_alive() and not errors and (root / "mlflow.db").is_file()


RACE = """
import sys, time
from pathlib import Path
root, ready, go = map(Path, sys.argv[1:4])
import mlflow
from metarec.config import Config
from tasks.track.tracking import setup_mlflow
ready.touch()
while not go.exists():
    time.sleep(0.005)
setup_mlflow(Config(runtime={"artifacts_dir": str(root)}))
with mlflow.start_run():
    mlflow.log_param("x", 1)
"""


@pytest.mark.slow
def test_runs_started_together_on_a_fresh_store_all_succeed(tmp_path: Path):
    """Item 5: two runs at once on a fresh artifacts folder raced to create MLflow's schema (before the lock, two
    processes released together failed 3 times in 3: 'duplicate column name', 'table ... already exists')."""
    root, go = tmp_path / "artifacts", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(root), str(tmp_path / f"ready{i}"), str(go)], cwd=PROJECT_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs if p.poll() is not None]
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-1500:] for o in outputs)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("metarec").experiment_id])) == 2


# ---------------------------------------------------------------------------- 6. damaged files


def test_damaged_saved_model_is_named_then_moved_aside_and_fitted_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Item 6: a truncated state.npz crashed with a traceback, and was reused as it was."""
    config = small_config(write_csv(tmp_path / "planted.csv"), tmp_path / "artifacts")
    prepare_data(config)
    out = fit_and_save("pop", config)
    state = out / "state.npz"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(str(state))):
        load_model(out)
    with caplog.at_level(logging.WARNING):
        assert fit_and_save("pop", config) == out
    assert load_model(out) is not None
    aside = list(out.parent.glob(f"{out.name}.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "state.npz").stat().st_size == 200
    assert str(state) in caplog.text and str(aside[0]) in caplog.text


def test_damaged_mlflow_store_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Item 6: a corrupt mlflow.db crashed with an SQLAlchemy traceback."""
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "mlflow.db").write_bytes(b"this is not a database " * 200)
    with pytest.raises(ValueError, match=re.escape(f"{root / 'mlflow.db'}: the MLflow store cannot be read")):
        setup_mlflow(Config(runtime=RuntimeConfig(artifacts_dir=root)))
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(root))
    result = CliRunner().invoke(app, ["recommend", "--user", "1"])
    assert result.exit_code == 1 and "mlflow.db: the MLflow store cannot be read" in result.output


# ---------------------------------------------------------------------------- 7. divergence in `metarec run`

DIVERGING = ["meta.lambda_ml=1e38"]
SMALL_RUN = ["data.new_user_folds=1", "eval.models=['responsive','pop']", "meta.epochs=1", "eval.bootstrap=20", "data.new_user_ns=[1,5]", "data.n_negatives=20",
             "tasks.k=3", "tasks.K=6", "meta.dim=8", "meta.batch_tasks=64"]


@pytest.mark.slow
def test_divergence_in_run_is_stated_marked_failed_and_exits_non_zero(prefect_harness, artifacts: Path, tmp_path: Path):
    """Item 7: a diverged `metarec run` exited 0, its Table 1 silently lacking our model."""
    from metarec.synthetic import planted_interactions

    data = planted_interactions(n_users=80, n_items=60, per_user=15, seed=2).interactions
    csv = tmp_path / "planted.csv"
    csv.write_text(HEADER + "".join(f"{u},{i},5,{t}\n" for u, i, t in zip(data.users, data.items, data.ts)))
    sets = [arg for item in [*SMALL_RUN, *DIVERGING] for arg in ("--set", item)]
    result = CliRunner().invoke(app, ["run", "--dataset", str(csv), "--no-sweep", *sets])
    assert result.exit_code == 3, result.output
    assert "error: fold 0: meta-training of responsive diverged" in result.output
    (run,) = artifacts.glob("*/pooled/*")
    for name in ("table1.md", "summary.md"):
        head = (run / name).read_text().splitlines()[0]
        assert head.startswith("> **Warning:** fold 0: meta-training of responsive diverged") and "missing from this table" in head, name
    uri = f"sqlite:///{artifacts / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("metarec").experiment_id
    (training,) = client.search_runs([experiment], "tags.model = 'responsive' and tags.status = 'diverged'")
    (parent,) = client.search_runs([experiment], "tags.kind = 'pipeline'")
    assert training.info.status == "FAILED" and parent.info.status == "FAILED" and "diverged" in parent.data.tags["warning"]

    allowed = CliRunner().invoke(app, ["run", "--dataset", str(csv), "--no-sweep", "--allow-divergence", *sets])
    assert allowed.exit_code == 0, allowed.output
    assert "warning: fold 0: meta-training of responsive diverged" in allowed.output


# ---------------------------------------------------------------------------- 8. nothing outlives a killed process

SERVER_CHILD = """
import sys, time
from flows.deploy import local_server
with local_server(int(sys.argv[1]), ui=False, services=False) as server:
    print(server.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_prefect_server_we_start_dies_with_its_parent_even_on_kill_9(tmp_path: Path):
    """Item 8: `kill -9` left the Prefect server running, holding its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    parent = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, str(port)],
                              cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    server_pid = None
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the server did not start (child exited {parent.poll()})"
        server_pid = int(line)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(180)
        deadline = time.monotonic() + 180  # SIGTERM, then the server's shutdown: slow on a busy machine
        while alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(server_pid), "the server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if server_pid is not None and alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


def test_temporaries_of_killed_processes_are_swept_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Item 8: `kill -9` during prepare left .HASH.*.tmp folders and metarec-duckdb-* folders behind."""
    gone = dead_pid()
    folder = tmp_path / "artifacts" / "planted"
    folder.mkdir(parents=True)
    stale = [folder / f".0123456789ab.pid{gone}.x1y2z3.tmp", folder / f".stats.json.pid{gone}.abc.tmp"]
    stale[0].mkdir()
    (stale[0] / "history.parquet").write_text("half written")
    stale[1].write_text("half written")
    live = folder / f".0123456789ab.pid{os.getpid()}.mine.tmp"
    live.mkdir()
    system_tmp = tmp_path / "tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    stale_duckdb, live_duckdb = system_tmp / f"metarec-duckdb-pid{gone}-abc", system_tmp / f"metarec-duckdb-pid{os.getpid()}-def"
    stale_duckdb.mkdir(), live_duckdb.mkdir()

    prepare_data(small_config(write_csv(tmp_path / "planted.csv"), tmp_path / "artifacts"))
    assert not any(path.exists() for path in [*stale, stale_duckdb])
    assert live.exists() and live_duckdb.exists()


def test_a_reused_pid_does_not_keep_an_old_temporary_alive():
    """Item 8: pid 1 is running, but started after a temporary last touched in 1970: its maker is gone."""
    from tasks.runtime.atomic import made_by_dead_process

    assert made_by_dead_process(1, last_touched=0.0)
    assert not made_by_dead_process(1, last_touched=time.time())


# ---------------------------------------------------------------------------- 9. port in use


def test_deploy_says_the_port_is_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Item 9: `metarec deploy --port P` with P taken started a server that could not bind it."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = CliRunner().invoke(app, ["deploy", "--port", str(port), "--no-ui"])
    assert result.exit_code == 2, result.output
    assert f"port {port} on 127.0.0.1 is already in use" in result.output


# ---------------------------------------------------------------------------- 10. bad values up front


@pytest.mark.parametrize("section", ["data", "tasks", "meta", "baselines", "eval"])
def test_negative_seed_is_rejected_up_front(section: str):
    """Item 10: data.seed = -1 was accepted, then crashed late."""
    with pytest.raises(ConfigError, match=re.escape(f"{section}.seed")):
        load_config(overrides=[f"{section}.seed=-1"])


def test_unknown_metarec_variable_warns_naming_the_close_match(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Item 10: METAREC_META_EPOCHS (one underscore) was silently ignored."""
    monkeypatch.setenv("METAREC_META_EPOCHS", "3")
    with caplog.at_level(logging.WARNING):
        config = load_config()
    assert config.meta.epochs == 5  # ignored, as the warning says
    assert "METAREC_META_EPOCHS" in caplog.text and "did you mean METAREC_META__EPOCHS" in caplog.text


# ---------------------------------------------------------------------------- 11. odd input, reported


def test_odd_timestamps_and_an_unterminated_last_line_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Item 11: fractional, negative and future timestamps and a truncated last line passed without a word."""
    lines = ratings_lines(sep="\t")
    lines[2] = "0\t2\t4\t880000002.5"  # fractional: rounded
    lines[40] = "3\t40\t4\t-5"  # before 1970
    lines[50] = "4\t50\t4\t4102444800"  # 2100
    path = tmp_path / "ml" / "u.data"
    path.parent.mkdir()
    path.write_text("\n".join([*lines, "12\t203\t3\t8"]))  # the last line cut short, no line end
    with caplog.at_level(logging.WARNING):
        out = prepare_data(small_config(path, tmp_path / "artifacts"))
    checks = load_prepared(out).stats["input_checks"]
    src = str(path.resolve())
    assert checks["fractional_timestamps"] == {"count": 1, "first": f"{src}, line 3"}
    assert checks["negative_timestamps"] == {"count": 1, "first": f"{src}, line 41"}
    assert checks["future_timestamps"] == {"count": 1, "first": f"{src}, line 51"}
    assert checks["unterminated_last_line"] == [f"{path}, line {len(lines) + 1}"]
    assert checks["rating_scale"] == "1 to 5 in steps of 1" and (checks["rating_min"], checks["rating_max"]) == (3.0, 4.0)
    for words in ("fractional timestamps", "negative timestamps", "future timestamps", "may be truncated"):
        assert words in caplog.text, words


# ---------------------------------------------------------------------------- 13. the deployment's parameters


@pytest.mark.parametrize("parameters, words", [
    ({"dataset": "/etc/passwd"}, "dataset '/etc/passwd' is not one this deployment serves"),
    ({"overrides": ["runtime.artifacts_dir=/tmp/elsewhere"]}, "override(s) ['runtime.artifacts_dir=/tmp/elsewhere'] are not among"),
    ({"config_file": "/etc/hosts"}, "config_file is not accepted"),
    ({"quick": False}, "quick=False differs"),
])
def test_deployment_runs_accept_only_what_deploy_was_started_with(prefect_harness, artifacts: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   parameters: dict, words: str):
    """Item 13: anyone reaching the API could pass dataset=/etc/anything, or point artifacts_dir anywhere."""
    from flows.nightly import nightly_retrain

    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "00000000-0000-0000-0000-000000000014")  # as in a deployment run
    # what `metarec deploy --dataset ml-100k --quick --set eval.bootstrap=50` records (flows.deploy.allow_parameters)
    monkeypatch.setenv("METAREC_DEPLOYMENT_ALLOWED", json.dumps({"datasets": ["ml-100k"], "quick": True, "overrides": ["eval.bootstrap=50"]}))
    asked = {"dataset": "ml-100k", "quick": True, "overrides": ["eval.bootstrap=50"], **parameters}
    with pytest.raises(ValueError, match=re.escape(words)):
        nightly_retrain(**asked)
    assert not artifacts.exists()  # rejected before anything was read or written


# ---------------------------------------------------------------------------- 14. no secrets in what we echo

SECRET_ADDRESS = "tcp://alice:s3cr3t@scheduler:8786?token=t0k3n"
SECRET_STORE = "postgresql://bob:pa55@db.example:5432/mlflow?sslmode=require&password=pa55w0rd"


def test_credentials_in_urls_are_masked_wherever_config_is_echoed():
    """Item 14: runtime.dask_address=tcp://user:pass@... was logged as an MLflow param."""
    from tasks.evaluate.aggregate import RunFacts, summary_markdown

    config = Config(runtime=RuntimeConfig(dask_address=SECRET_ADDRESS, mlflow_tracking_uri=SECRET_STORE))
    flat = config.to_flat_dict()
    echoed = {"params": lambda: json.dumps(flat), "summary.md": lambda: summary_markdown(RunFacts("x", 1, [], flat, {}), [], {}, []),
              "json dump": config.model_dump_json, "config.json": lambda: json.dumps(config.to_record())}
    for where, echo in echoed.items():
        text = echo()
        for secret in ("s3cr3t", "t0k3n", "pa55", "pa55w0rd"):
            assert secret not in text, (where, secret)
        assert "alice:***@scheduler:8786" in text and "db.example:5432/mlflow" in text and "sslmode=require" in text, where
    assert config.runtime.dask_address == SECRET_ADDRESS  # still usable by the code that connects


def test_prefect_stores_flow_parameters_without_credentials(prefect_harness):
    """Item 14: a flow's Config parameter is stored by Prefect (shown in its UI) as JSON."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    @flow(validate_parameters=False)
    def echo(config: Config) -> str:
        return flow_run.id

    run_id = echo(Config(runtime=RuntimeConfig(dask_address=SECRET_ADDRESS)))
    with get_client(sync_client=True) as client:
        stored = json.dumps(client.read_flow_run(run_id).parameters)
    assert "s3cr3t" not in stored and "t0k3n" not in stored and "alice:***@scheduler" in stored


# ---------------------------------------------------------------------------- 15. modes


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_prepared_folder_and_files_follow_the_umask(tmp_path: Path, umask: int, folder_mode: int, file_mode: int):
    """Item 15: the prepared folder and stats.json were created 0700 / 0600."""
    previous = os.umask(umask)
    try:
        out = prepare_data(small_config(write_csv(tmp_path / "planted.csv"), tmp_path / "artifacts"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    for name in ("stats.json", "history.parquet", "candidates.parquet"):
        assert stat.S_IMODE((out / name).stat().st_mode) == file_mode, name
