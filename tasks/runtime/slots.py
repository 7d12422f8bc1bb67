"""At most ``runtime.max_workers`` stages computing at once in this process, however many task threads there are.

The pipeline submits every fold's tasks at once. On a thread pool a task whose inputs are other tasks' futures
waits for them inside its worker thread: with as many threads as cores, a fold's chain (task shards -> training ->
its model -> its evaluation) held both threads while one of them trained, so one core worked and folds did not run
side by side. The runner now has ``THREADS_PER_SLOT`` threads per slot (``flows.runners``), and each stage's work
takes one of ``runtime.max_workers`` compute slots: waiting costs a thread, not a core. What a stage computes does
not depend on when it runs, so the results are the same.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

THREADS_PER_SLOT = 8  # a fold has at most a handful of tasks waiting on one computing (two rows of ours: 6)

_GUARD = threading.Lock()
_SLOTS: dict[int, threading.Semaphore] = {}


def _semaphore(slots: int) -> threading.Semaphore:
    with _GUARD:
        return _SLOTS.setdefault(slots, threading.BoundedSemaphore(slots))


@contextmanager
def compute_slot(slots: int) -> Iterator[None]:
    """Hold one of ``slots`` process-wide compute slots while the block runs (FIFO among waiters, as threading's)."""
    semaphore = _semaphore(max(1, int(slots)))
    with semaphore:
        yield
