"""The `prepare` flow: ingest -> split -> candidates -> stats, each a Prefect task.

The prepared folder is built in a temporary sibling and renamed into place only
when every task succeeded (``atomic_dir``); an existing complete folder for the
same data hash is reused.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from metarec.config import Config
from tasks.atomic import atomic_dir
from tasks.paths import prepared_dir
from tasks.prepare import candidates_task, ingest_task, is_prepared, split_task, stats_task


@flow(name="prepare")
def prepare_flow(config: Config) -> Path:
    final = prepared_dir(config)
    if is_prepared(final):
        return final
    with atomic_dir(final) as work:
        ingested = ingest_task(config, work)
        split_task(config, work)
        candidates_task(config, work)
        stats_task(config, work, ingested)
    return final
