"""Item cold start, Table 2 (opt-in, ``eval.new_items``): refit each row without the new items, evaluate, pool, render.

Per fold and row:
- the split (``tasks/data/new_items.py``) gives the history without the new items; the row is fitted on it
  (``fit_new_item_model``: ours by ``ResponsiveMF.fit``, the others by their own ``fit``) and saved beside
  the split, under the row's usual model key, so a re-run reuses it;
- ``metarec.new_items.evaluate_new_items`` reveals each new item's first n interactions to a copy of it and
  ranks the new item for each later interaction's user; the per-case results go to
  ``run_dir/new_items/eval/<row>/cases.parquet`` (the layout of Table 1's, part = "new_item"), so the pooling
  of ``tasks.evaluate.pooling`` stacks the folds and a case is named by (fold, case) in every row.

Each (fold, row) is one unit: in the pipeline a Prefect task run (``new_items_row_task``, "new items · <row> ·
fold k") on the flow's task runner, in a compute slot with ``runtime.torch_threads`` threads as Table 1's fits, so
units run side by side; everything a unit draws is seeded from its own config, so it computes the same whichever
thread or process runs it and in whatever order. A failing unit names its row and fold.

Then ``table2_report``, once every unit is done: ``write_table2`` on the pooled cases: ``table2.md`` /
``table2.csv`` (means with 95% CIs), the paired verdicts of ours against every other row
(``table2_verdicts.csv``) and their forest plot (``forest_table2.png``). The cases of one new item share its
adapted row, so every CI resamples new items (fold, item), not cases.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from prefect import task  # noqa: E402

from metarec.config import Config  # noqa: E402
from metarec.interface import StreamingRecommender  # noqa: E402
from metarec.metrics import cluster_bootstrap_ci  # noqa: E402
from metarec.models.registry import ROWS  # noqa: E402
from metarec.new_items import evaluate_new_items  # noqa: E402
from tasks.data.new_items import NewItemData, load_new_items, new_items_dir, new_items_key, prepare_new_items  # noqa: E402
from tasks.data.prepared import load_prepared  # noqa: E402
from tasks.evaluate.aggregate import LABELS, QUICK_LABEL, Comparison, _save_figure  # noqa: E402
from tasks.evaluate.evaluation import CASES_FILE, METRICS_FILE  # noqa: E402
from tasks.evaluate.pooling import pool_cases, select  # noqa: E402
from tasks.runtime.atomic import write_json, write_parquet, write_text  # noqa: E402
from tasks.runtime.logs import log_info  # noqa: E402
from tasks.runtime.paths import _combine, model_key, prepared_dir, run_dir, stage_code  # noqa: E402
from tasks.runtime.slots import compute_slot  # noqa: E402
from tasks.train.models import _reusable, build_model, load_model, model_hash, save_model  # noqa: E402

logger = logging.getLogger(__name__)

PART = "new_item"
TABLE2_METRICS = (("hr", "HR@10"), ("ndcg", "NDCG@10"), ("auc", "AUC"))


def new_items_run(config: Config) -> Path:
    """Where a fold's Table 2 evaluations go: ``run_dir/new_items`` (its ``eval/<row>/`` as Table 1's)."""
    return run_dir(config) / "new_items"


def fit_new_item_model(name: str, config: Config, data: NewItemData) -> StreamingRecommender:
    """Row ``name`` fitted on the history without the new items (saved beside the split; reused when there)."""
    out = data.root / "models" / f"{name}-{model_key(config, name)}"
    if _reusable(out, model_hash(config, name)):
        return load_model(out)
    model = build_model(name, config, load_prepared(prepared_dir(config)))
    started = time.perf_counter()
    model.fit(data.train)
    save_model(model, name, config, out, {"fit_seconds": round(time.perf_counter() - started, 3), "history_interactions": len(data.train),
                                          "new_items_split": new_items_key(config)})
    return model


def _cases_table(results: dict, items: np.ndarray) -> pa.Table:
    columns: dict[str, list] = {k: [] for k in ("part", "n", "batch", "user_id", "item_id", "seen", "hr", "ndcg", "auc", "full_hr", "full_ndcg")}
    for n, res in results.items():
        size = len(res.users)
        columns["part"] += [PART] * size
        columns["n"] += [n] * size
        columns["batch"] += [-1] * size
        columns["user_id"] += res.users.tolist()
        columns["item_id"] += items.tolist()
        columns["seen"] += [True] * size
        for metric in ("hr", "ndcg", "auc"):
            columns[metric] += res.metrics[metric].tolist()
        columns["full_hr"] += [float("nan")] * size
        columns["full_ndcg"] += [float("nan")] * size
    return pa.table(columns)


@task(name="split-new-items")
def split_new_items_task(config: Config) -> Path:
    """Prefect wrapper: the fold's item cold-start split (``prepare_new_items``), once, before its row units."""
    with compute_slot(config.runtime.max_workers):
        return prepare_new_items(config)


class NewItemUnitError(RuntimeError):
    """One (fold, row) unit of Table 2 failed; the message names both, the cause is chained."""


def evaluate_new_item_row(name: str, config: Config) -> dict:
    """Fit (or reuse) row ``name`` without the new items, evaluate it at every n; the record (reused when written).

    Its files are written atomically, the record last, so a unit that fails leaves nothing a re-run would reuse."""
    try:
        return _evaluate_new_item_row(name, config)
    except Exception as exc:
        label = ROWS[name].label if name in ROWS else name
        raise NewItemUnitError(f"Table 2 (new items): row {label} ({name}), fold {config.data.fold} failed: "
                               f"{type(exc).__name__}: {exc}") from exc


def _evaluate_new_item_row(name: str, config: Config) -> dict:
    out = new_items_run(config) / "eval" / name
    key = _combine(config.hash_of(), stage_code("new_items"), stage_code("evaluate"))
    if (out / METRICS_FILE).is_file():
        record = json.loads((out / METRICS_FILE).read_text())
        if record.get("key") == key:
            return record
    data = load_new_items(prepare_new_items(config))
    started = time.perf_counter()
    model = fit_new_item_model(name, config, data)
    fitted = time.perf_counter()
    results = evaluate_new_items(model, data.rows, data.item_pos, data.cases, config.data.new_user_ns)
    record = {"model": name, "key": key, "fold": config.data.fold, "split": str(data.root),
              "means": {f"n{n}_{m}": float(r.metrics[m].mean()) for n, r in results.items() for m in ("hr", "ndcg", "auc")},
              "cases": int(len(data.cases.users)), "items": int(len(np.unique(data.case_items))),
              "seconds": {"fit": round(fitted - started, 3), "evaluate": round(time.perf_counter() - fitted, 3)}}
    write_parquet(_cases_table(results, data.case_items), out / CASES_FILE)
    write_json(record, out / METRICS_FILE)
    logger.info("new items, %s fold %d: %s", name, config.data.fold, record["means"])
    return record


@task(name="new-items")
def new_items_row_task(name: str, config: Config) -> dict:
    """Prefect wrapper: one (fold, row) unit in a compute slot (``tasks.runtime.slots``) with ``runtime.torch_threads``
    threads, as meta-training takes them: the units run side by side, each with its share of the cores."""
    with compute_slot(config.runtime.max_workers):
        torch.set_num_threads(config.runtime.torch_threads)
        record = evaluate_new_item_row(name, config)
    log_info(logger, "new items, %s fold %d: NDCG@10 at n=%d %.4f", name, config.data.fold, max(config.data.new_user_ns),
             record["means"].get(f"n{max(config.data.new_user_ns)}_ndcg", float("nan")))
    return record


def unit_records(futures) -> list[dict]:
    """Every unit's record once all are done; a NewItemUnitError naming every failed (row, fold) if any failed."""
    records, failed = [], []
    for future in futures:
        try:
            records.append(future.result())
        except NewItemUnitError as exc:
            failed.append(exc)
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise NewItemUnitError(f"{len(failed)} units failed: " + "; ".join(str(exc) for exc in failed)) from failed[0]
    return records


# ---------------------------------------------------------------- Table 2
def _clusters(cases: pa.Table) -> np.ndarray:
    """(B, 2) (fold, item_id): a new item's cases share its adapted row, so the item is the resampling unit."""
    return np.stack([cases["fold"].to_numpy(), cases["item_id"].to_numpy()], axis=1)


def table2_rows(cases: dict[str, pa.Table], ns, resamples: int, seed: int) -> list[dict]:
    rows = []
    for n in ns:
        for model, table in cases.items():
            group = select(table, PART, n=n)
            if not group.num_rows:
                continue
            row = {"n": n, "model": model, "cases": group.num_rows, "items": len({tuple(c) for c in _clusters(group).tolist()})}
            for metric, _ in TABLE2_METRICS:
                mean, low, high = cluster_bootstrap_ci(group[metric].to_numpy().astype(np.float64), _clusters(group), resamples, seed)
                row[metric], row[f"{metric}_ci"] = mean, (low, high)
            rows.append(row)
    return rows


def table2_verdicts(cases: dict[str, pa.Table], ns, resamples: int, seed: int) -> list[Comparison]:
    """Each row of ours minus each other row, per n and metric, paired case by case ((fold, case): the same stored case)."""
    out: list[Comparison] = []
    for ours in [m for m in cases if m in ROWS and ROWS[m].is_ours]:
        for other in [m for m in cases if m != ours]:
            for n in ns:
                a, b = select(cases[ours], PART, n=n), select(cases[other], PART, n=n)
                key = lambda t: t["fold"].to_numpy() * (1 << 32) + t["case"].to_numpy()  # noqa: E731
                common, i, j = np.intersect1d(key(a), key(b), return_indices=True)
                if not len(common):
                    continue
                if not np.array_equal(a["item_id"].to_numpy()[i], b["item_id"].to_numpy()[j]):
                    raise ValueError(f"Table 2: {ours} and {other} were not evaluated on the same new-item cases")
                for metric, _ in TABLE2_METRICS:
                    diff = a[metric].to_numpy()[i] - b[metric].to_numpy()[j]
                    mean, low, high = cluster_bootstrap_ci(diff, _clusters(a)[i], resamples, seed)
                    out.append(Comparison(ours, other, PART, f"n={n}", metric, mean, low, high, len(common)))
    return out


def _fmt(value: float, ci: tuple[float, float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table2_markdown(rows: list[dict], found: list[Comparison], dataset: str, folds: int, quick: bool, negatives: int = 100) -> str:
    lines = [f"## Table 2 — new items, {dataset}", ""]
    if quick:
        lines += [f"> **{QUICK_LABEL}.** Every model trained for the same shortened fraction of its passes; no verdicts are drawn.", ""]
    lines += [f"Each new item (held out of training; {'pooled over ' + str(folds) + ' folds, ' if folds > 1 else ''}items dealt by a seeded hash) "
              "is shown to every row with its first n interactions; each of its later interactions (from the max(n)-th on, the same "
              f"cases at every n) ranks it against {negatives} stored negatives of that user (items the user never had). 95% CIs resample new items.", "",
              "| n | model | HR@10 | NDCG@10 | AUC | cases | items |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {LABELS.get(r['model'], r['model'])} | {_fmt(r['hr'], r['hr_ci'])} | {_fmt(r['ndcg'], r['ndcg_ci'])} "
              f"| {_fmt(r['auc'], r['auc_ci'])} | {r['cases']} | {r['items']} |" for r in rows]
    for metric, title in TABLE2_METRICS:
        group = [c for c in found if c.metric == metric]
        others = list(dict.fromkeys(c.other for c in group))
        for ours in dict.fromkeys(c.ours for c in group):
            lines += ["", f"### {LABELS.get(ours, ours)} minus each other row — new items, {title} (paired)", "",
                      "| n | " + " | ".join(LABELS.get(o, o) for o in others) + " |", "|---|" + "---|" * len(others)]
            for name in dict.fromkeys(c.group for c in group if c.ours == ours):
                cell = {c.other: c.cell() for c in group if c.ours == ours and c.group == name}
                lines.append(f"| {name} | " + " | ".join(cell.get(o, "–") for o in others) + " |")
    return "\n".join(lines) + "\n"


def table2_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["n", "model", "cases", "items", *[f for m, _ in TABLE2_METRICS for f in (m, f"{m}_ci_low", f"{m}_ci_high")]]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {k: r[k] for k in ("n", "model", "cases", "items")}
        for m, _ in TABLE2_METRICS:
            flat[m] = f"{r[m]:.6f}"
            flat[f"{m}_ci_low"], flat[f"{m}_ci_high"] = (f"{v:.6f}" for v in r[f"{m}_ci"])
        writer.writerow(flat)
    return buffer.getvalue()


def table2_forest(found: list[Comparison], path: Path, dataset: str) -> Path:
    """One panel per metric: ours minus each other row at each n, paired 95% CI; filled = the CI excludes 0."""
    fig, axes = plt.subplots(1, len(TABLE2_METRICS), figsize=(5.0 * len(TABLE2_METRICS), max(3.0, 0.3 * len(found) / 3 + 1.5)), squeeze=False)
    for ax, (metric, title) in zip(axes[0], TABLE2_METRICS):
        group = [c for c in found if c.metric == metric]
        for y, c in enumerate(group):
            ax.plot([c.low, c.high], [y, y], color="tab:blue", linewidth=1.6)
            ax.plot(c.diff, y, "o", color="tab:blue", markerfacecolor="tab:blue" if c.word != "tie" else "white")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(group)), [f"{c.group} · {LABELS.get(c.ours, c.ours)} − {LABELS.get(c.other, c.other)}" for c in group], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"new items, {title}")
        ax.set_xlabel("ours minus other (paired 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Table 2 verdicts — {dataset} (filled: the CI excludes 0)", y=1.02)
    return _save_figure(fig, path)


def verdicts_csv(found: list[Comparison]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ours", "other", "line", "metric", "difference", "ci_low", "ci_high", "cases", "verdict"])
    for c in found:
        writer.writerow([c.ours, c.other, c.group, c.metric, f"{c.diff:.6f}", f"{c.low:.6f}", f"{c.high:.6f}", c.cases, c.word])
    return buffer.getvalue()


def write_table2(out: Path, cases: dict[str, pa.Table], dataset: str, ns, folds: int, resamples: int, seed: int, quick: bool = False,
                 negatives: int = 100) -> dict[str, Path]:
    """table2.md, table2.csv, table2_verdicts.csv and forest_table2.png in ``out``, from the pooled new-item cases."""
    rows = table2_rows(cases, ns, resamples, seed)
    found = [] if quick else table2_verdicts(cases, ns, resamples, seed)  # as Table 1: a quick run draws no verdicts
    files = {"table2.md": out / "table2.md", "table2.csv": out / "table2.csv", "table2_verdicts.csv": out / "table2_verdicts.csv"}
    write_text(table2_markdown(rows, found, dataset, folds, quick, negatives), files["table2.md"])
    write_text(table2_csv(rows), files["table2.csv"])
    write_text(verdicts_csv(found), files["table2_verdicts.csv"])
    if found:
        files["forest_table2.png"] = table2_forest(found, out / "forest_table2.png", dataset)
    return files


def table2_report(config: Config, folds: list[Config], out: Path) -> dict[str, Path]:
    """Table 2 from every (fold, row) unit's written cases (all of them done), pooled, written into ``out``."""
    cases = pool_cases({c.data.fold: new_items_run(c) for c in folds}, config.eval.models)
    return write_table2(out, cases, config.data.dataset, config.data.new_user_ns, len(folds), config.eval.bootstrap, config.eval.seed,
                        config.runtime.preset == "quick", config.data.n_negatives)


def new_items_report(config: Config, folds: list[Config], out: Path) -> dict[str, Path]:
    """Table 2 in this thread, one unit after another: for use outside a flow (the pipeline fans the units out on
    its task runner, ``flows.pipeline.new_items_stage``); the same files, the units being seeded each on its own."""
    started = time.perf_counter()
    for fold_config in folds:
        for name in config.eval.models:
            evaluate_new_item_row(name, fold_config)
    files = table2_report(config, folds, out)
    logger.info("Table 2 (new items) in %s, %.1f s", files["table2.md"], time.perf_counter() - started)
    return files


def publish_table2(files: dict[str, Path], dataset: str) -> str | None:
    """Table 2 as a Prefect artifact ``table2-<data set>`` with its forest plot inline (None outside Prefect)."""
    from tasks.track.publish import publish_markdown

    images = {"Table 2 verdicts": files["forest_table2.png"]} if "forest_table2.png" in files else None
    return publish_markdown("table2", dataset, files["table2.md"].read_text(), f"Table 2 (new items) on {dataset}", images=images)
