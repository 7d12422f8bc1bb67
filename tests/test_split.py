"""The split and the stored candidates, on a small generated data set with known properties."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.data.prepare import run_steps, sample_negatives
from tasks.data.prepared import load_prepared, seal_prepared

N_USERS, N_ITEMS = 150, 80


def write_ratings(path: Path, seed: int = 0) -> list[tuple[int, int, float, int]]:
    """Ratings with raw ids that are not dense, repeated (user, item) pairs and tied timestamps."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_USERS):
        k = int(rng.integers(3, 45))
        for i in rng.choice(N_ITEMS, size=k, replace=False):
            rows.append((10 + 3 * u, 1000 + 7 * int(i), float(rng.integers(1, 6)), int(rng.integers(0, 2000)) * 60))
    for u, i, _, ts in rows[::37]:  # repeats: the later copy is a positive too; the earliest ts must win
        rows.append((u, i, 5.0, ts + 3600))
    path.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    return rows


def config_for(csv: Path, root: Path, **data) -> Config:
    return Config(data=DataConfig(dataset=str(csv), **data), runtime=RuntimeConfig(artifacts_dir=root))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("split")
    rows = write_ratings(root / "ratings.csv")
    out = root / "out"
    out.mkdir()
    config = config_for(root / "ratings.csv", root, n_negatives=20)
    stats = run_steps(config, out)
    seal_prepared(out)  # what build_once does after the steps
    return rows, out, stats, config


def table(out: Path, name: str) -> dict[str, np.ndarray]:
    t = pq.read_table(out / f"{name}.parquet")
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def expected_positives(rows) -> dict[tuple[int, int], int]:
    first: dict[tuple[int, int], int] = {}
    for u, i, r, t in rows:
        if r >= 3:
            first[(u, i)] = min(t, first.get((u, i), t))
    return first


def test_counts_add_up_to_the_input(prepared):
    rows, out, stats, _ = prepared
    inter = table(out, "interactions")
    assert len(inter["user_id"]) == len(rows) == stats["ratings_read"]
    users, items = table(out, "users"), table(out, "items")
    assert sorted(users["user_id"]) == list(range(len({r[0] for r in rows})))
    assert sorted(items["item_id"]) == list(range(len({r[1] for r in rows})))
    parts = [table(out, name) for name in ("history", "stream", "new_users")]
    assert sum(len(p["user_id"]) for p in parts) == len(expected_positives(rows)) == stats["positives"]


def test_repeated_pair_keeps_earliest_time_and_raw_ids_map_back(prepared):
    rows, out, _, _ = prepared
    raw_user = dict(zip(*table(out, "users").values()))
    items = table(out, "items")
    raw_item = dict(zip(items["item_id"], items["raw_item"]))
    got = {}
    for name in ("history", "stream", "new_users"):
        p = table(out, name)
        for u, i, t in zip(p["user_id"], p["item_id"], p["ts"]):
            got[(raw_user[u], raw_item[i])] = t
    assert got == expected_positives(rows)


def test_new_users_are_disjoint_and_a_tenth(prepared):
    _, out, _, _ = prepared
    new = set(table(out, "new_users")["user_id"])
    rest = set(table(out, "history")["user_id"]) | set(table(out, "stream")["user_id"])
    assert not new & rest
    assert len(new) == round(0.1 * len(new | rest))


def test_every_stream_row_comes_after_every_history_row(prepared):
    _, out, _, _ = prepared
    hist, stream = table(out, "history"), table(out, "stream")
    last_history = max(zip(hist["ts"], hist["user_id"]))
    first_stream = min(zip(stream["ts"], stream["user_id"]))
    assert last_history <= first_stream  # a user's rows of the cut's second may straddle it (tie-break order)
    assert stream["ts"].min() >= hist["ts"].max()
    n = len(hist["ts"]) + len(stream["ts"])
    assert len(hist["ts"]) == round(0.9 * n)


def test_stream_batches_are_time_ordered_and_equal(prepared):
    _, out, _, config = prepared
    stream = table(out, "stream")
    batch = stream["batch"]
    assert np.all(np.diff(batch) >= 0)  # rows are sorted by time, so batches must be non-decreasing
    sizes = np.bincount(batch)
    assert len(sizes) == config.data.stream_batches and sizes.max() - sizes.min() <= 1


def test_pos_is_chronological_per_user_in_each_file(prepared):
    _, out, _, _ = prepared
    for name in ("history", "stream", "new_users"):
        p = table(out, name)
        seen: dict[int, list] = defaultdict(list)
        for u, t, pos in zip(p["user_id"], p["ts"], p["pos"]):
            seen[u].append((pos, t))
        for entries in seen.values():
            by_pos = sorted(entries)
            assert [e[0] for e in by_pos] == list(range(len(entries)))
            assert [e[1] for e in by_pos] == sorted(e[1] for e in entries)  # pos follows time; ties: data.tie_break
        order = list(zip(p["ts"], p["user_id"], p["pos"]))
        assert order == sorted(order)


def test_candidates_cover_the_protocol(prepared):
    _, out, stats, config = prepared
    cand = pq.read_table(out / "candidates.parquet").to_pylist()
    new_users = table(out, "new_users")
    counts = np.bincount(new_users["user_id"])
    eligible = {u for u in set(new_users["user_id"]) if counts[u] >= 11}
    assert stats["new_users_evaluable"] == len(eligible) > 0
    by_user_pos = {(u, p): i for u, p, i in zip(new_users["user_id"], new_users["pos"], new_users["item_id"])}
    for n in config.data.new_user_ns:
        cases = [c for c in cand if c["kind"] == "new" and c["n"] == n]
        assert {c["user_id"] for c in cases} == eligible
        assert all(by_user_pos[(c["user_id"], n)] == c["item_id"] and c["pos"] == n for c in cases)
    stream_cases = [c for c in cand if c["kind"] == "stream"]
    assert len(stream_cases) == len(table(out, "stream")["user_id"])
    assert [c["case_id"] for c in cand] == list(range(len(cand)))


def test_negatives_are_distinct_and_never_a_positive_of_the_user(prepared):
    _, out, _, config = prepared
    positives = defaultdict(set)
    for name in ("history", "stream", "new_users"):
        p = table(out, name)
        for u, i in zip(p["user_id"], p["item_id"]):
            positives[u].add(i)
    n_items = len(table(out, "items")["item_id"])
    for case in pq.read_table(out / "candidates.parquet").to_pylist():
        negs = case["negatives"]
        assert len(negs) == len(set(negs)) == config.data.n_negatives
        assert not set(negs) & positives[case["user_id"]]
        assert case["item_id"] not in negs and all(0 <= j < n_items for j in negs)


def test_same_seed_gives_identical_bytes_and_another_seed_another_sample(prepared, tmp_path: Path):
    _, out, _, config = prepared
    again, other = tmp_path / "again", tmp_path / "other"
    again.mkdir(), other.mkdir()
    run_steps(config.model_copy(update={"runtime": RuntimeConfig(artifacts_dir=tmp_path, max_workers=1)}), again)
    for name in ("interactions", "users", "items", "history", "stream", "new_users", "candidates"):
        assert (again / f"{name}.parquet").read_bytes() == (out / f"{name}.parquet").read_bytes(), name
    reseeded = config.model_copy(update={"data": config.data.model_copy(update={"seed": 43})})
    run_steps(reseeded, other)
    assert set(table(other, "new_users")["user_id"]) != set(table(out, "new_users")["user_id"])


def test_load_prepared_reads_the_output(prepared):
    _, out, stats, _ = prepared
    data = load_prepared(out)
    assert len(data.history) == stats["parts"]["history"]["rows"]
    assert data.n_users == stats["users"] and data.n_items == stats["items"]
    assert len(data.candidates("new")) == 3 * stats["new_users_evaluable"]


def test_sample_negatives_when_almost_every_item_is_positive():
    n_items, n = 30, 5
    owned = np.setdiff1d(np.arange(n_items), [3, 7, 11, 19, 23, 29])  # user 0 lacks only six items
    keys = np.sort(np.concatenate([owned, 1 * n_items + np.arange(10)]))
    users = np.array([0, 1, 0])
    negs = sample_negatives(users, keys, n_items, n, np.random.default_rng(0))
    for row, u in zip(negs, users):
        assert len(set(row)) == n
        assert not set(row) & set((keys[keys // n_items == u] % n_items).tolist())


def test_sample_negatives_is_roughly_uniform():
    keys = np.array([0, 1, 2], dtype=np.int64)  # user 0 owns items 0..2 of 10
    negs = sample_negatives(np.zeros(4000, dtype=np.int64), keys, 10, 3, np.random.default_rng(1))
    counts = np.bincount(negs.ravel(), minlength=10)
    assert counts[:3].sum() == 0
    assert counts[3:].min() > 0.85 * counts[3:].mean()  # 7 free items, ~1714 draws each


def test_build_once_keeps_a_folder_another_process_completed_meanwhile(prepared, tmp_path: Path):
    import shutil

    from tasks.data.prepare import build_once

    _, out, _, _ = prepared
    final = tmp_path / "prepared"

    def racing_build(work: Path) -> None:
        shutil.copytree(out, work, dirs_exist_ok=True)
        shutil.copytree(out, final)  # "another process" publishes first, then writes a run inside it
        (final / "runs").mkdir()

    assert build_once(final, racing_build) == final
    assert (final / "runs").is_dir() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert build_once(final, lambda work: pytest.fail("must not rebuild a complete folder")) == final
