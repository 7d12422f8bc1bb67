"""The `pipeline` flow: raw ratings -> Table 1, the stream curve, and MLflow runs to compare.

prepare -> build tasks -> meta-train and fit each baseline (in parallel) ->
evaluate every model (in parallel) -> aggregate. Every step skips work already
done for the same inputs (its output folder is named by their hash), so a
re-run is cheap and a failed step can be retried alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.prepare import prepare_flow

from metarec.config import Config
from tasks.aggregate import write_report
from tasks.atomic import write_json
from tasks.evaluation import evaluate_model_task, log_child_run
from tasks.models import fit_model_task
from tasks.paths import run_dir
from tasks.prepared import load_prepared
from tasks.task_shards import build_task_shards_task
from tasks.tracking import run_tags, setup_mlflow
from tasks.training import meta_train_task

OURS = "responsive"


def _fit_all(config: Config) -> tuple[dict[str, Path], object]:
    """Meta-train ours and fit each baseline concurrently; a diverged training leaves ours out."""
    baselines = {name: fit_model_task.submit(name, config) for name in config.eval.models if name != OURS}
    training = None
    if OURS in config.eval.models:
        training = meta_train_task.submit(config, build_task_shards_task(config.for_row(OURS))).result()
    paths = {name: future.result() for name, future in baselines.items()}
    if training is not None and training.status == "finished":
        paths = {OURS: Path(training.model_path), **paths}
    return paths, training


def _log_parent(config: Config, results: dict[str, dict], files: dict[str, Path], training) -> None:
    experiment = mlflow.get_experiment_by_name(config.runtime.experiment)
    client = mlflow.MlflowClient()
    parent = mlflow.active_run()
    flat = {k: str(v) for k, v in config.to_flat_dict().items()}
    for name, record in results.items():
        extra = {"training_run_id": training.run_id} if name == OURS and training is not None else {}
        log_child_run(client, experiment.experiment_id, parent.info.run_id, record, run_tags(config, **extra), flat)
    for path in files.values():
        mlflow.log_artifact(str(path))


@flow(name="pipeline", validate_parameters=False)  # Config is validated once, by load_config
def pipeline(config: Config) -> dict:
    logger = get_run_logger()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    prepared_path = prepare_flow(config)
    seconds["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    model_paths, training = _fit_all(config)
    seconds["train and fit"] = time.perf_counter() - start
    if training is not None and training.status != "finished":
        logger.warning("meta-training %s: %s; our model is left out of the evaluation", training.status, training.message)

    start = time.perf_counter()
    futures = {name: evaluate_model_task.submit(name, path, config) for name, path in model_paths.items()}
    results = {name: future.result() for name, future in futures.items()}
    seconds["evaluate"] = time.perf_counter() - start

    prepared = load_prepared(prepared_path)
    out = run_dir(config)
    files = write_report(out, config.data.dataset, results, config.data.new_user_ns, config.data.stream_batches, prepared.stats, config.to_flat_dict(), seconds)
    write_json(config.model_dump(mode="json"), out / "config.json")  # the run's folder is named by its hash
    files["config.json"] = out / "config.json"
    setup_mlflow(config)
    with mlflow.start_run(run_name=f"pipeline-{config.hash_of()}", tags=run_tags(config, kind="pipeline"), nested=mlflow.active_run() is not None):
        _log_parent(config, results, files, training)
        mlflow.log_metrics({f"seconds_{k.replace(' ', '_')}": v for k, v in seconds.items()})
    create_markdown_artifact(files["table1.md"].read_text(), key="table1", description=f"Table 1 on {config.data.dataset}")
    create_markdown_artifact(files["summary.md"].read_text(), key="run-summary")
    create_link_artifact(files["stream_auc.png"].resolve().as_uri(), link_text="stream AUC per batch (PNG)", key="stream-auc-plot")
    logger.info("results in %s", out)
    return {"run_dir": str(out), "results": results, "training": None if training is None else training.__dict__, "files": {k: str(v) for k, v in files.items()}}
