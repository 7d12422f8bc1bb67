"""The `train` flow: prepare the data -> build the task shards -> meta-train the responsive MF.

Each step skips work already done for the same configuration (prepared data,
complete task shards); meta-training resumes from its last checkpoint.
"""

from __future__ import annotations

from prefect import flow

from metarec.config import Config
from flows.prepare import prepare_flow
from tasks.train.task_shards import build_task_shards_task
from tasks.train.training import TrainResult, meta_train_task


@flow(name="train", validate_parameters=False)
def train_flow(config: Config) -> TrainResult:
    prepare_flow(config)
    task_dir = build_task_shards_task(config.for_row("responsive"))
    return meta_train_task(config, task_dir)
