"""`metarec run` shows one progress display and its last lines say where things are; Prefect's lines go to a log file."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.progress import Progress, _StageHandler, planned_stages, run_display
from tasks.runtime.settings import load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _finished(task_name: str | None, run_name: str, flow_name: str = "pipeline", state: str = "Completed()") -> logging.LogRecord:
    record = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, f"Finished in state {state}", None, None)
    if task_name is not None:
        record.task_name, record.task_run_name = task_name, run_name
    record.flow_name, record.flow_run_name = flow_name, run_name
    return record


def test_plan_counts_every_stage_of_a_run():
    config = load_config(None, ["data.new_user_folds=3", "eval.models=['responsive','responsive_plus','pop','rkmf']",
                                "eval.lambda_sweep=[0.0, 1.0]"])
    assert planned_stages(config, sweep=True) == {"prepare": 3, "train": 6, "fit": 6, "evaluate": 12, "sweep point": 2}
    assert "sweep point" not in planned_stages(config, sweep=False)
    assert "new items" not in planned_stages(config, sweep=False)
    with_table2 = config.model_copy(update={"eval": config.eval.model_copy(update={"new_items": True})})
    assert planned_stages(with_table2, sweep=False)["new items"] == 12  # a refit and evaluation per (fold, row)


def test_plain_progress_counts_stages_by_kind_and_fold_with_time_left_and_never_past_the_plan():
    out, clock = io.StringIO(), Clock()
    progress = Progress({"prepare": 1, "fit": 1, "evaluate": 2}, out, live=False, clock=clock)
    handler = _StageHandler(progress)
    clock.now += 10
    handler.emit(_finished(None, "lucky-fox", flow_name="prepare"))
    clock.now += 30
    handler.emit(_finished("fit-model", "fit-pop-fold0"))
    handler.emit(_finished("fit-model", "fit-pop-fold0", state="Failed('boom')"))  # not a finished stage
    handler.emit(_finished("model-path", "model-responsive-fold0"))  # not a counted kind
    clock.now += 20
    handler.emit(_finished("evaluate-model", "evaluate-pop-fold0"))
    handler.emit(_finished("evaluate-model", "evaluate-rkmf-fold1", state="Cached(type=COMPLETED)"))
    handler.emit(_finished("evaluate-model", "evaluate-rkmf-fold2"))  # beyond the plan: never "5/4"
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("[1/4] 0:00:10 elapsed, ~0:00:30 left · done: prepare lucky-fox")
    assert lines[1].startswith("[2/4] 0:00:40 elapsed, ~0:00:40 left · done: fit-pop-fold0")
    assert lines[3].startswith("[4/4] 0:01:00 elapsed, ~0:00:00 left · done: evaluate-rkmf-fold1")
    assert lines[3].endswith("prepare 1/1, fit 1/1, evaluate 2/2 · fold 0: 2 fold 1: 1")
    assert not any("\x1b" in line or "\r" in line for line in lines)  # no control codes off a terminal


def test_without_verbose_prefect_lines_go_to_the_log_file_only(tmp_path):
    import prefect  # noqa: F401

    config = load_config(None, [f'runtime.artifacts_dir="{tmp_path}"'])
    root = logging.getLogger()
    before = list(root.handlers)
    log = tmp_path / "logs" / "run.log"
    with run_display(config, False, log, verbose=False, out=io.StringIO()):
        assert not [h for h in root.handlers if type(h).__name__ == "PrefectConsoleHandler"]
        assert not logging.raiseExceptions  # Prefect prints "--- Error logging to API ---" only when it is set
        logging.getLogger("prefect.task_runs").info("Finished in state Completed()", extra={"task_run_name": "fit-pop-fold0", "task_name": "fit-model"})
        logging.getLogger("mlflow").warning("an MLflow warning")
    assert set(root.handlers) == set(before)  # restored
    text = log.read_text()
    assert "Finished in state Completed()" in text and "an MLflow warning" in text
    assert logging.raiseExceptions  # restored
    with run_display(config, False, tmp_path / "verbose.log", verbose=True, out=io.StringIO()):
        assert all(h in root.handlers for h in before)


SMALL_RUN = ["data.new_user_folds=1", "eval.models=['responsive','pop']", "meta.epochs=1", "eval.bootstrap=20", "data.new_user_ns=[1,5]",
             "data.n_negatives=20", "tasks.k=3", "tasks.K=6", "meta.dim=8", "meta.batch_tasks=64"]


@pytest.mark.slow
def test_a_run_shows_progress_not_prefect_lines_and_ends_saying_where_everything_is(tmp_path):
    from metarec.synthetic import planted_interactions

    data = planted_interactions(n_users=80, n_items=60, per_user=15, seed=2).interactions
    csv = tmp_path / "planted.csv"
    csv.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{i},5,{t}\n" for u, i, t in zip(data.users, data.items, data.ts)))
    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "METAREC_RUNTIME__ARTIFACTS_DIR": str(artifacts),
           "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1"}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    sets = [arg for item in SMALL_RUN for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--dataset", str(csv), "--no-sweep", *sets], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    terminal = done.stdout + done.stderr
    assert "Finished in state" not in terminal and "Task run" not in terminal and "Error logging to API" not in terminal
    progress = [line for line in done.stderr.splitlines() if re.match(r"^\[\d+/\d+\] ", line)]
    assert progress and progress[-1].startswith("[5/5] ") and "left" in progress[-1]  # prepare, train, fit, 2 evaluations
    assert "\x1b[" not in done.stderr  # not a terminal: plain lines
    last = done.stdout.rstrip().splitlines()[-4:]
    assert last[0].startswith("Table 1: ") and Path(last[0].split()[2]).is_file()
    assert last[1].startswith("plots: ") and all(Path(p.strip()).is_file() for p in last[1].removeprefix("plots: ").split(","))
    assert last[2].startswith("log: ")
    log = Path(last[2].removeprefix("log: "))
    assert log.is_file() and log.is_relative_to(artifacts.resolve()) and "Finished in state Completed()" in log.read_text()
    assert last[3].startswith(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{artifacts.resolve() / 'mlflow.db'}")


def test_a_log_file_on_a_full_disk_neither_prints_tracebacks_nor_fails_on_close(tmp_path, capsys):
    from flows.progress import _QuietFileHandler

    handler = _QuietFileHandler(tmp_path / "run.log")

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

        flush = close = lambda self: (_ for _ in ()).throw(OSError(28, "No space left on device"))

    handler.stream = FullDisk()
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "a line", None, None))
    handler.close()
    assert capsys.readouterr().err == ""
