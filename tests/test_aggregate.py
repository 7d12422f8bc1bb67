"""The summary's verdicts: paired on the same cases, a tie unless the difference's CI excludes 0."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.aggregate import case_values, paired_verdict


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
    ours, other = difficulty + 0.02, difficulty
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
