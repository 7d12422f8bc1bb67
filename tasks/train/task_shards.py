"""Meta-learning tasks on disk: Parquet shards of fixed-width rows, and a manifest.

Folder ``task_shards_dir(config)`` (written whole, atomically; a folder with a
manifest is complete):

- ``shard-00000.parquet`` ...: one row per task. support_users, support_pos,
  support_neg: fixed_size_list<int64>[K]; query_user, query_pos, query_neg,
  query_ts: int64. Columns 0..k-1 of the support lists are the task user's own
  interactions (docs/method.md §4, ``metarec.meta_tasks``).
- ``manifest.json``: n_tasks, n_shards, shards [{file, rows}], k, K, seed,
  config_hash, format_version, plus what the caller adds (dataset, counts).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from metarec.config import Config
from metarec.meta_tasks import TaskArrays, count_tasks, iter_tasks
from tasks.runtime.atomic import atomic_dir
from tasks.runtime.logs import log_info
from tasks.runtime.slots import compute_slot
from tasks.runtime.paths import prepared_dir, task_shards_dir
from tasks.data.prepared import load_prepared

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LIST_COLUMNS = ("support_users", "support_pos", "support_neg")
SCALAR_COLUMNS = ("query_user", "query_pos", "query_neg", "query_ts")


def _table(tasks: TaskArrays) -> pa.Table:
    K = tasks.K
    columns = {
        name: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(getattr(tasks, name), dtype=np.int64).reshape(-1)), K)
        for name in LIST_COLUMNS
    }
    columns.update({name: pa.array(getattr(tasks, name), type=pa.int64()) for name in SCALAR_COLUMNS})
    return pa.table(columns)


def _arrays(table: pa.Table, path: Path) -> TaskArrays:
    missing = [c for c in LIST_COLUMNS + SCALAR_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"task shard {path} lacks columns {missing}; expected {list(LIST_COLUMNS + SCALAR_COLUMNS)}")
    table = table.combine_chunks()
    out = {}
    for name in LIST_COLUMNS:
        kind = table.schema.field(name).type
        if not pa.types.is_fixed_size_list(kind):
            raise ValueError(f"task shard {path}: column {name} is {kind}, expected fixed_size_list<int64>")
        column = table.column(name)
        flat = column.chunk(0).flatten().to_numpy() if column.num_chunks else np.zeros(0, np.int64)
        out[name] = flat.astype(np.int64, copy=False).reshape(table.num_rows, kind.list_size)
    for name in SCALAR_COLUMNS:
        out[name] = table.column(name).to_numpy().astype(np.int64, copy=False)
    return TaskArrays(**out)


def write_task_shards(
    tasks: TaskArrays | Iterable[TaskArrays], out_dir: Path, shard_size: int, manifest_extra: dict | None = None
) -> Path:
    """Write tasks (all at once, or as chunks of any size) as shards of ``shard_size`` rows plus the manifest.

    Chunks are consumed as they come, so at most one shard is held besides the chunk; the folder
    appears whole or not at all.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    parts = [tasks] if isinstance(tasks, TaskArrays) else tasks
    out_dir = Path(out_dir)
    shards: list[dict] = []
    K = (manifest_extra or {}).get("K")
    with atomic_dir(out_dir) as tmp:

        def flush(part: TaskArrays) -> None:
            name = f"shard-{len(shards):05d}.parquet"
            pq.write_table(_table(part), tmp / name)
            shards.append({"file": name, "rows": len(part)})
            logger.debug("wrote %s (%d tasks)", name, len(part))

        pending: list[TaskArrays] = []
        held = 0
        for part in parts:
            K = part.K
            pending.append(part)
            held += len(part)
            while held >= shard_size:
                buffer = TaskArrays.concat(pending)
                flush(buffer.take(slice(0, shard_size)))
                rest = buffer.take(slice(shard_size, None))
                pending, held = ([rest] if len(rest) else []), len(rest)
        if held:
            flush(TaskArrays.concat(pending))
        n_tasks = sum(s["rows"] for s in shards)
        manifest = {"format_version": FORMAT_VERSION, "n_tasks": n_tasks, "n_shards": len(shards), "K": K, "shards": shards}
        manifest.update(manifest_extra or {})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


def read_manifest(task_dir: Path) -> dict:
    path = Path(task_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no task manifest {path}; build the tasks first (build_task_shards)")
    return json.loads(path.read_text())


def iter_task_shards(task_dir: Path, start: int = 0, stop: int | None = None) -> Iterator[TaskArrays]:
    """The shards in manifest order (those numbered start .. stop-1), one TaskArrays each (memory: one shard at a time)."""
    task_dir = Path(task_dir)
    for shard in read_manifest(task_dir)["shards"][start:stop]:
        path = task_dir / shard["file"]
        tasks = _arrays(pq.read_table(path), path)
        if len(tasks) != shard["rows"]:
            raise ValueError(f"task shard {path} has {len(tasks)} rows, the manifest says {shard['rows']}")
        yield tasks


def load_tasks(task_dir: Path) -> TaskArrays:
    """Every task in one TaskArrays (small data sets and tests)."""
    parts = list(iter_task_shards(task_dir))
    return TaskArrays.concat(parts) if parts else TaskArrays.empty(int(read_manifest(task_dir)["K"]))


def shards_complete(task_dir: Path, config_hash: str | None = None) -> bool:
    """A manifest whose shards all exist with the stated row counts (and, if given, the same config hash)."""
    try:
        manifest = read_manifest(task_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if config_hash is not None and manifest.get("config_hash") != config_hash:
        return False
    for shard in manifest.get("shards", []):
        path = Path(task_dir) / shard["file"]
        if not path.is_file() or pq.read_metadata(path).num_rows != shard["rows"]:
            return False
    return True


def build_task_shards(config: Config) -> Path:
    """Tasks of the prepared history (docs/method.md §4) into ``task_shards_dir(config)``; skipped when already complete."""
    out = task_shards_dir(config)
    config_hash = config.hash_of("data", "tasks")
    if shards_complete(out, config_hash):
        logger.info("task shards already complete in %s", out)
        return out
    t = config.tasks
    history = load_prepared(prepared_dir(config)).history
    started = time.perf_counter()
    tasks = iter_tasks(history, t.k, t.support_size, t.seed, max_tasks_per_user=t.max_tasks_per_user, shuffle=t.shuffle, negatives=t.negatives)
    extra = {
        "K": t.support_size,
        "k": t.k,
        "seed": t.seed,
        "config_hash": config_hash,
        "dataset": config.data.dataset,
        "history_interactions": len(history),
        "history_users": int(len(np.unique(history.users))),
        "n_items": history.n_items,
        "n_users": history.n_users,
        "shuffle": t.shuffle,
        "max_tasks_per_user": t.max_tasks_per_user,
        "negatives": t.negatives,
    }
    write_task_shards(tasks, out, t.shard_size, extra)
    n_tasks = read_manifest(out)["n_tasks"]
    if n_tasks != count_tasks(history, t.k, t.max_tasks_per_user):
        raise RuntimeError(f"task shards in {out} hold {n_tasks} tasks, expected {count_tasks(history, t.k, t.max_tasks_per_user)}")
    seconds = time.perf_counter() - started
    logger.info("built %d tasks from %d interactions in %.1fs into %s", n_tasks, len(history), seconds, out)
    return out


@task(name="build-task-shards")
def build_task_shards_task(config: Config) -> Path:
    """Prefect wrapper around ``build_task_shards`` (in one of the process's compute slots, ``tasks.runtime.slots``)."""
    with compute_slot(config.runtime.max_workers):
        out = build_task_shards(config)
    manifest = read_manifest(out)
    log_info(logger, "task shards: %d tasks in %d shards at %s", manifest["n_tasks"], manifest["n_shards"], out)
    return out
