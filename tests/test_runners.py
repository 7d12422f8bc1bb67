"""The fan-out's task runner comes from the config: threads by default, a real local Dask cluster on request."""

from __future__ import annotations

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import task_runner, with_runner
from metarec.config import Config, RuntimeConfig


@task
def square_and_where(x: int) -> tuple[int, bool]:
    """x², and whether a Dask worker ran it."""
    try:
        from distributed import get_worker

        get_worker()
        on_dask = True
    except ValueError:
        on_dask = False
    return x * x, on_dask


@flow
def fan_out(config: Config) -> list[tuple[int, bool]]:
    return [future.result() for future in square_and_where.map(range(5))]


def test_threads_by_default():
    assert isinstance(task_runner(Config()), ThreadPoolTaskRunner)


def test_dask_runner_runs_the_fan_out_on_a_local_cluster(prefect_harness):
    config = Config(runtime=RuntimeConfig(task_runner="dask", max_workers=2))
    runner = task_runner(config)
    assert isinstance(runner, DaskTaskRunner)
    assert with_runner(fan_out, config)(config) == [(0, True), (1, True), (4, True), (9, True), (16, True)]


def test_dask_runner_points_at_an_existing_cluster_when_given_its_address():
    runner = task_runner(Config(runtime=RuntimeConfig(task_runner="dask", dask_address="tcp://10.0.0.5:8786")))
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://10.0.0.5:8786"
