"""The `lambda_sweep` flow: meta-train and evaluate ours for each λ_ML -> the λ_ML curve (paper Fig. 4).

Per METHOD.md §11: the sweep clips no gradient (``meta.grad_clip`` is set to
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
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.prepare import prepare_flow
from metarec.config import Config
from tasks.aggregate import lambda_curve, lambda_markdown, lambda_plot, paper_lambda
from tasks.atomic import write_json, write_text
from tasks.evaluation import evaluate_model, new_user_metric
from tasks.paths import prepared_dir
from tasks.task_shards import build_task_shards_task
from tasks.tracking import parent_run
from tasks.training import meta_train


def sweep_dir(config: Config) -> Path:
    return prepared_dir(config) / "sweeps" / config.hash_of()


def point_config(config: Config, lambda_ml: float) -> Config:
    """Ours at this λ_ML, without gradient clipping (§11), evaluated on sampled metrics only."""
    row = config.for_row("responsive")
    return row.model_copy(update={
        "meta": row.meta.model_copy(update={"lambda_ml": lambda_ml, "grad_clip": None}),
        "eval": row.eval.model_copy(update={"full_ranking": False}),
    })


@task(name="sweep-point")
def sweep_point(config: Config, lambda_ml: float, task_dir: Path, parent_run_id: str | None = None) -> dict:
    point = point_config(config, lambda_ml)
    training = meta_train(point, task_dir, parent_run_id=parent_run_id, register=False)  # sweep points are not serving candidates
    out = {"lambda_ml": lambda_ml, "lambda_paper": paper_lambda(lambda_ml, config.tasks.K), "status": training.status,
           "message": training.message, "metrics": {}, "run_id": training.run_id, "history": training.history}
    if training.status == "diverged":
        out["diverged_epoch"] = training.epochs_done + 1  # 1-based, as the table says it
    if training.status != "finished":
        return out
    record = evaluate_model("responsive", Path(training.model_path), point, stream=False)
    return {**out, "metrics": record["metrics"]}


@flow(name="lambda-sweep", validate_parameters=False)
def lambda_sweep(config: Config, parent_run_id: str | None = None) -> dict:
    """The sweep on fold 0's split; ``parent_run_id`` nests its MLflow runs under a pipeline run."""
    logger = get_run_logger()
    prepare_flow(config)
    task_dir = build_task_shards_task(config.for_row("responsive"))
    K = config.tasks.K
    with parent_run(config, "lambda sweep", "lambda_sweep", parent_run_id) as sweep_run:
        futures = [sweep_point.with_options(task_run_name=f"sweep-lambda-{value}").submit(config, value, task_dir, sweep_run)
                   for value in config.eval.lambda_sweep]
        points = [future.result() for future in futures]
        out = sweep_dir(config)
        write_json(points, out / "lambda_ml.json")
        plot = lambda_plot(points, out / "lambda_ml.png", config.data.dataset, K)
        table = lambda_markdown(points, K, config.data.new_user_ns)
        write_text(table, out / "lambda_ml.md")
        for step, p in enumerate(sorted(points, key=lambda p: p["lambda_ml"])):  # step = the point's rank in λ; both scales beside
            mlflow.log_metrics({"sweep_lambda_paper": p["lambda_paper"], "sweep_lambda_ours": p["lambda_ml"],
                                "sweep_diverged": float(p["status"] == "diverged")}, step=step)
            if p["status"] == "finished":
                mlflow.log_metric("sweep_n5_ndcg10", p["metrics"][new_user_metric(5, "ndcg")]["mean"], step=step)
        curve = lambda_curve(points, K, 5, "ndcg")
        mlflow.log_params({"sweep_grad_clip": "none", "sweep_K": K, "sweep_largest_lambda_paper": curve["largest_tried"],
                           "sweep_first_diverged_lambda_paper": curve["first_diverged"]})
        mlflow.log_artifact(str(plot))
        mlflow.log_artifact(str(out / "lambda_ml.md"))
    create_markdown_artifact(table, key="lambda-ml", description="λ_ML sweep (paper's scale), new users")
    create_link_artifact(Path(plot).resolve().as_uri(), link_text="λ_ML curve (PNG)", key="lambda-ml-plot")
    logger.info("λ_ML sweep in %s; diverged from λ_paper = %s", out, curve["first_diverged"])
    return {"points": points, "plot": str(plot), "dir": str(out), "table": table}
