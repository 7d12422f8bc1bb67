"""The task runner of the fan-outs, chosen by ``runtime.task_runner``: threads, or a Dask cluster."""

from __future__ import annotations

from metarec.config import Config
from tasks.runtime.slots import THREADS_PER_SLOT


def task_runner(config: Config):
    runtime = config.runtime
    if runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if runtime.dask_address:  # an existing cluster
            return DaskTaskRunner(address=runtime.dask_address)
        # a local cluster; threads, not processes: the tasks share the prepared data in memory-mapped files anyway
        return DaskTaskRunner(cluster_kwargs={"n_workers": runtime.max_workers, "threads_per_worker": 1, "processes": False})
    from prefect.task_runners import ThreadPoolTaskRunner

    # more threads than cores: a task waiting on another's future holds a thread; the cores are shared out by the
    # stages' compute slots (tasks.runtime.slots)
    return ThreadPoolTaskRunner(max_workers=runtime.max_workers * THREADS_PER_SLOT)


def with_runner(flow_fn, config: Config):
    """The flow, set to run its fan-out on the configured runner."""
    return flow_fn.with_options(task_runner=task_runner(config))
