"""Render what people look at: Table 1 beside the paper's, the stream AUC curve, the λ_ML curve, a summary.

Everything is written atomically into the run folder and returned as paths,
so the flow can log it to MLflow and as Prefect artifacts.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from metarec.metrics import bootstrap_ci  # noqa: E402
from metarec.models.registry import ROWS  # noqa: E402
from tasks.atomic import atomic_path, write_text  # noqa: E402
from tasks.evaluation import CASES_FILE, new_user_metric  # noqa: E402

OURS = "responsive"
LABELS = {name: row.label for name, row in ROWS.items()}
PAPER_BASELINES = ("rkmf", "srec", "spmf")

# METHOD.md §10: the paper's Table 1 (HR@10, NDCG@10) on ML-1M and Netflix
PAPER_TABLE1 = {
    (1, "rkmf"): (0.487, 0.346, 0.466, 0.340), (1, "srec"): (0.530, 0.392, 0.498, 0.365),
    (1, "spmf"): (0.543, 0.444, 0.541, 0.368), (1, "responsive"): (0.599, 0.512, 0.617, 0.499),
    (5, "rkmf"): (0.493, 0.350, 0.456, 0.335), (5, "srec"): (0.535, 0.395, 0.533, 0.387),
    (5, "spmf"): (0.559, 0.456, 0.564, 0.408), (5, "responsive"): (0.666, 0.590, 0.631, 0.523),
    (10, "rkmf"): (0.490, 0.350, 0.484, 0.360), (10, "srec"): (0.533, 0.399, 0.565, 0.420),
    (10, "spmf"): (0.571, 0.467, 0.609, 0.445), (10, "responsive"): (0.679, 0.601, 0.657, 0.551),
}
TABLE_METRICS = ("hr", "ndcg", "auc", "full_hr", "full_ndcg")


def _cell(metrics: dict, key: str) -> dict | None:
    value = metrics.get(key)
    return value if value and value.get("mean") is not None and not math.isnan(value["mean"]) else None


def table1_rows(results: dict[str, dict], ns: tuple[int, ...]) -> list[dict]:
    """One row per (n, model): our means with CIs and counts, the paper's figures beside."""
    rows = []
    for n in ns:
        for model, record in results.items():
            row = {"n": n, "model": model}
            for metric in TABLE_METRICS:
                cell = _cell(record["metrics"], new_user_metric(n, metric))
                row[metric] = cell["mean"] if cell else None
                row[f"{metric}_ci"] = (cell["ci_low"], cell["ci_high"]) if cell else None
                row["cases"] = cell["cases"] if cell else row.get("cases")
            paper = PAPER_TABLE1.get((n, model))
            row["paper_ml1m_hr"], row["paper_ml1m_ndcg"] = (paper[0], paper[1]) if paper else (None, None)
            rows.append(row)
    return rows


def improvements(rows: list[dict], metric: str) -> dict[int, float | None]:
    """Relative improvement of ours over the best baseline (of the paper's three) at each n."""
    out: dict[int, float | None] = {}
    for n in sorted({r["n"] for r in rows}):
        ours = next((r[metric] for r in rows if r["n"] == n and r["model"] == OURS and r[metric] is not None), None)
        baselines = [r[metric] for r in rows if r["n"] == n and r["model"] in PAPER_BASELINES and r[metric] is not None]
        out[n] = (ours / max(baselines) - 1.0) if ours is not None and baselines and max(baselines) > 0 else None
    return out


def _fmt(value, ci=None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def table1_markdown(rows: list[dict], dataset: str) -> str:
    head = (
        f"## Table 1 — new users, {dataset} (ours) beside the paper (ML-1M)\n\n"
        "Means over the same new users for every n, 95% bootstrap CI in brackets. "
        "Sampled metrics rank the true next item among 1 + 100 stored negatives; "
        "full-ranking ones among all items the user never interacted with.\n\n"
        "| n | model | HR@10 | NDCG@10 | AUC | full HR@10 | full NDCG@10 | cases | paper HR@10 | paper NDCG@10 |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['n']} | {LABELS.get(r['model'], r['model'])} | {_fmt(r['hr'], r['hr_ci'])} | {_fmt(r['ndcg'], r['ndcg_ci'])} "
        f"| {_fmt(r['auc'], r['auc_ci'])} | {_fmt(r['full_hr'], r['full_hr_ci'])} | {_fmt(r['full_ndcg'], r['full_ndcg_ci'])} "
        f"| {r['cases'] or '–'} | {_fmt(r['paper_ml1m_hr'])} | {_fmt(r['paper_ml1m_ndcg'])} |"
        for r in rows
    ]
    hr, ndcg = improvements(rows, "hr"), improvements(rows, "ndcg")
    paper_hr = {n: PAPER_TABLE1[(n, OURS)][0] / max(PAPER_TABLE1[(n, b)][0] for b in PAPER_BASELINES) - 1 for n in (1, 5, 10)}
    paper_ndcg = {n: PAPER_TABLE1[(n, OURS)][1] / max(PAPER_TABLE1[(n, b)][1] for b in PAPER_BASELINES) - 1 for n in (1, 5, 10)}
    tail = "\n\n### Relative improvement of ours over the best of RKMF, sRec, SPMF\n\n| n | HR@10 (ours) | NDCG@10 (ours) | HR@10 (paper) | NDCG@10 (paper) |\n|---|---|---|---|---|\n"
    tail += "\n".join(f"| {n} | {_pct(hr[n])} | {_pct(ndcg[n])} | {_pct(paper_hr.get(n))} | {_pct(paper_ndcg.get(n))} |" for n in hr)
    return head + "\n".join(lines) + tail + "\n"


def table1_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["n", "model", "cases", *[f for m in TABLE_METRICS for f in (m, f"{m}_ci_low", f"{m}_ci_high")], "paper_ml1m_hr", "paper_ml1m_ndcg"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {k: r.get(k) for k in ("n", "model", "cases", "paper_ml1m_hr", "paper_ml1m_ndcg")}
        for m in TABLE_METRICS:
            flat[m] = r[m]
            flat[f"{m}_ci_low"], flat[f"{m}_ci_high"] = r[f"{m}_ci"] or (None, None)
        writer.writerow(flat)
    return buffer.getvalue()


def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def stream_auc_plot(results: dict[str, dict], n_batches: int, path: Path, dataset: str) -> Path:
    """Paper Fig. 3: AUC on each stream batch (scored before the model saw it), one line per model;
    left all cases, right only users the model had seen before the batch (the existing users)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    panels = (("stream_b{b}_auc", "all stream interactions"), ("stream_b{b}_seen_auc", "users seen before the batch"))
    for ax, (pattern, title) in zip(axes, panels):
        for model, record in results.items():
            points = [(b + 1, record["metrics"][pattern.format(b=b)]["mean"]) for b in range(n_batches) if pattern.format(b=b) in record["metrics"]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", linewidth=2.4 if model == OURS else 1.4, label=LABELS.get(model, model))
        ax.set_title(title)
        ax.set_xlabel("stream batch (time order)")
        ax.set_xticks(range(1, n_batches + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUC (before observing the batch)")
    axes[1].legend(loc="best", fontsize=9)
    fig.suptitle(f"Existing users: AUC over the stream — {dataset}")
    return _save_figure(fig, path)


def lambda_plot(points: list[dict], path: Path, dataset: str, n: int = 5) -> Path:
    """Paper Fig. 4: HR@10 and NDCG@10 of new users at n against λ_ML; diverged values marked with ×."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ok = sorted((p for p in points if p["status"] == "finished"), key=lambda p: p["lambda_ml"])
    xs = [p["lambda_ml"] for p in ok]
    # λ_ML = 0 is a real point: a symlog axis keeps it beside 0.01 .. 10
    for metric, label in (("hr", "HR@10"), ("ndcg", "NDCG@10")):
        ax.plot(xs, [p["metrics"][new_user_metric(n, metric)]["mean"] for p in ok], marker="o", label=f"{label} (n={n})")
    diverged = [p["lambda_ml"] for p in points if p["status"] != "finished"]
    if diverged:
        low = min((p["metrics"][new_user_metric(n, "ndcg")]["mean"] for p in ok), default=0.0)
        ax.scatter(diverged, [low] * len(diverged), marker="x", s=90, color="red", zorder=5, label="diverged")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("λ_ML (weight of the meta-learning loss)")
    ax.set_ylabel("new users, sampled metric")
    ax.set_title(f"λ_ML sweep — {dataset}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save_figure(fig, path)


STREAM_GROUPS = (("stream_auc_mean", "all stream cases", None), ("stream_seen_auc_mean", "users seen before the batch", True), ("stream_cold_auc_mean", "users first seen in the batch", False))


def read_cases(run: Path, models) -> dict[str, pa.Table]:
    """Each model's per-case results (``eval/<model>/cases.parquet``), where written."""
    paths = {model: run / "eval" / model / CASES_FILE for model in models}
    return {model: pq.read_table(path) for model, path in paths.items() if path.is_file()}


def case_values(cases: pa.Table, metric: str, part: str, n: int | None = None, seen: bool | None = None) -> np.ndarray:
    """One metric of the cases of one part (new users at n, or stream cases, optionally seen or not)."""
    mask = np.asarray(cases.column("part").to_numpy(zero_copy_only=False) == part)
    if n is not None:
        mask &= cases.column("n").to_numpy() == n
    if seen is not None:
        mask &= cases.column("seen").to_numpy(zero_copy_only=False) == seen
    return cases.column(metric).to_numpy(zero_copy_only=False)[mask].astype(np.float64)


def paired_verdict(ours: np.ndarray, other: np.ndarray, resamples: int, seed: int) -> str:
    """wins / loses when the 95% paired-bootstrap CI of the per-case difference excludes 0, else a tie.

    ``ours[i]`` and ``other[i]`` must be the same case (the caller checks the
    user ids line up): the difference is then taken case by case, far tighter
    than comparing two CIs when cases differ much in difficulty.
    """
    if len(ours) != len(other) or not len(ours):
        return "not comparable (different cases)"
    diff, low, high = bootstrap_ci(ours - other, resamples, seed)
    word = "wins" if low > 0 else "loses" if high < 0 else "tie"
    return f"{word} (difference {diff:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}])"


def summary_markdown(
    dataset: str, stats: dict, config_flat: dict, step_seconds: dict[str, float], rows: list[dict], results: dict[str, dict], cases: dict[str, pa.Table] | None = None
) -> str:
    cases = cases or {}
    resamples, seed = int(config_flat.get("eval.bootstrap", 1000)), int(config_flat.get("eval.seed", 0))

    def verdict(best: str, ours_value: float, best_value: float, part: str, metric: str, n: int | None = None, seen: bool | None = None) -> str:
        if OURS not in cases or best not in cases:
            return "wins" if ours_value > best_value else "does not win"
        pick = lambda model, column: case_values(cases[model], column, part, n, seen)  # noqa: E731
        if not np.array_equal(pick(OURS, "user_id"), pick(best, "user_id")):
            return "not comparable (different cases)"
        return paired_verdict(pick(OURS, metric), pick(best, metric), resamples, seed)

    parts = stats.get("parts", {})
    lines = [f"# Run summary — {dataset}", "", "## Data", ""]
    lines += [f"- {name}: {p.get('rows')} rows, {p.get('users')} users, {p.get('items')} items" for name, p in parts.items()]
    lines += [f"- new users evaluated (>= {stats.get('new_users_min_positives')} positives): {stats.get('new_users_evaluable')}", ""]
    lines += ["## Wall time per step (s)", "", *[f"- {k}: {v:.1f}" for k, v in step_seconds.items()], ""]
    lines += ["## Where our model wins and where it does not", "", "Ours against the best other model on each line; wins and loses need the 95% paired-bootstrap CI of the per-case difference to exclude 0.", ""]
    for metric in ("hr", "ndcg", "auc", "full_hr", "full_ndcg"):
        for n in sorted({r["n"] for r in rows}):
            at_n = {r["model"]: r[metric] for r in rows if r["n"] == n and r[metric] is not None}
            if OURS not in at_n or len(at_n) < 2:
                continue
            best_other = max((m for m in at_n if m != OURS), key=lambda m: at_n[m])
            said = verdict(best_other, at_n[OURS], at_n[best_other], "new", metric, n)
            lines.append(f"- new users n={n}, {metric}: ours {at_n[OURS]:.3f} vs best other {LABELS.get(best_other, best_other)} {at_n[best_other]:.3f} — {said}")
    for key, label, seen in STREAM_GROUPS:
        stream = {m: r["metrics"].get(key, {}).get("mean") for m, r in results.items()}
        others = {m: v for m, v in stream.items() if m != OURS and v is not None and not math.isnan(v)}
        if stream.get(OURS) is not None and others:
            best = max(others, key=others.get)
            count = results[OURS]["metrics"][key]["cases"]
            said = verdict(best, stream[OURS], others[best], "stream", "auc", seen=seen)
            lines.append(f"- stream, {label} ({count} cases), mean AUC: ours {stream[OURS]:.3f} vs best other {LABELS.get(best, best)} {others[best]:.3f} — {said}")
    lines += ["", "## Configuration", "", "| key | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(config_flat.items())], ""]
    return "\n".join(lines)


def write_report(run: Path, dataset: str, results: dict[str, dict], ns: tuple[int, ...], n_batches: int, stats: dict, config_flat: dict, step_seconds: dict) -> dict[str, Path]:
    rows = table1_rows(results, ns)
    files = {
        "table1.md": run / "table1.md",
        "table1.csv": run / "table1.csv",
        "summary.md": run / "summary.md",
    }
    write_text(table1_markdown(rows, dataset), files["table1.md"])
    write_text(table1_csv(rows), files["table1.csv"])
    summary = summary_markdown(dataset, stats, config_flat, step_seconds, rows, results, read_cases(run, results))
    write_text(summary, files["summary.md"])
    files["stream_auc.png"] = stream_auc_plot(results, n_batches, run / "stream_auc.png", dataset)
    return files
