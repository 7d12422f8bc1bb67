"""Offline tasks (docs/method.md §4) checked against the user timelines they come from."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metarec.config import Config
from metarec.interface import Interactions
from metarec.meta_tasks import TaskArrays, build_tasks, count_tasks, fill_own, iter_tasks, stream_tasks
from metarec.neighbours import InteractionIndex
from metarec.synthetic import planted_interactions
from tasks.runtime.paths import prepared_dir, task_shards_dir
from tasks.data.prepared import seal_prepared
from tasks.train.task_shards import (
    MANIFEST,
    build_task_shards,
    build_task_shards_task,
    iter_task_shards,
    load_tasks,
    read_manifest,
    shards_complete,
    write_task_shards,
)

K, k = 12, 4


@pytest.fixture(scope="module")
def history() -> Interactions:
    """Planted timelines of varied length (some users shorter than k), with timestamp ties."""
    data = planted_interactions(n_users=120, n_items=100, per_user=30, seed=3).interactions
    rng = np.random.default_rng(0)
    keep = rng.random(len(data)) < np.repeat(rng.uniform(0.05, 1.0, 120), 30)[np.argsort(np.argsort(data.users, kind="stable"))]
    return Interactions.from_arrays(data.users[keep], data.items[keep], data.ts[keep] // 40)


@pytest.fixture(scope="module")
def tasks(history) -> TaskArrays:
    return build_tasks(history, k, K, seed=5)


def timelines(history: Interactions) -> dict[int, list[tuple[int, int]]]:
    """user -> [(ts, item)] in the order tasks use: by ts, ties in row order (the prepared tie-break, data.tie_break)."""
    out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, v, t in sorted(zip(history.users.tolist(), history.items.tolist(), history.ts.tolist()), key=lambda r: (r[0], r[2])):
        out[u].append((t, v))
    return out


def test_one_task_per_position_after_k(history, tasks):
    lines = timelines(history)
    assert min(len(x) for x in lines.values()) < k  # the fixture has users too short for a task
    assert len(tasks) == sum(max(0, len(x) - k) for x in lines.values())
    per_user = np.bincount(tasks.query_user, minlength=history.n_users)
    assert all(per_user[u] == max(0, len(x) - k) for u, x in lines.items())
    assert tasks.support_users.shape == (len(tasks), K) and tasks.support_pos.dtype == np.int64


def test_own_columns_are_the_k_previous_interactions_and_query_the_next(history, tasks):
    lines = timelines(history)
    seen = set()
    for t in range(len(tasks)):
        u = int(tasks.query_user[t])
        own = tasks.support_pos[t, :k].tolist()
        line = lines[u]
        starts = [i for i in range(k, len(line)) if [v for _, v in line[i - k : i]] == own and line[i][1] == tasks.query_pos[t]]
        assert starts, t
        i = starts[0]
        assert tasks.query_ts[t] == line[i][0]
        assert (tasks.support_users[t, :k] == u).all()
        seen.add((u, i))
    assert len(seen) == len(tasks)  # every (user, position) exactly once


def test_no_task_sees_its_future_and_neighbours_share_an_own_item(history, tasks):
    first = {}
    interactions = defaultdict(list)
    for u, v, t in zip(history.users.tolist(), history.items.tolist(), history.ts.tolist()):
        first[(u, v)] = min(t, first.get((u, v), t))
        interactions[(u, v)].append(t)
    lines = timelines(history)
    fallbacks = 0
    for t in range(len(tasks)):
        u, own = int(tasks.query_user[t]), tasks.support_pos[t, :k].tolist()
        i = next(i for i in range(k, len(lines[u])) if [v for _, v in lines[u][i - k : i]] == own and lines[u][i][1] == tasks.query_pos[t])
        cutoff = lines[u][i - 1][0]
        for w, v in zip(tasks.support_users[t, k:].tolist(), tasks.support_pos[t, k:].tolist()):
            if w == u:  # documented fallback: the user's own items repeated
                fallbacks += 1
                assert v in own
                continue
            assert min(interactions[(w, v)]) <= cutoff, (t, w, v)
            assert any(first.get((w, o), cutoff + 1) <= cutoff for o in own), (t, w)
    assert fallbacks < 0.05 * len(tasks) * (K - k)


def _first_seen(history: Interactions) -> dict[tuple[int, int], int]:
    first: dict[tuple[int, int], int] = {}
    for u, v, t in zip(history.users.tolist(), history.items.tolist(), history.ts.tolist()):
        first[(u, v)] = min(t, first.get((u, v), t))
    return first


def test_negatives_avoid_what_their_triples_user_had_by_the_task_time_only(history, tasks):
    """No task sees its future: a negative is never a positive its user had by then (support: ts(v_{i-1}), query:
    ts(v_i)), but may be one the user comes to have later, as at serving."""
    first = _first_seen(history)
    lines = timelines(history)
    later = 0
    for t in range(len(tasks)):
        u = int(tasks.query_user[t])
        i = next(i for i in range(k, len(lines[u])) if [v for _, v in lines[u][i - k : i]] == tasks.support_pos[t, :k].tolist()
                 and lines[u][i][1] == tasks.query_pos[t] and lines[u][i][0] == tasks.query_ts[t])
        cutoff = lines[u][i - 1][0]
        triples = [*zip(tasks.support_users[t].tolist(), tasks.support_neg[t].tolist(), [cutoff] * K), (u, int(tasks.query_neg[t]), int(tasks.query_ts[t]))]
        for w, neg, by in triples:
            assert first.get((w, neg), by + 1) > by, (t, w, neg, by)
            later += (w, neg) in first
    assert later > 0.02 * len(tasks) * (K + 1)  # the user's later positives are allowed (a uniform draw hits them often here)
    assert tasks.support_neg.min() >= 0 and tasks.support_neg.max() < history.n_items


def test_negatives_history_option_avoids_every_positive_of_the_history(history):
    tasks = build_tasks(history, k, K, seed=5, negatives="history")
    first = _first_seen(history)
    for users, negs in ((tasks.support_users.ravel(), tasks.support_neg.ravel()), (tasks.query_user, tasks.query_neg)):
        assert not any((u, n) in first for u, n in zip(users.tolist(), negs.tolist()))
    with pytest.raises(ValueError, match="'past' or 'history'"):
        build_tasks(history, k, K, seed=5, negatives="future")


def test_same_seed_same_tasks_other_seed_other_tasks(history, tasks):
    again = build_tasks(history, k, K, seed=5)
    other = build_tasks(history, k, K, seed=6)
    for name in TaskArrays.__dataclass_fields__:
        assert np.array_equal(getattr(tasks, name), getattr(again, name)), name
    assert not np.array_equal(tasks.support_pos, other.support_pos)
    assert not np.array_equal(tasks.query_neg, other.query_neg)
    # the same tasks, only ordered and sampled differently
    key = lambda t: sorted(zip(t.query_user.tolist(), t.query_ts.tolist(), t.query_pos.tolist()))  # noqa: E731
    assert key(tasks) == key(other)


def test_unshuffled_tasks_follow_user_then_time(history):
    ordered = build_tasks(history, k, K, seed=5, shuffle=False)
    assert np.all(np.diff(ordered.query_user) >= 0)
    same_user = np.diff(ordered.query_user) == 0
    assert np.all(np.diff(ordered.query_ts)[same_user] >= 0)


def test_cap_on_tasks_per_user(history):
    capped = build_tasks(history, k, K, seed=5, max_tasks_per_user=3)
    per_user = np.bincount(capped.query_user, minlength=history.n_users)
    lines = timelines(history)
    assert all(per_user[u] == min(3, max(0, len(x) - k)) for u, x in lines.items())


def test_k_equal_K_and_tiny_histories():
    tiny = Interactions.from_arrays([0, 0, 0, 1], [0, 1, 2, 3], [1, 2, 3, 1])
    tasks = build_tasks(tiny, 2, 2, seed=0)
    assert len(tasks) == 1 and tasks.support_pos.tolist() == [[0, 1]] and tasks.query_pos.tolist() == [2]
    assert len(build_tasks(tiny, 3, 4, seed=0)) == 0
    with pytest.raises(ValueError, match="1 <= k <= K"):
        build_tasks(tiny, 5, 4, seed=0)


def test_fill_own_repeats_when_fewer_than_k():
    rng = np.random.default_rng(0)
    filled = fill_own(np.array([[7, -1, -1], [1, 2, 3]]), 5, rng)
    assert filled[0].tolist() == [7] * 5
    assert filled[1, :3].tolist() == [1, 2, 3] and set(filled[1, 3:].tolist()) <= {1, 2, 3}
    assert fill_own(np.array([[1, 2, 3, 4]]), 2, rng).tolist() == [[3, 4]]
    with pytest.raises(ValueError, match="row 1 of own_items has no item"):
        fill_own(np.array([[1], [-1]]), 2, rng)


def _stream_split(history: Interactions):
    cut = len(history) * 3 // 4
    past, batch = history.take(slice(0, cut)), history.take(slice(cut, None))
    return batch, InteractionIndex.build(past).extend(batch)


def test_stream_tasks_use_only_the_users_own_past(history):
    """§7, §11: R^K of an online task is the user's own k previous interactions, nothing else."""
    batch, index = _stream_split(history)
    tasks, kept = stream_tasks(index, batch, k, K, np.random.default_rng(1))
    assert len(tasks) == kept.sum() > 0 and tasks.K == k
    assert np.array_equal(tasks.query_user, batch.users[kept]) and np.array_equal(tasks.query_pos, batch.items[kept])
    assert (tasks.support_users == tasks.query_user[:, None]).all()  # no neighbour's triple
    lines = timelines(history)
    first = _first_seen(history)
    for t in range(0, len(tasks), 7):
        u, ts = int(tasks.query_user[t]), int(tasks.query_ts[t])
        before = [v for s, v in lines[u] if s < ts]
        own = tasks.support_pos[t].tolist()
        assert set(own) <= set(before)
        if len(before) >= k:
            assert own == before[-k:]  # the k most recent, oldest first
        assert all(first.get((u, neg), ts + 1) > max(s for s, _ in lines[u] if s < ts) for neg in tasks.support_neg[t].tolist())
        assert first.get((u, int(tasks.query_neg[t])), ts + 1) > ts
    # users with nothing before their interaction form no task
    dropped = ~kept
    assert all(not any(s < t for s, _ in lines[u]) for u, t in zip(batch.users[dropped].tolist(), batch.ts[dropped].tolist()))


def test_stream_tasks_with_the_neighbours_option_respect_the_time_cutoff(history):
    batch, index = _stream_split(history)
    tasks, kept = stream_tasks(index, batch, k, K, np.random.default_rng(2), neighbours=True)
    assert tasks.K == K and len(tasks) == kept.sum()
    lines = timelines(history)
    first = _first_seen(history)
    had = defaultdict(list)
    for u, v, t in zip(history.users.tolist(), history.items.tolist(), history.ts.tolist()):
        had[(u, v)].append(t)
    neighbour_triples = 0
    for t in range(len(tasks)):
        u, ts = int(tasks.query_user[t]), int(tasks.query_ts[t])
        cutoff = max(s for s, _ in lines[u] if s < ts)  # the last own item's time
        own = tasks.support_pos[t, :k].tolist()
        for w, v in zip(tasks.support_users[t, k:].tolist(), tasks.support_pos[t, k:].tolist()):
            if w == u:
                assert v in own  # documented fallback
                continue
            neighbour_triples += 1
            assert min(had[(w, v)]) <= cutoff, (t, w, v, cutoff)  # never a neighbour interaction from after the cutoff
            assert any(first.get((w, o), cutoff + 1) <= cutoff for o in own), (t, w)
    assert neighbour_triples > 0.5 * len(tasks) * (K - k)


def test_ml100k_tasks_count(ml100k_dir):
    raw = np.loadtxt(ml100k_dir / "ml-100k" / "u.data", dtype=np.int64)
    raw = raw[raw[:, 2] >= 3]
    history = Interactions.from_arrays(raw[:, 0] - 1, raw[:, 1] - 1, raw[:, 3])
    tasks = build_tasks(history, 5, 20, seed=0)
    counts = np.bincount(history.users)
    assert len(tasks) == np.maximum(counts - 5, 0).sum()
    assert (tasks.support_users[:, 5:] != tasks.query_user[:, None]).mean() > 0.99  # neighbours found nearly always


# ----------------------------------------------------------------- shards on disk


def fake_prepared(root: Path, history: Interactions) -> None:
    """The files load_prepared needs, with this history and nothing else."""
    root.mkdir(parents=True, exist_ok=True)
    cols = {"user_id": history.users, "item_id": history.items, "ts": history.ts, "pos": np.zeros(len(history), np.int64)}
    for name in ("interactions", "history", "new_users"):
        pq.write_table(pa.table(cols), root / f"{name}.parquet")
    pq.write_table(pa.table({**cols, "batch": np.zeros(len(history), np.int64)}), root / "stream.parquet")
    pq.write_table(pa.table({"user_id": np.arange(history.n_users)}), root / "users.parquet")
    pq.write_table(pa.table({"item_id": np.arange(history.n_items)}), root / "items.parquet")
    pq.write_table(pa.table({"case_id": np.zeros(0, np.int64)}), root / "candidates.parquet")
    (root / "stats.json").write_text("{}")
    seal_prepared(root)


def test_shards_round_trip(tasks, tmp_path):
    out = write_task_shards(tasks, tmp_path / "tasks", shard_size=500, manifest_extra={"seed": 5, "k": k})
    manifest = read_manifest(out)
    assert manifest["n_tasks"] == len(tasks) and manifest["K"] == K and manifest["seed"] == 5
    assert manifest["n_shards"] == -(-len(tasks) // 500) == len(list(out.glob("shard-*.parquet")))
    schema = pq.read_schema(out / manifest["shards"][0]["file"])
    assert pa.types.is_fixed_size_list(schema.field("support_pos").type) and schema.field("support_pos").type.list_size == K
    back = load_tasks(out)
    for name in TaskArrays.__dataclass_fields__:
        assert np.array_equal(getattr(back, name), getattr(tasks, name)), name
    assert [len(s) for s in iter_task_shards(out)][:2] == [500, 500]
    (out / manifest["shards"][-1]["file"]).unlink()
    assert not shards_complete(out)


def test_chunked_tasks_equal_whole_tasks_and_write_the_same_shards(history, tasks, tmp_path, monkeypatch):
    from metarec import meta_tasks

    monkeypatch.setattr(meta_tasks, "CHUNK_TASKS", 1 << 30)
    whole = build_tasks(history, k, K, seed=5)  # the chunk size is part of the random stream: keep it
    monkeypatch.setattr(meta_tasks, "CHUNK_TASKS", 170)
    chunks = list(iter_tasks(history, k, K, seed=5))
    again = build_tasks(history, k, K, seed=5)
    assert [len(c) for c in chunks[:-1]] == [170] * (len(chunks) - 1)
    assert np.array_equal(TaskArrays.concat(chunks).support_neg, again.support_neg)
    assert len(whole) == len(again) == count_tasks(history, k) and count_tasks(history, k, 3) < len(whole)
    out = write_task_shards(iter(chunks), tmp_path / "chunked", shard_size=400, manifest_extra={"K": K})
    manifest = read_manifest(out)
    assert [s["rows"] for s in manifest["shards"]] == [400] * (len(again) // 400) + ([len(again) % 400] if len(again) % 400 else [])
    back = load_tasks(out)
    for name in TaskArrays.__dataclass_fields__:
        assert np.array_equal(getattr(back, name), getattr(again, name)), name
    empty = write_task_shards(iter([]), tmp_path / "empty", shard_size=10, manifest_extra={"K": K})
    assert read_manifest(empty)["n_tasks"] == 0 and len(load_tasks(empty)) == 0 and load_tasks(empty).K == K


def test_build_task_shards_from_prepared_data_once(history, artifacts, prefect_harness):
    config = Config(tasks={"k": k, "K": K, "shard_size": 500})
    fake_prepared(prepared_dir(config), history)
    out = build_task_shards_task(config)
    assert out == task_shards_dir(config) and shards_complete(out, config.hash_of("data", "tasks"))
    manifest = read_manifest(out)
    assert manifest["config_hash"] == config.hash_of("data", "tasks") and manifest["k"] == k
    built = load_tasks(out)
    direct = build_tasks(history, k, K, seed=config.tasks.seed)
    assert np.array_equal(built.support_neg, direct.support_neg) and len(built) == manifest["n_tasks"]
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert build_task_shards(config) == out and (out / MANIFEST).stat().st_mtime_ns == stamp  # skipped, not rebuilt
