"""SPMF: stream-centred probabilistic MF with a reservoir and rank-based positive sampling.

Wang, Yin, Huang, Wang, Du & Nguyen, "Streaming Ranking Based Recommender
Systems", SIGIR 2018.

Followed from the paper:
- the model: probabilistic MF (Gaussian priors on the factors, i.e. L2
  regularisation ``baselines.reg``) trained with the BPR pairwise objective by
  SGD, score ⟨w_u, h_i⟩;
- the reservoir: a fixed-size (``baselines.spmf_reservoir``) sample of all
  interactions seen so far, kept by reservoir sampling (Vitter's Algorithm R:
  the t-th interaction takes a uniform slot with probability |R| / t), filled
  with the history at fit time and with every stream interaction after the
  model has trained on its batch;
- the online update ("positive sampling"): each batch trains on its new
  interactions together with ``baselines.spmf_samples`` interactions drawn
  from the reservoir, an old interaction (u, i) drawn with probability
  ∝ exp(ρ_ui / τ), where ρ_ui ∈ [0, 1] is the fraction of items the current
  model ranks above i for u: the worse it is ranked, the likelier it is
  drawn (what the model is forgetting). τ = ``baselines.spmf_temperature``.

Adaptations and choices (BASELINES.md):
- our positives are the implicit interactions; negatives for the BPR loss are
  uniform over items the user never had (the paper's negative sampling for
  BPR), one per positive per epoch;
- the rank-based weight is written in normalised ranks so that τ does not
  depend on the catalogue size; τ → ∞ recovers uniform reservoir sampling;
- users first seen in a batch get rows from the PMF prior N(0, σ²); an item
  whose first positive arrives gets the mean of the trained item rows +
  N(0, ``baselines.new_row_std``²) (METHOD.md §11, for every model alike); a
  user or item never trained (an item with no positive, ids being dense) is
  scored with the mean of its table's trained rows; a new user's vector
  starts at the prior mean 0 and is trained by SGD on its first n
  interactions (items fixed, transient: ``score_new_users`` changes nothing);
- updates run ``baselines.spmf_update_epochs`` SGD passes over the batch plus
  the sample; the reservoir and every draw are seeded by (seed, batch count).

Not verified against the paper's full text (only its abstract was reachable
while writing this): the exact functional form of the rank-based weight and
whether its negatives are sampled non-uniformly. The form above is the one
BASELINES.md describes; τ is tuned like every other hyperparameter.
"""

from __future__ import annotations

import numpy as np
import torch

from metarec.config import BaselineConfig, Config
from metarec.interface import Interactions, RecentItems

from .common import (
    PURPOSE_NEW_USERS,
    PURPOSE_OBSERVE,
    FactorBaseline,
    gaussian,
    kernel_bpr_grads,
    negatives,
    require_fitted,
    rng_for,
    sgd_epoch,
)

RANK_CHUNK = 2048  # reservoir rows scored against all items at once


def reservoir_insert(
    res_users: np.ndarray, res_items: np.ndarray, seen: int, users: np.ndarray, items: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Algorithm R over a block of new interactions, vectorised; returns the reservoir and the new count seen.

    Equal to inserting them one by one: the t-th (1-based) overall goes to slot
    floor(U·t) if that is < size, and a later write to a slot overrides an earlier one.
    """
    users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
    free = min(max(size - len(res_users), 0), len(users))
    res_users = np.concatenate([res_users, users[:free]])
    res_items = np.concatenate([res_items, items[:free]])
    rest = np.arange(free, len(users))
    t = seen + rest + 1
    slot = np.floor(rng.random(len(rest)) * t).astype(np.int64)
    accept = slot < size
    slot, source = slot[accept], rest[accept]
    # the last write to each slot wins
    _, last_rev = np.unique(slot[::-1], return_index=True)
    keep = len(slot) - 1 - last_rev
    res_users, res_items = res_users.copy(), res_items.copy()
    res_users[slot[keep]] = users[source[keep]]
    res_items[slot[keep]] = items[source[keep]]
    return res_users, res_items, seen + len(users)


class SPMF(FactorBaseline):
    name = "spmf"
    _state_fields = FactorBaseline._state_fields + ("res_users_", "res_items_", "res_seen_")

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or BaselineConfig()
        super().__init__(self.config.dim, self.config.seed)
        self.grad_fn = kernel_bpr_grads("linear", 1.0, self.config.reg)
        self.new_row_std = self.config.new_row_std
        self.res_users_ = np.zeros(0, dtype=np.int64)
        self.res_items_ = np.zeros(0, dtype=np.int64)
        self.res_seen_ = 0

    def fit(self, history: Interactions) -> "SPMF":
        cfg = self.config
        rng = self.fit_bpr(history, cfg.init_std)
        empty = np.zeros(0, dtype=np.int64)
        self.res_users_, self.res_items_, self.res_seen_ = reservoir_insert(empty, empty, 0, history.users, history.items, cfg.spmf_reservoir, rng)
        return self

    def reservoir_ranks(self) -> np.ndarray:
        """ρ_ui ∈ [0, 1] of every reservoir interaction: the fraction of other items scored above i for u."""
        ranks = np.empty(len(self.res_users_), dtype=np.float64)
        for start in range(0, len(ranks), RANK_CHUNK):
            u = torch.from_numpy(self.res_users_[start : start + RANK_CHUNK])
            i = torch.from_numpy(self.res_items_[start : start + RANK_CHUNK])
            scores = self.W_[u] @ self.H_.T
            own = scores.gather(1, i[:, None])
            ranks[start : start + len(u)] = ((scores > own).sum(1).double() / max(len(self.H_) - 1, 1)).numpy()
        return ranks

    def sample_reservoir(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``spmf_samples`` reservoir interactions, drawn with replacement ∝ exp(ρ / τ)."""
        count = min(self.config.spmf_samples, len(self.res_users_)) if self.config.spmf_samples else 0
        if count == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        logits = self.reservoir_ranks() / self.config.spmf_temperature
        p = np.exp(logits - logits.max())
        pick = rng.choice(len(p), size=count, replace=True, p=p / p.sum())
        return self.res_users_[pick], self.res_items_[pick]

    def observe(self, batch: Interactions) -> None:
        require_fitted(self, self.H_)
        if not len(batch):
            return
        cfg = self.config
        rng = rng_for(self.seed, PURPOSE_OBSERVE, self.batches_)
        fill = lambda k: gaussian(rng, k, self.dim, cfg.init_std)  # noqa: E731 - the PMF prior
        new_items = self.new_item_rows(rng)  # METHOD.md §11: a new item starts as every model's does
        self._grow(max(len(self.W_), batch.n_users), max(len(self.H_), batch.n_items), fill, new_items)
        self.renew_untrained_items(batch, new_items)
        old_u, old_i = self.sample_reservoir(rng)
        self._remember(batch)
        users = np.concatenate([batch.users, old_u])
        items = np.concatenate([batch.items, old_i])
        for _ in range(cfg.spmf_update_epochs):
            neg = negatives(self.index_, users, rng, len(self.H_))
            sgd_epoch(self.W_, self.H_, users, items, neg, self.grad_fn, cfg.lr, cfg.batch_size, rng)
        self.res_users_, self.res_items_, self.res_seen_ = reservoir_insert(
            self.res_users_, self.res_items_, self.res_seen_, batch.users, batch.items, cfg.spmf_reservoir, rng
        )
        self.batches_ += 1

    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        require_fitted(self, self.H_)
        users = np.asarray(recent.users, dtype=np.int64)
        rng = rng_for(self.seed, PURPOSE_NEW_USERS, self.batches_, int(users[0]) if len(users) else 0, len(users))
        init = torch.zeros(len(users), self.dim)
        w = self.adapt_new_users(init, recent.items, users, self.config.spmf_update_epochs, self.config.lr, rng)
        return self.score_rows(w, np.asarray(candidates))


def from_config(config: Config) -> SPMF:
    return SPMF(config.baselines)
