"""The item cold-start split (Table 2, ``eval.new_items``), built beside a prepared folder.

From the prepared history (``prepared_dir(config)``), into ``new_items-<key>/`` inside it:

- ``train.parquet``: the history without any row of a new item (user_id, item_id, ts, pos): what every
  Table 2 row is fitted on, so no new item's interaction reaches training;
- ``rows.parquet``: every history row of a new item, with item_pos (its place in the item's time order);
  its first n (n in data.new_user_ns) are shown to the models, the rest are cases;
- ``cases.parquet``: one row per case (case_id, user_id, item_id, item_pos, negatives): the new item's
  interactions from item_pos = max(n) on, each with data.n_negatives items its user never had as a
  positive anywhere in the data set (distinct, drawn per case with a seeded generator, as Table 1's);
- ``stats.json``: the counts.

New items are the history's items dealt by a seeded md5 of their id into round(1 / data.new_item_fraction)
groups, group data.fold % that (``sql/split_new_items.sql``), like new users. The folder is named by the data
config and this code (``new_items_key``) and written atomically; an existing one is reused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metarec.config import Config
from metarec.interface import Interactions
from metarec.protocol import Cases
from tasks.data.datasets import DataError
from tasks.data.prepare import _parquet, duckdb_connection, export, sample_negatives
from tasks.runtime.atomic import atomic_dir
from tasks.runtime.locks import first_time_lock
from tasks.runtime.paths import _combine, prepared_dir, stage_code
from tasks.runtime.sqlfiles import run_sql, sql

logger = logging.getLogger(__name__)

FILES = ("train.parquet", "rows.parquet", "cases.parquet", "stats.json")


def new_items_key(config: Config) -> str:
    return _combine(config.hash_of("data"), stage_code("new_items"))


def new_items_dir(config: Config) -> Path:
    return prepared_dir(config) / f"new_items-{new_items_key(config)}"


@dataclass(frozen=True)
class NewItemData:
    """A loaded item cold-start split: the training history, the new items' rows (with item_pos) and the cases."""

    root: Path
    train: Interactions
    rows: Interactions
    item_pos: np.ndarray
    cases: Cases  # n = -1 here: the evaluation asks every case at every n
    case_items: np.ndarray
    n_items: int


def build_new_items(config: Config, out: Path) -> dict:
    """Write the split's files into ``out`` (see the module doc); returns its stats."""
    data = config.data
    prepared = prepared_dir(config)
    history = _parquet(prepared / "history.parquet")
    first = max(data.new_user_ns)
    with duckdb_connection(config.runtime) as con:
        run_sql(con, "split_new_items", {"history": history, "seed": data.seed, "deals": data.item_deals, "fold": data.fold % data.item_deals})
        export(con, "new_item_train", {"history": history}, out / "train.parquet")
        export(con, "new_item_rows", {"history": history}, out / "rows.parquet")
        cases = con.sql(sql("new_item_cases"), params={"rows": _parquet(out / "rows.parquet"), "first": first}).to_arrow_table()
        n_items = pq.read_metadata(prepared / "items.parquet").num_rows
        parts = [_parquet(prepared / f"{name}.parquet") for name in ("history", "stream", "new_users")]
        keys = np.asarray(run_sql(con, "positive_keys", {"paths": parts, "n_items": n_items}).fetchnumpy()["key"], dtype=np.int64)
        new_items = con.sql("SELECT count(*) FROM new_item_ids").fetchall()[0][0]
    if cases.num_rows == 0:
        raise DataError(f"no new item in {data.dataset} can be evaluated: each needs > max(data.new_user_ns)={first} history "
                        f"positives; raise data.new_item_fraction or use a larger data set")
    users = cases.column("user_id").to_numpy().astype(np.int64)
    negatives = sample_negatives(users, keys, n_items, data.n_negatives, np.random.default_rng([data.seed, 7, data.fold]))
    offsets = pa.array(np.arange(0, negatives.size + 1, data.n_negatives, dtype=np.int32))
    cases = cases.append_column("negatives", pa.ListArray.from_arrays(offsets, pa.array(negatives.reshape(-1), type=pa.int64())))
    pq.write_table(cases, out / "cases.parquet")
    stats = {"new_items": int(new_items), "deals": data.item_deals, "group": data.fold % data.item_deals,
             "train_rows": pq.read_metadata(out / "train.parquet").num_rows, "new_item_rows": pq.read_metadata(out / "rows.parquet").num_rows,
             "cases": cases.num_rows, "evaluated_items": len(set(cases.column("item_id").to_pylist())), "shown_ns": list(data.new_user_ns)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def prepare_new_items(config: Config) -> Path:
    """The split's folder for ``config`` (built once; the prepared data must exist)."""
    final = new_items_dir(config)
    with first_time_lock(final, f"splitting new items into {final}"):
        if all((final / name).is_file() for name in FILES):
            return final
        with atomic_dir(final) as work:
            stats = build_new_items(config, work)
    logger.info("new items of fold %d: %s", config.data.fold, stats)
    return final


def load_new_items(root: Path) -> NewItemData:
    root = Path(root)
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"item cold-start split in {root} lacks {missing}; build it with prepare_new_items")
    col = lambda table, name: table.column(name).to_numpy().astype(np.int64)  # noqa: E731
    train = pq.read_table(root / "train.parquet")
    rows = pq.read_table(root / "rows.parquet")
    cases = pq.read_table(root / "cases.parquet")
    negatives = np.asarray(cases.column("negatives").to_pylist(), dtype=np.int64).reshape(cases.num_rows, -1)
    minus = np.full(cases.num_rows, -1, dtype=np.int64)
    prepared_items = pq.read_metadata(root.parent / "items.parquet").num_rows
    return NewItemData(
        root=root,
        train=Interactions(col(train, "user_id"), col(train, "item_id"), col(train, "ts")),
        rows=Interactions(col(rows, "user_id"), col(rows, "item_id"), col(rows, "ts")),
        item_pos=col(rows, "item_pos"),
        cases=Cases(col(cases, "user_id"), col(cases, "item_id"), negatives, minus, minus),
        case_items=col(cases, "item_id"),
        n_items=prepared_items,
    )
