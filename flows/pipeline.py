"""The `pipeline` flow: raw ratings -> Table 1 pooled over new-user folds, the verdicts, the curves, MLflow runs.

For each of the F new-user folds (``data.new_user_folds``): prepare the fold's
split -> build its tasks -> meta-train our rows and fit every other row -> evaluate
each model. All folds' fits and evaluations fan out together on the configured
task runner; then the per-case results are pooled and rendered. Every step
skips work already done for the same inputs (its output folder is named by
their hash), so a re-run is cheap and a failed step can be retried alone.

One MLflow parent run spans the whole flow (opened first, closed last, so its
duration is true); under it one run per row (``<row> · pooled``, opened before the
row's fits and evaluations start, closed when its pooled results are logged), our
rows' trainings per fold under their row's run, and the λ_ML sweep.
A meta-training that did not finish is stated at the top of table1.md and summary.md,
and the parent run ends FAILED with it as a tag.

Then the run's candidate (Ours+ if the run has it, else Ours (paper); fold 0's Θ) is
registered and challenges this data set's champion (``tasks.serve.candidate``,
``tasks.track.champion``), as task runs of this flow; the decision is a Prefect
artifact and tags on the parent run. The Prefect flow run is named
``pipeline <data set> F=<folds> <preset>`` and tagged with them.
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
from tasks.evaluate.evaluation import evaluate_model_task
from tasks.evaluate.new_items import new_items_row_task, publish_table2, split_new_items_task, table2_report, unit_records
from tasks.train.models import fit_model_task
from tasks.runtime.paths import dataset_slug, fold_configs, prepared_dir, run_dir
from tasks.evaluate.pooling import pool_cases, summarise_cases
from tasks.data.prepared import load_prepared
from tasks.runtime.stages import record_path, stage_record
from tasks.train.task_shards import build_task_shards_task
from tasks.serve.candidate import candidate_cases, candidate_row, promote_task, register_task
from tasks.track.champion import registered_model_name
from tasks.track.model_registry import Candidate, log_model_metrics
from tasks.track.publish import log_mlflow_run, run_tags_of, tag_flow_run, publish_markdown, publish_run_report
from tasks.track.tracking import close_model_run, model_params, open_model_runs, parent_run, run_description
from tasks.train.training import meta_train_task
from tasks.train.tuning import TUNABLE, current_fingerprint, load_record, tune, tuned_source



def pooled_dir(config: Config) -> Path:
    """artifacts/<dataset>/pooled/<hash>-F<folds>: named by the run's config and every fold's data version."""
    versions = ",".join(prepared_dir(c).name for c in fold_configs(config))
    key = hashlib.sha256(f"{config.hash_of()}:{versions}".encode()).hexdigest()[:12]
    return Path(config.runtime.artifacts_dir) / dataset_slug(config.data.dataset) / "pooled" / f"{key}-F{config.data.new_user_folds}"


def _submit_fold(config: Config, model_runs: dict[str, str]) -> tuple[dict[str, object], dict[str, object]]:
    """Futures of one fold: meta-training of each row of ours (its MLflow run under the row's run in ``model_runs``),
    fitting of every other row, and their evaluations. Task runs are named by what they do, row and fold."""
    fold = config.data.fold
    shards: dict[str, object] = {}
    trained, evaluated = {}, {}
    for name in config.eval.models:
        label = ROWS[name].label
        if ROWS[name].is_ours:
            row_config = config.for_row(name)
            key = row_config.hash_of("data", "tasks")
            if key not in shards:  # rows whose tasks differ (Ours+ drops the neighbours) build their own
                named = f"tasks · fold {fold}" if not shards else f"tasks for {label} · fold {fold}"
                shards[key] = build_task_shards_task.with_options(task_run_name=named).submit(row_config)
            trained[name] = meta_train_task.with_options(task_run_name=f"train {label} · fold {fold}").submit(
                config, shards[key], row=name, parent_run_id=model_runs.get(name)  # the candidate is registered after evaluation
            )
            model = _model_path.with_options(task_run_name=f"model of {label} · fold {fold}").submit(trained[name])
        else:
            model = fit_model_task.with_options(task_run_name=f"fit {label} · fold {fold}").submit(name, config)
        evaluated[name] = evaluate_model_task.with_options(task_run_name=f"evaluate {label} · fold {fold}").submit(name, model, config)
    return trained, evaluated


def new_items_stage(config: Config, folds: list[Config], out: Path) -> dict[str, Path]:
    """Table 2: per fold its new-item split, then every row refitted without the new items and evaluated on them, one
    task run per (fold, row) on the flow's task runner, side by side as Table 1's; pooled and written once all are done.
    A failed unit stops the stage, once the others are done, before the table is written; the error names each failed
    unit's row and fold."""
    splits = [split_new_items_task.with_options(task_run_name=f"split new items · fold {c.data.fold}").submit(c) for c in folds]
    for split in splits:
        split.result()  # a split that failed says why, before any unit starts
    # our rows first (they meta-train again: the longest units), each for every fold: threads reach the compute slots
    # about in submission order, and one of ours starting last is the stage's tail (ml-100k, 1 fold: 55 s, then 126 s alone)
    units = [new_items_row_task.with_options(task_run_name=f"new items · {ROWS[name].label} · fold {c.data.fold}").submit(name, c)
             for name in sorted(config.eval.models, key=lambda m: not ROWS[m].is_ours) for c in folds]
    unit_records(units)
    return table2_report(config, folds, out)


@task(name="model-path")
def _model_path(training) -> str | None:
    """The saved model of a finished meta-training; None when it diverged or stopped (the model is left out)."""
    return training.model_path if training.status == "finished" else None


def _log_children(config: Config, model_runs: dict[str, str], results: dict[str, dict], files: dict[str, Path], trained: dict) -> None:
    """Each row's pooled results on the run opened for it (``open_model_runs``), then closed; the report files on the parent."""
    client = mlflow.MlflowClient()
    for name, run_id in model_runs.items():
        record = results.get(name)
        if record is None:  # no fold evaluated it (its training diverged everywhere)
            client.set_terminated(run_id, "FAILED")
            continue
        extra = {"training_run_id": trained[name].run_id} if name in trained and trained[name] is not None else {}
        close_model_run(client, run_id, record, extra, model_params(config, name, pooled=True))
    for path in files.values():
        mlflow.log_artifact(str(path))


def _link_model_metrics(trained: dict[int, dict], fold_results: dict[int, dict[str, dict]]) -> None:
    """Each logged Θ (row, fold) gets its fold's evaluation metrics as its final metrics."""
    for fold, rows in trained.items():
        for name, training in rows.items():
            record = fold_results.get(fold, {}).get(name)
            if training is not None and training.status == "finished" and record is not None:
                log_model_metrics(training.run_id, training.model_uri, {k: v["mean"] for k, v in record["metrics"].items()})


def training_warnings(trained: dict[int, dict]) -> list[str]:
    """Each meta-training that did not finish (diverged), for the top of table1.md and summary.md."""
    return [f"fold {fold}: meta-training of {name} {t.status} ({t.message or 'no message'}), so its results for that fold are "
            f"missing from this table and every comparison; see MLflow run {t.run_id}."
            for fold, rows in trained.items() for name, t in rows.items() if t.status != "finished"]


HEADLINE_ROWS = {"responsive": "ours_paper", "responsive_plus": "ours_plus"}  # metric prefix of each of our rows


def _headline(results: dict[str, dict]) -> dict[str, float]:
    """Both our rows (ours_paper_*, ours_plus_*) and the best other row (best_other_*), new-user NDCG@10 at each n,
    for the parent run."""
    out: dict[str, float] = {}
    for key in sorted({k for r in results.values() for k in r["metrics"] if k.startswith("new_n") and k.endswith("_ndcg10")}):
        others = [r["metrics"][key]["mean"] for m, r in results.items() if not ROWS[m].is_ours and key in r["metrics"]]
        for row, prefix in HEADLINE_ROWS.items():
            if row in results and key in results[row]["metrics"]:
                out[f"{prefix}_{key}"] = results[row]["metrics"][key]["mean"]
        if others:
            out[f"best_other_{key}"] = max(others)
    return out


def _champion(config: Config, kind: str, folds: list[Config], trained: dict) -> tuple[dict | None, dict]:
    """Register the run's candidate (Ours+ if the run has it, else Ours (paper): fold 0's Θ) and let it challenge
    this data set's champion; (decision, candidate's training) — decision None when there is no candidate model."""
    row = candidate_row(config.eval.models)
    training = trained[0].get(row) if row else None
    if training is None or training.status != "finished":
        return None, training
    label = ROWS[row].label
    cases = candidate_cases(folds[0], row)
    candidate = Candidate(row, 0, len(folds), cases)
    version = register_task.with_options(task_run_name=f"register {label} · fold 0")(folds[0], training.run_id, kind, candidate)
    training.model_version = version
    if cases is None:
        return {"promoted": False, "version": version, "reason": f"v{version} not promoted: fold 0 has no new-user cases at n = 5 to score it"}, training
    return promote_task.with_options(task_run_name=f"promote {label} · fold 0")(folds[0], version, cases), training


def _record_decision(config: Config, decision: dict | None, training) -> None:
    """The decision on the MLflow parent (tags) and as a Prefect artifact of the top flow run."""
    if decision is None:
        text = "no candidate: " + (f"meta-training of fold 0's candidate {training.status}" if training is not None else "the run has no row of ours")
        mlflow.set_tags({"champion_decision": text})
    else:
        text = decision["reason"]
        mlflow.set_tags({"champion_decision": text[:5000], "model_version": str(decision["version"]),
                         "registered_model": registered_model_name(config.data.dataset), "promoted": str(bool(decision["promoted"])).lower()})
    publish_markdown("champion", config.data.dataset, f"**{registered_model_name(config.data.dataset)}**: {text}", "champion decision")


def _tuned(config: Config, tune_missing: bool) -> tuple[Config, str]:
    """This data set's tuned values (tuning the rows that lack them first, when asked), and where they came from."""
    record = load_record(config)
    missing = [m for m in config.eval.models if m in TUNABLE and (record is None or record.get("legacy") or m not in record.get("models", {}))]
    fold0 = config.model_copy(update={"data": config.data.with_fold(0)})
    prepare_flow(fold0)  # the record's data fingerprint is checked against fold 0's history
    if tune_missing and missing:
        tune(config, tuple(missing))
    return tuned_source(config, current_fingerprint(config))


def run_title(config: Config) -> str:
    """``pipeline <data set> F=<folds> <preset>``: the Prefect flow run's and the MLflow parent run's name."""
    return f"pipeline {dataset_slug(redact(config.data.dataset))} F={config.data.new_user_folds} {config.runtime.preset}"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return run_title(flow_run.parameters["config"])


@flow(name="pipeline", flow_run_name=_flow_run_name, validate_parameters=False)  # Config is validated once, by load_config
def pipeline(config: Config, sweep: bool = False, tune_first: bool = False, kind: str = "pipeline") -> dict:
    """The whole run; ``kind``: who asks (pipeline for `metarec run`, nightly), recorded on the registered version."""
    logger = get_run_logger()
    requested = config  # what the warm-run record is keyed on (tuned values are resolved below)
    quick = config.runtime.preset == "quick"
    with parent_run(config, run_title(config), "pipeline") as parent_id:
        mlflow.set_tag("mlflow.note.content", run_description(config))
        log_mlflow_run(config, parent_id)
        tag_flow_run(*run_tags_of(config, "pipeline"))
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
        with open_model_runs(config, parent_id, config.eval.models) as model_runs:
            submitted = [_submit_fold(c, model_runs) for c in folds]
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
                files.update(table2 := new_items_stage(config, folds, out))
                publish_table2(table2, config.data.dataset)
                seconds["new items"] = time.perf_counter() - table2_started
                logger.info("Table 2 (new items) in %s, %.1f s", table2["table2.md"], seconds["new items"])
            seconds["report"] = time.perf_counter() - start
            _log_children(config, model_runs, results, files, trained[0])
        _link_model_metrics(trained, fold_results)
        decision, candidate_training = _champion(config, kind, folds, trained)
        _record_decision(config, decision, candidate_training)
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
        "training": None if candidate_training is None else candidate_training.__dict__,  # the candidate's (fold 0's)
        "champion": decision,
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
