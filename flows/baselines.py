"""Flows for the baselines: the validation search, and fitting models on the prepared history.

Composition only: the work is in ``tasks/train/tuning.py`` and ``tasks/train/models.py``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.prepare import prepare_flow
from metarec.config import Config
from tasks.train.models import fit_model_task
from tasks.train.tuning import TUNABLE, apply_tuned, tune, tuned_source


@flow(name="tune", validate_parameters=False)
def tune_flow(config: Config, models: tuple[str, ...] = TUNABLE) -> Path:
    """Prepare fold 0, then tune each row on its history; each row's trials run in runtime.max_workers processes."""
    prepare_flow(config.model_copy(update={"data": config.data.with_fold(0)}))
    return tune(config, models)


@flow(name="fit-models", validate_parameters=False)
def fit_flow(config: Config, models: tuple[str, ...], tuned: Path | None = None, force: bool = False) -> dict[str, Path]:
    prepare_flow(config)
    config = apply_tuned(config, tuned) if tuned else tuned_source(config)[0]
    futures = {name: fit_model_task.submit(name, config, force) for name in models}
    return {name: future.result() for name, future in futures.items()}
