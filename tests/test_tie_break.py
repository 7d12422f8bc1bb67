"""The order of same-second interactions (data.tie_break): seeded and blind to item labels, or the old item-id order.

A planted log with many same-second positives (timestamps on a coarse grid, several items per user per second)
is prepared by the real SQL. Comparisons are made in raw labels, so relabelling the items changes nothing that
is compared except through the tie-break itself.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from metarec.config import Config, DataConfig, RuntimeConfig
from metarec.interface import Interactions
from metarec.models.factory import make_model
from metarec.neighbours import InteractionIndex
from tasks.data.prepare import run_steps

N_USERS, N_ITEMS = 120, 60
PARTS = ("history", "stream", "new_users")


def planted_rows(seed: int = 0) -> list[tuple[int, int, int, int]]:
    """(raw user, raw item, rating, ts): 14..40 distinct items per user on a grid of 8 seconds, so most seconds hold ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_USERS):
        for i in rng.choice(N_ITEMS, size=int(rng.integers(14, 40)), replace=False):
            rows.append((100 + u, 1 + int(i), int(rng.integers(3, 6)), 1_000_000 + 60 * int(rng.integers(0, 8))))
    return rows


def write(path: Path, rows, relabel: dict[int, int] | None = None) -> Path:
    relabel = relabel or {}
    path.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{relabel.get(i, i)},{r},{t}\n" for u, i, r, t in rows))
    return path


def prepare(csv: Path, out: Path, **data) -> Path:
    out.mkdir(parents=True)
    config = Config(data=DataConfig(dataset=str(csv), n_negatives=5, **data), runtime=RuntimeConfig(artifacts_dir=out.parent))
    run_steps(config, out)
    return out


def in_raw_labels(out: Path, item_label=lambda raw: raw) -> dict[str, list[tuple]]:
    """Every split file and the candidate cases (without their sampled negatives) in raw ids, in file order."""
    users = dict(zip(*pq.read_table(out / "users.parquet").to_pydict().values()))
    items = pq.read_table(out / "items.parquet").to_pydict()
    raw_item = {i: item_label(r) for i, r in zip(items["item_id"], items["raw_item"])}
    tables = {}
    for name in (*PARTS, "candidates"):
        t = pq.read_table(out / f"{name}.parquet").to_pydict()
        keys = [k for k in t if k not in ("user_id", "item_id", "negatives")]
        tables[name] = [(users[u], raw_item[i], *(t[k][r] for k in keys)) for r, (u, i) in enumerate(zip(t["user_id"], t["item_id"]))]
    return tables


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ties")
    rows = planted_rows()
    permutation = dict(zip(range(1, N_ITEMS + 1), (np.random.default_rng(5).permutation(N_ITEMS) + 501).tolist()))
    original, relabelled = write(root / "original.csv", rows), write(root / "relabelled.csv", rows, permutation)
    return {"root": root, "rows": rows, "back": {v: k for k, v in permutation.items()}, "original": original, "relabelled": relabelled}


def test_the_planted_log_has_many_same_second_ties(logs):
    per_second = defaultdict(int)
    for u, _, r, t in logs["rows"]:
        per_second[(u, t)] += r >= 3
    assert np.mean([c >= 2 for c in per_second.values()]) > 0.75


def test_relabelling_items_changes_no_split_or_case_under_random(logs):
    root, back = logs["root"], logs["back"]
    a = in_raw_labels(prepare(logs["original"], root / "random-a"))
    b = in_raw_labels(prepare(logs["relabelled"], root / "random-b"), item_label=back.get)
    for name in (*PARTS, "candidates"):
        assert a[name] == b[name], name
    # the old order depends on the labels: the same comparison fails there (the test can fail)
    a_old = in_raw_labels(prepare(logs["original"], root / "item-a", tie_break="item_id"))
    b_old = in_raw_labels(prepare(logs["relabelled"], root / "item-b", tie_break="item_id"), item_label=back.get)
    assert a_old["new_users"] != b_old["new_users"] and a_old["candidates"] != b_old["candidates"]


def per_user_order(out: Path) -> dict[int, list[tuple[int, int]]]:
    """Each user's (ts, item) in the prepared order: history then stream (or new users), each by pos."""
    order: dict[int, list] = defaultdict(list)
    for name in PARTS:
        t = pq.read_table(out / f"{name}.parquet").to_pydict()
        for u, i, ts, pos in sorted(zip(t["user_id"], t["item_id"], t["ts"], t["pos"]), key=lambda r: (r[0], r[3])):
            order[u].append((ts, i))
    return order


def test_item_id_keeps_same_second_items_ascending_by_id(logs):
    out = logs["root"] / "item-ascending"
    prepare(logs["original"], out, tie_break="item_id")
    items = pq.read_table(out / "items.parquet").to_pydict()
    raw = dict(zip(items["item_id"], items["raw_item"]))
    groups = 0
    for name in PARTS:
        t = pq.read_table(out / f"{name}.parquet").to_pydict()
        by_second = defaultdict(list)
        for u, i, ts, pos in sorted(zip(t["user_id"], t["item_id"], t["ts"], t["pos"]), key=lambda r: (r[0], r[3])):
            by_second[(u, ts)].append(i)
        for items in by_second.values():
            assert items == sorted(items) and [raw[i] for i in items] == sorted(raw[i] for i in items)
            groups += len(items) > 1
    assert groups > 100


def test_random_order_is_not_item_order_and_keeps_time(logs):
    out = logs["root"] / "random-order"
    prepare(logs["original"], out)
    ascending = total = 0
    for sequence in per_user_order(out).values():
        assert [ts for ts, _ in sequence] == sorted(ts for ts, _ in sequence)
        for (t0, i0), (t1, i1) in zip(sequence, sequence[1:]):
            if t0 == t1:
                total += 1
                ascending += i0 < i1
    assert total > 500 and 0.35 < ascending / total < 0.65  # a random order: about half the same-second pairs ascend


def test_different_seeds_order_the_same_seconds_differently(logs):
    root = logs["root"]
    one, two = per_user_order(prepare(logs["original"], root / "seed-1", seed=1)), per_user_order(prepare(logs["original"], root / "seed-2", seed=2))
    assert {u: sorted(s) for u, s in one.items()} == {u: sorted(s) for u, s in two.items()}  # the same positives
    groups = differ = 0
    for u in one:
        seconds_one, seconds_two = defaultdict(list), defaultdict(list)
        for ts, i in one[u]:
            seconds_one[ts].append(i)
        for ts, i in two[u]:
            seconds_two[ts].append(i)
        for ts, items in seconds_one.items():
            if len(items) > 1:
                groups += 1
                differ += items != seconds_two[ts]
    assert groups > 200 and differ / groups > 0.5


def test_the_same_seed_twice_gives_byte_identical_prepared_files(logs):
    root = logs["root"]
    first, second = prepare(logs["original"], root / "twice-1"), prepare(logs["original"], root / "twice-2")
    for name in ("interactions", *PARTS, "candidates"):
        assert (first / f"{name}.parquet").read_bytes() == (second / f"{name}.parquet").read_bytes(), name


def test_the_tie_break_is_part_of_the_prepared_data_key():
    assert Config(data=DataConfig(tie_break="random")).hash_of("data") != Config(data=DataConfig(tie_break="item_id")).hash_of("data")
    assert Config(data=DataConfig(seed=1)).hash_of("data") != Config(data=DataConfig(seed=2)).hash_of("data")


# ------------------------------------------------------------------ Python keeps the prepared order
def same_second_rows() -> Interactions:
    """User 0 has items 5, 2, 9 in one second, in that (tie-break) order; user 1 has 7 then 3."""
    return Interactions(np.array([0, 0, 0, 1, 1, 0]), np.array([5, 2, 9, 7, 3, 1]), np.array([10, 10, 10, 10, 10, 20]))


def test_interactions_and_index_keep_the_row_order_of_same_second_rows():
    rows = same_second_rows()
    shuffled = Interactions.from_arrays(rows.users[::-1], rows.items[::-1], rows.ts[::-1])
    assert shuffled.items[shuffled.users == 0].tolist() == [9, 2, 5, 1]  # the caller's order within the second, time first
    index = InteractionIndex.build(rows)
    assert index.user_items_[index.user_ptr_[0] : index.user_ptr_[1]].tolist() == [5, 2, 9, 1]
    assert index.user_items_[index.user_ptr_[1] : index.user_ptr_[2]].tolist() == [7, 3]
    assert index.pair_time_items_[:4].tolist() == [5, 2, 9, 1]


def test_validation_new_user_cases_keep_the_row_order():
    from tasks.train.validation import _new_user_cases

    config = Config(data=DataConfig(new_user_ns=(1, 2), n_negatives=2), tuned={})
    rows = Interactions(np.zeros(4, dtype=np.int64), np.array([8, 3, 6, 1]), np.array([5, 5, 5, 5]))
    history = Interactions(np.array([1] * 10), np.arange(10, 20), np.arange(10))
    index = InteractionIndex.build(Interactions(np.r_[rows.users, history.users], np.r_[rows.items, history.items], np.r_[rows.ts, history.ts]))
    cases = _new_user_cases(rows, index, config, 20, np.random.default_rng(0))
    recent, candidates = cases[2]
    assert recent.items.tolist() == [[8, 3]] and candidates[0, 0] == 6
