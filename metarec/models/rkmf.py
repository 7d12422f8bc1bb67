"""RKMF: regularised kernel matrix factorisation with online UserUpdate / ItemUpdate.

Rendle & Schmidt-Thieme, "Online-updating regularized kernel matrix
factorization models for large-scale recommender systems", RecSys 2008.

Followed from the paper:
- the model r̂_ui = a + c·K(w_u, h_i) with the linear kernel K = ⟨w, h⟩ and the
  logistic form r̂ = r_min + (r_max − r_min)·σ(b + ⟨w, h⟩) (its section on
  kernels); ``baselines.rkmf_kernel`` chooses, ``baselines.rkmf_scale`` is
  c = r_max − r_min;
- offline training by stochastic gradient descent with L2 regularisation λ
  (``baselines.reg``) on W and H, from N(0, σ²) initial factors;
- the online rules (its Algorithm "UserUpdate"/"ItemUpdate"): when user u gets
  new data, re-initialise w_u and retrain w_u alone over all of u's data for a
  few epochs with H fixed; likewise h_i with W fixed. A stream batch triggers
  UserUpdate for each of its users, then ItemUpdate for each of its items
  (the alternation the reproduced paper describes); nothing else changes.

Adaptations to our implicit, pairwise setting (BASELINES.md):
- the squared loss on ratings becomes BPR: −log σ(r̂_ui − r̂_uj) over u's
  positives i and uniform negatives j, offline and in both updates; the
  constant a (and r_min) cancels in the difference, and we fix b = 0 (with a
  pairwise loss b only moves where σ saturates);
- in ItemUpdate(i) the triples are (u, i, j) for every user u of i, with a
  uniform negative j for u; only h_i moves;
- a new user's first n interactions trigger UserUpdate on a transient row
  (``score_new_users`` leaves the model unchanged); ids first seen in a batch
  get N(0, σ²) rows and are then retrained by the update rules; an id never
  trained (a user never seen, an item with no positive) is scored with the
  mean of its table's trained rows;
- offline SGD runs in small minibatches whose gradients are scatter-added (see
  ``common.sgd_epoch``); the updates take exactly one step per triple and row.
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
    item_positives,
    kernel_bpr_grads,
    negatives,
    require_fitted,
    rng_for,
    sgd_rounds,
    user_positives,
)


class RKMF(FactorBaseline):
    name = "rkmf"

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or BaselineConfig()
        super().__init__(self.config.dim, self.config.seed)
        self.kernel = self.config.rkmf_kernel
        self.scale = self.config.rkmf_scale if self.kernel == "logistic" else 1.0
        self.grad_fn = kernel_bpr_grads(self.kernel, self.scale, self.config.reg)
        self.new_row_std = self.config.new_row_std

    def fit(self, history: Interactions) -> "RKMF":
        self.fit_bpr(history, self.config.init_std)
        return self

    def user_update(self, users: np.ndarray, rng: np.random.Generator) -> None:
        """UserUpdate for each of ``users``: fresh w_u, retrained over all of u's positives, H fixed."""
        self.W_[torch.from_numpy(users)] = gaussian(rng, len(users), self.dim, self.config.init_std)
        owner, items = user_positives(self.index_, users)
        for _ in range(self.config.rkmf_update_epochs):
            neg = negatives(self.index_, owner, rng, len(self.H_))
            sgd_rounds(self.W_, self.H_, owner, items, neg, self.grad_fn, self.config.lr, rng, side="user")

    def item_update(self, items: np.ndarray, rng: np.random.Generator) -> None:
        """ItemUpdate for each of ``items``: fresh h_i, retrained over all of i's users, W fixed."""
        self.H_[torch.from_numpy(items)] = gaussian(rng, len(items), self.dim, self.config.init_std)
        item, users = item_positives(self.index_, items)
        for _ in range(self.config.rkmf_update_epochs):
            neg = negatives(self.index_, users, rng, len(self.H_))
            sgd_rounds(self.W_, self.H_, users, item, neg, self.grad_fn, self.config.lr, rng, side="pos")

    def observe(self, batch: Interactions) -> None:
        require_fitted(self, self.H_)
        if not len(batch):
            return
        rng = rng_for(self.seed, PURPOSE_OBSERVE, self.batches_)
        fill = lambda k: gaussian(rng, k, self.dim, self.config.init_std)  # noqa: E731 - rows UserUpdate/ItemUpdate re-draw anyway
        self._grow(max(len(self.W_), batch.n_users), max(len(self.H_), batch.n_items), fill, fill)
        self._remember(batch)
        self.user_update(np.unique(batch.users), rng)
        self.item_update(np.unique(batch.items), rng)
        self.batches_ += 1

    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        require_fitted(self, self.H_)
        users = np.asarray(recent.users, dtype=np.int64)
        rng = rng_for(self.seed, PURPOSE_NEW_USERS, self.batches_, int(users[0]) if len(users) else 0, len(users))
        init = gaussian(rng, len(users), self.dim, self.config.init_std)
        w = self.adapt_new_users(init, recent.items, users, self.config.rkmf_update_epochs, self.config.lr, rng)
        return self.score_rows(w, np.asarray(candidates))


def from_config(config: Config) -> RKMF:
    return RKMF(config.baselines)
