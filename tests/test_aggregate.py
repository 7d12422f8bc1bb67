"""The summary's verdicts: paired on the same cases, a tie unless the difference's CI excludes 0."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from metarec.metrics import bootstrap_ci
from tasks.aggregate import case_values, paired_verdict, summary_markdown


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


def test_summary_refuses_to_pair_different_cases():
    def cases(users):
        return pa.table({"part": ["new"] * 3, "n": [1] * 3, "seen": [False] * 3, "user_id": users, "ndcg": [0.9, 0.8, 0.7],
                         "hr": [1.0] * 3, "auc": [0.9] * 3, "full_hr": [0.0] * 3, "full_ndcg": [0.0] * 3})

    rows = [{"n": 1, "model": m, **{k: v for k in ("hr", "ndcg", "auc", "full_hr", "full_ndcg")}} for m, v in (("responsive", 0.8), ("pop", 0.5))]
    same = summary_markdown("d", {}, {}, {}, rows, {}, {"responsive": cases([1, 2, 3]), "pop": cases([1, 2, 3])})
    assert "n=1, ndcg: ours 0.800 vs best other Pop 0.500 — tie" in same  # identical cases: difference exactly 0
    other = summary_markdown("d", {}, {}, {}, rows, {}, {"responsive": cases([1, 2, 3]), "pop": cases([4, 5, 6])})
    assert "not comparable (different cases)" in other
