"""Evaluate one saved model on the prepared data's stored candidates; results to disk and MLflow.

Per model, in ``run_dir(config)/eval/<model>/``:
- ``cases.parquet``: one row per case (part, n, batch, user_id, seen, hr, ndcg, auc, full_hr,
  full_ndcg), in the stored candidates' order, so two models' cases pair up row by row;
- ``metrics.json``: the means (with 95% bootstrap CIs and case counts) under the metric
  names below, which are the same in every MLflow child run so the compare view lines
  models up.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from prefect import task

from metarec.config import Config
from metarec.metrics import bootstrap_ci
from metarec.models.factory import row_variant
from metarec.protocol import Cases, CaseResults, evaluate_new_users, evaluate_stream
from tasks.runtime.atomic import write_json, write_parquet
from tasks.runtime.logs import log_info
from tasks.runtime.slots import compute_slot
from tasks.train.models import load_model
from tasks.runtime.paths import evaluation_key, prepared_dir, run_dir
from tasks.data.prepared import PreparedData, load_prepared

logger = logging.getLogger(__name__)

METRICS_FILE, CASES_FILE = "metrics.json", "cases.parquet"


# ---------------------------------------------------------------- metric names (an interface)
def new_user_metric(n: int, metric: str) -> str:
    """new_n5_hr10, new_n5_ndcg10, new_n5_auc; full ranking: full_n5_hr10, full_n5_ndcg10."""
    prefix, base = ("full", metric.removeprefix("full_")) if metric.startswith("full_") else ("new", metric)
    return f"{prefix}_n{n}_{base}{'10' if base in ('hr', 'ndcg') else ''}"


def stream_metric(batch: int | None, metric: str) -> str:
    """stream_auc_mean over all stream cases, stream_b3_auc for batch 3."""
    suffix = "10" if metric in ("hr", "ndcg") else ""
    return f"stream_{metric}{suffix}_mean" if batch is None else f"stream_b{batch}_{metric}{suffix}"


def eval_dir(config: Config, model: str) -> Path:
    return run_dir(config) / "eval" / model


# ---------------------------------------------------------------- cases
def load_cases(prepared: PreparedData, kind: str) -> Cases:
    table = prepared.candidates(kind)
    column = lambda name: table.column(name).to_numpy().astype(np.int64)  # noqa: E731
    flat = table.column("negatives").combine_chunks().flatten().to_numpy(zero_copy_only=False)  # no Python list per case
    negatives = np.asarray(flat, dtype=np.int64).reshape(table.num_rows, -1)
    return Cases(column("user_id"), column("item_id"), negatives, column("n"), column("batch"))


def cap_new_users(cases: Cases, limit: int | None, seed: int) -> Cases:
    """Quick mode: a seeded subset of new users, the same users for every n."""
    users = np.unique(cases.users)
    if limit is None or len(users) <= limit:
        return cases
    keep = np.random.default_rng(seed).choice(users, size=limit, replace=False)
    return cases.take(np.isin(cases.users, keep))


# ---------------------------------------------------------------- summarising
def _summary(values: np.ndarray, config: Config) -> dict:
    mean, low, high = bootstrap_ci(values, config.eval.bootstrap, seed=config.eval.seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "cases": int(len(values))}


def summarise(new: dict[int, CaseResults], stream: dict[int, CaseResults], config: Config) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for n, res in new.items():
        for metric, values in res.metrics.items():
            out[new_user_metric(n, metric)] = _summary(values, config)
    if stream:
        seen = np.concatenate([res.extra["seen"] for res in stream.values()])
        for metric in ("hr", "ndcg", "auc"):
            pooled = np.concatenate([res.metrics[metric] for res in stream.values()])
            out[stream_metric(None, metric)] = _summary(pooled, config)
            # existing users (seen before the batch) apart from first-time users
            out[stream_metric(None, metric).replace("stream_", "stream_seen_")] = _summary(pooled[seen], config)
            out[stream_metric(None, metric).replace("stream_", "stream_cold_")] = _summary(pooled[~seen], config)
        for b, res in stream.items():
            if len(res.users):
                out[stream_metric(b, "auc")] = {"mean": float(res.metrics["auc"].mean()), "cases": int(len(res.users))}
            if res.extra["seen"].any():
                seen_auc = res.metrics["auc"][res.extra["seen"]]
                out[f"stream_b{b}_seen_auc"] = {"mean": float(seen_auc.mean()), "cases": int(len(seen_auc))}
    return out


def _cases_table(new: dict[int, CaseResults], stream: dict[int, CaseResults]) -> pa.Table:
    parts = []
    for label, groups in (("new", new), ("stream", stream)):
        for key, res in groups.items():
            size = len(res.users)
            parts.append({
                "part": [label] * size,
                "n": [key if label == "new" else -1] * size,
                "batch": [key if label == "stream" else -1] * size,
                "user_id": res.users.tolist(),
                "seen": res.extra["seen"].tolist() if "seen" in res.extra else [False] * size,
                **{m: res.metrics.get(m, np.full(size, np.nan)).tolist() for m in ("hr", "ndcg", "auc", "full_hr", "full_ndcg")},
            })
    columns = {k: sum((p[k] for p in parts), []) for k in ("part", "n", "batch", "user_id", "seen", "hr", "ndcg", "auc", "full_hr", "full_ndcg")}
    return pa.table(columns)


# ---------------------------------------------------------------- the step
def evaluate_model(name: str, model_path: Path, config: Config, prepared: PreparedData | None = None, stream: bool = True) -> dict:
    """Run the whole protocol for one saved model (``stream=False``: new users only); reuse results already written."""
    out = eval_dir(config, name)
    done = out / METRICS_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("evaluation_key") == evaluation_key(config) and record.get("model_path") == str(model_path):
            logger.info("evaluation of %s already done: %s", name, done)
            return record
    prepared = prepared or load_prepared(prepared_dir(config))
    model = load_model(model_path)
    started = time.perf_counter()
    new_cases = cap_new_users(load_cases(prepared, "new"), config.eval.max_new_users, config.eval.seed)
    new = evaluate_new_users(model, prepared.new_users, prepared.new_users_pos, new_cases, prepared.n_items, config.eval.full_ranking)
    new_seconds = time.perf_counter() - started
    stream_results = evaluate_stream(model, prepared.stream, prepared.stream_batch, load_cases(prepared, "stream"), prepared.history.users) if stream else {}
    record = {
        "model": name,
        "model_path": str(model_path),
        "config_hash": config.hash_of(),
        "evaluation_key": evaluation_key(config),  # the config and the evaluation code (tasks.runtime.paths)
        "variant": row_variant(name, config),  # None when the row runs its faithful default
        "features": model.feature_report(),  # which side features it used, or its fallback to ids (summary.md says so)
        "metrics": summarise(new, stream_results, config),
        "seconds": {
            "new_users": round(new_seconds, 3),
            "stream": round(sum(r.seconds for r in stream_results.values()), 3),
            "stream_update": round(sum(float(r.extra["update_seconds"][0]) for r in stream_results.values()), 3),
        },
    }
    write_parquet(_cases_table(new, stream_results), out / CASES_FILE)
    write_json(record, done)
    return record


def log_child_run(client: MlflowClient, experiment_id: str, parent_run_id: str, record: dict, tags: dict[str, str], params: dict,
                  started_ms: int | None = None, ended_ms: int | None = None) -> str:
    """One MLflow child run per model (thread-safe: explicit client) with the shared metric names. ``params``: the
    hyperparameters the model actually ran with (``tasks.track.tracking.model_params``), so diff-only comparison shows what
    differs between models. ``started_ms``/``ended_ms`` (epoch ms) give the run the span of the work it stands for."""
    name = record["model"]
    run = client.create_run(experiment_id, start_time=started_ms, run_name=name,
                            tags={"mlflow.parentRunId": parent_run_id, "model": name, **tags})
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value["mean"]), now, 0) for key, value in record["metrics"].items() if np.isfinite(value["mean"])]
    metrics += [Metric(f"seconds_{key}", float(value), now, 0) for key, value in record["seconds"].items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)[:6000]) for k, v in params.items()], tags=[RunTag("status", "evaluated")])
    client.log_dict(run.info.run_id, record, "metrics.json")
    client.set_terminated(run.info.run_id, end_time=ended_ms)
    return run.info.run_id


@task(name="evaluate-model", retries=1)
def evaluate_model_task(name: str, model: Path | str | None, config: Config) -> dict | None:
    """Prefect wrapper: one saved model through the whole protocol; None (logged) when there is no model,
    e.g. a meta-training that diverged. Logs the headline score."""
    if model is None:
        log_info(logger, "%s fold %d: no model to evaluate", name, config.data.fold)
        return None
    with compute_slot(config.runtime.max_workers):  # tasks.runtime.slots
        record = evaluate_model(name, Path(model), config)
    headline = record["metrics"].get(new_user_metric(5, "ndcg"), {}).get("mean", float("nan"))
    log_info(logger, "%s fold %d: new-user NDCG@10 at n=5 %.4f, stream AUC %.4f", name, config.data.fold, headline,
             record["metrics"].get("stream_auc_mean", {}).get("mean", float("nan")))
    return record
