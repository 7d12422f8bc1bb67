"""Pop: most popular items in the history, counts updated by the stream; and Pop (early).

The simplest model behind ``StreamingRecommender``; also the reference for
how a model meets ids it has never seen (an unseen item has count 0).

Pop (early) counts only users' first ``tasks.early_max`` interactions: a new
user with n shown items is asked for its (n+1)-th, an early item, and what users
take first differs from what they take later (issue 22: on ml-100k, popularity
over history positions < 5 scores NDCG@10 0.769 at n = 1 where all positions
score 0.572).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from metarec.models.common import check_ids
from metarec.config import Config
from metarec.interface import Interactions, OnEpoch, RecentItems, StreamingRecommender


class PopConfig(BaseModel):
    pass


class PopRecommender(StreamingRecommender):
    name = "pop"

    def __init__(self, config: PopConfig | None = None) -> None:
        self.config = config or PopConfig()
        self.counts_ = np.zeros(0, dtype=np.int64)

    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "PopRecommender":
        """Counts in one go: no epochs, so ``on_epoch`` is never called."""
        self.counts_ = np.bincount(history.items, minlength=history.n_items).astype(np.int64)
        self.n_items_ = len(self.counts_)
        return self

    def _item_scores(self, candidates: np.ndarray) -> np.ndarray:
        candidates = check_ids(self, "candidates", candidates)
        padded = np.zeros(max(int(candidates.max(initial=-1)) + 1, len(self.counts_)), dtype=np.float64)
        padded[: len(self.counts_)] = self.counts_
        return padded[candidates]

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return self._item_scores(candidates)

    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        return self._item_scores(candidates)

    def observe(self, batch: Interactions) -> None:
        grown = np.bincount(batch.items, minlength=max(len(self.counts_), batch.n_items))
        grown[: len(self.counts_)] += self.counts_
        self.counts_ = grown.astype(np.int64)
        self.n_items_ = len(self.counts_)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The fitted state as named arrays (saved as .npz without pickle by tasks/train/models.py)."""
        return {"counts_": self.counts_.copy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.counts_ = np.asarray(arrays["counts_"], dtype=np.int64)
        self.n_items_ = len(self.counts_)


class PopEarlyRecommender(PopRecommender):
    """Item counts over each user's first ``early_max`` interactions (positions 0 .. early_max - 1).

    ``fit``: the history users' first interactions, in the history's order (same-second rows in their
    tie-break order, ``Interactions``). ``observe`` follows the stream as Pop does, counting what is still
    early: a stream interaction counts when its user had fewer than ``early_max`` interactions before it
    (in the history, earlier batches or earlier in the batch), so a user first met in the stream adds
    their first ones and a long-standing user adds none. New users are scored alike (never changed).
    """

    name = "pop_early"

    def __init__(self, early_max: int = 10) -> None:
        super().__init__()
        if early_max < 1:
            raise ValueError(f"tasks.early_max must be >= 1, got {early_max}")
        self.early_max = int(early_max)
        self.seen_ = np.zeros(0, dtype=np.int64)  # interactions seen so far per user

    def fit(self, history: Interactions) -> "PopEarlyRecommender":
        self.counts_ = np.zeros(history.n_items, dtype=np.int64)
        self.seen_ = np.zeros(0, dtype=np.int64)
        self._count_early(history)
        return self

    def observe(self, batch: Interactions) -> None:
        self._count_early(batch)

    def _count_early(self, rows: Interactions) -> None:
        """Add the rows that are among their user's first early_max interactions, then count every row as seen."""
        users = np.asarray(rows.users, dtype=np.int64)
        n_users = max(len(self.seen_), rows.n_users)
        seen = np.zeros(n_users, dtype=np.int64)
        seen[: len(self.seen_)] = self.seen_
        order = np.lexsort((rows.ts, users))  # stable: per user in time, same-second rows in their given order
        by_user = users[order]
        starts = np.flatnonzero(np.r_[True, by_user[1:] != by_user[:-1]]) if len(by_user) else np.zeros(0, dtype=np.int64)
        rank_in_rows = np.arange(len(by_user)) - np.repeat(starts, np.diff(np.r_[starts, len(by_user)]))
        early = order[seen[by_user] + rank_in_rows < self.early_max]
        counts = np.zeros(max(len(self.counts_), rows.n_items), dtype=np.int64)
        counts[: len(self.counts_)] = self.counts_
        counts += np.bincount(rows.items[early], minlength=len(counts)).astype(np.int64)
        self.counts_, self.n_items_ = counts, len(counts)
        self.seen_ = seen + np.bincount(users, minlength=n_users)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"counts_": self.counts_.copy(), "seen_": self.seen_.copy(), "early_max": np.array([self.early_max])}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.seen_ = np.asarray(arrays["seen_"], dtype=np.int64)
        self.early_max = int(np.asarray(arrays["early_max"])[0])


def from_config(config: Config) -> PopRecommender:
    return PopRecommender()


def early_from_config(config: Config) -> PopEarlyRecommender:
    return PopEarlyRecommender(config.tasks.early_max)
