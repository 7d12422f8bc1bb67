"""What a person sees while `metarec run` works: one progress display; Prefect's per-task lines in a log file.

Progress is read off Prefect's own "Finished in state ..." records (the ``prefect.task_runs`` and
``prefect.flow_runs`` loggers), counted by task name (``meta-train``, ``fit-model``, ``evaluate-model``,
``new-items``, ``sweep-point``) and flow name (``prepare``), so the flows need no progress calls and a task run may
be named anything. ``planned_stages`` says how many of each a run has; a stage finished beyond its plan (the sweep
re-uses fold 0's prepared data) is not counted twice, so the display never reads "11/10".

On a terminal the display is a rich progress bar redrawn in place (stderr); elsewhere (CI, a pipe) it prints
plain one-line updates. Without ``--verbose`` every Prefect, MLflow and warnings line goes to the run's log
file only; with it they also reach the terminal as before, and progress is printed as plain lines between them.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator, TextIO

from metarec.config import Config
from metarec.models.registry import ROWS

FINISHED = re.compile(r"^Finished in state (Completed|Cached)")
COUNTED_TASKS = {"meta-train": "train", "fit-model": "fit", "evaluate-model": "evaluate", "new-items": "new items", "sweep-point": "sweep point"}
COUNTED_FLOWS = {"prepare": "prepare"}
FOLD = re.compile(r"fold\D{0,3}(\d+)", re.IGNORECASE)
# loggers whose records reach the terminal through their own or the root's stream handlers
QUIETED = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect._internal", "prefect.client", "mlflow", "py.warnings", "uvicorn")


def planned_stages(config: Config, sweep: bool) -> dict[str, int]:
    """How many stages of each kind a pipeline run of ``config`` finishes: per fold, prepare, each of our rows'
    training, each other row's fit and every row's evaluation, with Table 2 every row's refit and evaluation on the
    new items; one training per λ of the sweep."""
    folds = config.data.new_user_folds
    models = config.eval.models
    ours = sum(ROWS[name].is_ours for name in models)
    plan = {"prepare": folds, "train": folds * ours, "fit": folds * (len(models) - ours), "evaluate": folds * len(models),
            "new items": folds * len(models) if config.eval.new_items else 0, "sweep point": len(config.eval.lambda_sweep) if sweep else 0}
    return {kind: count for kind, count in plan.items() if count}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Stages done of the plan, by kind and by fold; the time taken and a linear estimate of the time left."""

    def __init__(self, plan: dict[str, int], out: TextIO, live: bool, clock=time.monotonic) -> None:
        self.plan, self.out, self.clock = plan, out, clock
        self.done = {kind: 0 for kind in plan}
        self.by_fold: dict[int, int] = {}
        self.started = clock()
        self.last = "starting"
        self._bar = self._live_bar() if live else None

    @property
    def total(self) -> int:
        return sum(self.plan.values())

    @property
    def finished(self) -> int:
        return sum(self.done.values())

    def _live_bar(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Bar(TextColumn("metarec run"), BarColumn(), MofNCompleteColumn(), TextColumn("stages ·"), TimeElapsedColumn(),
                  TextColumn("elapsed ·"), TimeRemainingColumn(), TextColumn("left · {task.description}"),
                  console=Console(file=self.out), transient=False)
        bar.start()
        self._task = bar.add_task(self.last, total=self.total)
        return bar

    def stage_finished(self, kind: str, name: str) -> None:
        if kind not in self.plan or self.done[kind] >= self.plan[kind]:
            return
        self.done[kind] += 1
        fold = FOLD.search(name)
        if fold:
            self.by_fold[int(fold.group(1))] = self.by_fold.get(int(fold.group(1)), 0) + 1
        self.last = f"{kind} {name}" if kind not in name else name
        self._show()

    def eta(self) -> float | None:
        """Seconds left, if each remaining stage takes the mean time of those done (None before the first)."""
        if not self.finished:
            return None
        return (self.clock() - self.started) / self.finished * (self.total - self.finished)

    def line(self) -> str:
        elapsed = self.clock() - self.started
        left = self.eta()
        kinds = ", ".join(f"{kind} {self.done[kind]}/{count}" for kind, count in self.plan.items())
        folds = " · " + " ".join(f"fold {f}: {n}" for f, n in sorted(self.by_fold.items())) if self.by_fold else ""
        return (f"[{self.finished}/{self.total}] {_clock(elapsed)} elapsed, "
                f"{'~' + _clock(left) if left is not None else '?'} left · done: {self.last} · {kinds}{folds}")

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.finished, description=self.last)
        else:
            print(self.line(), file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class _StageHandler(logging.Handler):
    """Feeds Prefect's "Finished in state Completed()" records to a Progress."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(level=logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not FINISHED.match(record.getMessage()):
                return
            task = getattr(record, "task_name", None)
            if task is not None:
                kind = COUNTED_TASKS.get(task)
                name = getattr(record, "task_run_name", None) or task
            else:
                kind = COUNTED_FLOWS.get(getattr(record, "flow_name", None) or "")
                name = f"{getattr(record, 'flow_name', '')} {getattr(record, 'flow_run_name', '')}".strip()
            if kind is not None:
                self.progress.stage_finished(kind, name)
        except Exception:  # a display must never fail the run
            self.handleError(record)


def log_path(config: Config) -> Path:
    """artifacts/logs/run-<time>-<dataset>.log: known before the run starts (its result folder is not)."""
    from tasks.runtime.paths import dataset_slug

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.runtime.artifacts_dir).resolve() / "logs" / f"run-{stamp}-{dataset_slug(config.data.dataset)}.log"


class _QuietFileHandler(logging.FileHandler):
    """The run's log file; a failed write (a full disk) must not print a logging traceback per line on the terminal:
    the run's own error says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            pass

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the buffered lines that did not fit: the run's error names the full disk
            pass


def _is_terminal_handler(handler: logging.Handler) -> bool:
    """A handler writing to the terminal: Prefect's console handlers (bound to whatever stderr was when Prefect was
    imported), MLflow's (a stream object of its own forwarding there), or any other on stdout/stderr."""
    from prefect.logging.handlers import PrefectConsoleHandler, _SafeStreamHandler

    if isinstance(handler, (PrefectConsoleHandler, _SafeStreamHandler)):
        return True
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    return stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) or type(stream).__name__ == "MlflowLoggingStream"


@contextmanager
def run_display(config: Config, sweep: bool, log_file: Path, verbose: bool = False, out: TextIO | None = None) -> Iterator[Progress]:
    """Show the run's progress on ``out`` (stderr) and send its log lines to ``log_file`` (and, ``verbose``, the terminal)."""
    import mlflow  # noqa: F401  (both configure their loggers on import: import them before rearranging)
    import prefect  # noqa: F401
    from prefect.logging.formatters import PrefectFormatter

    out = out or sys.stderr
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = _QuietFileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(PrefectFormatter(
        format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
        flow_run_fmt="%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt="%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r - %(message)s"))
    live = not verbose and hasattr(out, "isatty") and out.isatty()
    progress = Progress(planned_stages(config, sweep), out, live)
    stages = _StageHandler(progress)
    removed: list[tuple[logging.Logger, logging.Handler]] = []
    levels: list[tuple[logging.Logger, int]] = []
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        levels.append((logger, logger.level))
        logger.setLevel(logging.INFO)  # the finished-stage records are INFO, whatever PREFECT_LOGGING_LEVEL says
        logger.addHandler(stages)
    if not verbose:
        for name in QUIETED:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if _is_terminal_handler(h)]:
                logger.removeHandler(handler)
                removed.append((logger, handler))
    root = logging.getLogger()
    root.addHandler(to_file)
    quiet_loggers = [logging.getLogger(name) for name in ("prefect._internal", "mlflow") if not logging.getLogger(name).propagate]
    for logger in quiet_loggers:
        logger.addHandler(to_file)
    logging.captureWarnings(True)
    raising = logging.raiseExceptions
    if not verbose:  # else Prefect writes "--- Error logging to API ---" on the terminal when its server is gone
        logging.raiseExceptions = False
    try:
        yield progress
    finally:
        progress.close()
        logging.raiseExceptions = raising
        logging.captureWarnings(False)
        for logger in quiet_loggers:
            logger.removeHandler(to_file)
        root.removeHandler(to_file)
        to_file.close()
        for logger, handler in removed:
            logger.addHandler(handler)
        for logger, level in levels:
            logger.removeHandler(stages)
            logger.setLevel(level)


def mlflow_ui_hint(config: Config) -> str:
    """How to look at this store's runs: the `mlflow ui` command for a sqlite store, the server's address otherwise."""
    from metarec.redaction import redact
    from tasks.track.tracking import tracking_uri

    uri = tracking_uri(config)
    if uri.startswith("sqlite:///"):
        return f"MLflow UI: mlflow ui --backend-store-uri {uri} (then open http://127.0.0.1:5000)"
    return f"MLflow UI: {redact(uri)}"
