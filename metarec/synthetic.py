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
