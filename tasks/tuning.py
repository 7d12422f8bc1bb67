"""The seeded validation search that picks each baseline's hyperparameters (issue: same budget for every model).

Protocol, on the history only (the stream and the new users are never seen):

1. ``validation_split``: a seeded ``new_user_fraction`` of the history's users
   become pseudo-new users (their interactions leave the training part); the
   rest of the history is cut by time at the (1 − ``baselines.tune_holdout``)
   quantile into a training part and a held-out tail.
2. Cases, in the stored-candidate style (METHOD.md §9): the true item plus
   ``data.n_negatives`` items drawn uniformly from those the user never had
   anywhere in the history (drawn with replacement, seeded).
   - pseudo-new users with at least max(n) + 1 interactions: shown their first
     n (n in ``data.new_user_ns``), rank the (n+1)-th (``score_new_users``);
   - the held-out tail, cut into ``VAL_BATCHES`` time-ordered batches: each
     batch is scored first, then observed (so the online rules are tuned too).
3. Per model: ``baselines.tune_budget`` configurations, the defaults first
   then seeded random draws from ``SEARCH_SPACES[model]``; each is fitted on
   the training part and scored. The meta-learned ``responsive`` model gets
   the same split, objective, budget and draws. Values are keyed by
   ``section.field`` (``baselines.lr``, ``meta.lambda_ml``), as in ``Config.tuned``. The objective is the mean of the new-user
   NDCG@10 (pooled over n) and the held-out-tail NDCG@10; HR@10 and AUC are
   recorded beside it. Ties keep the earlier configuration.

Output: ``tuning_path(config)`` (JSON, written atomically): the search space,
the budget, every trial's values and metrics, and per model the chosen values,
ready for ``Config.tuned`` (``apply_tuned``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from prefect import task

from metarec.models.common import sampled_metrics
from metarec.config import SECTION_TYPES, Config
from metarec.interface import Interactions, RecentItems
from metarec.neighbours import InteractionIndex
from metarec.models.registry import make_model
from tasks.atomic import write_json
from tasks.logs import log_info
from tasks.models import baseline_threads
from tasks.paths import prepared_dir
from tasks.prepared import load_prepared

logger = logging.getLogger(__name__)

BASELINES = ("rkmf", "srec", "spmf", "mf_ft", "pop")
RESPONSIVE = "responsive"
TUNABLE = (*BASELINES, RESPONSIVE)  # the position seeds each model's draws: append only
RESPONSIVE_THREADS = 2  # torch threads for the responsive model's trials (meta-training is the heavy part)
VAL_BATCHES = 2
MAX_STREAM_CASES = 2000  # held-out tail cases scored per trial (a seeded sample when there are more)

# Discrete grids for the seeded random draws, keyed by section.field like Config.tuned.
_SGD = {"baselines.lr": [0.01, 0.02, 0.05, 0.1], "baselines.reg": [1e-5, 1e-4, 1e-3, 1e-2], "baselines.epochs": [10, 20, 40]}
SEARCH_SPACES: dict[str, dict[str, list]] = {
    "rkmf": {**_SGD, "baselines.rkmf_kernel": ["linear", "logistic"], "baselines.rkmf_update_epochs": [2, 5, 10]},
    "srec": {
        "baselines.srec_obs_var": [0.1, 0.3, 1.0, 3.0],
        "baselines.srec_prior_var": [0.01, 0.03, 0.1, 0.3],
        "baselines.srec_drift_var": [0.0, 1e-9, 1e-8, 1e-7],
        "baselines.srec_negatives": [1, 2, 4],
        "baselines.srec_passes": [1, 2, 3],
    },
    "spmf": {
        **_SGD,
        "baselines.spmf_reservoir": [1000, 5000, 20000],
        "baselines.spmf_samples": [250, 1000, 4000],
        "baselines.spmf_temperature": [0.1, 0.3, 1.0, 3.0],
        "baselines.spmf_update_epochs": [1, 3, 5],
    },
    "mf_ft": {**_SGD, "baselines.ft_lr": [0.01, 0.05, 0.1, 0.2], "baselines.ft_epochs": [1, 3, 5, 10]},
    "pop": {},
    RESPONSIVE: {
        "meta.lambda_ml": [0.5, 1.0, 2.0, 5.0],
        "meta.inner_lr": [1.0, 3.0, 10.0, 20.0, 40.0],
        "meta.inner_steps": [1, 2, 3],
        "meta.pretrain_epochs": [0, 3, 10],
        "meta.epochs": [5, 10],
        "meta.outer_lr": [0.002, 0.005, 0.01, 0.02],
        "meta.batch_tasks": [256],
        "tasks.k": [3, 5, 10],
    },
}



# ------------------------------------------------------------------ the validation data
def validation_split(history: Interactions, config: Config) -> dict:
    """Training part, held-out tail batches and pseudo-new-user cases, all seeded by ``baselines.seed``."""
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
    return {"train": train, "tail": tail_cases, "new": new_cases, "pseudo_new_users": int(len(pseudo_new))}


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
    model = make_model(name, config).fit(split["train"])
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


def draw_configs(name: str, budget: int, seed: int) -> list[dict]:
    """The defaults ({}) first, then distinct seeded random draws from the model's space (fewer if it is exhausted)."""
    space = SEARCH_SPACES[name]
    rng = np.random.default_rng([seed, TUNABLE.index(name)])
    draws: list[dict] = [{}]
    seen = {json.dumps({}, sort_keys=True)}
    for _ in range(50 * budget):
        if len(draws) >= budget or not space:
            break
        values = {key: options[int(rng.integers(len(options)))] for key, options in space.items()}
        values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()}
        key = json.dumps(values, sort_keys=True)
        if key not in seen:
            seen.add(key)
            draws.append(values)
    return draws


def with_values(config: Config, name: str, values: dict) -> Config:
    """The config with ``values`` (section.field -> value) in ``tuned[name]`` and those fields reset to their class
    defaults, so the row's values take effect (``Config.for_row``); validated like any config."""
    tuned = {**config.tuned, name: {**config.tuned.get(name, {}), **values}}
    update: dict[str, dict] = {}
    for key in values:
        section, _, field = key.partition(".")
        if section not in SECTION_TYPES or field not in SECTION_TYPES[section].model_fields:
            raise ValueError(f"tuning value {key!r} for {name}: expected section.field with section in {list(SECTION_TYPES)}")
        update.setdefault(section, {})[field] = SECTION_TYPES[section].model_fields[field].default
    data = config.model_dump()
    for section, fields in update.items():
        data[section] = {**data[section], **fields}
    return Config.model_validate({**data, "tuned": tuned})


def tune_model(name: str, config: Config, split: dict) -> dict:
    """Every trial of one model, and the chosen values (the best objective; the earlier on ties)."""
    if name not in SEARCH_SPACES:
        raise ValueError(f"no search space for model {name!r}; tunable: {list(SEARCH_SPACES)}")
    trials = []
    draws = draw_configs(name, config.baselines.tune_budget, config.baselines.seed)
    budget = len(draws)
    for values in draws:
        metrics = evaluate_trial(name, with_values(config, name, values), split)
        trials.append({"values": values, "metrics": metrics})
        log_info(logger, "tuning %s trial %d/%d %s: objective %.4f (%.0f s)", name, len(trials), budget, values, metrics["objective"], metrics["seconds"])
    best = max(range(len(trials)), key=lambda k: (trials[k]["metrics"]["objective"], -k))
    chosen = {**_defaults_of(config, name), **trials[best]["values"]}
    return {"chosen": chosen, "best_trial": best, "trials": trials}


def _defaults_of(config: Config, name: str) -> dict:
    """The values row ``name`` runs with today, for every key of its space."""
    row_config = config.for_row(name)
    return {key: getattr(getattr(row_config, key.split(".")[0]), key.split(".")[1]) for key in SEARCH_SPACES[name]}


# ------------------------------------------------------------------ I/O
def tuning_path(config: Config, models: tuple[str, ...] = BASELINES) -> Path:
    """The record's path; it depends on meta/tasks too when the responsive model is among ``models``."""
    sections = ("data", "baselines", "tasks", "meta") if RESPONSIVE in models else ("data", "baselines")
    suffix = "-responsive" if RESPONSIVE in models else ""
    return prepared_dir(config) / f"tuning-{config.hash_of(*sections)}{suffix}.json"


def tune_baselines(config: Config, models: tuple[str, ...] = BASELINES, history: Interactions | None = None) -> Path:
    """Run the search for each model on the history (default: the prepared one) and write the JSON record atomically."""
    unknown = [m for m in models if m not in SEARCH_SPACES]
    if unknown:
        raise ValueError(f"cannot tune {unknown}: tunable models are {list(SEARCH_SPACES)}")
    torch.set_num_threads(RESPONSIVE_THREADS if RESPONSIVE in models else baseline_threads(config))
    history = history if history is not None else load_prepared(prepared_dir(config)).history
    split = validation_split(history, config)
    record = {
        "protocol": __doc__.split("Output:")[0].strip(),
        "budget": config.baselines.tune_budget,
        "holdout": config.baselines.tune_holdout,
        "seed": config.baselines.seed,
        "search_spaces": {name: SEARCH_SPACES[name] for name in models},
        "train_interactions": len(split["train"]),
        "pseudo_new_users": split["pseudo_new_users"],
        "new_user_cases": {str(n): int(len(c[0].users)) for n, c in split["new"].items()},
        "tail_cases": int(sum(len(u) for _, u, _ in split["tail"])),
        "models": {name: tune_model(name, config, split) for name in models},
    }
    out = tuning_path(config, models)
    write_json(record, out)
    return out


def apply_tuned(config: Config, path: Path | None = None) -> Config:
    """The config with the chosen values of a tuning record in ``Config.tuned``."""
    record = json.loads(Path(path or tuning_path(config)).read_text())
    for name, result in record["models"].items():
        config = with_values(config, name, result["chosen"])
    return config


@task(name="tune-baselines")
def tune_baselines_task(config: Config, models: tuple[str, ...] = BASELINES) -> Path:
    """Prefect wrapper around ``tune_baselines``."""
    out = tune_baselines(config, models)
    log_info(logger, "tuning record in %s", out)
    return out
