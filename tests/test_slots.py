"""Folds side by side: tasks waiting on other tasks' futures hold threads, not cores, and the stages compute in at most
``runtime.max_workers`` slots at once (``tasks.runtime.slots``, ``flows.runners``)."""

from __future__ import annotations

import threading

from prefect import flow, task

from flows.runners import task_runner, with_runner
from metarec.config import Config, RuntimeConfig
from tasks.runtime.slots import THREADS_PER_SLOT, _semaphore, compute_slot

WAIT = 300  # s: a deadline for a busy machine, only reached when the test fails


def test_no_more_than_the_slots_compute_at_once():
    inside, release = threading.Barrier(3), threading.Event()

    def hold() -> None:
        with compute_slot(2):
            inside.wait(timeout=WAIT)
            release.wait(timeout=WAIT)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    inside.wait(timeout=WAIT)  # both holders are inside
    third = _semaphore(2).acquire(blocking=False)
    release.set()
    for thread in holders:
        thread.join(timeout=WAIT)
    assert not third
    assert _semaphore(2).acquire(blocking=False)  # free again once they left
    _semaphore(2).release()


def test_the_thread_runner_has_room_for_waiting_tasks():
    runner = task_runner(Config(runtime=RuntimeConfig(max_workers=2)))
    assert runner._max_workers == 2 * THREADS_PER_SLOT


GO = threading.Event()


@task
def waits_for_go() -> bool:
    """A long stage: it finishes when a task submitted after it has run."""
    return GO.wait(timeout=WAIT)


@task
def after(upstream: bool) -> bool:
    return upstream


@task
def says_go() -> bool:
    GO.set()
    return True


@flow
def chain_then_independent(config: Config) -> tuple[bool, bool]:
    first = waits_for_go.submit()
    waiting = after.submit(first)  # holds a thread until `first` is done
    go = says_go.submit()  # with two threads it queued behind both, and `first` timed out
    return waiting.result(), go.result()


def test_a_task_behind_a_waiting_chain_still_runs(prefect_harness):
    GO.clear()
    config = Config(runtime=RuntimeConfig(max_workers=2))
    assert with_runner(chain_then_independent, config)(config) == (True, True)
