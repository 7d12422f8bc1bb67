"""Hand-computed cases for the protocol's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metarec.metrics import bootstrap_ci, case_metrics, full_ranking_metrics


def _scores_with_rank(rank: int, n_negatives: int = 100) -> np.ndarray:
    """Positive scored 0.5; `rank` negatives above it, the rest below."""
    negatives = np.concatenate([np.ones(rank), np.zeros(n_negatives - rank)])
    return np.concatenate([[0.5], negatives])[None, :]


def test_rank_9_is_a_hit_and_rank_10_is_not():
    at9, at10 = case_metrics(_scores_with_rank(9)), case_metrics(_scores_with_rank(10))
    assert at9["hr"][0] == 1.0 and at10["hr"][0] == 0.0
    assert at9["ndcg"][0] == pytest.approx(1 / math.log2(11))
    assert at10["ndcg"][0] == 0.0
    assert at9["auc"][0] == pytest.approx(91 / 100) and at10["auc"][0] == pytest.approx(90 / 100)


def test_first_and_last():
    top, last = case_metrics(_scores_with_rank(0)), case_metrics(_scores_with_rank(100))
    assert (top["hr"][0], top["ndcg"][0], top["auc"][0]) == (1.0, 1.0, 1.0)
    assert (last["hr"][0], last["ndcg"][0], last["auc"][0]) == (0.0, 0.0, 0.0)


def test_all_ties_is_chance_not_a_hit():
    m = case_metrics(np.zeros((1, 101)))
    assert m["hr"][0] == pytest.approx(10 / 101)
    assert m["ndcg"][0] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / 101)
    assert m["auc"][0] == pytest.approx(0.5)


def test_partial_tie_straddling_the_cutoff():
    # 8 above, positive tied with 4 negatives: rank uniform over 8..12, ranks 8 and 9 hit
    scores = np.concatenate([[0.5], np.ones(8), np.full(4, 0.5), np.zeros(88)])[None, :]
    m = case_metrics(scores)
    assert m["hr"][0] == pytest.approx(2 / 5)
    assert m["ndcg"][0] == pytest.approx((1 / math.log2(10) + 1 / math.log2(11)) / 5)
    assert m["auc"][0] == pytest.approx((88 + 2) / 100)


def test_bad_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        case_metrics(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros(5))


def test_full_ranking_matches_sampled_when_candidates_are_all_items():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 30))
    sampled = case_metrics(scores)
    full = full_ranking_metrics(scores[:, 0], scores[:, 1:])
    np.testing.assert_allclose(full["hr"], sampled["hr"])
    np.testing.assert_allclose(full["ndcg"], sampled["ndcg"])
    excluded = scores[:, 1:].copy()
    excluded[:, :] = -np.inf  # every other item excluded: the positive is first
    assert full_ranking_metrics(scores[:, 0], excluded)["hr"].tolist() == [1.0] * 50


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    values = np.random.default_rng(1).random(500)
    mean, low, high = bootstrap_ci(values, 500, seed=3)
    assert low < mean < high and high - low < 0.1
    assert bootstrap_ci(values, 500, seed=3) == (mean, low, high)
    assert bootstrap_ci(np.array([0.7]), 100) == (0.7, 0.7, 0.7)
