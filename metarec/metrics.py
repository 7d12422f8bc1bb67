"""Leave-one-out ranking metrics of docs/method.md §9, per test case, and bootstrap CIs.

A case is one row of a score matrix whose column 0 is the true next item and
the other columns its sampled negatives. With g negatives scored strictly
higher than the positive and t tied with it, the positive's 0-based rank r is
taken as uniform over g .. g+t (random tie-breaking), and we report the
expectation: a model that scores everything equal gets HR@10 = 10/101, not 1
(optimistic ties) or 0 (pessimistic ties). Without ties this is exactly
HR@10 = [r < 10], NDCG@10 = 1/log2(r + 2) if r < 10. AUC counts ties as half.
"""

from __future__ import annotations

import numpy as np

CUTOFF = 10


def _rank_counts(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(greater, tied) counts of negatives against the positive, per row of (B, C) scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (cases, 1 + negatives), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf; a model must score every candidate with a finite number")
    positive = scores[:, :1]
    negatives = scores[:, 1:]
    return (negatives > positive).sum(1), (negatives == positive).sum(1)


def _discounts(max_rank: int, cutoff: int) -> np.ndarray:
    """cumulative[r] = sum over ranks < r of the NDCG gain 1/log2(rank+2) (0 past the cutoff)."""
    gains = np.where(np.arange(max_rank) < cutoff, 1.0 / np.log2(np.arange(max_rank) + 2.0), 0.0)
    return np.concatenate([[0.0], np.cumsum(gains)])


def case_metrics(scores: np.ndarray, cutoff: int = CUTOFF) -> dict[str, np.ndarray]:
    """Per-case hr, ndcg and auc for (B, 1 + negatives) scores, positive in column 0."""
    greater, tied = _rank_counts(scores)
    n_negatives = scores.shape[1] - 1
    span = tied + 1  # ranks g .. g+t, equally likely
    last = greater + span  # one past the last possible rank
    hits = np.clip(np.minimum(last, cutoff) - greater, 0, None)
    cumulative = _discounts(n_negatives + 1, cutoff)
    ndcg = (cumulative[last] - cumulative[greater]) / span
    auc = (n_negatives - greater - tied + 0.5 * tied) / n_negatives
    return {"hr": hits / span, "ndcg": ndcg, "auc": auc}


def full_ranking_metrics(positive_scores: np.ndarray, other_scores: np.ndarray, cutoff: int = CUTOFF) -> dict[str, np.ndarray]:
    """HR and NDCG when the positive is ranked against every non-interacted item.

    positive_scores (B,), other_scores (B, I) with excluded items set to -inf.
    """
    positive = np.asarray(positive_scores, dtype=np.float64)[:, None]
    other = np.asarray(other_scores, dtype=np.float64)
    greater = (other > positive).sum(1)
    tied = (other == positive).sum(1)
    span = tied + 1
    last = greater + span
    hits = np.clip(np.minimum(last, cutoff) - greater, 0, None)
    gains_upto = np.minimum(last, cutoff)
    cumulative = _discounts(cutoff + 1, cutoff)
    low = np.minimum(greater, cutoff)
    ndcg = (cumulative[gains_upto] - cumulative[low]) / span
    return {"hr": hits / span, "ndcg": ndcg}


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean, seeded."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if resamples <= 0 or len(values) == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory for large case counts
        stop = min(start + 256, resamples)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return mean, float(low), float(high)


def cluster_bootstrap_ci(
    values: np.ndarray, clusters: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over cases, resampling whole clusters.

    Cases of one user are correlated (a stream user has many; pooled folds give
    each user one case per n), so the resampling unit is the user: draw users
    with replacement and take the mean over all their cases, sum / count. With
    one case per cluster this is ``bootstrap_ci``'s case bootstrap.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    _, owner = np.unique(np.asarray(clusters), return_inverse=True, axis=0 if np.ndim(clusters) > 1 else None)
    owner = owner.reshape(-1)
    sums = np.bincount(owner, weights=values)
    counts = np.bincount(owner).astype(np.float64)
    mean = float(values.mean())
    n_clusters = len(sums)
    if resamples <= 0 or n_clusters == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory for many clusters
        stop = min(start + 256, resamples)
        picks = rng.integers(0, n_clusters, size=(stop - start, n_clusters))
        means[start:stop] = sums[picks].sum(1) / counts[picks].sum(1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return mean, float(low), float(high)
