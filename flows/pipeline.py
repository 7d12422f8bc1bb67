"""The `pipeline` flow: raw ratings -> Table 1 pooled over new-user folds, the verdicts, the curves, MLflow runs.

For each of the F new-user folds (``data.new_user_folds``): prepare the fold's
split -> build its tasks -> meta-train our rows and fit every other row -> evaluate
each model. All folds' fits and evaluations fan out together on the configured
task runner; then the per-case results are pooled and rendered. Every step
skips work already done for the same inputs (its output folder is named by
their hash), so a re-run is cheap and a failed step can be retried alone.

One MLflow parent run spans the whole flow (opened first, closed last, so its
duration is true); training runs, the model children and the λ_ML sweep nest under it.
A meta-training that did not finish is stated at the top of table1.md and summary.md,
and the parent run ends FAILED with it as a tag.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task

from flows.lambda_sweep import lambda_sweep
from flows.prepare import prepare_flow
from metarec.config import Config
from metarec.redaction import redact
from metarec.models.registry import ROWS
from tasks.evaluate.aggregate import RunFacts, ours_options, write_report
from tasks.runtime.atomic import write_json
from tasks.evaluate.evaluation import evaluate_model_task, log_child_run
from tasks.evaluate.new_items import new_items_report, publish_table2
from tasks.train.models import fit_model_task
from tasks.runtime.paths import dataset_slug, fold_configs, prepared_dir, run_dir
from tasks.evaluate.pooling import pool_cases, summarise_cases
from tasks.data.prepared import load_prepared
from tasks.runtime.stages import record_path, stage_record
from tasks.train.task_shards import build_task_shards_task
from tasks.track.publish import log_mlflow_run, publish_run_report
from tasks.track.tracking import model_params, parent_run, run_tags
from tasks.train.training import meta_train_task
from tasks.train.tuning import TUNABLE, current_fingerprint, load_record, tune, tuned_source

OURS = "responsive"  # the paper's row: its fold-0 model is the serving candidate


def pooled_dir(config: Config) -> Path:
    """artifacts/<dataset>/pooled/<hash>-F<folds>: named by the run's config and every fold's data version."""
    versions = ",".join(prepared_dir(c).name for c in fold_configs(config))
    key = hashlib.sha256(f"{config.hash_of()}:{versions}".encode()).hexdigest()[:12]
    return Path(config.runtime.artifacts_dir) / dataset_slug(config.data.dataset) / "pooled" / f"{key}-F{config.data.new_user_folds}"


def _submit_fold(config: Config, parent_id: str) -> tuple[dict[str, object], dict[str, object]]:
    """Futures of one fold: meta-training of each row of ours, fitting of every other row, and their evaluations."""
    fold = config.data.fold
    shards: dict[Path, object] = {}
    trained, evaluated = {}, {}
    for name in config.eval.models:
        if ROWS[name].is_ours:
            row_config = config.for_row(name)
            task_dir = build_task_shards_task.with_options(task_run_name=f"tasks-fold{fold}")
            key = Path(str(row_config.hash_of("data", "tasks")))
            shards.setdefault(key, task_dir.submit(row_config))
            trained[name] = meta_train_task.with_options(task_run_name=f"train-{name}-fold{fold}").submit(
                config, shards[key], row=name, parent_run_id=parent_id  # registered after evaluation if fold 0's ours
            )
            model = _model_path.with_options(task_run_name=f"model-{name}-fold{fold}").submit(trained[name])
        else:
            model = fit_model_task.with_options(task_run_name=f"fit-{name}-fold{fold}").submit(name, config)
        evaluated[name] = evaluate_model_task.with_options(task_run_name=f"evaluate-{name}-fold{fold}").submit(name, model, config)
    return trained, evaluated


@task(name="model-path")
def _model_path(training) -> str | None:
    """The saved model of a finished meta-training; None when it diverged or stopped (the model is left out)."""
    return training.model_path if training.status == "finished" else None


def _log_children(config: Config, parent_id: str, results: dict[str, dict], files: dict[str, Path], trained: dict) -> None:
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_run(parent_id).info.experiment_id
    for name, record in results.items():
        extra = {"training_run_id": trained[name].run_id} if name in trained and trained[name] is not None else {}
        log_child_run(client, experiment_id, parent_id, record, run_tags(config, kind="model", **extra), model_params(config, name))
    for path in files.values():
        mlflow.log_artifact(str(path))


def training_warnings(trained: dict[int, dict]) -> list[str]:
    """Each meta-training that did not finish (diverged), for the top of table1.md and summary.md."""
    return [f"fold {fold}: meta-training of {name} {t.status} ({t.message or 'no message'}), so its results for that fold are "
            f"missing from this table and every comparison; see MLflow run {t.run_id}."
            for fold, rows in trained.items() for name, t in rows.items() if t.status != "finished"]


def _headline(results: dict[str, dict]) -> dict[str, float]:
    """Ours and the best other row, new-user NDCG@10 at each n, for the parent run."""
    out: dict[str, float] = {}
    for key in sorted({k for r in results.values() for k in r["metrics"] if k.startswith("new_n") and k.endswith("_ndcg10")}):
        others = [r["metrics"][key]["mean"] for m, r in results.items() if not ROWS[m].is_ours and key in r["metrics"]]
        if OURS in results and key in results[OURS]["metrics"]:
            out[f"ours_{key}"] = results[OURS]["metrics"][key]["mean"]
        if others:
            out[f"best_other_{key}"] = max(others)
    return out


def _tuned(config: Config, tune_missing: bool) -> tuple[Config, str]:
    """This data set's tuned values (tuning the rows that lack them first, when asked), and where they came from."""
    record = load_record(config)
    missing = [m for m in config.eval.models if m in TUNABLE and (record is None or record.get("legacy") or m not in record.get("models", {}))]
    fold0 = config.model_copy(update={"data": config.data.with_fold(0)})
    prepare_flow(fold0)  # the record's data fingerprint is checked against fold 0's history
    if tune_missing and missing:
        tune(config, tuple(missing))
    return tuned_source(config, current_fingerprint(config))


@flow(name="pipeline", validate_parameters=False)  # Config is validated once, by load_config
def pipeline(config: Config, sweep: bool = False, tune_first: bool = False) -> dict:
    logger = get_run_logger()
    requested = config  # what the warm-run record is keyed on (tuned values are resolved below)
    quick = config.runtime.preset == "quick"
    with parent_run(config, f"pipeline {redact(config.data.dataset)} F={config.data.new_user_folds}", "pipeline") as parent_id:
        log_mlflow_run(config, parent_id)
        config, tuned_note = _tuned(config, tune_first)
        logger.info(tuned_note)
        folds = fold_configs(config)
        mlflow.log_params({"dataset": redact(config.data.dataset), "folds": len(folds), "models": ",".join(config.eval.models),
                           "config_hash": config.hash_of(), "preset": config.runtime.preset})
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        prepared = [prepare_flow(c) for c in folds]
        seconds["prepare"] = time.perf_counter() - start

        start = time.perf_counter()
        submitted = [_submit_fold(c, parent_id) for c in folds]
        fold_results = {c.data.fold: {name: r for name, future in evaluated.items() if (r := future.result()) is not None}
                        for c, (_, evaluated) in zip(folds, submitted)}
        trained = {c.data.fold: {name: future.result() for name, future in t.items()} for c, (t, _) in zip(folds, submitted)}
        seconds["train, fit and evaluate"] = time.perf_counter() - start

        notes = [tuned_note]
        warnings = training_warnings(trained)
        for note in [*notes, *warnings]:
            logger.warning(note)
        start = time.perf_counter()
        out = pooled_dir(config)
        cases = pool_cases({c.data.fold: run_dir(c) for c in folds}, config.eval.models)
        results = {name: {"model": name, "metrics": summarise_cases(table, config.eval.bootstrap, config.eval.seed), "seconds": _seconds(fold_results, name)}
                   for name, table in cases.items()}
        facts = RunFacts(config.data.dataset, len(folds), [load_prepared(p).stats for p in prepared], config.to_flat_dict(), seconds, quick, notes,
                         ours_options(config, config.eval.models))
        files = write_report(out, facts, results, cases, fold_results, warnings)
        write_json(config.to_record(), out / "config.json")
        files["config.json"] = out / "config.json"
        if config.eval.new_items:  # opt-in Table 2 (item cold start): a second fit and evaluation of every row
            table2_started = time.perf_counter()
            files.update(table2 := new_items_report(config, folds, out))
            publish_table2(table2, config.data.dataset)
            seconds["new items"] = time.perf_counter() - table2_started
        seconds["report"] = time.perf_counter() - start
        _log_children(config, parent_id, results, files, trained[0])
        mlflow.log_metrics({**_headline(results), **{f"seconds_{k.replace(', ', '_').replace(' ', '_')}": v for k, v in seconds.items()}})
        publish_run_report(files, config.data.dataset)  # on the top flow run (the nightly run around this one)
        logger.info("results in %s", out)
        swept = lambda_sweep(config, parent_id) if sweep else None
        if warnings:
            mlflow.set_tags({"status": "diverged", "warning": " ".join(warnings)[:5000]})
        else:  # a diverged run is not recorded for warm re-runs: running it again states the divergence again
            outputs = {**{k: str(v) for k, v in files.items()}, **({"sweep_plot": str(swept["plot"])} if swept else {})}
            write_json(stage_record(requested, sweep, outputs), record_path(requested, sweep))
    if warnings:  # the parent run ends FAILED, not FINISHED with a tag
        mlflow.MlflowClient().set_terminated(parent_id, "FAILED")
    return {
        "warnings": warnings,
        "run_dir": str(out),
        "results": results,
        "fold0": fold_results.get(0, {}),
        "training": None if trained[0].get(OURS) is None else trained[0][OURS].__dict__,
        "files": {k: str(v) for k, v in files.items()},
        "sweep": swept,
    }


def _seconds(fold_results: dict[int, dict[str, dict]], name: str) -> dict[str, float]:
    """A model's evaluation seconds summed over folds."""
    total: dict[str, float] = {}
    for results in fold_results.values():
        for key, value in results.get(name, {}).get("seconds", {}).items():
            total[key] = total.get(key, 0.0) + float(value)
    return total
