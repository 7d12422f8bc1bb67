"""The validation data every row is tuned on, and one trial: fit on it, score it (the same protocol for every row).

Protocol, on the history only (the stream and the new users are never seen):

1. ``validation_split``: a seeded ``new_user_fraction`` of the history's users
   become pseudo-new users (their interactions leave the training part); the
   rest of the history is cut by time at the (1 − ``baselines.tune_holdout``)
   quantile into a training part and a held-out tail.
2. Cases, as the test's (docs/method.md §9, ``tasks/data/prepare.py``): the true item plus
   ``data.n_negatives`` distinct items drawn uniformly from those the user never
   had anywhere in the history (seeded).
   - pseudo-new users with at least max(n) + 1 interactions: shown their first
     n (n in ``data.new_user_ns``), rank the (n+1)-th (``score_new_users``);
   - the held-out tail, cut into ``VAL_BATCHES`` time-ordered batches: each
     batch is scored first, then observed (so the online rules are tuned too).
3. Metrics as the test's (``metarec.metrics.case_metrics``): a tie's rank is its
   expectation under random tie-breaking.
4. ``evaluate_trial``: fit a row on the training part and score it with ``score_split``;
   the OBJECTIVE (one for every row) is 0.5 · the mean over n of the new-user NDCG@10
   + 0.5 · the held-out-tail NDCG@10. With ``report``, the fit's copy after each
   scored pass is scored by the same ``score_split`` (multi-fidelity pruning).
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

import numpy as np

from metarec.config import Config
from metarec.features import NO_FEATURES, Features
from metarec.interface import Interactions, RecentItems, StreamingRecommender
from metarec.maml import DivergedError
from metarec.metrics import case_metrics
from metarec.models.registry import ROWS
from metarec.models.factory import make_model
from metarec.neighbours import InteractionIndex

VAL_BATCHES = 2
MAX_STREAM_CASES = 2000  # held-out tail cases scored per trial (a seeded sample when there are more)
OBJECTIVE = "0.5 * mean over n in data.new_user_ns of new-user NDCG@10 (n shown) + 0.5 * held-out-tail NDCG@10"

# (passes done, the metrics of the copy after them, final=False) -> None; may raise optuna.TrialPruned unless final
Report = Callable[..., None]


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
    return np.concatenate([items[:, None], index.sample_distinct_negatives(users, n_neg, rng, n_items=n_items)], axis=1)


def _new_user_cases(new: Interactions, index: InteractionIndex, config: Config, n_items: int, rng: np.random.Generator) -> dict[int, tuple]:
    ns = config.data.new_user_ns
    order = np.lexsort((new.ts, new.users))  # stable: same-second rows keep the prepared tie-break order
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


# ------------------------------------------------------------------ scoring
def case_scores(scores: np.ndarray) -> dict[str, float]:
    """Mean HR@10, NDCG@10 and AUC of (B, 1 + negatives) scores, ties at their expected rank (as the test's)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():  # an SGD rate too large: a bad trial, not a broken tuning
        raise DivergedError("the model scores candidates with NaN or Inf: its training diverged")
    per_case = case_metrics(scores)
    return {"hr@10": float(per_case["hr"].mean()), "ndcg@10": float(per_case["ndcg"].mean()), "auc": float(per_case["auc"].mean()),
            "cases": int(len(per_case["hr"]))}


def score_split(model: StreamingRecommender, split: dict) -> dict[str, float]:
    """The validation metrics of a fitted model, and the objective; scoring observes the tail, so the model changes."""
    new = {n: case_scores(model.score_new_users(recent, cands)) for n, (recent, cands) in split["new"].items()}
    tail_scores = []
    for b, (batch, users, cands) in enumerate(split["tail"]):
        tail_scores.append(case_scores(model.score(users, cands)))
        if b < len(split["tail"]) - 1:  # observing the last batch would change nothing scored
            model.observe(batch)
    tail = _pool(tail_scores)
    new_mean = float(np.mean([m["ndcg@10"] for m in new.values()]))
    return {
        "objective": 0.5 * new_mean + 0.5 * tail["ndcg@10"],
        "new_ndcg@10": new_mean,
        **{f"new_n{n}_{k}": v for n, m in new.items() for k, v in m.items() if k != "cases"},
        **{f"tail_{k}": v for k, v in tail.items()},
    }


def fit_accepts_on_epoch(model: StreamingRecommender) -> bool:
    """Rows written before the hook (or added by others) still tune: they are scored once, at the end."""
    return "on_epoch" in inspect.signature(model.fit).parameters


# ------------------------------------------------------------------ one trial
def planned_passes(name: str, config: Config) -> int:
    """The passes a row's fit will make (the sum of its ``Row.passes`` fields), 0 if it declares none."""
    row_config = config.for_row(name)
    return sum(int(getattr(getattr(row_config, key.split(".")[0]), key.split(".")[1])) for key in ROWS[name].passes)


def evaluate_trial(name: str, config: Config, split: dict, report: Report | None = None, scored: Callable[[int], bool] = lambda passes: True) -> dict[str, float]:
    """Fit on the training part and score the result with ``score_split``.

    With ``report``, after every pass before the last that ``scored(passes)`` accepts, the fit's finished copy is scored
    the same way and reported (the copy is scored and observed, never the model being fitted); a ``report`` that raises
    (optuna.TrialPruned) ends the trial. The final model's score is reported with ``final=True``: a trial that trained
    to the end is never pruned."""
    started = time.perf_counter()
    model = make_model(name, config)
    model.set_features(split.get("features", NO_FEATURES))
    planned = planned_passes(name, config)
    last = [0]

    def on_epoch(passes: int, snapshot: Callable[[], StreamingRecommender]) -> None:
        last[0] = passes
        if report is not None and passes != planned and scored(passes):
            report(passes, score_split(snapshot(), split))

    if fit_accepts_on_epoch(model):
        model.fit(split["train"], on_epoch=on_epoch)
    else:
        model.fit(split["train"])
    metrics = score_split(model, split)
    if report is not None and last[0]:
        report(last[0], metrics, final=True)
    return {**metrics, "passes": last[0], "seconds": time.perf_counter() - started}


def _pool(parts: list[dict]) -> dict[str, float]:
    cases = sum(p["cases"] for p in parts)
    out = {k: sum(p[k] * p["cases"] for p in parts) / max(cases, 1) for k in ("hr@10", "ndcg@10", "auc")}
    return {**out, "cases": cases}
