"""The evaluation protocol of docs/method.md §9, driving any ``StreamingRecommender``.

- New users: for each n, every model sees each new user's first n interactions
  and ranks the (n+1)-th against its stored negatives; the same users for every
  n. Beside the sampled metrics, the full-ranking ones: the positive against
  every item the user never interacted with (Krichene & Rendle, KDD 2020).
- Existing users: per stream batch in time order, the model first ranks each
  interaction of the batch against its stored negatives, then observes it.

Every function returns per-case arrays; means and CIs are the caller's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from metarec.interface import Interactions, RecentItems, StreamingRecommender
from metarec.metrics import case_metrics, full_ranking_metrics

logger = logging.getLogger(__name__)

FULL_RANKING_CHUNK = 256  # new users scored against all items at once


@dataclass(frozen=True)
class Cases:
    """Stored evaluation cases of one kind: users (B,), items (B,) true next items, negatives (B, N),
    n (B,) interactions shown first (new users) and batch (B,) (stream)."""

    users: np.ndarray
    items: np.ndarray
    negatives: np.ndarray
    n: np.ndarray
    batch: np.ndarray

    def take(self, mask: np.ndarray) -> "Cases":
        return Cases(self.users[mask], self.items[mask], self.negatives[mask], self.n[mask], self.batch[mask])

    @property
    def candidates(self) -> np.ndarray:
        """(B, 1 + N): the true item first, as the metrics expect."""
        return np.concatenate([self.items[:, None], self.negatives], axis=1)


@dataclass
class CaseResults:
    """Per-case metrics of one group of cases, plus how long the model took."""

    users: np.ndarray
    metrics: dict[str, np.ndarray]
    seconds: float
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def first_interactions(new_users: Interactions, pos: np.ndarray, users: np.ndarray, n: int) -> RecentItems:
    """Each user's first n interactions (by pos) as a (B, n) rectangle, in the order of ``users``."""
    shown = pos < n
    rows = np.flatnonzero(shown & np.isin(new_users.users, users))
    order = np.lexsort((pos[rows], new_users.users[rows]))
    rows = rows[order]
    by_user = new_users.users[rows].reshape(-1, n)
    if by_user.shape[0] != len(np.unique(users)) or (by_user != by_user[:, :1]).any():
        raise ValueError(f"every evaluated new user needs at least {n} interactions before its test item")
    lookup = {u: i for i, u in enumerate(by_user[:, 0])}
    take = np.array([lookup[u] for u in users.tolist()], dtype=np.int64)
    return RecentItems(
        users=users.astype(np.int64),
        items=new_users.items[rows].reshape(-1, n)[take],
        ts=new_users.ts[rows].reshape(-1, n)[take],
    )


def evaluate_new_users(
    model: StreamingRecommender,
    new_users: Interactions,
    pos: np.ndarray,
    cases: Cases,
    n_items: int,
    full_ranking: bool = True,
) -> dict[int, CaseResults]:
    """For each n among the cases: sampled (and full-ranking) metrics of the (n+1)-th item."""
    results: dict[int, CaseResults] = {}
    for n in sorted(np.unique(cases.n).tolist()):
        group = cases.take(cases.n == n)
        start = time.perf_counter()
        recent = first_interactions(new_users, pos, group.users, n)
        scores = model.score_new_users(recent, group.candidates)
        metrics = case_metrics(scores)
        if full_ranking:
            metrics.update({f"full_{k}": v for k, v in _full_ranking_new(model, new_users, recent, group, n_items).items()})
        results[n] = CaseResults(group.users, metrics, time.perf_counter() - start)
        logger.info("new users n=%d: %d cases, HR@10 %.4f", n, len(group.users), metrics["hr"].mean())
    return results


def _full_ranking_new(model: StreamingRecommender, new_users: Interactions, recent: RecentItems, group: Cases, n_items: int) -> dict[str, np.ndarray]:
    """Rank the true item against all items the user never interacted with (anywhere)."""
    everything = np.arange(n_items, dtype=np.int64)
    hr, ndcg = [], []
    for start in range(0, len(group.users), FULL_RANKING_CHUNK):
        rows = slice(start, start + FULL_RANKING_CHUNK)
        chunk_recent = RecentItems(recent.users[rows], recent.items[rows], recent.ts[rows])
        b = len(chunk_recent.users)
        scores = model.score_new_users(chunk_recent, np.broadcast_to(everything, (b, n_items))).astype(np.float64)
        positive = scores[np.arange(b), group.items[rows]]
        interacted = np.isin(new_users.users, chunk_recent.users)
        row_of = {u: i for i, u in enumerate(chunk_recent.users.tolist())}
        user_rows = np.array([row_of[u] for u in new_users.users[interacted].tolist()], dtype=np.int64)
        scores[user_rows, new_users.items[interacted]] = -np.inf  # includes the true item itself
        metrics = full_ranking_metrics(positive, scores)
        hr.append(metrics["hr"])
        ndcg.append(metrics["ndcg"])
    return {"hr": np.concatenate(hr), "ndcg": np.concatenate(ndcg)}


def evaluate_stream(
    model: StreamingRecommender, stream: Interactions, stream_batch: np.ndarray, cases: Cases, known_users: np.ndarray | None = None
) -> dict[int, CaseResults]:
    """Per batch in time order: score the batch's cases first, then observe the batch.

    ``extra["seen"]`` marks cases whose user the model had seen (in ``known_users``, e.g. the
    history's, or an earlier batch) before scoring: the existing users whose drift the stream
    tests, apart from users who appear for the first time.
    """
    results: dict[int, CaseResults] = {}
    seen_users = set(np.unique(known_users).tolist()) if known_users is not None else set()
    for b in sorted(np.unique(stream_batch).tolist()):
        group = cases.take(cases.batch == b)
        seen = np.fromiter((u in seen_users for u in group.users.tolist()), dtype=bool, count=len(group.users))
        seen_users.update(np.unique(stream.users[stream_batch == b]).tolist())
        start = time.perf_counter()
        scores = model.score(group.users, group.candidates) if len(group.users) else np.zeros((0, 1 + cases.negatives.shape[1]))
        scored = time.perf_counter()
        model.observe(stream.take(stream_batch == b))
        metrics = case_metrics(scores) if len(group.users) else {"hr": np.zeros(0), "ndcg": np.zeros(0), "auc": np.zeros(0)}
        results[b] = CaseResults(group.users, metrics, time.perf_counter() - start, {"update_seconds": np.array([time.perf_counter() - scored]), "seen": seen})
        logger.info("stream batch %d: %d cases, AUC %.4f", b, len(group.users), metrics["auc"].mean() if len(group.users) else float("nan"))
    return results
