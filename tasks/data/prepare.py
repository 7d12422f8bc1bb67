"""The data stage: ingest -> side features -> split -> candidates -> stats, into ``prepared_dir(config)``.

Each step is a plain function writing into a work folder (callable without
Prefect); ``prepare_data`` runs them all in a temporary folder (``build_once``),
then moves the prepared files into place and writes their manifest last, so the
prepared folder counts as complete only once every file is whole. It skips the
work when the folder is complete and intact, and when it is not, rebuilds only the
prepared files: what later stages wrote beside them (``models/``, ``training/``,
``tasks-*/``, ``runs/``) was computed from the same bytes and is kept. A file lock
makes a second process wait for the first one's build instead of racing it.
The ``*_task`` objects are thin Prefect wrappers used by ``flows/prepare.py``.

All the relational work is in ``sql/*.sql`` (DuckDB, bound parameters); only the
negative sampling is vectorised numpy. Outputs are sorted explicitly and written
with pyarrow, so the same config gives byte-identical Parquet files.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from metarec.config import Config, RuntimeConfig
from tasks.runtime.atomic import sweep_stale_temporaries, temp_sibling_dir, write_json
from tasks.data.datasets import EXPECTED, DataError, inspect_input, load_raw, resolve_source
from tasks.data.features import KINDS, describe_output, feature_files, load_feature_file
from tasks.runtime.integrity import MANIFEST
from tasks.runtime.locks import first_time_lock
from tasks.runtime.paths import prepared_dir
from tasks.data.prepared import PREPARED_FILES, prepared_problems, seal_prepared
from tasks.runtime.sqlfiles import literal_path, run_sql, sql

logger = logging.getLogger(__name__)

BATCH_ROWS = 1 << 20  # rows per Arrow batch / Parquet row group when streaming query results
CASE_CHUNK = 1 << 16  # evaluation cases per negative-sampling chunk (each chunk has its own seeded stream)


DUCKDB_TEMP = re.compile(r"^metarec-duckdb-pid(?P<pid>\d+)-")


@contextmanager
def duckdb_connection(runtime: RuntimeConfig | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A throw-away DuckDB database in a private temp folder (under ``runtime.duckdb_temp_dir`` if set).

    File-backed rather than in-memory: stored tables are compressed and paged, so the
    100M lines of Netflix need not fit in RAM (an in-memory table of 2M lines took 1.4 GB).
    ``runtime.duckdb_memory_limit`` caps DuckDB's buffer pool; sorts, joins and aggregates
    beyond it spill to the same folder, so memory stays bounded whatever the input's size.
    The folder is named with this process's pid; ones whose process is gone (killed
    with ``kill -9``) are removed first.
    """
    runtime = runtime or RuntimeConfig()
    parent = Path(tempfile.gettempdir())
    if runtime.duckdb_temp_dir is not None:
        parent = Path(runtime.duckdb_temp_dir)
        parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(parent, DUCKDB_TEMP)
    with tempfile.TemporaryDirectory(prefix=f"metarec-duckdb-pid{os.getpid()}-", dir=parent) as work:
        settings = {"threads": runtime.max_workers, "preserve_insertion_order": True, "temp_directory": work,
                    "memory_limit": runtime.duckdb_memory_limit}
        con = duckdb.connect(str(Path(work) / "work.duckdb"), config=settings)
        con.execute("PRAGMA disable_progress_bar")  # a per-connection setting; the bar garbles logs
        try:
            yield con
        finally:
            con.close()


def export(con: duckdb.DuckDBPyConnection, query: str, params: dict, path: Path) -> int:
    """Stream the result of ``sql/<query>.sql`` into a Parquet file; returns the row count."""
    reader = con.sql(sql(query), params=params).to_arrow_reader(BATCH_ROWS)
    rows = 0
    with pq.ParquetWriter(path, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def is_prepared(root: Path) -> bool:
    """A complete prepared folder, feature files included, whose files match their manifest (sizes, and hashes unless
    the folder is huge)."""
    return not prepared_problems(root, hashes=None, features=True)


def _parquet(path: Path) -> str:
    """A prepared file's path as DuckDB must see it: literally (the artifacts folder may hold glob characters)."""
    return literal_path(Path(path).resolve())


# ---------------------------------------------------------------------------- steps


def ingest(config: Config, out: Path) -> dict:
    """Raw ratings -> interactions.parquet (dense ids), users.parquet, items.parquet."""
    data = config.data
    columns = {"user_col": data.user_col, "item_col": data.item_col, "rating_col": data.rating_col, "ts_col": data.ts_col}
    source = resolve_source(data.dataset, data.data_dir, data.download, columns)
    logger.info("ingesting %s (%s) from %s", source.name, source.layout, source.ratings[0].parent)
    with duckdb_connection(config.runtime) as con:
        load_raw(con, source)
        checks = inspect_input(con, source, data.rating_threshold, int(time.time()))
        run_sql(con, "ratings", {"ts_format": EXPECTED[source.layout][2]})
        run_sql(con, "drop_raw_text")
        ratings_read = run_sql(con, "count_rows", {"table": "ratings"}).fetchall()[0][0]
        if data.sample_users is not None:
            run_sql(con, "sample_users", {"n": data.sample_users, "seed": data.seed})
        run_sql(con, "user_ids")
        run_sql(con, "item_ids")
        users = export(con, "out_users", {}, out / "users.parquet")
        items = export(con, "out_items", {}, out / "items.parquet")
        rows = export(con, "out_interactions", {}, out / "interactions.parquet")
    return {"source": source.describe(), "ratings_read": ratings_read, "interactions": rows, "users": users, "items": items,
            "input_checks": checks}


def features(config: Config, out: Path) -> dict:
    """Side features (``tasks/data/features.py``) -> user_features.parquet, item_features.parquet keyed by dense id.

    Reads users.parquet and items.parquet from ``ingest``; a file in the wrong format raises DataError."""
    data = config.data
    columns = {"user_col": data.user_col, "item_col": data.item_col, "rating_col": data.rating_col, "ts_col": data.ts_col}
    files = feature_files(resolve_source(data.dataset, data.data_dir, data.download, columns), data)
    with duckdb_connection(config.runtime) as con:
        run_sql(con, "feature_table")
        for file in files:
            load_feature_file(con, file, data)
        params = {"users": _parquet(out / "users.parquet"), "items": _parquet(out / "items.parquet")}
        for kind in KINDS:
            export(con, "out_features", {**params, "kind": kind}, out / f"{kind}_features.parquet")
    by_kind = {file.kind: file for file in files}
    return {f"{kind}s": describe_output(out / f"{kind}_features.parquet", by_kind.get(kind)) for kind in KINDS}


def split(config: Config, out: Path) -> dict:
    """interactions.parquet -> positives -> new_users / history / stream Parquet files (docs/method.md §2)."""
    data = config.data
    interactions = _parquet(out / "interactions.parquet")
    with duckdb_connection(config.runtime) as con:
        run_sql(con, "positives", {"interactions": interactions, "threshold": data.rating_threshold, "tie_break": data.tie_break,
                                   "seed": data.seed})
        run_sql(con, "split_new_users", {"seed": data.seed, "deals": data.deals, "fold": data.fold})
        run_sql(con, "split_history_stream", {"history_fraction": data.history_fraction, "batches": data.stream_batches})
        counts = dict(zip(("positives", "users", "new_users", "history", "stream"), run_sql(con, "split_counts").fetchall()[0]))
        _check_split(config, counts, run_sql(con, "rating_range", {"interactions": interactions}).fetchall()[0])
        for name in ("new_users", "history", "stream"):
            export(con, f"out_{name}", {}, out / f"{name}.parquet")
    return counts


def _check_split(config: Config, counts: dict, rating_range: tuple) -> None:
    data = config.data
    n, lo, hi = rating_range
    if counts["positives"] == 0:
        raise DataError(f"no positive interactions in {data.dataset}: none of its {n} ratings (range {lo}..{hi}) is "
                        f">= data.rating_threshold={data.rating_threshold}; expected at least one")
    remaining = counts["users"] - counts["new_users"]
    if counts["new_users"] < 1 or remaining < 1:
        raise DataError(f"too few users for the split in {data.dataset}: {counts['users']} user(s) with positives and "
                        f"data.new_user_fraction={data.new_user_fraction} (users dealt into {data.deals} groups) and data.fold={data.fold} "
                        f"give {counts['new_users']} new and {remaining} "
                        "remaining users; expected at least one of each")
    if counts["history"] < 1 or counts["stream"] < data.stream_batches:
        raise DataError(f"too few interactions for the split in {data.dataset}: the remaining users' positives give "
                        f"{counts['history']} history and {counts['stream']} stream rows; expected >= 1 history row and "
                        f">= data.stream_batches={data.stream_batches} stream rows")


def candidates(config: Config, out: Path) -> dict:
    """Evaluation cases + n_negatives stored negatives each -> candidates.parquet (docs/method.md §9)."""
    data = config.data
    n_items = pq.read_metadata(out / "items.parquet").num_rows
    parts = [_parquet(out / f"{name}.parquet") for name in ("history", "stream", "new_users")]
    params = {"new_users": parts[2], "stream": parts[1], "ns": list(data.new_user_ns), "min_positives": max(data.new_user_ns) + 1}
    with duckdb_connection(config.runtime) as con:
        cases = con.sql(sql("candidate_cases"), params=params).to_arrow_table()
        keys = run_sql(con, "positive_keys", {"paths": parts, "n_items": n_items}).fetchnumpy()["key"]
    keys = np.asarray(keys, dtype=np.int64)
    users = cases.column("user_id").to_numpy().astype(np.int64)
    _check_evaluable_new_users(config, cases, parts[2])
    _check_enough_negatives(users, keys, n_items, data.n_negatives)
    with pq.ParquetWriter(out / "candidates.parquet", _candidate_schema(cases.schema)) as writer:
        for chunk, start in enumerate(range(0, max(len(users), 1), CASE_CHUNK)):
            part = cases.slice(start, CASE_CHUNK)
            rng = np.random.default_rng([data.seed, chunk])
            negatives = sample_negatives(users[start:start + CASE_CHUNK], keys, n_items, data.n_negatives, rng)
            flat = pa.array(negatives.reshape(-1), type=pa.int64())
            offsets = pa.array(np.arange(0, negatives.size + 1, data.n_negatives, dtype=np.int32))
            writer.write_table(part.append_column("negatives", pa.ListArray.from_arrays(offsets, flat)))
    return {"cases": len(users)}


def _check_evaluable_new_users(config: Config, cases: pa.Table, new_users: str) -> None:
    """Evaluation needs at least one new user with max(new_user_ns) + 1 positives (docs/method.md §9): fail here, not there."""
    kinds = cases.column("kind").to_numpy(zero_copy_only=False)
    if (kinds == "new").any():
        return
    data = config.data
    with duckdb_connection(config.runtime) as con:
        n_new, most = con.sql(sql("new_user_counts"), params={"new_users": new_users}).fetchall()[0]
    raise DataError(f"no new user in {data.dataset} can be evaluated: each needs >= {max(data.new_user_ns) + 1} positives "
                    f"(max(data.new_user_ns)={max(data.new_user_ns)} shown first, then the next one to predict), but the "
                    f"{n_new} new users have at most {most or 0}; lower data.new_user_ns or use a larger data set")


def _candidate_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("negatives", pa.list_(pa.int64())))


def _check_enough_negatives(users: np.ndarray, keys: np.ndarray, n_items: int, n_negatives: int) -> None:
    if len(users) == 0:
        return
    positives_per_user = np.bincount(keys // n_items, minlength=int(users.max()) + 1)
    free = n_items - positives_per_user[users]
    if free.min() < n_negatives:
        worst = int(users[np.argmin(free)])
        raise DataError(f"user_id {worst} has only {int(free.min())} items they never had as a positive; "
                        f"data.n_negatives={n_negatives} needs at least that many")


def sample_negatives(users: np.ndarray, keys: np.ndarray, n_items: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(len(users), n) distinct items per row, uniform over the items the row's user never had as a positive.

    keys: sorted ``user * n_items + item`` of every positive. Draws wide rows of
    uniform items, drops positives and repeats, keeps the first n survivors; rows
    left short are redrawn wider, then (rarely) sampled exactly from the complement.
    Keeping the first n distinct valid draws of an iid stream is uniform sampling
    without replacement from the valid items.
    """
    out = np.empty((len(users), n), dtype=np.int64)
    todo = np.arange(len(users))
    width = 2 * n + 16
    for _ in range(4):
        if todo.size == 0:
            return out
        draws = rng.integers(0, n_items, size=(todo.size, width), dtype=np.int64)
        keep = ~_is_positive(users[todo, None] * n_items + draws, keys) & _first_occurrence(draws)
        done = keep.sum(axis=1) >= n
        keep &= np.cumsum(keep, axis=1) <= n
        out[todo[done]] = draws[done][keep[done]].reshape(-1, n)
        todo, width = todo[~done], width * 4
    for row in todo:  # users with almost every item positive: sample the complement exactly
        owned = keys[(keys >= users[row] * n_items) & (keys < (users[row] + 1) * n_items)] - users[row] * n_items
        out[row] = rng.choice(np.setdiff1d(np.arange(n_items), owned), size=n, replace=False)
    return out


def _is_positive(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if keys.size == 0:
        return np.zeros(query.shape, dtype=bool)
    idx = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return keys[idx] == query


def _first_occurrence(draws: np.ndarray) -> np.ndarray:
    """True where a value appears in its row for the first time (left to right)."""
    order = np.argsort(draws, axis=1, kind="stable")
    ordered = np.take_along_axis(draws, order, axis=1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = np.empty_like(repeat)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first


def write_stats(config: Config, out: Path, ingested: dict) -> dict:
    """stats.json: rows, users, items and time ranges per part; new users with enough positives."""
    data = config.data
    min_positives = max(data.new_user_ns) + 1
    with duckdb_connection(config.runtime) as con:
        parts = {}
        for name in ("interactions", "history", "stream", "new_users"):
            row = run_sql(con, "part_stats", {"path": _parquet(out / f"{name}.parquet")}).fetchall()[0]
            parts[name] = dict(zip(("rows", "users", "items", "ts_min", "ts_max"), row))
        batches = [dict(zip(("batch", "rows", "ts_min", "ts_max"), r)) for r in run_sql(con, "batch_sizes", {"stream": _parquet(out / "stream.parquet")}).fetchall()]
        cases = [dict(zip(("kind", "n", "cases", "users"), r)) for r in run_sql(con, "candidate_counts", {"candidates": _parquet(out / "candidates.parquet")}).fetchall()]
        evaluable = run_sql(con, "new_user_sizes", {"new_users": _parquet(out / "new_users.parquet"), "min_positives": min_positives}).fetchall()[0][0]
    positives = sum(parts[name]["rows"] for name in ("history", "stream", "new_users"))
    stats = {
        "dataset": data.dataset,
        "data_hash": prepared_dir(config).name,
        "data_config": config.data.model_dump(mode="json"),
        "source": ingested["source"],
        "ratings_read": ingested["ratings_read"],
        "users": ingested["users"],
        "items": ingested["items"],
        "positives": positives,
        "parts": parts,
        "stream_batches": batches,
        "new_users_min_positives": min_positives,
        "new_users_evaluable": evaluable,
        "candidates": cases,
        "features": ingested.get("features", {"users": None, "items": None}),
        "input_checks": ingested.get("input_checks", {}),
    }
    write_json(stats, out / "stats.json")
    return stats


# ---------------------------------------------------------------------------- the whole stage


def run_steps(config: Config, out: Path) -> dict:
    ingested = ingest(config, out)
    ingested["features"] = features(config, out)
    split(config, out)
    candidates(config, out)
    return write_stats(config, out, ingested)


def build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """Run ``build(work)`` in a temporary sibling of ``final``, then publish the prepared files into ``final``.

    Skipped when ``final`` is complete and intact. Holds ``final``'s lock throughout, so a
    second process waits, then finds the folder complete. Publishing replaces only the
    prepared files: later stages' outputs inside ``final`` (tasks-*/, runs/, ...) stay.
    """
    with first_time_lock(final, f"preparing {final}"):
        problems = prepared_problems(final, hashes=None, features=True) if final.exists() else []
        if final.exists() and not problems:
            logger.info("prepared data already in %s", final)
            return final
        if problems:
            logger.warning("prepared data in %s is incomplete or damaged (%s); rebuilding the prepared files, keeping "
                           "everything else in the folder", final, "; ".join(problems))
        started = time.perf_counter()
        with temp_sibling_dir(final) as work:
            build(work)
            publish_prepared(work, final)
    logger.info("prepared %s in %.1f s", final, time.perf_counter() - started)
    return final


def publish_prepared(work: Path, final: Path) -> None:
    """Move the prepared files from ``work`` into ``final`` (each rename atomic), then write the manifest.

    The old manifest goes first, so a crash half-way leaves a folder without one: incomplete,
    and rebuilt by the next run.
    """
    missing = [name for name in PREPARED_FILES if not (work / name).is_file()]
    if missing:
        raise RuntimeError(f"preparing {final}: the build wrote no {missing}")
    final.mkdir(parents=True, exist_ok=True)
    (final / MANIFEST).unlink(missing_ok=True)
    for name in PREPARED_FILES:
        os.replace(work / name, final / name)
    seal_prepared(final)


def prepare_data(config: Config) -> Path:
    """Prepare the data set of ``config`` (no Prefect); returns the prepared folder.

    Does nothing when the complete folder for this data hash exists already.
    """
    return build_once(prepared_dir(config), lambda work: run_steps(config, work))


def _user_errors_without_frames(fn: Callable) -> Callable:
    """Drop the traceback of a DataError before Prefect stores it: its frames hold DuckDB
    connections, which would stay alive until exit (nanobind then prints leak warnings).
    The message already names the file, line or parameter."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataError as exc:
            exc.__traceback__ = None
            raise

    return wrapper


ingest_task = task(name="ingest", cache_policy=NO_CACHE)(_user_errors_without_frames(ingest))
features_task = task(name="features", cache_policy=NO_CACHE)(_user_errors_without_frames(features))
split_task = task(name="split", cache_policy=NO_CACHE)(_user_errors_without_frames(split))
candidates_task = task(name="candidates", cache_policy=NO_CACHE)(_user_errors_without_frames(candidates))
stats_task = task(name="stats", cache_policy=NO_CACHE)(_user_errors_without_frames(write_stats))
