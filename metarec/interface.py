"""The one interface every model implements, so the evaluation never special-cases one.

Ids are dense integers over the whole data set (history, stream and new users
share one id space), so a model meets ids it has never seen: in the stream
(users or items that first appear there) and for new users. What a model does
with an unseen id is its own paper's rule (mean + noise for ours, the
population prior for sRec, ...).

Protocol (docs/method.md §9), as the evaluation drives it:
- ``fit(history)`` once, offline.
- New users: ``score_new_users(recent, candidates)`` for each n: the model sees
  each new user's first n interactions and scores that user's candidates. It
  must not change the model: every n starts from the same fitted state.
- Stream: for each batch in time order, ``score(users, candidates)`` first, then
  ``observe(batch)``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np

if TYPE_CHECKING:
    from metarec.features import Features


@dataclass(frozen=True)
class Interactions:
    """Positive interactions as columns, sorted by (ts, user).

    users, items: int64 dense ids; ts: int64 seconds. All of one length.
    A user's rows of the same second are in their tie-break order (``data.tie_break``, decided in SQL when the
    data is prepared): every consumer keeps the row order among them (stable sorts on (user, ts) only), never
    re-sorts them by item.
    """

    users: np.ndarray
    items: np.ndarray
    ts: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.users)
        if len(self.items) != n or len(self.ts) != n:
            raise ValueError(f"Interactions columns differ in length: users {n}, items {len(self.items)}, ts {len(self.ts)}")

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_arrays(cls, users, items, ts=None) -> "Interactions":
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        ts = np.arange(len(users), dtype=np.int64) if ts is None else np.asarray(ts, dtype=np.int64)
        order = np.lexsort((users, ts))  # stable: same-second rows of a user keep the caller's order
        return cls(users[order], items[order], ts[order])

    def take(self, mask_or_index) -> "Interactions":
        return Interactions(self.users[mask_or_index], self.items[mask_or_index], self.ts[mask_or_index])

    @property
    def n_users(self) -> int:
        """1 + the largest user id (0 when empty)."""
        return int(self.users.max()) + 1 if len(self) else 0

    @property
    def n_items(self) -> int:
        return int(self.items.max()) + 1 if len(self) else 0


@dataclass(frozen=True)
class RecentItems:
    """Each new user's first n interactions, padded to a rectangle.

    users: (B,) ids the model has never seen (for seeding only);
    items: (B, n) item ids in chronological order; ts: (B, n) their times.
    """

    users: np.ndarray
    items: np.ndarray
    ts: np.ndarray


class StreamingRecommender(ABC):
    """Fit on history, adapt to a few new interactions, follow a stream."""

    name: str = "base"

    @abstractmethod
    def fit(self, history: Interactions, on_epoch: "OnEpoch | None" = None) -> "StreamingRecommender":
        """Train offline on the history. Returns self.

        ``on_epoch(passes, snapshot)`` is called after each full training pass (epoch) with the number of passes done
        (1, 2, ...) and a zero-argument callable building a separate copy of the model finished as ``fit`` finishes it,
        as if training had stopped there (the tuner scores it; see ``fitted_copy``). A model that trains in one go
        (Pop) never calls it. An exception it raises (a pruned trial) ends the fit.
        """

    @abstractmethod
    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Scores (B, C) of candidates (B, C) for existing users (B,) in the current state.

        Higher is better. Users the model has not seen are scored as the model's
        rule for unseen users says (never an error).
        """

    @abstractmethod
    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        """Scores (B, C) for new users who have shown only ``recent``. Does not change the model."""

    @abstractmethod
    def observe(self, batch: Interactions) -> None:
        """Update the model on a stream batch (after it has been scored)."""

    def set_features(self, features: "Features") -> None:
        """Side features of users and items keyed by dense id, given by the caller before ``fit`` (models read no files).

        Most models use none and ignore them; a model that does keeps them in its saved state.
        """

    def feature_report(self) -> dict | None:
        """What side features the fitted model uses, for run records: None for a model that never uses any, else
        ``{"uses_features": bool, "fallback": bool, "user_fields": [...], "item_fields": [...], "note": str}``."""
        return None

    def recommend(self, user: int, n: int = 10, exclude: np.ndarray | None = None, n_items: int | None = None) -> np.ndarray:
        """Top-n item ids for an existing user, best first, skipping ``exclude``."""
        n_items = n_items or self.n_items_
        candidates = np.arange(n_items, dtype=np.int64)[None, :]
        scores = self.score(np.array([user], dtype=np.int64), candidates)[0].astype(np.float64)
        if exclude is not None and len(exclude):
            scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
        top = np.argsort(-scores, kind="stable")[:n]
        return top[np.isfinite(scores[top])]

    n_items_: int = 0


Model = TypeVar("Model", bound=StreamingRecommender)
# (passes done, a callable building the model as if fit stopped after them) -> None
OnEpoch = Callable[[int, Callable[[], StreamingRecommender]], None]


def fitted_copy(model: Model, finish: Callable[[Model], None]) -> Callable[[], Model]:
    """A callable that builds a deep copy of ``model`` mid-fit and applies ``finish`` (fit's steps after its last epoch) to it.

    Lazy, so a pass nobody scores costs no copy; the copy shares nothing with the model, so scoring and observing it
    leave the ongoing fit untouched.
    """

    def build() -> Model:
        clone = copy.deepcopy(model)
        finish(clone)
        return clone

    return build
