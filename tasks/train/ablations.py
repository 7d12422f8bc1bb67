"""Ablations of our model on the validation split of fold 0's history: what its results depend on.

Never on the test cases: every number here comes from ``tasks/train/validation.py``'s
split of the history (pseudo-new users and a held-out time tail), so the
findings can choose options without touching what Table 1 reports.

A study is a list of variants, each a set of ``section.field`` values applied
to our row's config for training (``train``) and, optionally, values changed
only when serving (``serve``, e.g. the inner steps L at serving). Each variant
is fitted once (models trained with the same values are shared between
variants that differ only in serving) and scored per case, so every variant
is compared with the study's first variant by a paired bootstrap over users.
A learning curve evaluates one model after each meta-epoch instead.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metarec.config import Config
from metarec.metrics import case_metrics, cluster_bootstrap_ci
from metarec.models.factory import make_model
from metarec.models.responsive import ResponsiveMF
from metarec.meta_tasks import build_tasks
from tasks.runtime.logs import log_info

logger = logging.getLogger(__name__)

OURS = "responsive"


@dataclass(frozen=True)
class Variant:
    label: str
    train: dict = field(default_factory=dict)  # section.field -> value, for fitting
    serve: dict = field(default_factory=dict)  # meta.field -> value, changed on the fitted model before scoring
    row: str = OURS


def with_fields(config: Config, values: dict) -> Config:
    """``config`` with section.field values set directly (no tuned-value semantics: an ablation sets what it names)."""
    update: dict[str, dict] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        update.setdefault(section, {})[name] = value
    sections = {s: getattr(config, s).model_copy(update=fields) for s, fields in update.items()}
    return config.model_copy(update=sections)


def score_split(model, split: dict, observe: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Per-case metrics: new users per n ("new1", "new5", ...) and the held-out tail ("tail"), scored before observed.

    ``observe`` lets the tail batches update the model (on a copy, so the caller's model is untouched)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for n, (recent, cands) in split["new"].items():
        out[f"new{n}"] = {**case_metrics(model.score_new_users(recent, cands)), "users": np.asarray(recent.users)}
    live = copy.deepcopy(model) if observe else model
    parts = []
    for batch, users, cands in split["tail"]:
        parts.append({**case_metrics(live.score(users, cands)), "users": np.asarray(users)})
        if observe:
            live.observe(batch)
    out["tail"] = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return out


def _with_serving(model: ResponsiveMF, serve: dict) -> ResponsiveMF:
    if not serve:
        return model
    served = copy.copy(model)  # shares Θ and the index; only the serving hyperparameters differ
    served.meta = model.meta.model_copy(update={k.split(".", 1)[1]: v for k, v in serve.items() if k.startswith("meta.")})
    served.tasks = model.tasks.model_copy(update={k.split(".", 1)[1]: v for k, v in serve.items() if k.startswith("tasks.")})
    return served


def run_study(config: Config, split: dict, variants: list[Variant]) -> dict:
    """Fit each distinct training configuration once, score every variant, compare each with the first."""
    fitted: dict[str, object] = {}
    scores: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for variant in variants:
        key = json.dumps({"row": variant.row, **variant.train}, sort_keys=True, default=str)
        if key not in fitted:
            started = time.perf_counter()
            fitted[key] = make_model(variant.row, with_fields(config.for_row(variant.row), variant.train)).fit(split["train"])
            seconds[key] = time.perf_counter() - started
        model = _with_serving(fitted[key], variant.serve)
        scores[variant.label] = score_split(model, split)
        log_info(logger, "ablation %s: new-user NDCG@10 %s, tail NDCG@10 %.4f (fit %.0f s)", variant.label,
                 " / ".join(f"{v['ndcg'].mean():.4f}" for k, v in scores[variant.label].items() if k.startswith("new")),
                 scores[variant.label]["tail"]["ndcg"].mean(), seconds[key])
    return {"variants": [v.label for v in variants], "summary": summarise(scores, variants[0].label, config.eval.bootstrap, config.eval.seed),
            "fit_seconds": {v.label: seconds[json.dumps({"row": v.row, **v.train}, sort_keys=True, default=str)] for v in variants}}


def summarise(scores: dict[str, dict], reference: str, resamples: int, seed: int) -> dict:
    """Per variant and part: mean NDCG@10/HR@10/AUC with a CI, and the paired difference from the reference."""
    out: dict[str, dict] = {}
    for label, parts in scores.items():
        out[label] = {}
        for part, cases in parts.items():
            row = {}
            for metric in ("ndcg", "hr", "auc"):
                mean, low, high = cluster_bootstrap_ci(cases[metric], cases["users"], resamples, seed)
                row[metric] = {"mean": mean, "ci": [low, high]}
            if label != reference:
                diff, low, high = cluster_bootstrap_ci(cases["ndcg"] - scores[reference][part]["ndcg"], cases["users"], resamples, seed)
                row["ndcg_vs_reference"] = {"mean": diff, "ci": [low, high]}
            row["cases"] = int(len(cases["ndcg"]))
            out[label][part] = row
    return out


def learning_curve(config: Config, split: dict, max_epochs: int, patience: int = 3, every: int = 1, row: str = OURS) -> dict:
    """Meta-train epoch by epoch; after every ``every`` epochs score the validation split; stop when the objective
    (mean of new-user and tail NDCG@10) has not improved for ``patience`` evaluations."""
    row_config = config.for_row(row)
    model: ResponsiveMF = make_model(row, row_config)
    history = split["train"]
    model.set_index(history)
    model.init_params(history.n_users, history.n_items)
    t = row_config.tasks
    tasks = build_tasks(history, t.k, t.K, t.seed, t.max_tasks_per_user, index=model.index_)
    for epoch in range(row_config.meta.pretrain_epochs):
        model.pretrain_epoch(history, epoch)
    points, best, waited = [], -np.inf, 0
    for epoch in range(max_epochs):
        stats = model.meta_train_epoch([tasks], epoch)
        if (epoch + 1) % every:
            continue
        snapshot = copy.deepcopy(model)
        snapshot.reset_unseen_users(history)
        scores = score_split(snapshot, split)
        new = float(np.mean([v["ndcg"].mean() for k, v in scores.items() if k.startswith("new")]))
        tail = float(scores["tail"]["ndcg"].mean())
        objective = 0.5 * (new + tail)
        points.append({"epoch": epoch + 1, "support_loss": stats.support_loss, "query_loss": stats.query_loss,
                       "new_ndcg": new, "tail_ndcg": tail, "objective": objective,
                       **{f"{k}_ndcg": float(v["ndcg"].mean()) for k, v in scores.items()}})
        log_info(logger, "learning curve epoch %d: new %.4f tail %.4f objective %.4f", epoch + 1, new, tail, objective)
        if objective > best + 1e-4:
            best, waited = objective, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return {"points": points, "best_epoch": max(points, key=lambda p: p["objective"])["epoch"] if points else None}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def write_study(out: Path, name: str, result: dict) -> Path:
    from tasks.runtime.atomic import write_json

    path = Path(out) / f"{name}.json"
    write_json(result, path)
    return path
