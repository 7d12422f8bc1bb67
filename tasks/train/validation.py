"""The validation data every row is tuned on, and one trial: fit on it, score it (the same protocol for every row).

Protocol, on the history only (the stream and the new users are never seen):

1. ``validation_split``: a seeded ``new_user_fraction`` of the history's users
   become pseudo-new users (their interactions leave the training part); the
   rest of the history is cut by time at the (1 − ``baselines.tune_holdout``)
   quantile into a training part and a held-out tail.
2. Cases, in the stored-candidate style (docs/method.md §9): the true item plus
   ``data.n_negatives`` items drawn uniformly from those the user never had
   anywhere in the history (drawn with replacement, seeded).
   - pseudo-new users with at least max(n) + 1 interactions: shown their first
     n (n in ``data.new_user_ns``), rank the (n+1)-th (``score_new_users``);
   - the held-out tail, cut into ``VAL_BATCHES`` time-ordered batches: each
     batch is scored first, then observed (so the online rules are tuned too).
3. ``evaluate_trial``: fit a row on the training part and score both; the
   objective is the mean of the new-user NDCG@10 (pooled over n) and the
   held-out-tail NDCG@10; HR@10 and AUC are recorded beside it.
"""

from __future__ import annotations

import time

import numpy as np

from metarec.config import Config
from metarec.features import NO_FEATURES, Features
from metarec.interface import Interactions, RecentItems
from metarec.models.common import sampled_metrics
from metarec.models.factory import make_model
from metarec.neighbours import InteractionIndex

VAL_BATCHES = 2
MAX_STREAM_CASES = 2000  # held-out tail cases scored per trial (a seeded sample when there are more)



def validation_split(history: Interactions, config: Config, features: Features | None = None) -> dict:
    """Training part, held-out tail batches and pseudo-new-user cases, all seeded by ``baselines.seed``; the data set's
    side features ride along for the rows that use them (MeLU, MAMO, the prototype recommender)."""
    rng = np.random.default_rng([config.baselines.seed, 99])
    users = np.unique(history.users)
    pseudo_new = rng.choice(users, size=max(1, int(round(config.data.new_user_fraction * len(users)))), replace=False)
    is_new = np.isin(history.users, pseudo_new)
    rest = history.take(~is_new)
    cut = np.quantile(rest.ts, 1.0 - config.baselines.tune_holdout)
    train, tail = rest.take(rest.ts <= cut), rest.take(rest.ts > cut)
    if not len(train) or not len(tail):
        raise ValueError(f"baselines.tune_holdout={config.baselines.tune_holdout} leaves an empty training part or tail ({len(train)}, {len(tail)} rows)")
    index = InteractionIndex.build(history)  # negatives avoid every positive of the history
    n_items = history.n_items
    batches = np.array_split(np.arange(len(tail)), VAL_BATCHES)
    tail_cases = []
    for b, rows in enumerate(batches):
        batch = tail.take(rows)
        keep = rows if len(rows) <= MAX_STREAM_CASES // VAL_BATCHES else np.sort(rng.choice(rows, MAX_STREAM_CASES // VAL_BATCHES, replace=False))
        users_b, items_b = tail.users[keep], tail.items[keep]
        tail_cases.append((batch, users_b, _candidates(index, users_b, items_b, config.data.n_negatives, n_items, rng)))
    new_cases = _new_user_cases(history.take(is_new), index, config, n_items, rng)
    return {"train": train, "tail": tail_cases, "new": new_cases, "pseudo_new_users": int(len(pseudo_new)), "features": features or NO_FEATURES}


def _candidates(index: InteractionIndex, users: np.ndarray, items: np.ndarray, n_neg: int, n_items: int, rng: np.random.Generator) -> np.ndarray:
    negs = index.sample_negatives(np.repeat(users, n_neg).reshape(len(users), n_neg), rng, n_items=n_items)
    return np.concatenate([items[:, None], negs], axis=1)


def _new_user_cases(new: Interactions, index: InteractionIndex, config: Config, n_items: int, rng: np.random.Generator) -> dict[int, tuple]:
    ns = config.data.new_user_ns
    order = np.lexsort((new.items, new.ts, new.users))
    users, items, ts = new.users[order], new.items[order], new.ts[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    eligible = starts[counts > max(ns)]
    cases = {}
    for n in ns:
        offsets = eligible[:, None] + np.arange(n)
        case_users = users[eligible]
        recent = RecentItems(case_users, items[offsets], ts[offsets])
        cases[n] = (recent, _candidates(index, case_users, items[eligible + n], config.data.n_negatives, n_items, rng))
    return cases


# ------------------------------------------------------------------ one trial
def evaluate_trial(name: str, config: Config, split: dict) -> dict[str, float]:
    """Fit on the training part, score new-user cases, then score-then-observe the tail batches."""
    started = time.perf_counter()
    model = make_model(name, config)
    model.set_features(split.get("features", NO_FEATURES))
    model.fit(split["train"])
    new_scores = [sampled_metrics(model.score_new_users(recent, cands)) for recent, cands in split["new"].values()]
    tail_scores = []
    for batch, users, cands in split["tail"]:
        tail_scores.append(sampled_metrics(model.score(users, cands)))
        model.observe(batch)
    new, tail = _pool(new_scores), _pool(tail_scores)
    return {
        "objective": 0.5 * (new["ndcg@10"] + tail["ndcg@10"]),
        **{f"new_{k}": v for k, v in new.items()},
        **{f"tail_{k}": v for k, v in tail.items()},
        "seconds": time.perf_counter() - started,
    }


def _pool(parts: list[dict]) -> dict[str, float]:
    cases = sum(p["cases"] for p in parts)
    out = {k: sum(p[k] * p["cases"] for p in parts) / max(cases, 1) for k in ("hr@10", "ndcg@10", "auc")}
    return {**out, "cases": cases}
