"""The `lambda_sweep` flow: meta-train and evaluate ours for each λ_ML -> the λ_ML curve (paper Fig. 4).

The points run in parallel on the configured task runner; a diverged value is
a marked point on the curve, never a crash of the sweep.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task

from flows.prepare import prepare_flow
from metarec.config import Config
from tasks.aggregate import lambda_plot
from tasks.atomic import write_json, write_text
from tasks.evaluation import evaluate_model, new_user_metric
from tasks.paths import prepared_dir
from tasks.task_shards import build_task_shards_task
from tasks.publish import log_mlflow_run, publish_markdown
from tasks.tracking import child_run, main_params, model_params, parent_run, run_tags
from tasks.training import meta_train


def sweep_dir(config: Config) -> Path:
    return prepared_dir(config) / "sweeps" / config.hash_of()


def point_name(lambda_ml: float) -> str:
    return f"sweep λ={lambda_ml:g}"


@task(name="sweep-point")
def sweep_point(config: Config, lambda_ml: float, task_dir: Path, parent_run_id: str | None = None) -> dict:
    """One λ_ML: its own MLflow run under ``parent_run_id`` (λ as a param, the new-user metrics), its training nested
    under it. Never registered: sweep points are not serving candidates."""
    row = config.for_row("responsive")
    point = row.model_copy(update={"meta": row.meta.model_copy(update={"lambda_ml": lambda_ml})})
    point_eval = point.model_copy(update={"eval": point.eval.model_copy(update={"full_ranking": False})})
    with child_run(point_name(lambda_ml), run_tags(point, kind="sweep_point", model="responsive"), parent_run_id=parent_run_id):
        mlflow.log_params({"lambda_ml": lambda_ml, **model_params(point, "responsive")})
        training = meta_train(point, task_dir)
        mlflow.set_tags({"status": training.status, "training_run_id": training.run_id})
        if training.status != "finished":
            mlflow.set_tag("message", training.message[:5000])
            return {"lambda_ml": lambda_ml, "status": training.status, "message": training.message, "metrics": {}}
        record = evaluate_model("responsive", Path(training.model_path), point_eval, stream=False)
        mlflow.log_metrics({key: value["mean"] for key, value in record["metrics"].items() if value["mean"] == value["mean"]})
    return {"lambda_ml": lambda_ml, "status": "finished", "metrics": record["metrics"], "run_id": training.run_id}


@flow(name="lambda-sweep", validate_parameters=False)
def lambda_sweep(config: Config, parent_run_id: str | None = None) -> dict:
    """The sweep on fold 0's split; ``parent_run_id`` nests its MLflow runs under a pipeline run."""
    logger = get_run_logger()
    prepare_flow(config)
    task_dir = build_task_shards_task(config.for_row("responsive"))
    with parent_run(config, f"λ_ML sweep {config.data.dataset} {config.hash_of()}", "lambda_sweep", parent_run_id) as sweep_run:
        mlflow.log_params({**main_params(config), "eval.lambda_sweep": str(list(config.eval.lambda_sweep))})
        log_mlflow_run(config, sweep_run)
        futures = [sweep_point.with_options(task_run_name=f"sweep-lambda-{value}").submit(config, value, task_dir, sweep_run)
                   for value in config.eval.lambda_sweep]
        points = [future.result() for future in futures]
        out = sweep_dir(config)
        write_json(points, out / "lambda_ml.json")
        plot = lambda_plot(points, out / "lambda_ml.png", config.data.dataset)
        lines = ["| λ_ML | status | HR@10 (n=5) | NDCG@10 (n=5) |", "|---|---|---|---|"]
        for p in sorted(points, key=lambda p: p["lambda_ml"]):
            hr = p["metrics"].get(new_user_metric(5, "hr"), {}).get("mean")
            ndcg = p["metrics"].get(new_user_metric(5, "ndcg"), {}).get("mean")
            lines.append(f"| {p['lambda_ml']} | {p['status']} | {'–' if hr is None else f'{hr:.3f}'} | {'–' if ndcg is None else f'{ndcg:.3f}'} |")
        table = "\n".join(lines) + "\n"
        write_text(table, out / "lambda_ml.md")
        # the curve against λ itself: a chart artifact and the table (a metric's step axis cannot stand for λ)
        mlflow.log_artifact(str(plot))
        mlflow.log_artifact(str(out / "lambda_ml.md"))
        mlflow.log_artifact(str(out / "lambda_ml.json"))
    publish_markdown("lambda-ml", config.data.dataset, table, f"λ_ML sweep on {config.data.dataset}, new users n=5",
                     images={"λ_ML curve": Path(plot)})
    logger.info("λ_ML sweep in %s", out)
    return {"points": points, "plot": str(plot), "dir": str(out)}
