"""The protocol drives any model the same way: what it shows, in which order."""

from __future__ import annotations

import numpy as np

from metarec.models.pop import PopRecommender
from metarec.interface import Interactions, RecentItems, StreamingRecommender
from metarec.protocol import Cases, evaluate_new_users, evaluate_stream, first_interactions


class Spy(StreamingRecommender):
    """Scores the candidate it was told is next highest only if it has seen it in `observe`; logs calls."""

    name = "spy"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.seen: set[int] = set()

    def fit(self, history):
        return self

    def score(self, users, candidates):
        self.calls.append(("score", tuple(users.tolist())))
        return np.isin(candidates, list(self.seen)).astype(float)

    def score_new_users(self, recent: RecentItems, candidates):
        self.calls.append(("new", recent.items.copy()))
        return np.isin(candidates, recent.items).astype(float)

    def observe(self, batch):
        self.calls.append(("observe", tuple(batch.users.tolist())))
        self.seen.update(batch.items.tolist())


def _new_users():
    # users 10 and 11, each with items u*100 + 0..11 in time order
    users = np.repeat([10, 11], 12)
    items = np.concatenate([np.arange(12) + 1000, np.arange(12) + 1100])
    ts = np.tile(np.arange(12), 2) * 10 + np.repeat([0, 1], 12)
    inter = Interactions.from_arrays(users, items, ts)
    pos = np.array([int(i % 100) for i in inter.items])
    return inter, pos


def test_new_users_see_exactly_their_first_n_interactions():
    inter, pos = _new_users()
    recent = first_interactions(inter, pos, np.array([11, 10]), 5)
    assert recent.items.tolist() == [[1100, 1101, 1102, 1103, 1104], [1000, 1001, 1002, 1003, 1004]]

    negs = np.tile(np.arange(3), (4, 1))
    cases = Cases(np.array([10, 11, 10, 11]), np.array([1001, 1101, 1005, 1105]), negs, np.array([1, 1, 5, 5]), np.full(4, -1))
    spy = Spy()
    results = evaluate_new_users(spy, inter, pos, cases, n_items=1200, full_ranking=True)
    shown = [c[1] for c in spy.calls if c[0] == "new"]
    assert [items.shape[1] for items in shown] == [1, 1, 5, 5]  # sampled, then full ranking, per n
    assert all((items % 100 < items.shape[1]).all() for items in shown)  # never the item to predict
    # the spy ranks what it was shown on top; the true next item never was, so it only ties
    assert results[1].metrics["auc"].tolist() == [0.5, 0.5]
    assert set(results) == {1, 5} and len(results[5].metrics["full_hr"]) == 2


def test_stream_scores_each_batch_before_observing_it():
    stream = Interactions.from_arrays([1, 2, 1, 3], [7, 8, 9, 7], [0, 1, 2, 3])
    batch = np.array([0, 0, 1, 1])
    cases = Cases(stream.users, stream.items, np.array([[50, 51]] * 4), np.full(4, -1), batch)
    spy = Spy()
    results = evaluate_stream(spy, stream, batch, cases)
    assert [c[0] for c in spy.calls] == ["score", "observe", "score", "observe"]
    # batch 0 unseen when scored (all ties -> AUC 0.5); item 7 seen in batch 0 helps in batch 1
    assert results[0].metrics["auc"].tolist() == [0.5, 0.5]
    assert results[1].metrics["auc"].tolist() == [0.5, 1.0]


def test_pop_runs_through_both_protocols():
    inter, pos = _new_users()
    history = Interactions.from_arrays([0, 1, 2], [1000, 1000, 1101])
    model = PopRecommender().fit(history)
    cases = Cases(np.array([10, 11]), np.array([1001, 1101]), np.array([[1000, 5], [1000, 5]]), np.array([1, 1]), np.full(2, -1))
    res = evaluate_new_users(model, inter, pos, cases, n_items=1200)
    # counts: 1000 -> 2, 1101 -> 1, 1001 and 5 -> 0. User 10: below 1000, tied with 5; user 11: between.
    assert res[1].metrics["auc"].tolist() == [0.25, 0.5]


def test_stream_marks_users_seen_before_each_batch():
    stream = Interactions.from_arrays([1, 2, 2, 3], [7, 8, 9, 7], [0, 1, 2, 3])
    batch = np.array([0, 0, 1, 1])
    cases = Cases(stream.users, stream.items, np.array([[50, 51]] * 4), np.full(4, -1), batch)
    results = evaluate_stream(Spy(), stream, batch, cases, known_users=np.array([1]))
    assert results[0].extra["seen"].tolist() == [True, False]  # user 1 from history, user 2 new
    assert results[1].extra["seen"].tolist() == [True, False]  # user 2 seen in batch 0, user 3 new
