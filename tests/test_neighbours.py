"""InteractionIndex against brute-force answers on small random histories."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from metarec.interface import Interactions
from metarec import neighbours
from metarec.neighbours import PAD_TS, InteractionIndex


@pytest.fixture(autouse=True, params=["fast paths", "exact paths"])
def paths(request, monkeypatch):
    """Every test runs twice: with the bitmap and draw-and-check rounds, and with the exact searchsorted paths only."""
    if request.param == "exact paths":
        monkeypatch.setattr(neighbours, "BITMAP_MAX_CELLS", 0)
        monkeypatch.setattr(neighbours, "REJECTION_ROUNDS", 0)
    return request.param


def random_history(seed: int = 0, n_users: int = 40, n_items: int = 30, n: int = 600, ts_range: int = 200) -> Interactions:
    """Random interactions with many timestamp ties and some repeated (user, item) pairs."""
    rng = np.random.default_rng(seed)
    return Interactions.from_arrays(rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(0, ts_range, n))


def first_ts(history: Interactions) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for u, v, t in zip(history.users.tolist(), history.items.tolist(), history.ts.tolist()):
        out[(u, v)] = min(t, out.get((u, v), t))
    return out


def test_negatives_are_never_positives_and_cover_every_other_item():
    history = random_history()
    index = InteractionIndex.build(history)
    positives = defaultdict(set)
    for u, v in zip(history.users.tolist(), history.items.tolist()):
        positives[u].add(v)
    users = np.repeat(np.arange(45), 400)  # users 40..44 are unknown to the index
    negs = index.sample_negatives(users, np.random.default_rng(1))
    assert negs.shape == users.shape and negs.min() >= 0 and negs.max() < index.n_items
    for u in range(45):
        drawn = set(negs[users == u].tolist())
        assert drawn == set(range(index.n_items)) - positives[u], u


def test_negatives_are_uniform_over_the_allowed_items():
    history = Interactions.from_arrays([0, 0, 0, 1], [1, 4, 5, 9])
    index = InteractionIndex.build(history)
    negs = index.sample_negatives(np.zeros(70_000, dtype=np.int64), np.random.default_rng(2))
    counts = np.bincount(negs, minlength=10)
    assert counts[[1, 4, 5]].sum() == 0
    allowed = counts[[0, 2, 3, 6, 7, 8, 9]]
    assert np.abs(allowed / 10_000 - 1).max() < 0.05  # 7 items x 10k expected each


def test_negatives_respect_n_items_and_exclude_and_shape():
    index = InteractionIndex.build(Interactions.from_arrays([0, 0, 1], [0, 1, 2]))
    rng = np.random.default_rng(3)
    wide = index.sample_negatives(np.zeros((50, 40), dtype=np.int64), rng, n_items=100)
    assert wide.shape == (50, 40) and wide.max() >= 3 and not np.isin(wide, [0, 1]).any()
    narrow = index.sample_negatives(np.ones(500, dtype=np.int64), rng, n_items=2)
    assert set(narrow.tolist()) == {0, 1}
    exclude = np.tile([[3, 4, 5, 6]], (2000, 1))
    excluded = index.sample_negatives(np.zeros(2000, dtype=np.int64), rng, n_items=8, exclude=exclude)
    assert set(excluded.tolist()) == {2, 7}


def test_negatives_by_a_time_avoid_only_the_positives_had_by_then():
    """A task drawn at time c must not learn from its user's future: positives first seen after c are allowed."""
    history = random_history(seed=13)
    index = InteractionIndex.build(history)
    first = first_ts(history)
    rng = np.random.default_rng(14)
    users = np.repeat(np.arange(42), 600)  # 40, 41 unknown to the index
    until = np.repeat(rng.integers(-5, 210, 42), 600)
    negs = index.sample_negatives(users, rng, until_ts=until)
    for u in range(42):
        c = int(until[u * 600])
        past = {v for (w, v), t in first.items() if w == u and t <= c}
        assert set(negs[users == u].tolist()) == set(range(index.n_items)) - past, u


def test_negatives_by_a_time_are_uniform_and_honour_exclude():
    # user 0: item 1 at t=1, item 4 at t=5, item 5 at t=9; by t=5 items 1 and 4 are its past, 5 its future
    index = InteractionIndex.build(Interactions.from_arrays([0, 0, 0, 1], [1, 4, 5, 9], [1, 5, 9, 2]))
    rng = np.random.default_rng(15)
    negs = index.sample_negatives(np.zeros(80_000, dtype=np.int64), rng, until_ts=np.array(5))
    counts = np.bincount(negs, minlength=10)
    assert counts[[1, 4]].sum() == 0
    assert np.abs(counts[[0, 2, 3, 5, 6, 7, 8, 9]] / 10_000 - 1).max() < 0.05  # 8 items x 10k expected each
    excluded = index.sample_negatives(np.zeros(2000, dtype=np.int64), rng, n_items=12, exclude=np.tile([[0, 2, 3, 5, 6, 7, 8]], (2000, 1)), until_ts=np.array(5))
    assert set(excluded.tolist()) == {9, 10, 11}
    with pytest.raises(ValueError, match="n_items >= the index's 10 items"):
        index.sample_negatives(np.zeros(2, dtype=np.int64), rng, n_items=5, until_ts=np.array(5))


def test_has_item_is_true_for_items_with_a_positive():
    index = InteractionIndex.build(Interactions.from_arrays([0, 1], [2, 5]))
    assert index.has_item(np.array([0, 2, 5, 6, 100])).tolist() == [False, True, True, False, False]


def test_negatives_raise_when_a_user_has_every_item():
    index = InteractionIndex.build(Interactions.from_arrays([0, 0, 1], [0, 1, 0]))
    with pytest.raises(ValueError, match="user 0 has a positive for every one of the 2 items"):
        index.sample_negatives(np.array([1, 0]), np.random.default_rng(0))


def test_recent_items_match_brute_force():
    history = random_history(seed=4)
    index = InteractionIndex.build(history)
    rng = np.random.default_rng(5)
    users = rng.integers(0, 45, 300)
    before = rng.integers(-5, 210, 300)
    items, ts = index.recent_items(users, 4, before)
    order = np.lexsort((history.ts, history.users))  # same-second rows in row order (the prepared tie-break)
    for row, (u, b) in enumerate(zip(users.tolist(), before.tolist())):
        rows = [r for r in order if history.users[r] == u and history.ts[r] < b][-4:]
        want = [int(history.items[r]) for r in rows]
        assert items[row, : len(want)].tolist() == want
        assert ts[row, : len(want)].tolist() == [int(history.ts[r]) for r in rows]
        assert (items[row, len(want) :] == -1).all() and (ts[row, len(want) :] == PAD_TS).all()
    everything, _ = index.recent_items(np.array([0]), 1000)
    assert (everything[0] >= 0).sum() == (history.users == 0).sum()


def test_neighbour_interactions_share_an_item_and_respect_the_cutoff():
    history = random_history(seed=6)
    index = InteractionIndex.build(history)
    first = first_ts(history)
    rng = np.random.default_rng(7)
    users = rng.integers(0, 40, 200)
    own = rng.integers(-1, 30, (200, 3))
    cutoff = rng.integers(0, 200, 200)
    nb_users, nb_items, fallback = index.sample_neighbour_interactions(users, own, cutoff, 25, rng, return_fallback=True)
    assert nb_users.shape == nb_items.shape == (200, 25)
    had = {(u, v, t) for u, v, t in zip(history.users.tolist(), history.items.tolist(), history.ts.tolist())}
    for row in range(200):
        u, c = int(users[row]), int(cutoff[row])
        own_valid = [v for v in own[row].tolist() if v >= 0]
        can = {w for (w, v), t in first.items() if w != u and v in own_valid and t <= c}
        assert fallback[row] == (not can)
        if not can:
            assert (nb_users[row] == u).all() and set(nb_items[row].tolist()) <= (set(own_valid) or {-1})
            continue
        for w, item in zip(nb_users[row].tolist(), nb_items[row].tolist()):
            assert w in can, (row, w)
            assert any((w, item, t) in had for t in range(c + 1)), (row, w, item)


def test_neighbour_sampling_reaches_every_neighbour_with_two_hop_weights():
    # user 0 owns items 0 and 1; item 0 is shared with users 1, 2; item 1 with user 3 only
    history = Interactions.from_arrays(
        [0, 0, 1, 2, 3, 1, 2, 3, 3, 4],
        [0, 1, 0, 0, 1, 5, 6, 7, 8, 9],
        [1, 1, 2, 2, 2, 3, 3, 3, 99, 1],
    )
    index = InteractionIndex.build(history)
    n = 40_000
    nb_users, nb_items = index.sample_neighbour_interactions(np.array([0]), np.array([[0, 1]]), np.array([10]), n, np.random.default_rng(8))
    share = np.bincount(nb_users[0], minlength=5) / n
    # own item first (1/2 each), then a uniform other user of it: users 1, 2 get 1/4, user 3 gets 1/2
    assert np.allclose(share, [0, 0.25, 0.25, 0.5, 0], atol=0.01)
    pairs = set(zip(nb_users[0].tolist(), nb_items[0].tolist()))
    assert pairs == {(1, 0), (1, 5), (2, 0), (2, 6), (3, 1), (3, 7)}  # (3, 8) is after the cutoff


def test_unknown_users_and_items_do_not_break_sampling():
    index = InteractionIndex.build(random_history(seed=9))
    rng = np.random.default_rng(10)
    nb_users, nb_items, fallback = index.sample_neighbour_interactions(
        np.array([1000, 1]), np.array([[3, -1], [500, -1]]), np.array([10**12, 10**12]), 6, rng, return_fallback=True
    )
    assert not fallback[0] and (nb_users[0] != 1000).all() and (nb_items[0] >= 0).all()
    assert fallback[1] and (nb_users[1] == 1).all() and (nb_items[1] == 500).all()


def test_sampling_is_deterministic_per_seed():
    index = InteractionIndex.build(random_history(seed=11))
    args = (np.arange(40), np.tile([[1, 2, 3]], (40, 1)), np.full(40, 150), 10)
    a = index.sample_neighbour_interactions(*args, np.random.default_rng(1))
    b = index.sample_neighbour_interactions(*args, np.random.default_rng(1))
    c = index.sample_neighbour_interactions(*args, np.random.default_rng(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_extend_equals_building_on_everything():
    history = random_history(seed=12)
    head, tail = history.take(slice(0, 400)), history.take(slice(400, None))
    grown = InteractionIndex.build(head).extend(tail)
    whole = InteractionIndex.build(history)
    assert (grown.n_users, grown.n_items, len(grown)) == (whole.n_users, whole.n_items, len(history))
    for name in ("user_items_", "user_ts_", "item_users_", "pair_key_", "gap_key_"):
        assert np.array_equal(getattr(grown, name), getattr(whole, name)), name
    new = InteractionIndex.build(head).extend(Interactions.from_arrays([99], [77], [5]))
    assert (new.n_users, new.n_items) == (100, 78) and new.has_pair(np.array([99]), np.array([77]))[0]


def test_bad_ids_raise_a_clear_error():
    with pytest.raises(ValueError, match="users must be ids"):
        InteractionIndex.build(Interactions.from_arrays([-1], [0]))


def test_an_empty_index_answers_without_errors():
    index = InteractionIndex.build(Interactions.from_arrays([], []))
    rng = np.random.default_rng(0)
    assert (index.n_users, index.n_items, len(index)) == (0, 0, 0)
    assert set(index.sample_negatives(np.array([0, 3, 3]), rng, n_items=4).tolist()) <= {0, 1, 2, 3}
    items, _ = index.recent_items(np.array([0, 1]), 3)
    assert (items == -1).all()
    nb_users, nb_items, fallback = index.sample_neighbour_interactions(np.array([2]), np.array([[5, -1]]), np.array([0]), 4, rng, True)
    assert fallback.all() and (nb_users == 2).all() and (nb_items == 5).all()
    empty_users, empty_items = index.sample_neighbour_interactions(np.array([2]), np.array([[5]]), np.array([0]), 0, rng)
    assert empty_users.shape == empty_items.shape == (1, 0)
    assert len(index.extend(Interactions.from_arrays([1], [2]))) == 1
