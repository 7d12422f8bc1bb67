"""The `lambda_sweep` flow: meta-train and evaluate ours for each λ_ML -> the λ_ML curve (paper Fig. 4).

Per docs/method.md §11: the sweep clips no gradient (``meta.grad_clip`` is set to
None for its points whatever the configuration says), so that it can show
where training explodes; every point's training logs the gradient norm before
clipping per epoch. The curve and the table put λ on the paper's scale
(λ_paper = K·λ_ours, our L^K being a mean over its K triples), with the 95%
bootstrap CI of each point's mean. The points run in parallel on the
configured task runner; a diverged value is a marked point on the curve,
never a crash of the sweep.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task

from flows.prepare import prepare_flow
from metarec.config import Config
from metarec.redaction import redact
from tasks.evaluate.aggregate import lambda_curve, lambda_markdown, lambda_plot, paper_lambda
from tasks.runtime.atomic import write_json, write_text
from tasks.evaluate.evaluation import evaluate_model, new_user_metric
from tasks.runtime.paths import dataset_slug, prepared_dir
from tasks.runtime.slots import compute_slot
from tasks.train.task_shards import build_task_shards_task
from tasks.track.publish import log_mlflow_run, run_tags_of, tag_flow_run, publish_markdown
from tasks.track.tracking import child_run, main_params, model_params, parent_run, run_tags
from tasks.train.training import meta_train


def sweep_dir(config: Config) -> Path:
    return prepared_dir(config) / "sweeps" / config.hash_of()


def point_name(lambda_ml: float, K: int) -> str:
    """``sweep λ_paper=500``: λ on the paper's scale, as the curve, README and findings give it."""
    return f"sweep λ_paper={paper_lambda(lambda_ml, K):g}"


def point_config(config: Config, lambda_ml: float) -> Config:
    """Ours at this λ_ML, without gradient clipping (§11), evaluated on sampled metrics only."""
    row = config.for_row("responsive")
    return row.model_copy(update={
        "meta": row.meta.model_copy(update={"lambda_ml": lambda_ml, "grad_clip": None}),
        "eval": row.eval.model_copy(update={"full_ranking": False}),
    })


@task(name="sweep-point")
def sweep_point(config: Config, lambda_ml: float, task_dir: Path, parent_run_id: str | None = None) -> dict:
    """One λ_ML: its own MLflow run under ``parent_run_id`` (λ on both scales as params, the new-user metrics), its
    training nested under it, without gradient clipping (§11). Never registered: sweep points are not serving candidates.
    Its training and evaluation take one of the process's compute slots (``tasks.runtime.slots``): the points are all
    submitted at once, and run ``runtime.max_workers`` at a time rather than all together on the same cores."""
    with compute_slot(config.runtime.max_workers):
        return _sweep_point(config, lambda_ml, task_dir, parent_run_id)


def _sweep_point(config: Config, lambda_ml: float, task_dir: Path, parent_run_id: str | None) -> dict:
    point = point_config(config, lambda_ml)
    name = point_name(lambda_ml, config.tasks.K)
    with child_run(name, run_tags(point, kind="sweep_point", model="responsive"), parent_run_id=parent_run_id):
        mlflow.log_params({"lambda_ml": lambda_ml, "lambda_paper": paper_lambda(lambda_ml, config.tasks.K), **model_params(point, "responsive")})
        training = meta_train(point, task_dir, run_name=f"{name} · train")
        mlflow.set_tags({"status": training.status, "training_run_id": training.run_id})
        out = {"lambda_ml": lambda_ml, "lambda_paper": paper_lambda(lambda_ml, config.tasks.K), "status": training.status,
               "message": training.message, "metrics": {}, "run_id": training.run_id, "history": training.history}
        if training.status == "diverged":
            out["diverged_epoch"] = training.epochs_done + 1  # 1-based, as the table says it
        if training.status != "finished":
            mlflow.set_tag("message", training.message[:5000])
            mlflow.end_run("FAILED")  # a diverged point reads FAILED, like its training, not a green Finished
            return out
        record = evaluate_model("responsive", Path(training.model_path), point, stream=False)
        mlflow.log_metrics({key: value["mean"] for key, value in record["metrics"].items() if value["mean"] == value["mean"]})
    return {**out, "metrics": record["metrics"]}


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    return f"λ_ML sweep {dataset_slug(redact(config.data.dataset))} {len(config.eval.lambda_sweep)} points"


@flow(name="lambda-sweep", flow_run_name=_flow_run_name, validate_parameters=False)
def lambda_sweep(config: Config, parent_run_id: str | None = None) -> dict:
    """The sweep on fold 0's split; ``parent_run_id`` nests its MLflow runs under a pipeline run."""
    logger = get_run_logger()
    prepare_flow(config)
    task_dir = build_task_shards_task.with_options(task_run_name="tasks · fold 0 · sweep")(config.for_row("responsive"))
    K = config.tasks.K
    with parent_run(config, f"λ_ML sweep {redact(config.data.dataset)}", "lambda_sweep", parent_run_id) as sweep_run:
        mlflow.log_params({**main_params(config), "eval.lambda_sweep": str(list(config.eval.lambda_sweep))})
        log_mlflow_run(config, sweep_run)
        tag_flow_run(*run_tags_of(config, "lambda_sweep"))
        futures = [sweep_point.with_options(task_run_name=point_name(value, K)).submit(config, value, task_dir, sweep_run)
                   for value in config.eval.lambda_sweep]
        points = [future.result() for future in futures]
        out = sweep_dir(config)
        write_json(points, out / "lambda_ml.json")
        plot = lambda_plot(points, out / "lambda_ml.png", config.data.dataset, K)
        table = lambda_markdown(points, K, config.data.new_user_ns)
        write_text(table, out / "lambda_ml.md")
        curve = lambda_curve(points, K, 5, "ndcg")
        mlflow.log_params({"sweep_grad_clip": "none", "sweep_K": K, "sweep_largest_lambda_paper": curve["largest_tried"],
                           "sweep_first_diverged_lambda_paper": curve["first_diverged"]})
        # the curve against λ itself: a chart artifact and the table (a metric's step axis cannot stand for λ)
        mlflow.log_artifact(str(plot))
        mlflow.log_artifact(str(out / "lambda_ml.md"))
        mlflow.log_artifact(str(out / "lambda_ml.json"))
    publish_markdown("lambda-ml", config.data.dataset, table, f"λ_ML sweep on {config.data.dataset}, new users n=5",
                     images={"λ_ML curve": Path(plot)})
    logger.info("λ_ML sweep in %s; diverged from λ_paper = %s", out, curve["first_diverged"])
    return {"points": points, "plot": str(plot), "dir": str(out), "table": table}
