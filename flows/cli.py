"""metarec: a responsive, meta-learned recommender as a batch workflow.

Every command builds one validated configuration, then runs a Prefect flow. Configuration layers, later wins:
defaults < METAREC_* environment < --config FILE (TOML) < --set section.field=value < each command's own flags.

Exit codes: 0 done; 1 a run failed (bad data, a damaged file, ...); 2 a bad option or config
value; 3 meta-training diverged (`metarec run` without --allow-divergence, `metarec train`).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from metarec.config import DataConfig
from tasks.runtime.settings import ConfigError, check_artifacts_dir, load_config

# A batch tool runs offline too: Prefect's server telemetry would only log a failed lookup on every run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# MLflow draws a progress bar for every small artifact it copies (logging a model copies several): noise in a batch log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Plain help (no rich markup): rich reads "[data]" as a style tag and drops it, and shows flags as "<bool>".
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})


def shown(text: str, default: str) -> str:
    """Help text ending in click's "[default: ...]" for options whose default click would hide (None, a False flag)."""
    return f"{text}  [default: {default}]"


def config_sections() -> list[str]:
    """The sections a --config file may hold, read off the Config model so the help cannot go stale."""
    from metarec.config import Config, Section

    return [name for name, field in Config.model_fields.items() if isinstance(field.annotation, type) and issubclass(field.annotation, Section)]


def _config_help() -> str:
    return "TOML file with " + ", ".join(f"[{name}]" for name in config_sections()) + " sections."


_DATA_DEFAULTS = DataConfig()
ConfigOpt = typer.Option(None, "--config", metavar="FILE", help=shown(_config_help(), "none: defaults and METAREC_* variables"))
SetOpt = typer.Option([], "--set", metavar="SECTION.FIELD=VALUE", help=shown("Override one value: section.field=value (repeatable).", "none"))
DatasetOpt = typer.Option(None, "--dataset", metavar="NAME|PATH", help=shown(
    "ml-100k, ml-1m, ml-latest, ml-latest-small, netflix, synthetic-drift (generated), or a CSV/Parquet path.",
    f"data.dataset, {_DATA_DEFAULTS.dataset}"))
DataDirOpt = typer.Option(None, "--data-dir", metavar="DIR", help=shown(
    "Folder holding raw datasets.", "METAREC_DATA_DIR, else ./data, else ../shared/datasets"))
VerboseOpt = typer.Option(False, "--verbose", "-v", help=shown("Also show Prefect's per-task log lines on the terminal (they always go to the run's log file).", "off"))
QuickOpt = typer.Option(False, "--quick", help=shown("Fewer epochs, tasks and resamples: minutes, for tests and a first look.", "off, the full preset"))


def _config(config: Optional[Path], sets: list[str], dataset: Optional[str] = None, data_dir: Optional[Path] = None, **sections):
    data = {k: v for k, v in {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None}.items() if v is not None}
    data.update(sections.pop("data", {}))
    try:
        cfg = load_config(config, sets, data=data, **sections)
        check_artifacts_dir(cfg.runtime.artifacts_dir)
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    ensure_prefect_home(cfg)
    return cfg


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1) from exc


def _checked_input(cfg) -> Path:
    """The prepared folder of the input (resolving and hashing it): a missing path, a folder without ratings, a
    symlink loop or a FIFO is named here, before Prefect starts, not in a flow's traceback."""
    from tasks.runtime.paths import prepared_dir

    try:
        return prepared_dir(cfg)
    except (ValueError, OSError) as exc:
        _fail(exc)


@contextmanager
def _prefect_api() -> Iterator[None]:
    """Flows need a Prefect API: the configured one, else a temporary local server that dies with this process.

    Losing it mid-run (the server killed or stopped) is one short error, not Prefect's traceback: the stages
    finished so far are kept, so running the command again resumes."""
    import httpx

    from flows.deploy import temporary_server

    try:
        with temporary_server():
            yield
    except Exception as exc:
        full = disk_full(exc)
        if full is None and not isinstance(exc, httpx.HTTPError):
            raise
        if full is not None:
            where = f" writing {full.filename}" if full.filename else ""
            typer.secho(f"error: no space left on the device (OSError ENOSPC{where}; {full.strerror}). Free some space "
                        "there (or point runtime.artifacts_dir elsewhere) and run the command again: the stages finished so "
                        "far are kept.", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        typer.secho(f"error: lost the Prefect API ({type(exc).__name__}: {first}): its server stopped or was killed. "
                    "The stages finished so far are kept; run the command again to resume.", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC OSError behind ``exc``, however deep in its causes and contexts (MLflow and Prefect wrap it, and
    their own failing writes on the full disk pile on top of it), else None."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return current
        todo += [current.__cause__, current.__context__]
    return None


def ensure_prefect_home(cfg, environ=os.environ) -> None:
    """Prefect keeps its database and settings in $PREFECT_HOME (~/.prefect): with a read-only or missing HOME,
    use artifacts/prefect instead (as `metarec deploy` does). Only before Prefect is imported, which reads it once."""
    if environ.get("PREFECT_HOME"):
        return
    try:
        home = Path.home() / ".prefect"
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return
    except (OSError, RuntimeError):  # RuntimeError: no home directory at all
        pass
    environ["PREFECT_HOME"] = str((Path(cfg.runtime.artifacts_dir) / "prefect").resolve())


@app.command()
def prepare(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    sample_users: Optional[int] = typer.Option(None, "--sample-users", metavar="N", help=shown("Keep a seeded sample of N users.", "data.sample_users, every user")),
) -> None:
    """Prepare a data set for the pipeline.

    Ingests the ratings, splits them in DuckDB (new users, history, stream) and samples the evaluation candidates.
    """
    cfg = _config(config, set_, dataset, data_dir, data={"sample_users": sample_users} if sample_users else {})
    from tasks.runtime.paths import prepared_dir
    from tasks.data.prepare import is_prepared

    where = _checked_input(cfg)
    if is_prepared(where):  # skip starting Prefect (~15 s) for nothing
        typer.echo(f"already prepared: {where}")
        return
    from flows.prepare import prepare_flow

    try:
        with _prefect_api():
            out = prepare_flow(cfg)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(f"prepared data in {out}")


@app.command()
def datasets(data_dir: Optional[Path] = DataDirOpt) -> None:
    """List the known data sets and where each was found.

    Prints the folders searched, in order, then one line per known data set.
    """
    from tasks.data.datasets import KNOWN, detect_folder, search_dirs

    dirs = search_dirs(data_dir)
    typer.echo("searched: " + ", ".join(str(d) for d in dirs))
    for name, spec in KNOWN.items():
        found = next((d / f for d in dirs for f in spec.folders if (d / f).is_dir() and detect_folder(d / f)), None)
        absent = spec.url or ("generated on first use" if spec.generated else "no official download")
        where = str(found) if found else f"absent ({absent})"
        typer.echo(f"{name:16s} {where}")


@app.command()
def tune(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    model: list[str] = typer.Option([], "--model", metavar="NAME", help=shown("Row(s) to tune (repeatable); a row without a search space, Pop, is scored once.", "every row of eval.models")),
    budget: Optional[int] = typer.Option(None, "--budget", metavar="N", help=shown("Trials per row (the same for every row); a larger budget continues the studies.", "baselines.tune_budget, 24")),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N", help=shown("Processes running each row's trials, one torch thread each.", "runtime.max_workers, 2")),
) -> None:
    """Tune each row's hyperparameters.

    A seeded Optuna search on fold 0's history, with the same budget, objective and pruner for every row; writes
    the data set's record tuned/<dataset>.json (runtime.tuned_dir) and resumes from its sqlite studies.
    """
    overrides = {"baselines": {"tune_budget": budget}} if budget is not None else {}
    if workers is not None:
        overrides["runtime"] = {"max_workers": workers}
    cfg = _config(config, set_, dataset, data_dir, **overrides)
    from flows.baselines import tune_flow
    from flows.runners import with_runner

    try:
        with _prefect_api():
            out = with_runner(tune_flow, cfg)(cfg, tuple(model) or cfg.eval.models)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(f"tuning record in {out}")


@app.command()
def fit(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    model: list[str] = typer.Option([], "--model", metavar="NAME", help=shown("Model(s) to fit (repeatable).", "the baselines among eval.models")),
    tuned: Optional[Path] = typer.Option(None, "--tuned", metavar="FILE", help=shown("A tuning record (metarec tune) whose chosen values to use.", "none: the config's tuned values")),
    force: bool = typer.Option(False, "--force", help=shown("Refit even if a saved model with the same config exists.", "off")),
) -> None:
    """Fit models and save them.

    Fits on the prepared history and saves each model as state.npz + model.json (no pickle).
    """
    cfg = _config(config, set_, dataset, data_dir)
    from flows.baselines import fit_flow
    from tasks.train.models import BASELINE_NAMES

    try:
        with _prefect_api():
            out = fit_flow(cfg, tuple(model) or tuple(m for m in cfg.eval.models if m in BASELINE_NAMES), tuned, force)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        _fail(exc)
    for name, path in out.items():
        typer.echo(f"{name}: {path}")


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    epochs: Optional[int] = typer.Option(None, "--epochs", metavar="N", help=shown("Meta-training epochs.", "meta.epochs, 5")),
    lambda_ml: Optional[float] = typer.Option(None, "--lambda-ml", metavar="X", help=shown("Weight of the meta-learning loss.", "meta.lambda_ml, 1.0")),
) -> None:
    """Meta-train our model.

    Prepares the data, builds the task shards and meta-trains the responsive MF (resuming from its last
    checkpoint); logs to MLflow and logs Θ as an MLflow model.
    """
    meta = {k: v for k, v in {"epochs": epochs, "lambda_ml": lambda_ml}.items() if v is not None}
    cfg = _config(config, set_, dataset, data_dir, meta=meta)
    from flows.train import train_flow

    try:
        with _prefect_api():
            result = train_flow(cfg)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    for row in result.history:
        typer.echo(f"epoch {row['epoch']}: support_loss {row['support_loss']:.4f} query_loss {row['query_loss']:.4f} "
                   f"{row['tasks_per_s']:.0f} tasks/s ({row['epoch_seconds']:.1f} s)")
    typer.echo(f"status {result.status}; MLflow run {result.run_id}" + (f"; model version {result.model_version}" if result.model_version else ""))
    if result.status == "diverged":
        typer.secho(f"meta-training diverged: {result.message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(3)


def _run_config(config, set_, dataset, data_dir, quick: bool):
    from tasks.runtime.settings import QUICK_OVERRIDES

    return _config(config, [*(QUICK_OVERRIDES if quick else ()), *set_], dataset, data_dir)


def _print_cached(cfg, sweep: bool) -> bool:
    """Print the results of an earlier run with the same config, data, tuning and code, if there is one (no Prefect start)."""
    from tasks.data.datasets import DataError
    from tasks.runtime.stages import cached_run

    try:
        record = cached_run(cfg, sweep)
    except (DataError, OSError) as exc:  # a missing path, a folder, a symlink loop, a FIFO: named before Prefect starts
        _fail(exc)
    if record is None:
        return False
    table = Path(record["files"]["table1.md"])
    typer.echo(table.read_text())
    typer.echo("every step cached (same config, data, tuning and code): nothing was run")
    _where(cfg, record["files"], record["files"].get("sweep_plot"), None)
    return True


def _where(cfg, files: dict, sweep_plot: Optional[str], log: Optional[Path]) -> None:
    """The run's last lines: where Table 1, the plots and the log are, and how to open the MLflow UI on this store."""
    from flows.progress import mlflow_ui_hint

    plots = [str(path) for name, path in files.items() if str(name).endswith(".png")] + ([str(sweep_plot)] if sweep_plot else [])
    typer.echo(f"Table 1: {files['table1.md']} (summary, CSVs and plots beside it)")
    typer.echo("plots: " + (", ".join(plots) if plots else "none"))
    typer.echo(f"log: {log}" if log else "log: none (nothing ran)")
    typer.echo(mlflow_ui_hint(cfg))


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    quick: bool = QuickOpt,
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Also run the λ_ML sweep (paper Fig. 4)."),
    tune_first: bool = typer.Option(False, "--tune", help=shown("Tune every row on this data set first when it has no tuned values yet (metarec tune).", "off")),
    folds: Optional[int] = typer.Option(None, "--folds", metavar="F", min=1, help=shown(
        "New-user folds to pool (at least 1).", f"data.new_user_folds, {_DATA_DEFAULTS.new_user_folds}; 1 with --quick")),
    allow_divergence: bool = typer.Option(False, "--allow-divergence", help=shown("Exit 0 even if our model's meta-training diverges (the report says so either way).", "off: exit 3")),
    verbose: bool = VerboseOpt,
) -> None:
    """Run the whole pipeline, with the λ_ML sweep.

    Prepares, builds tasks, trains ours and fits the baselines, evaluates all in parallel over the new-user folds,
    writes Table 1 and the curves, registers our model and moves the champion alias if it is at least as good.
    One progress display shows the stages done and the time left; Prefect's log goes to artifacts/logs/.
    """
    cfg = _run_config(config, [*set_, *([f"data.new_user_folds={folds}"] if folds is not None else [])], dataset, data_dir, quick)
    _checked_input(cfg)
    if not tune_first and _print_cached(cfg, sweep):
        return
    from flows.pipeline import pipeline
    from flows.progress import log_path, run_display
    from flows.runners import with_runner

    # the run's display replaces meta-training's own per-epoch bar: one live display at a time
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"progress": False})})
    log = log_path(cfg)
    diverged = None
    try:
        with run_display(cfg, sweep, log, verbose), _prefect_api():  # the server's start and last flush logged too
            result = with_runner(pipeline, cfg)(cfg, sweep=sweep, tune_first=tune_first)
        typer.echo((Path(result["run_dir"]) / "table1.md").read_text())
        if result.get("champion"):
            typer.echo("champion: " + result["champion"]["reason"])
        _where(cfg, result["files"], (result["sweep"] or {}).get("plot"), log)
        diverged = result.get("warnings") or None
    except (ValueError, FileNotFoundError) as exc:
        typer.secho(f"log: {log}", err=True)
        _fail(exc)
    for warning in diverged or []:
        typer.secho(f"{'warning' if allow_divergence else 'error'}: {warning}", fg=typer.colors.YELLOW if allow_divergence else typer.colors.RED, err=True)
    if diverged and not allow_divergence:
        raise typer.Exit(3)


@app.command()
def evaluate(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    quick: bool = QuickOpt,
    allow_divergence: bool = typer.Option(False, "--allow-divergence", help=shown("Exit 0 even if our model's meta-training diverges.", "off: exit 3")),
    verbose: bool = VerboseOpt,
) -> None:
    """Run the pipeline without the λ_ML sweep.

    Evaluates the models of eval.models (fitting what is missing) and renders Table 1: the same as
    `run --no-sweep`.
    """
    run(config, set_, dataset, data_dir, quick, sweep=False, tune_first=False, folds=None, allow_divergence=allow_divergence, verbose=verbose)


@app.command()
def recommend(
    user: str = typer.Option(..., "--user", metavar="ID", help="The user's id as in the raw data (e.g. 196 for ml-100k)."),
    recent: Optional[str] = typer.Option(None, "--recent", metavar="ITEM,ITEM,...", help=shown("Comma-separated raw item ids, oldest first.", "the user's stored ones")),
    n: int = typer.Option(10, "-n", metavar="N", help="How many items."),
    version: Optional[str] = typer.Option(None, "--version", metavar="VERSION", help=shown(
        "A registered version of the data set's model responsive-mf-<data set>.", "its champion")),
    dataset: Optional[str] = typer.Option(None, "--dataset", metavar="NAME|PATH", help=shown(
        "Serve this data set's champion (each data set has its own registered model).", "the configured data set, ml-100k")),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Recommend items from the champion.

    Top-n items, adapted to the user's most recent interactions (docs/method.md §6).
    """
    cfg = _config(config, set_, dataset)
    from tasks.serve.serving import ServingError, load_served
    from tasks.serve.serving import recommend as recommend_items

    items = [part.strip() for part in recent.split(",") if part.strip()] if recent is not None else None
    if recent is not None and not items:
        _fail(ValueError("--recent is empty: give at least one item id, e.g. --recent 50,172"))
    try:
        served = load_served(cfg, version, dataset=dataset)
        rows = recommend_items(served, user, items, n)
    except (ServingError, FileNotFoundError, ValueError) as exc:  # ValueError: a damaged file or store, named
        _fail(exc)
    typer.echo(f"{served.name} v{served.version}, user {user}" + (f", adapted to {len(items)} recent item(s)" if items else ", adapted to its stored recent items"))
    for row in rows:
        typer.echo(f"{row['rank']:>3}  {row['item']:>8}  {row['title']}")


SERVER_LOG = "server.log"


def _prefect_home(cfg) -> Path:
    """$PREFECT_HOME if set, else artifacts/prefect: this checkout's runs never mix with other projects' in ~/.prefect."""
    home = Path(os.environ.get("PREFECT_HOME") or Path(cfg.runtime.artifacts_dir) / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _valid_cron(cron: str) -> str:
    """Checked before the server starts: Prefect would reject a bad schedule only after, with a long traceback."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise typer.BadParameter(f"{cron!r} is not a valid cron schedule: five fields, minute (0-59) hour (0-23) "
                                 "day of month (1-31) month (1-12) weekday (0-6), e.g. '0 2 * * *' (02:00 every day)")
    return cron


@app.command()
def deploy(
    port: int = typer.Option(4200, "--port", metavar="PORT", min=1, max=65535, help="Port of the local Prefect server (127.0.0.1), 1-65535."),
    cron: str = typer.Option("0 2 * * *", "--cron", metavar="CRON", callback=_valid_cron,
                             help="Schedule of the nightly retraining (five cron fields: minute hour day month weekday)."),
    dataset: str = typer.Option("ml-100k", "--dataset", metavar="NAME|PATH", help="The data set each nightly run retrains on."),
    quick: bool = typer.Option(False, "--quick", help=shown("Retrain with the --quick preset.", "off")),
    set_: list[str] = SetOpt,
    server: bool = typer.Option(True, "--server/--no-server", help="Start a Prefect server here (else use PREFECT_API_URL)."),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="Serve the Prefect web UI from the started server."),
    paused: bool = typer.Option(False, "--paused", help=shown("Register the schedule paused: runs start only by hand "
                                "(`prefect deployment run`) until it is resumed in the UI or with `prefect deployment resume`.", "off")),
) -> None:
    """Serve the nightly retraining on a local Prefect server.

    Starts the server and serves the deployment; Ctrl-C stops both. Prefect's state (its database, settings and
    the server's log, server.log) lives in artifacts/prefect/, or in $PREFECT_HOME when that is set.
    """
    import os

    from flows.deploy import DEPLOYMENT_NAME, api_url, local_server, port_in_use, serve_nightly

    cfg = _config(None, set_, dataset)  # validate the overrides before anything starts
    if server and port_in_use(port):
        typer.secho(f"error: port {port} on 127.0.0.1 is already in use by another process; choose another with --port",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    home = _prefect_home(cfg)
    # before Prefect is imported: this process (the served deployment, its flow runs) and the server share this home
    os.environ["PREFECT_HOME"] = str(home)
    parameters = {"dataset": dataset, "quick": quick, "overrides": list(set_)}
    typer.echo(f"Prefect home: {home}" + (f"; server log: {home / SERVER_LOG}" if server else ""))
    typer.echo(f"trigger a run with: PREFECT_API_URL={api_url(port)} prefect deployment run 'nightly-retrain/{DEPLOYMENT_NAME}'")
    if not server:
        serve_nightly(cron, parameters, paused=paused)
        return
    import signal
    import sys

    # SIGTERM unwinds like Ctrl-C, so the server started below is stopped with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with local_server(port, prefect_home=home, log_path=home / SERVER_LOG, ui=ui):
        os.environ["PREFECT_API_URL"] = api_url(port)
        typer.echo(f"Prefect server on {api_url(port).removesuffix('/api')}; serving 'nightly-retrain/{DEPLOYMENT_NAME}' on '{cron}'"
                    + (" (paused)" if paused else ""))
        serve_nightly(cron, parameters, paused=paused)


if __name__ == "__main__":
    app()
