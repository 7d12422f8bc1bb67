"""The summary's verdicts: paired on the same cases, a tie unless the difference's CI excludes 0."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pytest

from metarec.metrics import bootstrap_ci
from tasks.evaluate.aggregate import (RunFacts, case_values, comparisons, forest_panels, forest_plot, paired_verdict, table1_markdown, verdict_tables,
                             write_report)
from tasks.evaluate.pooling import paired


def test_paired_verdict_wins_loses_and_ties():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    assert paired_verdict(base + 0.05, base, 500, 0).startswith("wins")
    assert paired_verdict(base, base + 0.05, 500, 0).startswith("loses")
    assert paired_verdict(base, base, 500, 0).startswith("tie")
    assert paired_verdict(base[:10], base, 500, 0).startswith("not comparable")


def test_pairing_sees_what_unpaired_intervals_miss():
    """Per-user difficulty varies a lot, the gain is small and steady: the CIs of the two means overlap,
    the paired difference is clearly positive."""
    rng = np.random.default_rng(1)
    difficulty = rng.random(100)
    ours, other = difficulty + 0.02 + rng.normal(0, 0.01, 100), difficulty
    _, ours_low, ours_high = bootstrap_ci(ours, 1000, 0)
    _, other_low, other_high = bootstrap_ci(other, 1000, 0)
    assert ours_low < other_high and other_low < ours_high  # unpaired: the intervals overlap
    assert paired_verdict(ours, other, 1000, 0).startswith("wins")


def test_case_values_select_part_n_and_seen():
    cases = pa.table({
        "part": ["new", "new", "stream", "stream"],
        "n": [1, 5, -1, -1],
        "seen": [False, False, True, False],
        "auc": [0.1, 0.2, 0.3, 0.4],
    })
    assert case_values(cases, "auc", "new", n=5).tolist() == [0.2]
    assert case_values(cases, "auc", "stream").tolist() == [0.3, 0.4]
    assert case_values(cases, "auc", "stream", seen=False).tolist() == [0.4]


def _cases(users, ndcg, fold=0, part="new", n=1):
    size = len(users)
    return pa.table({"part": [part] * size, "n": [n] * size, "batch": [-1] * size, "seen": [False] * size, "user_id": users,
                     "hr": [1.0] * size, "ndcg": ndcg, "auc": [0.9] * size, "full_hr": [0.0] * size, "full_ndcg": [0.0] * size,
                     "fold": [fold] * size, "case": list(range(size))})


def test_pairing_refuses_cases_of_different_users():
    with pytest.raises(ValueError, match="different users"):
        paired(_cases([1, 2, 3], [0.9, 0.8, 0.7]), _cases([4, 5, 6], [0.9, 0.8, 0.7]), "ndcg")


def test_pairing_matches_fold_and_case_and_drops_unmatched():
    ours = pa.concat_tables([_cases([1, 2], [0.9, 0.8], fold=0), _cases([3, 4], [0.7, 0.6], fold=1)])
    other = _cases([3, 4], [0.5, 0.5], fold=1)  # evaluated in fold 1 only (e.g. diverged in fold 0)
    mine, theirs, users = paired(ours, other, "ndcg")
    assert mine.tolist() == [0.7, 0.6] and theirs.tolist() == [0.5, 0.5] and users.tolist() == [[1, 3], [1, 4]]


def test_comparisons_against_every_model_with_verdicts():
    rng = np.random.default_rng(2)
    users = list(range(200))
    base = rng.random(200)
    cases = {
        "responsive": _cases(users, (base + 0.1).tolist()),
        "rkmf": _cases(users, base.tolist()),  # ours is better by 0.1 on every case
        "pop": _cases(users, (base + 0.1 + rng.normal(0, 0.3, 200)).tolist()),  # same mean, noisy: a tie
        "spmf": _cases(users, (base + 0.2).tolist()),  # ours is worse by 0.1
    }
    found = {c.other: c for c in comparisons(cases, (1,), 500, 0) if c.metric == "ndcg"}
    assert set(found) == {"rkmf", "pop", "spmf"}  # every other model, not only the best
    assert found["rkmf"].word == "wins" and abs(found["rkmf"].diff - 0.1) < 1e-9
    assert found["spmf"].word == "loses" and found["pop"].word == "tie"
    table = "\n".join(verdict_tables(list(found.values())))
    assert "RKMF" in table and "SPMF" in table and "Pop" in table and "+0.100" in table


def test_forest_plot_is_a_png(tmp_path):
    rng = np.random.default_rng(3)
    cases = {"responsive": _cases(list(range(50)), rng.random(50).tolist()), "pop": _cases(list(range(50)), rng.random(50).tolist())}
    path = forest_plot(comparisons(cases, (1,), 200, 0), tmp_path / "forest.png", "d")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdicts_judge_new_user_ndcg_on_sampled_candidates_and_on_full_ranking(tmp_path):
    """Ours wins on the sampled candidates and loses on full ranking: both verdicts are drawn, in the table, the CSV
    and the forest plot's panels (sampled metrics can reorder models)."""
    rng = np.random.default_rng(4)
    users = list(range(200))
    base = rng.random(200)

    def with_full(ndcg, full):
        table = _cases(users, ndcg)
        return table.set_column(table.schema.get_field_index("full_ndcg"), "full_ndcg", pa.array(full))

    cases = {"responsive": with_full((base + 0.1).tolist(), (base * 0.1).tolist()), "pop": with_full(base.tolist(), (base * 0.1 + 0.05).tolist())}
    found = comparisons(cases, (1,), 300, 0)
    by_metric = {c.metric: c for c in found if c.part == "new"}
    assert by_metric["ndcg"].word == "wins" and by_metric["full_ndcg"].word == "loses"
    table = "\n".join(verdict_tables(found))
    assert "new users, NDCG@10 (sampled candidates)" in table and "new users, NDCG@10 (full ranking)" in table
    panels = [(part, metric) for part, metric, _ in forest_panels(found)]
    assert ("new", "ndcg") in panels and ("new", "full_ndcg") in panels
    facts = RunFacts("d", 1, [], {"data.new_user_ns": [1], "data.stream_batches": 1, "eval.bootstrap": 300}, {})
    metrics = {"new_n1_ndcg10": {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "cases": 200}}
    results = {m: {"model": m, "metrics": metrics, "seconds": {}} for m in cases}
    files = write_report(tmp_path, facts, results, cases, {0: results})
    rows = list(csv.DictReader(io.StringIO(files["verdicts.csv"].read_text())))
    assert {(r["metric"], r["verdict"]) for r in rows if r["part"] == "new" and r["metric"].endswith("ndcg")} == {("ndcg", "wins"), ("full_ndcg", "loses")}
    assert files["forest.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forest_panels_skip_full_ranking_when_it_was_not_computed():
    rng = np.random.default_rng(5)
    table = _cases(list(range(50)), rng.random(50).tolist())
    nan = table.set_column(table.schema.get_field_index("full_ndcg"), "full_ndcg", pa.array([float("nan")] * 50))
    found = comparisons({"responsive": nan, "pop": nan}, (1,), 100, 0)
    assert ("new", "full_ndcg") not in [(p, m) for p, m, _ in forest_panels(found)] and not any(c.metric == "full_ndcg" for c in found)


def test_table1_names_the_variant_a_row_runs():
    cells = {k: None for m in ("hr", "ndcg", "auc", "full_hr", "full_ndcg") for k in (m, f"{m}_ci")}
    rows = [{"n": 1, "model": m, "variant": v, "cases": 3, "paper_ml1m_hr": None, "paper_ml1m_ndcg": None, **cells}
            for m, v in (("spmf", "batch + reservoir draws"), ("rkmf", None))]
    table = table1_markdown(rows, "d")
    assert "| 1 | SPMF (variant: batch + reservoir draws) |" in table
    assert "| 1 | RKMF |" in table


def test_the_pooled_table_takes_the_variant_from_the_fold_records(tmp_path):
    cell = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "cases": 3}
    metrics = {"new_n1_ndcg10": cell, "stream_b0_auc": cell, "stream_b0_seen_auc": cell}
    pooled = {"spmf": {"model": "spmf", "metrics": metrics, "seconds": {}}, "pop": {"model": "pop", "metrics": metrics, "seconds": {}}}
    fold_results = {0: {"spmf": {"model": "spmf", "variant": "batch + reservoir draws", "metrics": metrics, "seconds": {}},
                        "pop": {"model": "pop", "variant": None, "metrics": metrics, "seconds": {}}}}
    facts = RunFacts("d", 1, [], {"data.new_user_ns": [1], "data.stream_batches": 1}, {}, quick=True)
    files = write_report(tmp_path, facts, pooled, {}, fold_results)
    table = files["table1.md"].read_text()
    assert "| 1 | SPMF (variant: batch + reservoir draws) |" in table and "| 1 | Pop |" in table


def _sweep_points() -> list[dict]:
    def cell(mean):
        return {"mean": mean, "ci_low": mean - 0.02, "ci_high": mean + 0.03, "cases": 90}

    def point(lam, status, ndcg=None, norms=(1.0, 2.0)):
        metrics = {} if ndcg is None else {f"new_n{n}_{m}": cell(ndcg + (0.1 if m == "hr10" else 0)) for n in (1, 5, 10) for m in ("ndcg10", "hr10")}
        history = [{"epoch": e, "grad_norm_max": g, "grad_norm_mean": g / 2} for e, g in enumerate(norms)]
        return {"lambda_ml": lam, "status": status, "metrics": metrics, "history": history, **({"diverged_epoch": 2} if status == "diverged" else {})}

    return [point(10.0, "diverged", norms=(5.0, 1e9)), point(0.0, "finished", 0.5), point(1.0, "finished", 0.6), point(100.0, "diverged", norms=(1e12,))]


def test_lambda_curve_is_on_the_papers_scale_with_cis_and_divergence():
    from tasks.evaluate.aggregate import lambda_curve

    curve = lambda_curve(_sweep_points(), K=20, n=5, metric="ndcg")
    assert curve["x"] == [0.0, 20.0]  # λ_paper = K·λ_ours, finished points in λ order
    assert curve["mean"] == [0.5, 0.6] and curve["low"] == [0.48, 0.58] and curve["high"] == [0.53, 0.63]
    assert curve["diverged"] == [200.0, 2000.0] and curve["first_diverged"] == 200.0 and curve["largest_tried"] == 2000.0


def test_lambda_table_and_plot_say_the_scale_and_where_training_diverged(tmp_path):
    from tasks.evaluate.aggregate import lambda_markdown, lambda_plot

    points = _sweep_points()
    table = lambda_markdown(points, K=20)
    assert "λ_paper = K·λ_ours with K = 20" in table and "Gradient clipping: none" in table
    assert "diverged (NaN/Inf) from λ_paper = 200 on" in table
    assert "| 200 | 10 | diverged in epoch 2 | 1e+09 |" in table
    assert "| 20 | 1 | finished | 2 | 0.600 [0.580, 0.630]" in table
    finished_only = lambda_markdown([p for p in points if p["status"] == "finished"], K=20)
    assert "No point diverged; the largest λ tried is λ_paper = 20." in finished_only
    png = lambda_plot(points, tmp_path / "lambda.png", "planted", K=20)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the plots: every series in a legend, nothing overlaps
def _legend_texts(fig) -> set[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return {text.get_text() for legend in legends for text in legend.get_texts()}


def _overlaps(fig) -> list[str]:
    """Every visible text (titles, labels, tick labels, legends, notes) whose box, as rendered, reaches into an axes
    other than its own: a label over another panel."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = {ax: ax.get_window_extent(renderer) for ax in fig.axes}
    found = []
    for text in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent")):
        if not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        own = text.axes
        for ax, other in boxes.items():
            if ax is not own and box.overlaps(other):
                found.append(f"{text.get_text()!r} over the panel {ax.get_title()!r}")
    return found


def _stream_part(new: pa.Table, rng) -> pa.Table:
    """Stream cases for the new cases' users (seen and first-time), numbered after them."""
    size = new.num_rows
    return pa.table({"part": ["stream"] * size, "n": [-1] * size, "batch": [0] * size, "seen": [u % 2 == 0 for u in range(size)],
                     "user_id": new["user_id"].to_pylist(), "hr": [1.0] * size, "ndcg": [0.5] * size, "auc": rng.random(size).tolist(),
                     "full_hr": [0.0] * size, "full_ndcg": [0.0] * size, "fold": [0] * size, "case": list(range(size, 2 * size))})


def _stream_results() -> dict[str, dict]:
    rng = np.random.default_rng(4)
    return {m: {"model": m, "metrics": {f"stream_b{b}_{k}": {"mean": float(rng.uniform(0.6, 0.9))} for b in range(5) for k in ("auc", "seen_auc")}}
            for m in ("responsive", "responsive_plus", "mf_ft", "rkmf", "srec", "spmf", "pop")}


def test_the_forest_plot_names_both_rows_of_ours_and_no_label_runs_into_another_panel():
    import matplotlib.pyplot as plt

    from tasks.evaluate.aggregate import forest_figure

    rng = np.random.default_rng(3)
    users = list(range(60))
    cases = {m: _cases(users, rng.random(60).tolist()) for m in ("responsive", "responsive_plus", "mf_ft", "rkmf", "spmf", "pop")}
    cases = {m: pa.concat_tables([t, _stream_part(t, rng)]) for m, t in cases.items()}
    found = comparisons(cases, (1,), 100, 0)
    assert {c.part for c in found} == {"new", "stream"}
    fig = forest_figure(found, "ml-100k")
    try:
        assert {"Ours (paper)", "Ours+"} <= _legend_texts(fig)
        assert len(fig.axes) == 4 and _overlaps(fig) == []  # HR, NDCG sampled, NDCG full ranking, stream AUC
    finally:
        plt.close(fig)


def test_the_stream_plot_has_every_row_in_its_legend_outside_the_panels():
    import matplotlib.pyplot as plt

    from tasks.evaluate.aggregate import LABELS, stream_auc_figure

    results = _stream_results()
    fig = stream_auc_figure(results, 5, "ml-100k")
    try:
        assert _legend_texts(fig) == {LABELS[m] for m in results}
        assert _overlaps(fig) == []
        fig.canvas.draw()
        legend = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
        assert not any(legend.overlaps(ax.get_window_extent(fig.canvas.get_renderer())) for ax in fig.axes)  # covers no point
    finally:
        plt.close(fig)


def test_the_lambda_plot_names_every_series_and_the_divergence_note_is_in_its_legend():
    import matplotlib.pyplot as plt

    from tasks.evaluate.aggregate import lambda_figure

    fig = lambda_figure(_sweep_points(), "planted", K=20)
    try:
        texts = _legend_texts(fig)
        assert {"HR@10 (n=5), 95% CI band", "NDCG@10 (n=5), 95% CI band"} <= texts
        assert any(t.startswith("training diverged (NaN/Inf) from λ_paper = 200") for t in texts)
        assert {"λ_paper = 0", "λ_paper = 20", "λ_paper = 200 (diverged)", "λ_paper = 2000 (diverged)"} <= texts
        assert _overlaps(fig) == []
    finally:
        plt.close(fig)


def test_the_improvement_table_names_each_row_of_ours():
    cells = {k: None for m in ("hr", "ndcg", "auc", "full_hr", "full_ndcg") for k in (m, f"{m}_ci")}
    rows = [{"n": 5, "model": m, "variant": None, "cases": 3, "paper_ml1m_hr": None, "paper_ml1m_ndcg": None, **cells, "hr": v, "ndcg": v}
            for m, v in (("responsive", 0.5), ("responsive_plus", 0.6), ("rkmf", 0.4))]
    tail = table1_markdown(rows, "d").split("### Relative improvement")[1]
    assert "| n | HR@10 (Ours (paper)) | NDCG@10 (Ours (paper)) | HR@10 (Ours+) | NDCG@10 (Ours+) |" in tail
    assert "| 5 | +25.0% | +25.0% | +50.0% | +50.0% |" in tail
