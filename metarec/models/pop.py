"""Pop: most popular items in the history, counts updated by the stream.

The simplest model behind ``StreamingRecommender``; also the reference for
how a model meets ids it has never seen (an unseen item has count 0).
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
        """The fitted state as named arrays (saved as .npz without pickle by tasks/models.py)."""
        return {"counts_": self.counts_.copy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.counts_ = np.asarray(arrays["counts_"], dtype=np.int64)
        self.n_items_ = len(self.counts_)


def from_config(config: Config) -> PopRecommender:
    return PopRecommender()
