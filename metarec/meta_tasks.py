"""Meta-learning tasks from the history (METHOD.md §4), and the same support sets for serving (§6) and updates (§7).

A task t of user u at chronological position i > k (1-based, v_1 ... v_m):

- support R^K_t, K triples (user, positive, negative): columns 0..k-1 are u's
  own consecutive interactions v_{i-k} ... v_{i-1}, oldest first; columns
  k..K-1 are interactions of u's neighbours (other users who interacted with
  one of those k items) with ts <= ts(v_{i-1}), drawn by
  ``InteractionIndex.sample_neighbour_interactions`` (two hops, see there:
  neighbours are weighted by overlap, not uniform over the union);
- query R^1_t = (u, v_i, negative).

Every positive gets one negative, sampled for the user of its triple (a
neighbour's triple gets the neighbour's negative) uniformly from the items
that user never had as a positive anywhere in the history (the whole history,
as METHOD.md §3 and §4 say; only positives are restricted to the past).

Everything is vectorised over tasks; the only Python loop is over fixed-size
chunks, which bounds memory. Same history, k, K, seed (and options) => the
same arrays, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np

from metarec.interface import Interactions
from metarec.neighbours import InteractionIndex

CHUNK_TASKS = 65536  # part of the random stream's layout: changing it changes the sampled tasks


@dataclass(frozen=True)
class TaskArrays:
    """T tasks as int64 arrays. Support (T, K): columns < k the task user's own, the rest neighbours'."""

    support_users: np.ndarray  # (T, K)
    support_pos: np.ndarray  # (T, K)
    support_neg: np.ndarray  # (T, K)
    query_user: np.ndarray  # (T,)
    query_pos: np.ndarray  # (T,)
    query_neg: np.ndarray  # (T,)
    query_ts: np.ndarray  # (T,)

    def __post_init__(self) -> None:
        t = len(self.query_user)
        for f in fields(self):
            value = getattr(self, f.name)
            want = 2 if f.name.startswith("support") else 1
            if value.ndim != want or len(value) != t:
                raise ValueError(f"TaskArrays.{f.name}: expected {want}-d with {t} rows, got shape {value.shape}")
        if self.support_pos.shape != self.support_users.shape or self.support_neg.shape != self.support_users.shape:
            raise ValueError(f"TaskArrays support shapes differ: {self.support_users.shape}, {self.support_pos.shape}, {self.support_neg.shape}")

    def __len__(self) -> int:
        return len(self.query_user)

    @property
    def K(self) -> int:
        return self.support_users.shape[1]

    def take(self, index) -> "TaskArrays":
        return TaskArrays(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concat(cls, parts: list["TaskArrays"]) -> "TaskArrays":
        if not parts:
            raise ValueError("TaskArrays.concat needs at least one part")
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    @classmethod
    def allocate(cls, T: int, K: int) -> "TaskArrays":
        """Uninitialised arrays for T tasks, to fill with ``put``."""
        return cls(**{f.name: np.empty((T, K) if f.name.startswith("support") else T, np.int64) for f in fields(cls)})

    @classmethod
    def empty(cls, K: int) -> "TaskArrays":
        return cls.allocate(0, K)

    def put(self, index, part: "TaskArrays") -> None:
        """Write ``part`` into rows ``index`` (the arrays are mutable; the dataclass only fixes which arrays)."""
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(part, f.name)


def fill_own(own_items: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(B, k) own items: the valid (>= 0) entries in order, then -1 slots filled by draws with repetition
    from the row's valid entries (METHOD.md §7: "sampled with repetition when u has fewer than k").

    own_items: (B, j), left-aligned as ``InteractionIndex.recent_items`` returns them; the last k valid
    entries are kept when j > k. Rows without any valid entry raise (no task can be formed).
    """
    own = np.asarray(own_items, dtype=np.int64)
    if own.ndim != 2:
        raise ValueError(f"own_items must be (B, j), got shape {own.shape}")
    n_valid = (own >= 0).sum(axis=1)
    if len(own) and n_valid.min() == 0:
        raise ValueError(f"row {int(np.argmin(n_valid))} of own_items has no item (all -1); drop users without history first")
    # valid entries to the front in order, then keep the last k of them
    packed = np.take_along_axis(own, np.argsort(own < 0, axis=1, kind="stable"), axis=1)
    width = max(packed.shape[1], k)
    packed = np.pad(packed, ((0, 0), (0, width - packed.shape[1])), constant_values=-1)
    start = np.maximum(n_valid - k, 0)
    cols = start[:, None] + np.arange(k)[None, :]
    out = np.take_along_axis(packed, np.minimum(cols, width - 1), axis=1)
    short = cols >= n_valid[:, None]
    draw = np.floor(rng.random(out.shape) * np.maximum(n_valid, 1)[:, None]).astype(np.int64)
    return np.where(short, np.take_along_axis(packed, draw, axis=1), out)


def support_sets(
    index: InteractionIndex,
    users: np.ndarray,
    own_items: np.ndarray,
    cutoff_ts: np.ndarray,
    K: int,
    rng: np.random.Generator,
    n_items: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Support sets R^K for many users at once: (support_users, support_pos, support_neg), each (B, K).

    users (B,), own_items (B, k) all valid (see ``fill_own``), cutoff_ts (B,): neighbour
    interactions are drawn with ts <= cutoff. Negatives are uniform over [0, n_items) minus the
    triple user's positives in the index, and also never one of the row's own items (which a new
    user's recent items, unknown to the index, need). Used by ``build_tasks`` (§4), serving (§6) and
    online updates (§7) alike.
    """
    users = np.asarray(users, dtype=np.int64)
    own = np.asarray(own_items, dtype=np.int64)
    B, k = own.shape
    if k > K:
        raise ValueError(f"own items per task ({k}) must be <= K ({K})")
    nb_users, nb_items = index.sample_neighbour_interactions(users, own, cutoff_ts, K - k, rng)
    s_users = np.concatenate([np.repeat(users[:, None], k, axis=1), nb_users], axis=1)
    s_pos = np.concatenate([own, nb_items], axis=1)
    own_neg = index.sample_negatives(s_users[:, :k], rng, n_items, exclude=np.repeat(own[:, None, :], k, axis=1))
    nb_neg = index.sample_negatives(nb_users, rng, n_items, exclude=nb_items[:, :, None])
    return s_users, s_pos, np.concatenate([own_neg, nb_neg], axis=1)


def task_positions(index: InteractionIndex, k: int, max_tasks_per_user: int | None, rng: np.random.Generator) -> np.ndarray:
    """Positions (in the index's by-user arrays) of every task's query v_i: each user's rows k .. m_u - 1 (0-based).

    ``max_tasks_per_user`` keeps a seeded uniform sample of that many positions per user (not the
    most recent ones, so a capped user's tasks still span its whole timeline). Sorted.
    """
    counts = np.maximum(np.diff(index.user_ptr_) - k, 0)
    owners = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64) if len(counts) else np.zeros(0, np.int64)
    queries = index.user_ptr_[owners] + k + (np.arange(len(owners), dtype=np.int64) - first[owners])
    if max_tasks_per_user is not None:
        order = np.lexsort((rng.random(len(owners)), owners))
        rank = np.empty(len(owners), dtype=np.int64)
        rank[order] = np.arange(len(owners)) - first[owners[order]]
        queries = queries[rank < max_tasks_per_user]
    return queries


def build_tasks(
    history: Interactions,
    k: int,
    K: int,
    seed: int,
    max_tasks_per_user: int | None = None,
    shuffle: bool = True,
    n_items: int | None = None,
    index: InteractionIndex | None = None,
) -> TaskArrays:
    """Every task of METHOD.md §4 from the history, in memory (see ``iter_tasks`` for the arguments).

    Count: sum over users of max(0, m_u - k) (or the cap).
    """
    index, queries, rng = _plan(history, k, K, seed, max_tasks_per_user, shuffle, index)
    out = TaskArrays.allocate(len(queries), K)
    for start, part in _chunks(index, queries, k, K, rng, n_items):  # the output is filled in place
        out.put(slice(start, start + len(part)), part)
    return out


def iter_tasks(
    history: Interactions,
    k: int,
    K: int,
    seed: int,
    max_tasks_per_user: int | None = None,
    shuffle: bool = True,
    n_items: int | None = None,
    index: InteractionIndex | None = None,
) -> Iterator[TaskArrays]:
    """The same tasks as ``build_tasks``, in the same order, as chunks of ``CHUNK_TASKS`` (bounded memory).

    ``shuffle`` orders the tasks by a seeded permutation, so any contiguous slice (a shard) is a
    uniform sample of tasks and an epoch streamed shard by shard needs no global shuffle; False
    keeps (user, position) order. ``max_tasks_per_user`` keeps a seeded sample of positions per
    user. ``n_items`` bounds negatives (default: the history's items); pass ``index`` to reuse one
    built on this history.
    """
    index, queries, rng = _plan(history, k, K, seed, max_tasks_per_user, shuffle, index)
    for _, part in _chunks(index, queries, k, K, rng, n_items):
        yield part


def count_tasks(history: Interactions, k: int, max_tasks_per_user: int | None = None) -> int:
    """How many tasks ``build_tasks`` makes, without building them."""
    counts = np.bincount(np.asarray(history.users, dtype=np.int64)) if len(history) else np.zeros(0, np.int64)
    per_user = np.maximum(counts - k, 0)
    return int(np.minimum(per_user, max_tasks_per_user).sum() if max_tasks_per_user is not None else per_user.sum())


def _plan(
    history: Interactions,
    k: int,
    K: int,
    seed: int,
    max_tasks_per_user: int | None,
    shuffle: bool,
    index: InteractionIndex | None,
) -> tuple[InteractionIndex, np.ndarray, np.random.Generator]:
    """The index, the query positions in output order, and the generator the sampling continues with."""
    if not 1 <= k <= K:
        raise ValueError(f"need 1 <= k <= K, got k={k}, K={K}")
    index = InteractionIndex.build(history) if index is None else index
    rng = np.random.default_rng(seed)
    queries = task_positions(index, k, max_tasks_per_user, rng)
    if shuffle:
        queries = queries[rng.permutation(len(queries))]
    return index, queries, rng


def _chunks(
    index: InteractionIndex, queries: np.ndarray, k: int, K: int, rng: np.random.Generator, n_items: int | None
) -> Iterator[tuple[int, TaskArrays]]:
    for start in range(0, len(queries), CHUNK_TASKS):  # chunks bound the temporaries
        yield start, _tasks_at(index, queries[start : start + CHUNK_TASKS], k, K, rng, n_items)


def _tasks_at(index: InteractionIndex, queries: np.ndarray, k: int, K: int, rng: np.random.Generator, n_items: int | None) -> TaskArrays:
    """Tasks whose query sits at ``queries`` in the by-user arrays (each with >= k rows of its user before it)."""
    users = np.searchsorted(index.user_ptr_, queries, side="right") - 1
    own = index.user_items_[queries[:, None] - k + np.arange(k)[None, :]]
    cutoff = index.user_ts_[queries - 1]
    s_users, s_pos, s_neg = support_sets(index, users, own, cutoff, K, rng, n_items)
    q_pos = index.user_items_[queries]
    q_neg = index.sample_negatives(users, rng, n_items)
    return TaskArrays(s_users, s_pos, s_neg, users, q_pos, q_neg, index.user_ts_[queries])


def stream_tasks(
    index: InteractionIndex,
    batch: Interactions,
    k: int,
    K: int,
    rng: np.random.Generator,
    n_items: int | None = None,
) -> tuple[TaskArrays, np.ndarray]:
    """Tasks for online updates (METHOD.md §7): one per new interaction (u, v, t) of a user with a past.

    R^1 = (u, v); R^K = u's last k positives in ``index`` with ts < t (drawn with repetition when
    fewer) plus neighbour interactions with ts <= the last of them. Pass the index extended with
    the batch (``index.extend(batch)``), so a user's earlier interactions within the batch count
    as its past and negatives avoid the batch's positives. Returns the tasks and the mask over
    the batch of interactions that formed one (a user with nothing before t forms none).
    """
    users = np.asarray(batch.users, dtype=np.int64)
    ts = np.asarray(batch.ts, dtype=np.int64)
    recent, recent_ts = index.recent_items(users, k, before_ts=ts)
    kept = (recent >= 0).any(axis=1)
    if not kept.any():
        return TaskArrays.empty(K), kept
    users, recent, recent_ts = users[kept], recent[kept], recent_ts[kept]
    own = fill_own(recent, k, rng)
    cutoff = recent_ts.max(axis=1)
    s_users, s_pos, s_neg = support_sets(index, users, own, cutoff, K, rng, n_items)
    q_pos = np.asarray(batch.items, dtype=np.int64)[kept]
    q_neg = index.sample_negatives(users, rng, n_items, exclude=q_pos[:, None])
    return TaskArrays(s_users, s_pos, s_neg, users, q_pos, q_neg, ts[kept]), kept
