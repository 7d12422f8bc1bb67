"""Planted data where the right answer is known: users in latent taste groups whose taste switches.

Items are split into ``n_groups`` genres. Each user starts in one genre and, at
a random point of its timeline, switches to another, after which its
interactions come from the new genre (with a little noise). A model that
follows a user's most recent interactions ranks the next item well; one that
only remembers the user's whole past does not. Used by tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from metarec.interface import Interactions

if TYPE_CHECKING:
    from metarec.features import Features


@dataclass(frozen=True)
class PlantedData:
    interactions: Interactions
    item_group: np.ndarray  # (n_items,) genre of each item
    user_groups: np.ndarray  # (n_users, 2) genre before and after the switch
    switch_at: np.ndarray  # (n_users,) index in the user's timeline where the taste switches


def planted_interactions(
    n_users: int = 300,
    n_items: int = 200,
    n_groups: int = 5,
    per_user: int = 40,
    noise: float = 0.05,
    switch_prob: float = 1.0,
    seed: int = 0,
) -> PlantedData:
    """Every user has ``per_user`` distinct items, chronologically interleaved with other users'."""
    if per_user * 2 > n_items:
        raise ValueError(f"per_user ({per_user}) must be at most half of n_items ({n_items})")
    rng = np.random.default_rng(seed)
    item_group = np.arange(n_items) % n_groups
    by_group = [np.flatnonzero(item_group == g) for g in range(n_groups)]
    # popularity within a genre is skewed, as in real data
    weights = [1.0 / np.arange(1, len(items) + 1) ** 0.8 for items in by_group]

    first = rng.integers(0, n_groups, n_users)
    second = (first + rng.integers(1, n_groups, n_users)) % n_groups
    switches = rng.random(n_users) < switch_prob
    second = np.where(switches, second, first)
    switch_at = rng.integers(per_user // 4, 3 * per_user // 4, n_users)

    users, items = [], []
    for u in range(n_users):  # data generation only, a few hundred users
        seen: set[int] = set()
        for position in range(per_user):
            group = first[u] if position < switch_at[u] else second[u]
            if rng.random() < noise:
                group = rng.integers(0, n_groups)
            pool = by_group[group]
            p = weights[group] / weights[group].sum()
            for _ in range(50):
                item = int(rng.choice(pool, p=p))
                if item not in seen:
                    break
            else:
                item = int(rng.choice([i for i in range(n_items) if i not in seen]))
            seen.add(item)
            users.append(u)
            items.append(item)

    users_arr = np.asarray(users, dtype=np.int64)
    # each user's timeline is spread over the same global time span, so users interleave
    start = rng.integers(0, 1000, n_users)
    steps = rng.integers(1, 100, len(users_arr))
    ts = np.empty(len(users_arr), dtype=np.int64)
    for u in range(n_users):
        rows = slice(u * per_user, (u + 1) * per_user)
        ts[rows] = start[u] + np.cumsum(steps[rows])
    return PlantedData(
        Interactions.from_arrays(users_arr, np.asarray(items), ts),
        item_group,
        np.stack([first, second], axis=1),
        switch_at,
    )


@dataclass(frozen=True)
class PlantedFeatureData:
    interactions: Interactions
    features: "Features"
    item_group: np.ndarray  # (n_items,) genre of each item, also its "genre" feature
    user_group: np.ndarray  # (n_users,) the one genre each user likes


def planted_feature_interactions(
    n_users: int = 300,
    n_items: int = 120,
    n_groups: int = 4,
    per_user: int = 20,
    noise: float = 0.05,
    seed: int = 0,
) -> PlantedFeatureData:
    """Taste is a genre, and the genre is an item feature: each user likes one genre for good.

    Items carry a "genre" field (their group) and a "decade" field drawn at random (uninformative);
    users carry a "region" field drawn at random (uninformative: the profile does not tell the taste).
    So a few shown items reveal a new user's genre through their features, and a model that adapts to
    them can rank that genre first; a model that does not adapt can only rank for the population.
    """
    from metarec.features import Features, FeatureTable

    if per_user * n_groups > n_items:
        raise ValueError(f"per_user ({per_user}) x n_groups ({n_groups}) must be at most n_items ({n_items})")
    rng = np.random.default_rng(seed)
    item_group = np.arange(n_items) % n_groups
    by_group = [np.flatnonzero(item_group == g) for g in range(n_groups)]
    user_group = rng.integers(0, n_groups, n_users)
    users, items = [], []
    for u in range(n_users):  # data generation only
        genre = np.where(rng.random(per_user) < noise, rng.integers(0, n_groups, per_user), user_group[u])
        chosen: list[int] = []
        for g in genre:
            pool = np.setdiff1d(by_group[g], chosen)
            pool = pool if len(pool) else np.setdiff1d(np.arange(n_items), chosen)
            chosen.append(int(rng.choice(pool)))
        users += [u] * per_user
        items += chosen
    users_arr = np.asarray(users, dtype=np.int64)
    # each user's timeline spans the same global period, so users interleave
    ts = (rng.integers(0, 1000, n_users)[:, None] + np.cumsum(rng.integers(1, 50, (n_users, per_user)), axis=1)).ravel()
    decade = rng.integers(0, 5, n_items)
    region = rng.integers(0, 6, n_users)
    item_table = FeatureTable.from_long(
        np.r_[np.arange(n_items), np.arange(n_items)], np.r_[item_group, n_groups + decade],
        np.r_[np.zeros(n_groups, np.int64), np.ones(5, np.int64)], ("genre", "decade"), n_items,
    )
    user_table = FeatureTable.from_long(np.arange(n_users), region, np.zeros(6, np.int64), ("region",), n_users)
    return PlantedFeatureData(Interactions.from_arrays(users_arr, np.asarray(items), ts), Features(user_table, item_table), item_group, user_group)


# ---------------------------------------------------------------------------------------------------------------------
# Planted interest drift at MovieLens-1M scale: a data set the whole pipeline runs on (``tasks/data/generated.py`` writes it
# in ML-1M's native format as the named data set ``synthetic-drift``).

ML1M_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
               "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
ML1M_START, ML1M_END = 956_703_932, 1_046_454_590  # the first and last timestamps of ML-1M's ratings.dat


@dataclass(frozen=True)
class DriftParams:
    """What ``drift_ratings`` generates (defaults: ML-1M's sizes). Every field is recorded in the data set's SOURCE.md.

    - ``n_users``, ``n_items``: ML-1M has 6,040 users and 3,706 rated movies.
    - ``n_groups``: item groups (genres), one per item, of equal size; ML-1M's 18 genre names label them.
    - ``mean_ratings``, ``min_ratings``: ratings per user, min + a log-normal (σ = 1) with this mean (ML-1M: 165.6 and
      20), capped at ``max_item_share`` of the items.
    - ``favourite_groups``: each user's interest moves among this many groups of its own (a long-term taste).
    - ``mean_run``: interactions per interest, on average: after each interaction the interest switches to another of
      the user's favourite groups with probability 1 / mean_run (so switches happen at random times, new users'
      first ten interactions included).
    - ``noise``: share of interactions drawn from a random other group (the user's off-interest views). A heavy user
      who has had every item of a group it is drawn to takes one of a random group instead (at ML-1M's size this
      adds about 5% off-interest ratings).
    - ``popularity_exponent``: item popularity ∝ 1 / rank^a (a random rank per item); within a group a user takes
      items in a popularity-weighted order without repeats, so after a switch the next item is one of the new group's
      popular items the user has not had.
    - ``positive_share``, ``noise_positive_share``: the share of on-interest / off-interest interactions rated 3-5 (a
      positive at the pipeline's default threshold); the others are rated 1-2 and dropped as not interacted.
    - ``median_active_days``: a user's ratings spread over a log-normal number of days with this median, starting
      uniformly in ML-1M's time span (and ending inside it), so the pipeline's 90% time cut leaves existing users
      mid-timeline in the stream.
    - ``seed``: everything is drawn from ``numpy.random.default_rng(seed)``.
    """

    n_users: int = 6040
    n_items: int = 3706
    n_groups: int = 18
    mean_ratings: float = 165.6
    min_ratings: int = 20
    max_item_share: float = 0.5
    favourite_groups: int = 3
    mean_run: float = 20.0
    noise: float = 0.1
    popularity_exponent: float = 0.9
    positive_share: float = 0.9
    noise_positive_share: float = 0.35
    median_active_days: float = 60.0
    seed: int = 20240611

    def __post_init__(self) -> None:
        if not 2 <= self.favourite_groups <= self.n_groups:
            raise ValueError(f"favourite_groups must be in [2, n_groups={self.n_groups}], got {self.favourite_groups}")
        if self.n_items < self.n_groups or self.min_ratings < 2 or self.mean_ratings <= self.min_ratings:
            raise ValueError(f"need n_items >= n_groups, min_ratings >= 2 and mean_ratings > min_ratings, got {self}")
        if self.min_ratings > self.max_item_share * self.n_items or self.mean_run < 1:
            raise ValueError(f"min_ratings must fit in max_item_share of the items and mean_run must be >= 1, got {self}")


@dataclass(frozen=True)
class DriftRatings:
    """Rating events sorted by (user, ts): ids 1-based as in ML-1M's files.

    interest (T,): the group the user's interest was on at each rating (the planted truth); drawn_group (T,): the group
    the item was taken from (= interest unless the rating is noise); switch (T,): the rating opens a new interest run.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    ts: np.ndarray
    interest: np.ndarray
    drawn_group: np.ndarray
    switch: np.ndarray
    item_group: np.ndarray  # (n_items,) group of item id - 1
    popularity: np.ndarray  # (n_items,) the planted popularity weight of item id - 1
    user_attributes: np.ndarray  # (n_users, 4): gender (0 = F, 1 = M), age code, occupation, zip code


def _within(owner: np.ndarray) -> np.ndarray:
    """For entries grouped by a sorted owner array: each entry's 0-based position inside its owner's block."""
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    counts = np.diff(np.r_[starts, len(owner)])
    return np.arange(len(owner)) - np.repeat(starts, counts)


def drift_ratings(params: DriftParams = DriftParams()) -> DriftRatings:
    """Ratings whose next positive follows the user's current interest, which switches group at random times.

    Vectorised over all users and ratings (a few seconds at ML-1M's size). See ``DriftParams`` for the process.
    """
    p = params
    rng = np.random.default_rng(p.seed)
    U, N, G, F = p.n_users, p.n_items, p.n_groups, p.favourite_groups
    item_group = rng.permutation(np.arange(N) % G)
    popularity = 1.0 / (rng.permutation(N) + 1.0) ** p.popularity_exponent
    group_size = np.bincount(item_group, minlength=G)

    # ratings per user, and each rating's owner and position in its user's timeline
    spread = rng.lognormal(np.log(p.mean_ratings - p.min_ratings) - 0.5, 1.0, U)
    counts = np.minimum(p.min_ratings + np.round(spread).astype(np.int64), int(p.max_item_share * N))
    owner = np.repeat(np.arange(U), counts)
    position = _within(owner)
    T = len(owner)

    # the interest: runs over each user's favourite groups, a switch after each rating with probability 1 / mean_run
    favourites = np.argsort(rng.random((U, G)), axis=1)[:, :F]
    switch = (rng.random(T) < 1.0 / p.mean_run) & (position > 0)
    step = np.where(switch, 1 + rng.integers(0, F - 1, T), 0)  # to another favourite, never the same one
    start_slot = rng.integers(0, F, U)
    cumulative = np.cumsum(step)
    before_user = np.repeat(cumulative[np.r_[0, np.cumsum(counts)[:-1]]] - step[np.r_[0, np.cumsum(counts)[:-1]]], counts)
    interest = favourites[owner, (start_slot[owner] + cumulative - before_user) % F]

    # the group each item is drawn from: the interest, or a random other group for noise
    noisy = rng.random(T) < p.noise
    other = (interest + 1 + rng.integers(0, G - 1, T)) % G
    drawn = np.where(noisy, other, interest)
    drawn = _fit_groups(drawn, owner, group_size, rng)

    # each user takes a group's items in its own popularity-weighted order without repeats (Gumbel top-k per group)
    rank = _rank_in_group(owner, drawn)
    items = _personal_items(owner, drawn, rank, item_group, popularity, rng)

    positive = rng.random(T) < np.where((drawn == interest) & ~noisy, p.positive_share, p.noise_positive_share)
    ratings = np.where(positive, rng.choice([3, 4, 5], T, p=[0.25, 0.4, 0.35]), rng.choice([1, 2], T, p=[0.4, 0.6]))
    ts = _timestamps(owner, position, counts, p, rng)
    attributes = np.stack([rng.random(U) < 0.72, rng.choice([1, 18, 25, 35, 45, 50, 56], U), rng.integers(0, 21, U),
                           rng.integers(10_000, 100_000, U)], axis=1).astype(np.int64)
    return DriftRatings(owner + 1, items + 1, ratings.astype(np.int64), ts, interest, drawn, switch, item_group, popularity, attributes)


def _rank_in_group(owner: np.ndarray, group: np.ndarray) -> np.ndarray:
    """How many earlier ratings of the same user were drawn from the same group (ratings are in timeline order)."""
    key = (owner * (int(group.max()) + 1) + group) * len(owner) + np.arange(len(owner))  # unique: one sort, no ties
    order = np.argsort(key)
    rank = np.empty(len(owner), dtype=np.int64)
    rank[order] = _within((key[order] // len(owner)))
    return rank


def _fit_groups(drawn: np.ndarray, owner: np.ndarray, group_size: np.ndarray, rng: np.random.Generator, rounds: int = 50) -> np.ndarray:
    """Ratings that would need more of a group's items than it has (a heavy user) are redrawn from a random group."""
    drawn = drawn.copy()
    for _ in range(rounds):
        over = np.flatnonzero(_rank_in_group(owner, drawn) >= group_size[drawn])
        if not len(over):
            return drawn
        drawn[over] = rng.integers(0, len(group_size), len(over))
    raise ValueError("drift_ratings: could not fit every user's ratings into the groups; lower max_item_share")


def _personal_items(owner, drawn, rank, item_group, popularity, rng: np.random.Generator, chunk: int = 1024) -> np.ndarray:
    """The rank-th item of group ``drawn`` in the user's own order of that group: by log popularity + Gumbel noise,
    best first (the order of drawing without replacement in proportion to popularity). Users in chunks: bounded memory."""
    G = int(item_group.max()) + 1
    members = [np.flatnonzero(item_group == g) for g in range(G)]
    log_pop = [np.log(popularity[m]).astype(np.float32) for m in members]
    items = np.empty(len(owner), dtype=np.int64)
    n_users = int(owner.max()) + 1
    bounds = np.searchsorted(owner, np.arange(0, n_users + chunk, chunk))
    for c, first in enumerate(range(0, n_users, chunk)):
        rows = np.arange(bounds[c], bounds[c + 1])
        users = min(chunk, n_users - first)
        for g in range(G):
            picks = rows[drawn[rows] == g]
            keys = log_pop[g][None, :] + rng.gumbel(size=(users, len(members[g]))).astype(np.float32)
            order = np.argsort(-keys, axis=1)
            items[picks] = members[g][order[owner[picks] - first, rank[picks]]]
    return items


def _timestamps(owner, position, counts, p: DriftParams, rng: np.random.Generator) -> np.ndarray:
    """Each user's ratings spread over its active period, strictly increasing (one second at least between two)."""
    span = ML1M_END - ML1M_START
    active = np.minimum(rng.lognormal(np.log(p.median_active_days * 86_400), 1.0, len(counts)), 0.9 * span)
    begin = ML1M_START + rng.random(len(counts)) * (span - active)
    offsets = np.sort(rng.random(len(owner)) + owner)  # sorted per user (owner is sorted), each user's in [0, 1)
    return (begin[owner] + (offsets - owner) * active[owner]).astype(np.int64) + position


def format_drift_files(data: DriftRatings, params: DriftParams) -> dict[str, str]:
    """ML-1M's three files as text: ratings.dat (UserID::MovieID::Rating::Timestamp), movies.dat (MovieID::Title::Genres,
    the item's group as its genre) and users.dat (UserID::Gender::Age::Occupation::Zip-code)."""
    ratings = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in zip(data.users.tolist(), data.items.tolist(), data.ratings.tolist(), data.ts.tolist()))
    names = ML1M_GENRES if params.n_groups <= len(ML1M_GENRES) else tuple(f"Group{g}" for g in range(params.n_groups))
    movies = "".join(f"{i + 1}::Synthetic item {i + 1} (2000)::{names[g]}\n" for i, g in enumerate(data.item_group.tolist()))
    users = "".join(f"{u + 1}::{'M' if g else 'F'}::{a}::{o}::{z:05d}\n" for u, (g, a, o, z) in enumerate(data.user_attributes.tolist()))
    return {"ratings.dat": ratings, "movies.dat": movies, "users.dat": users}
