"""The nightly retraining flow behind the `nightly` deployment.

prepare on the latest data -> build tasks -> meta-train -> evaluate against the
baselines (the `pipeline` flow) -> register Θ (done by meta-training) -> move
the `champion` alias only if the new version's new-user NDCG@10 at n = 5 is at
least the champion's on the same evaluation data. A run that fails anywhere
raises before the promotion step, so the champion is untouched, and the MLflow
runs it opened are marked FAILED with the error.

Run by the served deployment, the flow takes its parameters from whoever can reach
the Prefect API, which has no authentication. So it first checks them against what
`metarec deploy` was started with (``check_deployment_parameters``): the same data
set, quick preset and no config file, and only overrides given at serve time.
Anything else is rejected before any file is read or any MLflow run opened.
"""

from __future__ import annotations

import json
import os

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task

from flows.pipeline import pipeline
from flows.runners import with_runner
from metarec.config import Config
from tasks.track.champion import promote_if_better
from tasks.track.model_registry import register_candidate
from tasks.runtime.paths import prepared_dir
from tasks.track.publish import log_mlflow_run, publish_markdown
from tasks.serve.serving import rescore_version
from tasks.runtime.settings import QUICK_OVERRIDES, load_config
from tasks.track.tracking import main_params, parent_run, setup_mlflow

SCORE = "new_n5_ndcg10"
# What a deployment run may ask for, set by `metarec deploy` in its own environment (not reachable through the API;
# flows/deploy.py writes it, check_deployment_parameters reads it)
DEPLOYMENT_ALLOWED_ENV = "METAREC_DEPLOYMENT_ALLOWED"


class RetrainingFailed(RuntimeError):
    """Meta-training did not produce a model to register (diverged or stopped)."""


class DeploymentParameterError(ValueError):
    """A deployment run asked for a parameter value the deployment was not started with."""


def check_deployment_parameters(dataset: str, quick: bool, overrides: list[str], config_file: str | None) -> None:
    """Inside a deployment run, accept only what `metarec deploy` allowed; outside one (a direct call), anything."""
    from prefect.runtime import deployment

    if deployment.id is None:
        return
    raw = os.environ.get(DEPLOYMENT_ALLOWED_ENV)
    if raw is None:
        raise DeploymentParameterError(f"this deployment was not started by `metarec deploy` ({DEPLOYMENT_ALLOWED_ENV} is unset), "
                                       "so no parameters are accepted; serve it with `metarec deploy`")
    allowed = json.loads(raw)
    problems = []
    if dataset not in allowed["datasets"]:
        problems.append(f"dataset {dataset!r} is not one this deployment serves ({allowed['datasets']})")
    if bool(quick) != allowed["quick"]:
        problems.append(f"quick={quick} differs from the deployment's quick={allowed['quick']}")
    if config_file is not None:
        problems.append("config_file is not accepted (give the deployment its configuration with `metarec deploy --set`)")
    extra = [item for item in overrides if item not in allowed["overrides"]]
    if extra:
        problems.append(f"override(s) {extra} are not among the deployment's own ({allowed['overrides']})")
    if problems:
        raise DeploymentParameterError("rejected deployment parameters: " + "; ".join(problems) +
                                       ". A deployment run accepts only the data set and overrides `metarec deploy` was started with")


@task(name="promote-champion")
def promote_task(config: Config, version: str, score: float) -> dict:
    setup_mlflow(config)
    decision = promote_if_better(MlflowClient(), version, score, prepared_dir(config).name, lambda v: rescore_version(v, config))
    return decision.__dict__


@task(name="register-candidate")
def register_task(config: Config, run_id: str, kind: str, score: float) -> str:
    """Register the training run's Θ as a serving candidate (once per run: a re-run gets the same version)."""
    setup_mlflow(config)
    return register_candidate(config, run_id, kind, score, prepared_dir(config).name)


def promote_result(config: Config, result: dict, kind: str = "pipeline") -> tuple[float, dict]:
    """(score, decision) for a pipeline run's model, fold 0's, scored on fold 0's new users: registered as a
    serving candidate, then promoted if at least as good. ``kind``: the run that asks, recorded on the version
    (pipeline for `metarec run`, or nightly)."""
    training = result["training"]
    score = result["fold0"]["responsive"]["metrics"][SCORE]["mean"]
    version = register_task(config, training["run_id"], kind, score)
    training["model_version"] = version
    return score, promote_task(config, version, score)


def nightly_config(dataset: str, quick: bool, overrides: list[str], config_file: str | None) -> Config:
    sets = [*(QUICK_OVERRIDES if quick else ()), *overrides, "eval.lambda_sweep=[1.0]"]
    return load_config(config_file, sets, data={"dataset": dataset})


@flow(name="nightly-retrain")
def nightly_retrain(dataset: str = "ml-100k", quick: bool = False, overrides: list[str] | None = None, config_file: str | None = None) -> dict:
    logger = get_run_logger()
    check_deployment_parameters(dataset, quick, overrides or [], config_file)
    config = nightly_config(dataset, quick, overrides or [], config_file)
    # the run fails (FAILED, with the error as a tag) if anything below raises; nothing is promoted then
    with parent_run(config, f"nightly {config.data.dataset} {config.hash_of()}", "nightly") as run_id:
        mlflow.log_params(main_params(config))  # quick or full, the data set, the main settings
        log_mlflow_run(config, run_id)
        result = with_runner(pipeline, config)(config)
        training = result["training"]
        if training is None or training["status"] != "finished":
            status = "missing" if training is None else training["status"]
            raise RetrainingFailed(f"meta-training {status}: {training and training.get('message')}; champion left as it was")
        score, decision = promote_result(config, result, kind="nightly")
        mlflow.set_tags({"promotion": decision["reason"], "model_version": training["model_version"]})
        mlflow.log_metric(SCORE, score)
    publish_markdown("champion", config.data.dataset, f"**responsive-mf v{training['model_version']}**: {decision['reason']}", "champion decision")
    logger.info("v%s: %s", training["model_version"], decision["reason"])
    return {"run_id": run_id, "version": training["model_version"], "score": score, "promotion": decision}
