"""The nightly retraining flow behind the `nightly` deployment.

prepare on the latest data -> build tasks -> meta-train -> evaluate against the
baselines -> register the candidate's Θ -> move this data set's `champion` alias only
if it beats the champion by the paired CI on the same cases (all inside the `pipeline`
flow; the rule: ``tasks.track.champion``). A run that fails anywhere raises before the
promotion step, so the champion is untouched, and the MLflow runs it opened are
marked FAILED with the error. A quick nightly run registers its version but never promotes it.

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
from prefect import flow, get_run_logger

from flows.pipeline import pipeline
from flows.runners import with_runner
from metarec.config import Config
from metarec.redaction import redact
from tasks.track.champion import registered_model_name
from tasks.runtime.paths import dataset_slug
from tasks.track.publish import log_mlflow_run, run_tags_of, tag_flow_run
from tasks.runtime.settings import QUICK_OVERRIDES, load_config
from tasks.track.tracking import main_params, parent_run

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


def nightly_config(dataset: str, quick: bool, overrides: list[str], config_file: str | None) -> Config:
    sets = [*(QUICK_OVERRIDES if quick else ()), *overrides, "eval.lambda_sweep=[1.0]"]
    return load_config(config_file, sets, data={"dataset": dataset})


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    return f"nightly {dataset_slug(redact(parameters.get('dataset', 'ml-100k')))} {'quick' if parameters.get('quick') else 'full'}"


@flow(name="nightly-retrain", flow_run_name=_flow_run_name)
def nightly_retrain(dataset: str = "ml-100k", quick: bool = False, overrides: list[str] | None = None, config_file: str | None = None) -> dict:
    logger = get_run_logger()
    check_deployment_parameters(dataset, quick, overrides or [], config_file)
    config = nightly_config(dataset, quick, overrides or [], config_file)
    # the run fails (FAILED, with the error as a tag) if anything below raises; nothing is promoted then
    with parent_run(config, f"nightly {redact(config.data.dataset)} {config.runtime.preset}", "nightly") as run_id:
        mlflow.log_params(main_params(config))  # quick or full, the data set, the main settings
        log_mlflow_run(config, run_id)
        tag_flow_run(*run_tags_of(config, "nightly"))
        # registration and the champion decision run inside the pipeline (its logs, its artifact on this run)
        result = with_runner(pipeline, config)(config, kind="nightly")
        training, decision = result["training"], result["champion"]
        if training is None or training["status"] != "finished" or decision is None:
            status = "missing" if training is None else training["status"]
            raise RetrainingFailed(f"meta-training {status}: {training and training.get('message')}; champion left as it was")
        mlflow.set_tags({"champion_decision": decision["reason"][:5000], "model_version": str(decision["version"]),
                         "registered_model": registered_model_name(config.data.dataset)})
        mlflow.log_metric(SCORE, decision["score"])
    logger.info("v%s: %s", decision["version"], decision["reason"])
    return {"run_id": run_id, "version": decision["version"], "score": decision["score"], "promotion": decision}
