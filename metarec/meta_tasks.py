"""Meta-learning tasks from the history (docs/method.md §4), and the same support sets for serving (§6) and updates (§7).

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
that user had not interacted with by the task's time (``negatives="past"``,
the default): the support's by ts(v_{i-1}), the query's by ts(v_i). A task
thus sees no future, neither through its positives (§4's decision) nor its
negatives: avoiding the user's later positives too would tell the model which
items the user will come to like, something serving can never know (a new
user's negatives avoid only the items shown so far). ``negatives="history"``
avoids every positive of the whole history (docs/method.md §3 read literally, the
behaviour before this option existed).

Online tasks (§7, ``stream_tasks``) have R^K = the user's own k previous
interactions only (docs/method.md §11); adding neighbour interactions online is an
option (``neighbours=True``, ``tasks.online_neighbours``).

Everything is vectorised over tasks; the only Python loop is over fixed-size
chunks, which bounds memory. Same history, k, K, seed (and options) => the
same arrays, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Literal

import numpy as np

from metarec.interface import Interactions
from metarec.neighbours import InteractionIndex

CHUNK_TASKS = 65536  # part of the random stream's layout: changing it changes the sampled tasks
Negatives = Literal["past", "history"]  # what a task's negatives avoid (see the module doc)


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
    from the row's valid entries (docs/method.md §7: "sampled with repetition when u has fewer than k").

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
    shown: np.ndarray | None = None,
    negatives_until: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Support sets R^K for many users at once: (support_users, support_pos, support_neg), each (B, K).

    users (B,), own_items (B, k) all valid (see ``fill_own``), cutoff_ts (B,): neighbour
    interactions are drawn with ts <= cutoff. Negatives are uniform over [0, n_items) minus the
    triple user's positives in the index, and the own triples' negatives never one of the row's
    ``shown`` items (B, n) (-1 = padding; default the own items): a new user's items are unknown to
    the index, and all n it has shown, not only the k in its support, are its positives.
    ``negatives_until`` (B,): avoid only the positives each triple's user had by then (see
    ``InteractionIndex.sample_negatives``; None = all in the index). Used by ``build_tasks`` (§4),
    serving (§6) and online updates (§7) alike.
    """
    users = np.asarray(users, dtype=np.int64)
    own = np.asarray(own_items, dtype=np.int64)
    B, k = own.shape
    if k > K:
        raise ValueError(f"own items per task ({k}) must be <= K ({K})")
    shown = own if shown is None else np.asarray(shown, dtype=np.int64).reshape(B, -1)
    nb_users, nb_items = index.sample_neighbour_interactions(users, own, cutoff_ts, K - k, rng)
    s_users = np.concatenate([np.repeat(users[:, None], k, axis=1), nb_users], axis=1)
    s_pos = np.concatenate([own, nb_items], axis=1)
    until = None if negatives_until is None else np.asarray(negatives_until, dtype=np.int64)[:, None]  # one time per row
    own_neg = index.sample_negatives(s_users[:, :k], rng, n_items, exclude=np.repeat(shown[:, None, :], k, axis=1), until_ts=until)
    nb_neg = index.sample_negatives(nb_users, rng, n_items, exclude=nb_items[:, :, None], until_ts=until)
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
    negatives: Negatives = "past",
) -> TaskArrays:
    """Every task of docs/method.md §4 from the history, in memory (see ``iter_tasks`` for the arguments).

    Count: sum over users of max(0, m_u - k) (or the cap).
    """
    index, queries, rng = _plan(history, k, K, seed, max_tasks_per_user, shuffle, index)
    out = TaskArrays.allocate(len(queries), K)
    for start, part in _chunks(index, queries, k, K, rng, n_items, negatives):  # the output is filled in place
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
    negatives: Negatives = "past",
) -> Iterator[TaskArrays]:
    """The same tasks as ``build_tasks``, in the same order, as chunks of ``CHUNK_TASKS`` (bounded memory).

    ``shuffle`` orders the tasks by a seeded permutation, so any contiguous slice (a shard) is a
    uniform sample of tasks and an epoch streamed shard by shard needs no global shuffle; False
    keeps (user, position) order. ``max_tasks_per_user`` keeps a seeded sample of positions per
    user. ``n_items`` bounds negatives (default: the history's items); pass ``index`` to reuse one
    built on this history. ``negatives``: "past" avoids the positives a triple's user had by the
    task's time, "history" every positive of the history (see the module doc).
    """
    index, queries, rng = _plan(history, k, K, seed, max_tasks_per_user, shuffle, index)
    for _, part in _chunks(index, queries, k, K, rng, n_items, negatives):
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
    index: InteractionIndex, queries: np.ndarray, k: int, K: int, rng: np.random.Generator, n_items: int | None, negatives: Negatives
) -> Iterator[tuple[int, TaskArrays]]:
    for start in range(0, len(queries), CHUNK_TASKS):  # chunks bound the temporaries
        yield start, _tasks_at(index, queries[start : start + CHUNK_TASKS], k, K, rng, n_items, negatives)


def _check_negatives(negatives: str) -> None:
    if negatives not in ("past", "history"):
        raise ValueError(f"negatives must be 'past' or 'history', got {negatives!r}")


def _tasks_at(
    index: InteractionIndex, queries: np.ndarray, k: int, K: int, rng: np.random.Generator, n_items: int | None, negatives: Negatives
) -> TaskArrays:
    """Tasks whose query sits at ``queries`` in the by-user arrays (each with >= k rows of its user before it)."""
    _check_negatives(negatives)
    users = np.searchsorted(index.user_ptr_, queries, side="right") - 1
    own = index.user_items_[queries[:, None] - k + np.arange(k)[None, :]]
    cutoff = index.user_ts_[queries - 1]
    query_ts = index.user_ts_[queries]
    past = negatives == "past"
    s_users, s_pos, s_neg = support_sets(index, users, own, cutoff, K, rng, n_items, negatives_until=cutoff if past else None)
    q_pos = index.user_items_[queries]
    q_neg = index.sample_negatives(users, rng, n_items, until_ts=query_ts if past else None)
    return TaskArrays(s_users, s_pos, s_neg, users, q_pos, q_neg, query_ts)


def stream_tasks(
    index: InteractionIndex,
    batch: Interactions,
    k: int,
    K: int,
    rng: np.random.Generator,
    n_items: int | None = None,
    neighbours: bool = False,
    negatives: Negatives = "past",
) -> tuple[TaskArrays, np.ndarray]:
    """Tasks for online updates (docs/method.md §7): one per new interaction (u, v, t) of a user with a past.

    R^1 = (u, v); R^K = u's last k positives in ``index`` with ts < t (drawn with repetition when
    fewer): k triples (§7, §11). ``neighbours=True`` (a variant) adds K - k neighbour interactions
    with ts <= the last of them, as offline tasks have. Pass the index extended with the batch
    (``index.extend(batch)``), so a user's earlier interactions within the batch count as its
    past; negatives avoid the user's positives by the task's time ("past"; the support's by its
    last own item, the query's by t), or every positive in the index ("history"). Returns the
    tasks and the mask over the batch of interactions that formed one (a user with nothing before
    t forms none).
    """
    _check_negatives(negatives)
    width = K if neighbours else k
    users = np.asarray(batch.users, dtype=np.int64)
    ts = np.asarray(batch.ts, dtype=np.int64)
    recent, recent_ts = index.recent_items(users, k, before_ts=ts)
    kept = (recent >= 0).any(axis=1)
    if not kept.any():
        return TaskArrays.empty(width), kept
    users, recent, recent_ts = users[kept], recent[kept], recent_ts[kept]
    own = fill_own(recent, k, rng)
    cutoff = recent_ts.max(axis=1)
    past = negatives == "past"
    s_users, s_pos, s_neg = support_sets(index, users, own, cutoff, width, rng, n_items, negatives_until=cutoff if past else None)
    q_pos = np.asarray(batch.items, dtype=np.int64)[kept]
    q_neg = index.sample_negatives(users, rng, n_items, exclude=q_pos[:, None], until_ts=ts[kept] if past else None)
    return TaskArrays(s_users, s_pos, s_neg, users, q_pos, q_neg, ts[kept]), kept


def early_tasks(
    index: InteractionIndex,
    early_max: int,
    k: int,
    K: int,
    seed: int,
    n_items: int | None = None,
    negatives: Negatives = "past",
) -> TaskArrays:
    """Tasks that look like the test (``tasks.early_share``): for each user of the index and n in 1..early_max (while
    the user has an (n+1)-th interaction), support = the user's first n interactions as serving builds a new user's
    (the last k of them, drawn with repetition when n < k; ``fill_own``), plus K - k neighbour interactions when K > k,
    negatives avoiding all n shown items; query = the (n+1)-th interaction.

    The paper's tasks only ask for targets at positions >= k; a new user is asked for its 2nd ... (early_max+1)-th. The
    caller starts these tasks' users where a new user starts (``metarec.maml.StartRows``). Vectorised over tasks;
    same index and seed => the same arrays.
    """
    _check_negatives(negatives)
    if not 1 <= k <= K:
        raise ValueError(f"need 1 <= k <= K, got k={k}, K={K}")
    rng = np.random.default_rng([seed, 11])
    counts = np.minimum(np.diff(index.user_ptr_) - 1, early_max).clip(min=0)  # tasks per user: n = 1 .. min(early_max, m_u - 1)
    owners = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    if not len(owners):
        return TaskArrays.empty(K)
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    n_shown = np.arange(len(owners), dtype=np.int64) - first[owners] + 1  # n of each task
    start = index.user_ptr_[owners]
    cols = np.arange(early_max)[None, :]
    shown = np.where(cols < n_shown[:, None], index.user_items_[np.minimum(start[:, None] + cols, start[:, None] + n_shown[:, None] - 1)], -1)
    queries = start + n_shown
    cutoff = index.user_ts_[queries - 1]
    query_ts = index.user_ts_[queries]
    past = negatives == "past"
    own = fill_own(shown, k, rng)
    s_users, s_pos, s_neg = support_sets(index, owners, own, cutoff, K, rng, n_items, shown=shown, negatives_until=cutoff if past else None)
    q_neg = index.sample_negatives(owners, rng, n_items, until_ts=query_ts if past else None)
    return TaskArrays(s_users, s_pos, s_neg, owners, index.user_items_[queries], q_neg, query_ts)
