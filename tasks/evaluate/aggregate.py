"""Render what people look at: Table 1 beside the paper's, the stream AUC curve, the λ_ML curve, a summary.

Everything is written atomically into the run folder and returned as paths,
so the flow can log it to MLflow and as Prefect artifacts.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from metarec.metrics import cluster_bootstrap_ci  # noqa: E402
from metarec.models.registry import ROWS  # noqa: E402
from tasks.runtime.atomic import atomic_path, write_text  # noqa: E402
from tasks.evaluate.evaluation import CASES_FILE, new_user_metric  # noqa: E402
from tasks.evaluate.pooling import paired, select  # noqa: E402

OURS = "responsive"
LABELS = {name: row.label for name, row in ROWS.items()}
PAPER_BASELINES = ("rkmf", "srec", "spmf")

# docs/method.md §10: the paper's Table 1 (HR@10, NDCG@10) on ML-1M and Netflix
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
            row = {"n": n, "model": model, "variant": record.get("variant")}
            for metric in TABLE_METRICS:
                cell = _cell(record["metrics"], new_user_metric(n, metric))
                row[metric] = cell["mean"] if cell else None
                row[f"{metric}_ci"] = (cell["ci_low"], cell["ci_high"]) if cell else None
                row["cases"] = cell["cases"] if cell else row.get("cases")
            paper = PAPER_TABLE1.get((n, model))
            row["paper_ml1m_hr"], row["paper_ml1m_ndcg"] = (paper[0], paper[1]) if paper else (None, None)
            rows.append(row)
    return rows


def improvements(rows: list[dict], metric: str, ours_row: str = OURS) -> dict[int, float | None]:
    """Relative improvement of row ``ours_row`` over the best baseline (of the paper's three) at each n."""
    out: dict[int, float | None] = {}
    for n in sorted({r["n"] for r in rows}):
        ours = next((r[metric] for r in rows if r["n"] == n and r["model"] == ours_row and r[metric] is not None), None)
        baselines = [r[metric] for r in rows if r["n"] == n and r["model"] in PAPER_BASELINES and r[metric] is not None]
        out[n] = (ours / max(baselines) - 1.0) if ours is not None and baselines and max(baselines) > 0 else None
    return out


def _fmt(value, ci=None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def _row_label(r: dict) -> str:
    """The row's Table 1 label, naming the variant it runs if it is not the faithful default."""
    label = LABELS.get(r["model"], r["model"])
    return f"{label} (variant: {r['variant']})" if r.get("variant") else label


def table1_markdown(rows: list[dict], dataset: str, folds: int = 1) -> str:
    pooled = f"pooled over {folds} new-user folds, " if folds > 1 else ""
    head = (
        f"## Table 1 — new users, {dataset} (ours) beside the paper (ML-1M)\n\n"
        f"Means over the same new users for every n ({pooled}each user once), 95% bootstrap CI in brackets. "
        "Sampled metrics rank the true next item among 1 + 100 stored negatives; "
        "full-ranking ones among all items the user never interacted with.\n\n"
        "| n | model | HR@10 | NDCG@10 | AUC | full HR@10 | full NDCG@10 | cases | paper HR@10 | paper NDCG@10 |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['n']} | {_row_label(r)} | {_fmt(r['hr'], r['hr_ci'])} | {_fmt(r['ndcg'], r['ndcg_ci'])} "
        f"| {_fmt(r['auc'], r['auc_ci'])} | {_fmt(r['full_hr'], r['full_hr_ci'])} | {_fmt(r['full_ndcg'], r['full_ndcg_ci'])} "
        f"| {r['cases'] or '–'} | {_fmt(r['paper_ml1m_hr'])} | {_fmt(r['paper_ml1m_ndcg'])} |"
        for r in rows
    ]
    present = {r["model"] for r in rows}
    ours_rows = [row for row in (OURS, "responsive_plus") if row in present] or [OURS]  # each row of ours, named
    gains = {row: (improvements(rows, "hr", row), improvements(rows, "ndcg", row)) for row in ours_rows}
    paper_hr = {n: PAPER_TABLE1[(n, OURS)][0] / max(PAPER_TABLE1[(n, b)][0] for b in PAPER_BASELINES) - 1 for n in (1, 5, 10)}
    paper_ndcg = {n: PAPER_TABLE1[(n, OURS)][1] / max(PAPER_TABLE1[(n, b)][1] for b in PAPER_BASELINES) - 1 for n in (1, 5, 10)}
    columns = [f"{metric} ({LABELS[row]})" for row in ours_rows for metric in ("HR@10", "NDCG@10")]
    tail = ("\n\n### Relative improvement of ours over the best of RKMF, sRec, SPMF\n\n"
            f"| n | {' | '.join(columns)} | HR@10 (paper's Ours) | NDCG@10 (paper's Ours) |\n|---|{'---|' * (len(columns) + 2)}\n")
    ns = gains[ours_rows[0]][0]
    tail += "\n".join(f"| {n} | " + " | ".join(f"{_pct(gains[row][0][n])} | {_pct(gains[row][1][n])}" for row in ours_rows)
                      + f" | {_pct(paper_hr.get(n))} | {_pct(paper_ndcg.get(n))} |" for n in ns)
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


def stream_auc_figure(results: dict[str, dict], n_batches: int, dataset: str) -> Figure:
    """Paper Fig. 3: AUC on each stream batch (scored before the model saw it), one line per model;
    left all cases, right only users the model had seen before the batch (the existing users). One legend for
    both panels, outside them, so it covers no point."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True, layout="constrained")
    panels = (("stream_b{b}_auc", "all stream interactions"), ("stream_b{b}_seen_auc", "users seen before the batch"))
    handles = {}
    for ax, (pattern, title) in zip(axes, panels):
        for k, (model, record) in enumerate(results.items()):
            points = [(b + 1, record["metrics"][pattern.format(b=b)]["mean"]) for b in range(n_batches) if pattern.format(b=b) in record["metrics"]]
            if points:
                xs, ys = zip(*points)
                ours = model in ROWS and ROWS[model].is_ours
                handles[model] = ax.plot(xs, ys, marker="o", linewidth=2.4 if ours else 1.4, color=_colour(k), label=LABELS.get(model, model))[0]
        ax.set_title(title)
        ax.set_xlabel("stream batch (time order)")
        ax.set_xticks(range(1, n_batches + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUC (before observing the batch)")
    fig.legend(list(handles.values()), [LABELS.get(m, m) for m in handles], loc="outside right upper", fontsize=9)
    fig.suptitle(f"Existing users: AUC over the stream — {dataset}")
    return fig


def stream_auc_plot(results: dict[str, dict], n_batches: int, path: Path, dataset: str) -> Path:
    return _save_figure(stream_auc_figure(results, n_batches, dataset), path)


def _colour(k: int) -> str:
    """The k-th colour of the cycle: one colour per row, the same in both panels."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return colours[k % len(colours)]


def paper_lambda(lambda_ours: float, K: int) -> float:
    """docs/method.md §11: with L^K a mean over its K triples, λ_paper = K · λ_ours (the paper sums over the K triples)."""
    return K * lambda_ours


def lambda_curve(points: list[dict], K: int, n: int, metric: str) -> dict:
    """One metric of the sweep's finished points, on the paper's λ scale: x (λ_paper), mean and its 95% bootstrap CI
    (over the per-case results), and where training diverged: the λ_paper of each diverged point and the first."""
    ok = sorted((p for p in points if p["status"] == "finished"), key=lambda p: p["lambda_ml"])
    cells = [p["metrics"][new_user_metric(n, metric)] for p in ok]
    diverged = sorted(paper_lambda(p["lambda_ml"], K) for p in points if p["status"] == "diverged")
    return {
        "x": [paper_lambda(p["lambda_ml"], K) for p in ok],
        "mean": [c["mean"] for c in cells],
        "low": [c["ci_low"] for c in cells],
        "high": [c["ci_high"] for c in cells],
        "diverged": diverged,
        "first_diverged": diverged[0] if diverged else None,
        "largest_tried": max((paper_lambda(p["lambda_ml"], K) for p in points), default=None),
    }


def lambda_figure(points: list[dict], dataset: str, K: int, n: int = 5) -> Figure:
    """Paper Fig. 4: new users' HR@10 and NDCG@10 at n against λ_ML on the paper's scale (λ_paper = K·λ_ours), with the
    95% bootstrap CI of each point's mean as a band; diverged values marked (× and a shaded region from the first,
    named in the legend, which sits below the axes so it hides nothing).
    Right: the largest meta-gradient norm (before clipping; the sweep clips nothing) of each epoch, one line per λ."""
    fig, (ax, norms) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.35, 1]}, layout="constrained")
    curves = {metric: lambda_curve(points, K, n, metric) for metric in ("hr", "ndcg")}
    for metric, label in (("hr", "HR@10"), ("ndcg", "NDCG@10")):
        c = curves[metric]
        line = ax.plot(c["x"], c["mean"], marker="o", label=f"{label} (n={n}), 95% CI band")[0]
        ax.fill_between(c["x"], c["low"], c["high"], color=line.get_color(), alpha=0.2, linewidth=0)
    c = curves["ndcg"]
    if c["diverged"]:
        # a divergence far beyond the finished points is drawn one decade past them; the legend gives its true value
        far = max(c["x"], default=0.0) * 10 or 1.0
        shown = [x if x <= 10 * far else far for x in c["diverged"]]
        moved = " (drawn one decade past the last finished point)" if shown[0] != c["diverged"][0] else ""
        ax.axvspan(min(shown), max(shown) * 1.5 + 1e-9, color="red", alpha=0.08,
                   label=f"training diverged (NaN/Inf) from λ_paper = {c['first_diverged']:g}{moved}")
        low = min(c["low"], default=0.0)
        ax.scatter(shown, [low] * len(shown), marker="x", s=90, color="red", zorder=5, label="diverged λ_paper")
    positive = [x for x in c["x"] if x > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)  # λ = 0 is a real point
    ax.set_xlabel(f"λ_ML on the paper's scale (λ_paper = K·λ_ours, K = {K})")
    ax.set_ylabel(f"new users (n = {n}), sampled metric")
    largest = c["largest_tried"]
    ax.set_title("new-user accuracy against λ_paper" if c["diverged"] else f"no divergence up to λ_paper = {largest:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9)
    cmap = plt.get_cmap("viridis")
    ordered = sorted(points, key=lambda p: p["lambda_ml"])
    for i, p in enumerate(ordered):
        epochs = [(r["epoch"] + 1, r["grad_norm_max"]) for r in p.get("history", []) if r.get("grad_norm_max") is not None]
        if not epochs:
            continue
        xs, ys = zip(*epochs)
        colour = cmap(i / max(len(ordered) - 1, 1))
        norms.plot(xs, ys, marker="o", color=colour, label=f"λ_paper = {paper_lambda(p['lambda_ml'], K):g}" + (" (diverged)" if p["status"] == "diverged" else ""))
        if p["status"] == "diverged":
            norms.scatter([xs[-1]], [ys[-1]], marker="x", s=90, color="red", zorder=5)
    norms.set_yscale("log")
    norms.xaxis.set_major_locator(MaxNLocator(integer=True))
    norms.set_xlabel("epoch (× = diverged in it)")
    norms.set_ylabel("largest meta-gradient norm, before clipping")
    norms.set_title("gradient norm per epoch (no clipping)")
    norms.grid(alpha=0.3)
    norms.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.suptitle(f"λ_ML sweep — {dataset}")
    return fig


def lambda_plot(points: list[dict], path: Path, dataset: str, K: int, n: int = 5) -> Path:
    return _save_figure(lambda_figure(points, dataset, K, n), path)


def lambda_markdown(points: list[dict], K: int, ns: tuple[int, ...] = (1, 5, 10), clip: float | None = None) -> str:
    """The sweep as a table: λ on both scales, status (diverged in which epoch), the largest gradient norm before
    clipping, and new users' NDCG@10 (95% CI) at each n and HR@10 at n = 5."""
    c = lambda_curve(points, K, 5, "ndcg")
    said = (f"Training diverged (NaN/Inf) from λ_paper = {c['first_diverged']:g} on." if c["diverged"]
            else f"No point diverged; the largest λ tried is λ_paper = {c['largest_tried']:g}.")
    lines = [
        f"## λ_ML sweep\n\nλ on the paper's scale: λ_paper = K·λ_ours with K = {K} (our L^K is a mean over its K triples, "
        f"the paper's a sum; docs/method.md §11). Gradient clipping: {'none' if clip is None else f'at norm {clip:g}'}. {said} "
        "NDCG@10 and HR@10 of new users, 95% bootstrap CI of the mean over the same cases in brackets.\n",
        "| λ_paper | λ_ours | status | max gradient norm (before clipping) | "
        + " | ".join(f"NDCG@10 n={n}" for n in ns) + " | HR@10 n=5 |",
        "|---|---|---|---|" + "---|" * len(ns) + "---|",
    ]
    for p in sorted(points, key=lambda p: p["lambda_ml"]):
        history = p.get("history", [])
        top = max((r["grad_norm_max"] for r in history if r.get("grad_norm_max") is not None), default=None)
        status = p["status"] if p["status"] != "diverged" else f"diverged in epoch {p.get('diverged_epoch', '?')}"
        cells = [_fmt(*_ci(p["metrics"].get(new_user_metric(n, "ndcg")))) for n in ns]
        hr = _fmt(*_ci(p["metrics"].get(new_user_metric(5, "hr"))))
        lines.append(f"| {paper_lambda(p['lambda_ml'], K):g} | {p['lambda_ml']:g} | {status} | {'–' if top is None else f'{top:.3g}'} | "
                     + " | ".join(cells) + f" | {hr} |")
    return "\n".join(lines) + "\n"


def _ci(cell: dict | None) -> tuple:
    return (cell["mean"], (cell["ci_low"], cell["ci_high"])) if cell else (None, None)


STREAM_GROUPS = (("stream_auc_mean", "all stream cases", None), ("stream_seen_auc_mean", "users seen before the batch", True), ("stream_cold_auc_mean", "users first seen in the batch", False))
QUICK_LABEL = "quick preset: a smoke run, not a comparison"
# New-user NDCG@10 both on the stored candidates (1 + data.n_negatives) and on full ranking: sampled metrics can
# reorder models (Krichene & Rendle, KDD 2020), so a verdict holds only where both agree.
VERDICT_METRICS = (("hr", "HR@10"), ("ndcg", "NDCG@10 (sampled candidates)"), ("full_ndcg", "NDCG@10 (full ranking)"), ("auc", "AUC"))
FOREST_METRICS = ("hr", "ndcg", "full_ndcg")  # the new-user panels of the forest plot, beside the stream's AUC


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


def paired_verdict(ours: np.ndarray, other: np.ndarray, resamples: int, seed: int, users: np.ndarray | None = None) -> str:
    """wins / loses when the 95% paired-bootstrap CI of the per-case difference excludes 0, else a tie.

    ``ours[i]`` and ``other[i]`` must be the same case: the difference is then
    taken case by case, far tighter than comparing two CIs when cases differ
    much in difficulty. ``users`` (one row per case) makes the bootstrap
    resample users rather than cases.
    """
    if len(ours) != len(other) or not len(ours):
        return "not comparable (different cases)"
    clusters = np.arange(len(ours)) if users is None else users
    diff, low, high = cluster_bootstrap_ci(ours - other, clusters, resamples, seed)
    return f"{_verdict_word(low, high)} (difference {diff:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}])"


def _verdict_word(low: float, high: float) -> str:
    return "wins" if low > 0 else "loses" if high < 0 else "tie"


@dataclass(frozen=True)
class Comparison:
    """Row ``ours`` minus row ``other`` on one line of the report, paired case by case."""

    ours: str
    other: str
    part: str  # "new" or "stream"
    group: str  # "n=5", or a stream group's label
    metric: str
    diff: float
    low: float
    high: float
    cases: int

    @property
    def word(self) -> str:
        return _verdict_word(self.low, self.high)

    def cell(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}] {self.word}"


def _compare(ours: str, other: str, a: pa.Table, b: pa.Table, part: str, group: str, metric: str, resamples: int, seed: int) -> Comparison | None:
    mine, theirs, users = paired(a, b, metric)
    keep = ~(np.isnan(mine) | np.isnan(theirs))
    if not keep.any():
        return None
    diff, low, high = cluster_bootstrap_ci(mine[keep] - theirs[keep], users[keep], resamples, seed)
    return Comparison(ours, other, part, group, metric, diff, low, high, int(keep.sum()))


def comparisons(cases: dict[str, pa.Table], ns, resamples: int, seed: int) -> list[Comparison]:
    """Every row of our family against every other row: new users per n (HR, NDCG, AUC), the stream groups (AUC)."""
    ours_rows = [m for m in cases if m in ROWS and ROWS[m].is_ours]
    out: list[Comparison] = []
    for ours in ours_rows:
        for other in cases:
            if other == ours:
                continue
            for n in ns:
                a, b = select(cases[ours], "new", n=n), select(cases[other], "new", n=n)
                out += [c for metric, _ in VERDICT_METRICS if (c := _compare(ours, other, a, b, "new", f"n={n}", metric, resamples, seed))]
            for _, label, seen in STREAM_GROUPS:
                a, b = select(cases[ours], "stream", seen=seen), select(cases[other], "stream", seen=seen)
                if (c := _compare(ours, other, a, b, "stream", label, "auc", resamples, seed)) is not None:
                    out.append(c)
    return out


def verdict_tables(found: list[Comparison]) -> list[str]:
    """Markdown: per row of ours and per metric, one line per n (or stream group), one column per other model."""
    lines: list[str] = []
    for ours in dict.fromkeys(c.ours for c in found):
        mine = [c for c in found if c.ours == ours]
        others = list(dict.fromkeys(c.other for c in mine))
        for part, metric, title in [("new", m, f"new users, {t}") for m, t in VERDICT_METRICS] + [("stream", "auc", "stream, AUC")]:
            group = [c for c in mine if c.part == part and c.metric == metric]
            if not group:
                continue
            lines += ["", f"### {LABELS.get(ours, ours)} minus each other model — {title}", ""]
            lines += ["| line | " + " | ".join(LABELS.get(o, o) for o in others) + " |", "|---|" + "---|" * len(others)]
            for name in dict.fromkeys(c.group for c in group):
                cell = {c.other: c.cell() for c in group if c.group == name}
                lines.append(f"| {name} | " + " | ".join(cell.get(o, "–") for o in others) + " |")
    return lines


def forest_panels(found: list[Comparison]) -> list[tuple[str, str, str]]:
    """(part, metric, title) of each forest-plot panel that has comparisons: new users' HR@10 and NDCG@10 on the
    sampled candidates and on full ranking, then the stream's AUC."""
    panels = [("new", m, f"new users, {t}") for m, t in VERDICT_METRICS if m in FOREST_METRICS] + [("stream", "auc", "stream, AUC")]
    return [p for p in panels if any(c.part == p[0] and c.metric == p[1] for c in found)] or panels[:1]


def forest_figure(found: list[Comparison], dataset: str) -> Figure:
    """One panel per metric (``forest_panels``): each of our rows minus each other model, with its paired 95% CI;
    filled = CI excludes 0. Every row of ours in the legend (below the panels), each panel wide enough for its own
    line labels."""
    panels = forest_panels(found)
    ours_rows = list(dict.fromkeys(c.ours for c in found))
    lines = {p: list(dict.fromkeys((c.group, c.other) for c in found if (c.part, c.metric) == p[:2])) for p in panels}
    height = max(3.4, 0.28 * max((len(v) for v in lines.values()), default=1) + 2.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), height), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        names = lines[panel]
        for k, ours in enumerate(ours_rows):
            offset = (k - (len(ours_rows) - 1) / 2) * 0.18
            for y, (group, other) in enumerate(names):
                c = next((c for c in found if (c.part, c.metric, c.ours, c.group, c.other) == (*panel[:2], ours, group, other)), None)
                if c is None:
                    continue
                colour = _colour(k)
                ax.plot([c.low, c.high], [y + offset] * 2, color=colour, linewidth=1.6)
                ax.plot(c.diff, y + offset, "o", color=colour, markerfacecolor=colour if c.word != "tie" else "white")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(names)), [f"{g} · {LABELS.get(o, o)}" for g, o in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(panel[2])
        ax.set_xlabel("ours minus other (paired 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], color=_colour(k), marker="o", linewidth=1.6, label=LABELS.get(ours, ours)) for k, ours in enumerate(ours_rows)]
    handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="white", linewidth=0, label="open: the CI holds 0 (tie)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(f"Verdicts — {dataset} (filled: the CI excludes 0)")
    return fig


def forest_plot(found: list[Comparison], path: Path, dataset: str) -> Path:
    return _save_figure(forest_figure(found, dataset), path)


def comparisons_csv(found: list[Comparison]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ours", "other", "part", "line", "metric", "difference", "ci_low", "ci_high", "cases", "verdict"])
    for c in found:
        writer.writerow([c.ours, c.other, c.part, c.group, c.metric, f"{c.diff:.6f}", f"{c.low:.6f}", f"{c.high:.6f}", c.cases, c.word])
    return buffer.getvalue()


def folds_csv(fold_results: dict[int, dict[str, dict]], ns) -> str:
    """table1_folds.csv: each fold's new-user means (and stream AUC) per model, to see the spread between folds."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["fold", "n", "model", "cases", *TABLE_METRICS])
    for fold, results in sorted(fold_results.items()):
        for n in ns:
            for model, record in results.items():
                cells = [_cell(record["metrics"], new_user_metric(n, m)) for m in TABLE_METRICS]
                cases = next((c["cases"] for c in cells if c), "")
                writer.writerow([fold, n, model, cases, *["" if c is None else f"{c['mean']:.6f}" for c in cells]])
        for model, record in results.items():
            cell = _cell(record["metrics"], "stream_auc_mean")
            if cell:
                writer.writerow([fold, "stream", model, cell["cases"], "", "", f"{cell['mean']:.6f}", "", ""])
    return buffer.getvalue()


@dataclass
class RunFacts:
    """What the summary says about how the run was made, beside its numbers."""

    dataset: str
    folds: int
    stats: list[dict]  # stats.json of each fold
    config_flat: dict
    step_seconds: dict[str, float]
    quick: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. a diverged training, where tuned values came from
    row_options: list[str] = field(default_factory=list)  # our rows' values where they differ from the paper's row


def _data_lines(facts: RunFacts) -> list[str]:
    first = facts.stats[0] if facts.stats else {}
    lines = [f"- new-user folds: {facts.folds} (each fold holds out one group of the seeded deal of users; results are pooled over folds)"]
    lines += [f"- {name} (fold 0): {p.get('rows')} rows, {p.get('users')} users, {p.get('items')} items" for name, p in first.get("parts", {}).items()]
    evaluable = [s.get("new_users_evaluable", 0) for s in facts.stats]
    lines.append(f"- new users evaluated (>= {first.get('new_users_min_positives')} positives): {sum(evaluable)} in all ({', '.join(map(str, evaluable))} per fold)")
    return lines


def feature_notes(fold_results: dict[int, dict[str, dict]]) -> list[str]:
    """One line per model that reads side features (its evaluation record's ``features``): which ones, and whether it
    fell back to id embeddings because the data set has none (the first fold that says so)."""
    reports: dict[str, dict] = {}
    for results in fold_results.values():
        for model, record in results.items():
            if record.get("features") and (model not in reports or record["features"].get("fallback")):
                reports[model] = record["features"]
    return [f"- {LABELS.get(m, m)}: {r.get('note', '')}" + (" **(fallback to id embeddings)**" if r.get("fallback") else "") for m, r in reports.items()]


def ours_options(config, models) -> list[str]:
    """One line per row of ours other than the paper's (Ours+, FOMAML, ...): its tasks/meta values that differ from the
    paper row's, after tuned values and fixed options (``Config.for_row``)."""
    paper = config.for_row(OURS).to_flat_dict()
    lines = []
    for name in models:
        if name == OURS or not ROWS[name].is_ours:
            continue
        flat = config.for_row(name).to_flat_dict()
        differ = {k: v for k, v in flat.items() if k.startswith(("tasks.", "meta.")) and paper.get(k) != v}
        lines.append(f"- {LABELS.get(name, name)}: " + (", ".join(f"{k} = {v}" for k, v in sorted(differ.items())) or "the paper row's values"))
    return lines


def summary_markdown(facts: RunFacts, rows: list[dict], results: dict[str, dict], found: list[Comparison], features: list[str] | None = None) -> str:
    lines = [f"# Run summary — {facts.dataset}", ""]
    if facts.quick:
        lines += [f"> **{QUICK_LABEL}.** Every model trained for the same shortened fraction of its passes; no verdicts are drawn.", ""]
    lines += [f"> {note}" for note in facts.notes] + ([""] if facts.notes else [])
    lines += ["## Data", "", *_data_lines(facts), ""]
    lines += ["## Wall time per step (s)", "", *[f"- {k}: {v:.1f}" for k, v in facts.step_seconds.items()], ""]
    if features:
        lines += ["## Side features", "", *features, ""]
    if facts.row_options:
        lines += ["## Our rows beside the paper's", "", "Options and values that differ from Ours (paper) (docs/findings.md says why):",
                  "", *facts.row_options, ""]
    if not facts.quick:
        lines += ["## Verdicts: each of our rows minus every other model", "",
                  "Difference of the means on the same cases, with the 95% paired-bootstrap CI (resampling users, pooled over folds). "
                  "wins / loses only when the CI excludes 0, otherwise tie. New users' NDCG@10 is judged twice: on the stored "
                  "candidates (1 + data.n_negatives sampled) and on full ranking (every item the user never had), since "
                  "sampled metrics can reorder models. Picture: forest.png.", *verdict_tables(found), ""]
    stream = [f"- {label}: " + ", ".join(f"{LABELS.get(m, m)} {r['metrics'][key]['mean']:.3f}" for m, r in results.items() if key in r["metrics"])
              for key, label, _ in STREAM_GROUPS]
    lines += ["## Stream, mean AUC", "", *stream, ""]
    lines += ["## Configuration", "", "| key | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(facts.config_flat.items())], ""]
    return "\n".join(lines)


def warnings_markdown(warnings: list[str]) -> str:
    """What went wrong in the run, stated before anything else in a report (e.g. our model's training diverged)."""
    return "".join(f"> **Warning:** {warning}\n>\n" for warning in warnings).removesuffix(">\n") + "\n" if warnings else ""


def write_report(run: Path, facts: RunFacts, results: dict[str, dict], cases: dict[str, pa.Table], fold_results: dict[int, dict[str, dict]],
                 warnings: list[str] | None = None) -> dict[str, Path]:
    """Table 1, its per-fold numbers, the verdicts (table, CSV, forest plot), the stream curve and the summary, pooled.

    ``warnings`` (e.g. a diverged training) head both table1.md and summary.md.
    """
    ns = tuple(int(n) for n in facts.config_flat.get("data.new_user_ns", (1, 5, 10)))
    resamples, seed = int(facts.config_flat.get("eval.bootstrap", 1000)), int(facts.config_flat.get("eval.seed", 0))
    variants = {name: record.get("variant") for by_model in fold_results.values() for name, record in by_model.items()}
    rows = table1_rows({name: {**record, "variant": variants.get(name)} for name, record in results.items()}, ns)
    found = [] if facts.quick else comparisons(cases, ns, resamples, seed)
    files = {name: run / name for name in ("table1.md", "table1.csv", "table1_folds.csv", "summary.md", "verdicts.csv")}
    head = warnings_markdown(warnings or [])
    label = f"> **{QUICK_LABEL}.**\n\n" if facts.quick else ""
    write_text(head + label + table1_markdown(rows, facts.dataset, facts.folds), files["table1.md"])
    write_text(table1_csv(rows), files["table1.csv"])
    write_text(folds_csv(fold_results, ns), files["table1_folds.csv"])
    write_text(comparisons_csv(found), files["verdicts.csv"])
    write_text(head + summary_markdown(facts, rows, results, found, feature_notes(fold_results)), files["summary.md"])
    n_batches = int(facts.config_flat.get("data.stream_batches", 10))
    files["stream_auc.png"] = stream_auc_plot(results, n_batches, run / "stream_auc.png", facts.dataset)
    if found:
        files["forest.png"] = forest_plot(found, run / "forest.png", facts.dataset)
    return files
