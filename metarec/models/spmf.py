"""SPMF: stream-centred probabilistic MF with a reservoir and rank-based positive sampling.

Wang, Yin, Huang, Wang, Du & Nguyen, "Streaming Ranking Based Recommender
Systems", SIGIR 2018.

Followed from the paper, in the form the ASMG authors' code labels "exactly
the method from the paper" (danni9594/ASMG, ``MovieLens/SPMF/train_ml.py``,
its strategy 1); ``baselines.spmf_strategy = "exact"``, the default:
- the model: probabilistic MF (Gaussian priors on the factors, i.e. L2
  regularisation ``baselines.reg``) trained with the BPR pairwise objective by
  SGD, score ⟨w_u, h_i⟩;
- the reservoir R: a fixed-size (``baselines.spmf_reservoir``) sample of all
  positives seen so far, kept by Vitter's Algorithm R (the t-th positive takes
  a uniform slot with probability |R| / t), filled with the history at fit
  time and with each stream batch after the model has trained on it;
- the online update ("positive sampling"): pool R with the new batch W, score
  every positive of R ∪ W by the current model, and rank them all together by
  score, rank 0 for the highest (the source sorts the pooled positives by
  score, descending); draw |W| of them without replacement with weight
  exp(rank / |R ∪ W|), so the worse the model ranks a positive, the likelier
  it is trained on (what it is forgetting); train on those, then update R.
  The draw is sequential weighted sampling without replacement (each draw ∝
  weight among those left, as pandas' ``sample(weights=..., replace=False)``
  in the source), done at once with the Gumbel-top-k trick.

Adaptations and choices (docs/baselines.md):
- BPR instead of the source's pointwise log loss (its base model is a CTR
  model over stored labelled negatives): each trained positive gets
  ``baselines.spmf_negatives`` uniform negatives among the items its user
  never had, fresh every epoch. Default 1, BPR's own convention (one j per
  drawn (u, i)); the 5 negatives per positive of the ASMG data feed a
  pointwise loss, and in BPR k triples per positive would scale the
  positive's step by k, which the tuned learning rate already sets;
- a temperature τ (``baselines.spmf_temperature``): weight exp(rank / (τ |R ∪ W|));
  τ = 1 is the source's form; docs/baselines.md lists the sampling temperature
  among the tuned hyperparameters, so the search may move it;
- the ranking pools all users' positives by raw score, as the source does,
  though BPR scores are calibrated per user only;
- ``baselines.spmf_strategy = "batch_plus_reservoir"`` is a variant (this
  module's earlier default, close to the source's strategy 2, labelled in
  Table 1): all of W plus ``baselines.spmf_samples`` reservoir positives
  drawn with replacement ∝ exp(ρ_ui / τ), ρ_ui ∈ [0, 1] the fraction of
  items the model ranks above i for u;
- users first seen in a batch get rows from the PMF prior N(0, σ²); an item
  whose first positive arrives gets the mean of the trained item rows +
  N(0, ``baselines.new_row_std``²) (docs/method.md §11, for every model alike); a
  user or item never trained (an item with no positive, ids being dense) is
  scored with the mean of its table's trained rows; a new user's vector
  starts at the prior mean 0 and is trained by SGD on its first n
  interactions (items fixed, transient: ``score_new_users`` changes nothing);
- updates run ``baselines.spmf_update_epochs`` SGD passes over the training
  positives (the source runs one epoch); the reservoir and every draw are
  seeded by (seed, batch count).

The paper's full text was not reachable while writing this; the exact
strategy follows the ASMG code cited above (docs/baselines.md, SPMF).
"""

from __future__ import annotations

import numpy as np
import torch

from metarec.config import BaselineConfig, Config
from metarec.interface import Interactions, OnEpoch, RecentItems

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


def descending_ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of each score in descending order (0 = highest; ties by position), as the source sorts."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def weighted_sample_without_replacement(log_weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct positions in draw order, each draw ∝ exp(log_weight) among those not yet drawn.

    Gumbel-top-k: the positions of the ``count`` largest log_weight + Gumbel noise, sorted by that key,
    have exactly the law of sequential weighted draws without replacement.
    """
    count = min(int(count), len(log_weights))
    keys = np.asarray(log_weights, dtype=np.float64) + rng.gumbel(size=len(log_weights))
    top = np.argpartition(-keys, count - 1)[:count] if 0 < count < len(keys) else np.arange(len(keys))[: max(count, 0)]
    return top[np.argsort(-keys[top], kind="stable")]


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

    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "SPMF":
        def fill_reservoir(model: "SPMF", rng: np.random.Generator) -> None:
            empty = np.zeros(0, dtype=np.int64)
            model.res_users_, model.res_items_, model.res_seen_ = reservoir_insert(
                empty, empty, 0, history.users, history.items, model.config.spmf_reservoir, rng)

        self.fit_bpr(history, self.config.init_std, on_epoch, finish=fill_reservoir)
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

    def exact_sample(self, batch: Interactions, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """|W| positives of R ∪ W drawn without replacement, weight exp(rank / (τ |R ∪ W|)), rank 0 = best scored."""
        users = np.concatenate([self.res_users_, np.asarray(batch.users, dtype=np.int64)])
        items = np.concatenate([self.res_items_, np.asarray(batch.items, dtype=np.int64)])
        scores = np.concatenate([self.pair_scores(users[s : s + RANK_CHUNK], items[s : s + RANK_CHUNK]) for s in range(0, len(users), RANK_CHUNK)])
        log_weights = descending_ranks(scores) / (self.config.spmf_temperature * len(scores))
        pick = weighted_sample_without_replacement(log_weights, len(batch), rng)
        return users[pick], items[pick]

    def pair_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        u, i = torch.from_numpy(users), torch.from_numpy(items)
        return (self.W_[u] * self.H_[i]).sum(1).numpy()

    def observe(self, batch: Interactions) -> None:
        require_fitted(self, self.H_)
        if not len(batch):
            return
        cfg = self.config
        rng = rng_for(self.seed, PURPOSE_OBSERVE, self.batches_)
        fill = lambda k: gaussian(rng, k, self.dim, cfg.init_std)  # noqa: E731 - the PMF prior
        new_items = self.new_item_rows(rng)  # docs/method.md §11: a new item starts as every model's does
        self._grow(max(len(self.W_), batch.n_users), max(len(self.H_), batch.n_items), fill, new_items)
        self.renew_untrained_items(batch, new_items)
        if cfg.spmf_strategy == "exact":
            users, items = self.exact_sample(batch, rng)
        else:
            old_u, old_i = self.sample_reservoir(rng)
            users, items = np.concatenate([batch.users, old_u]), np.concatenate([batch.items, old_i])
        self._remember(batch)
        users, items = np.repeat(users, cfg.spmf_negatives), np.repeat(items, cfg.spmf_negatives)
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


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the faithful default."""
    return "batch + reservoir draws" if config.baselines.spmf_strategy == "batch_plus_reservoir" else None
