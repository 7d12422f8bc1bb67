"""The `prepare` flow: ingest -> features -> split -> candidates -> stats, each a Prefect task.

The prepared files are built in a temporary sibling and moved into place, with
their manifest last, only when every task succeeded (``build_once``); an existing
complete and intact folder for the same data hash is reused.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from metarec.config import Config
from metarec.redaction import redact
from tasks.runtime.paths import dataset_slug, prepared_dir
from tasks.data.prepare import build_once, candidates_task, features_task, ingest_task, split_task, stats_task


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    return f"prepare {dataset_slug(redact(config.data.dataset))} · fold {config.data.fold}"


@flow(name="prepare", flow_run_name=_flow_run_name, validate_parameters=False)
def prepare_flow(config: Config) -> Path:
    fold = f" · fold {config.data.fold}"

    def steps(work: Path) -> None:
        ingested = ingest_task.with_options(task_run_name="ingest" + fold)(config, work)
        ingested["features"] = features_task.with_options(task_run_name="features" + fold)(config, work)
        split_task.with_options(task_run_name="split" + fold)(config, work)
        candidates_task.with_options(task_run_name="candidates" + fold)(config, work)
        stats_task.with_options(task_run_name="stats" + fold)(config, work, ingested)

    return build_once(prepared_dir(config), steps)
