"""The `prepare` flow: ingest -> features -> split -> candidates -> stats, each a Prefect task.

The prepared files are built in a temporary sibling and moved into place, with
their manifest last, only when every task succeeded (``build_once``); an existing
complete and intact folder for the same data hash is reused.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from metarec.config import Config
from tasks.runtime.paths import prepared_dir
from tasks.data.prepare import build_once, candidates_task, features_task, ingest_task, split_task, stats_task


@flow(name="prepare", validate_parameters=False)
def prepare_flow(config: Config) -> Path:
    def steps(work: Path) -> None:
        ingested = ingest_task(config, work)
        ingested["features"] = features_task(config, work)
        split_task(config, work)
        candidates_task(config, work)
        stats_task(config, work, ingested)

    return build_once(prepared_dir(config), steps)
