"""One process at a time through a first-time set-up: the MLflow store's schema, a prepared folder, task shards.

Two runs started together on a fresh artifacts folder would otherwise both create the
same thing at once (MLflow's sqlite schema migration is not safe to run twice
concurrently). An OS file lock (``filelock``: flock on POSIX, released by the kernel
when its holder dies, so a killed process never leaves a stale lock) makes the second
one wait, then find the work done. Locks are per process *and* per thread, so threads
of one pipeline serialise the same way.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

# Preparing Netflix takes long; a waiter should outlast it rather than fail.
WAIT_SECONDS = 6 * 3600.0


def lock_path(target: Path) -> Path:
    """The lock file guarding ``target``: a hidden sibling, ``.<name>.lock``."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def first_time_lock(target: Path, what: str, timeout: float = WAIT_SECONDS) -> Iterator[None]:
    """Hold the lock of ``target`` for the block; says so in the log when another process holds it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process to finish %s (lock %s)", what, path)
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for another process to finish {what} (lock {path})") from exc
    try:
        yield
    finally:
        lock.release()
