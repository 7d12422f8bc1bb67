"""Pool the per-fold evaluations of a run into one set of cases per model, and summarise them.

Each fold writes ``eval/<model>/cases.parquet`` in its own run folder, one row
per case in the stored candidates' order. Pooling stacks them with two more
columns: ``fold`` and ``case`` (the row's position within its fold), so that a
case is named by (fold, case) in every model's table and two models pair up
case by case. Each user is a new user in exactly one fold, so new-user cases
are distinct users; stream cases of one user are correlated, so every CI here
resamples users (``cluster_bootstrap_ci``), not cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from metarec.metrics import cluster_bootstrap_ci
from tasks.evaluate.evaluation import CASES_FILE, new_user_metric, stream_metric

NEW_METRICS = ("hr", "ndcg", "auc", "full_hr", "full_ndcg")
STREAM_METRICS = ("hr", "ndcg", "auc")


def fold_cases(run: Path, model: str, fold: int) -> pa.Table | None:
    """One fold's cases of one model with ``fold`` and ``case`` columns, or None if it was not evaluated."""
    path = Path(run) / "eval" / model / CASES_FILE
    if not path.is_file():
        return None
    table = pq.read_table(path)
    return table.append_column("fold", pa.array(np.full(table.num_rows, fold, dtype=np.int64))).append_column(
        "case", pa.array(np.arange(table.num_rows, dtype=np.int64))
    )


def pool_cases(fold_runs: dict[int, Path], models) -> dict[str, pa.Table]:
    """Per model, its cases over every fold it was evaluated in (a model missing from a fold has no rows there)."""
    pooled: dict[str, pa.Table] = {}
    for model in models:
        parts = [t for fold, run in sorted(fold_runs.items()) if (t := fold_cases(run, model, fold)) is not None]
        if parts:
            pooled[model] = pa.concat_tables(parts)
    return pooled


def select(cases: pa.Table, part: str, n: int | None = None, seen: bool | None = None, batch: int | None = None) -> pa.Table:
    mask = pc.equal(cases["part"], part)
    if n is not None:
        mask = pc.and_(mask, pc.equal(cases["n"], n))
    if seen is not None:
        mask = pc.and_(mask, pc.equal(cases["seen"], seen))
    if batch is not None:
        mask = pc.and_(mask, pc.equal(cases["batch"], batch))
    return cases.filter(mask)


def users_of(cases: pa.Table) -> np.ndarray:
    """(B, 2) (fold, user_id): the resampling unit (a user's stream differs between folds)."""
    return np.stack([cases["fold"].to_numpy(), cases["user_id"].to_numpy()], axis=1)


def _summary(cases: pa.Table, metric: str, resamples: int, seed: int) -> dict:
    values = cases[metric].to_numpy(zero_copy_only=False).astype(np.float64)
    keep = ~np.isnan(values)
    mean, low, high = cluster_bootstrap_ci(values[keep], users_of(cases)[keep], resamples, seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "cases": int(keep.sum())}


def summarise_cases(cases: pa.Table, resamples: int, seed: int) -> dict[str, dict]:
    """The metric records of ``tasks.evaluate.evaluation.summarise`` (same names), computed from pooled cases."""
    out: dict[str, dict] = {}
    new = select(cases, "new")
    for n in sorted(set(new["n"].to_pylist())):
        group = select(new, "new", n=n)
        for metric in NEW_METRICS:
            summary = _summary(group, metric, resamples, seed)
            if summary["cases"]:
                out[new_user_metric(n, metric)] = summary
    stream = select(cases, "stream")
    if stream.num_rows:
        for metric in STREAM_METRICS:
            key = stream_metric(None, metric)
            out[key] = _summary(stream, metric, resamples, seed)
            out[key.replace("stream_", "stream_seen_")] = _summary(select(stream, "stream", seen=True), metric, resamples, seed)
            out[key.replace("stream_", "stream_cold_")] = _summary(select(stream, "stream", seen=False), metric, resamples, seed)
        for b in sorted(set(stream["batch"].to_pylist())):
            group = select(stream, "stream", batch=b)
            out[stream_metric(b, "auc")] = {"mean": float(np.mean(group["auc"].to_numpy())), "cases": group.num_rows}
            seen = select(group, "stream", seen=True)
            if seen.num_rows:
                out[f"stream_b{b}_seen_auc"] = {"mean": float(np.mean(seen["auc"].to_numpy())), "cases": seen.num_rows}
    return out


def paired(ours: pa.Table, other: pa.Table, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ours, other, users) of the cases both tables hold, matched by (fold, case): the same stored case."""
    key = lambda t: t["fold"].to_numpy() * (1 << 32) + t["case"].to_numpy()  # noqa: E731
    common, i, j = np.intersect1d(key(ours), key(other), return_indices=True)
    if not len(common):
        return np.zeros(0), np.zeros(0), np.zeros((0, 2), dtype=np.int64)
    if not np.array_equal(ours["user_id"].to_numpy()[i], other["user_id"].to_numpy()[j]):
        raise ValueError("paired cases name different users: the two models were not evaluated on the same stored candidates")
    values = lambda t, rows: t[metric].to_numpy(zero_copy_only=False)[rows].astype(np.float64)  # noqa: E731
    return values(ours, i), values(other, j), users_of(ours)[i]
