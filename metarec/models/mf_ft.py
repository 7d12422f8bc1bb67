"""MF-FT: our MF and BPR without the meta loss (λ_ML = 0), updated online by plain fine-tuning.

The decisive ablation (docs/baselines.md): the same model f (docs/method.md §3: score
p_iᵀq_j, per-triple loss ``metarec.models.mf.bpr_triple_loss`` with the meta
section's λ_P, λ_Q⁺, λ_Q⁻, dimension d and initial std) as the meta-learned
model, so the two differ only in how they learn:

- offline: plain BPR by minibatch SGD over the history (``baselines.epochs``,
  ``baselines.lr``), one uniform negative per positive per epoch;
- stream batch: new ids, and items whose first positive arrives, get the mean
  of the trained rows plus N(0, σ²I) (docs/method.md §7, §11, σ =
  ``meta.new_row_std``), then ``baselines.ft_epochs`` SGD
  passes (rate ``baselines.ft_lr``) over the batch's interactions with fresh
  negatives, updating every touched user and item row — plain fine-tuning,
  the strategy the paper argues against;
- new user: a mean-plus-noise vector fine-tuned by ``ft_epochs`` SGD passes
  (one step per interaction per pass) on its first n interactions, item rows
  fixed, on a transient copy (``score_new_users`` changes nothing). Keeping
  the item rows fixed is our choice: one user's n interactions would move
  only those n items and the sampled negatives, and the model must not change.

An id never trained (a user never seen, an item with no positive) is scored with the mean of its table's trained rows
(§7 without the noise, whose random order of equal scores the metrics' tie rule averages over).
"""

from __future__ import annotations

import numpy as np

from metarec.config import BaselineConfig, Config, MetaConfig
from metarec.interface import Interactions, OnEpoch, RecentItems
from metarec.models.mf import bpr_triple_loss

from .common import (
    PURPOSE_NEW_USERS,
    PURPOSE_OBSERVE,
    FactorBaseline,
    autograd_bpr_grads,
    gaussian,
    negatives,
    require_fitted,
    rng_for,
    sgd_epoch,
)


class MFFineTune(FactorBaseline):
    name = "mf_ft"

    def __init__(self, config: BaselineConfig | None = None, meta: MetaConfig | None = None) -> None:
        self.config = config or BaselineConfig()
        self.meta = meta or MetaConfig()
        super().__init__(self.meta.dim, self.config.seed)
        m = self.meta
        self.grad_fn = autograd_bpr_grads(lambda w, hi, hj: bpr_triple_loss(w, hi, hj, m.lambda_p, m.lambda_q_pos, m.lambda_q_neg))
        self.new_row_std = m.new_row_std

    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "MFFineTune":
        self.fit_bpr(history, self.meta.init_std, on_epoch, finish=MFFineTune._new_user_rows)
        return self

    def _new_user_rows(self, rng: np.random.Generator) -> None:
        unseen = self.unseen_users()  # their rows start as every new user's does (§7), not as untrained noise
        self.W_[unseen] = self._population_plus_noise(rng)(len(unseen))

    def _population_plus_noise(self, rng: np.random.Generator):
        """k -> k new user rows (§7): the trained user rows' mean (``user_population``) + N(0, new_row_std² I)."""
        mean = self.user_population()[0][None]
        return lambda k: mean + gaussian(rng, k, self.dim, self.meta.new_row_std)

    def observe(self, batch: Interactions) -> None:
        require_fitted(self, self.H_)
        if not len(batch):
            return
        cfg = self.config
        rng = rng_for(self.seed, PURPOSE_OBSERVE, self.batches_)
        new_items = self.new_item_rows(rng)
        self._grow(max(len(self.W_), batch.n_users), max(len(self.H_), batch.n_items), self._population_plus_noise(rng), new_items)
        self.renew_untrained_items(batch, new_items)
        self._remember(batch)
        for _ in range(cfg.ft_epochs):
            neg = negatives(self.index_, batch.users, rng, len(self.H_))
            sgd_epoch(self.W_, self.H_, batch.users, batch.items, neg, self.grad_fn, cfg.ft_lr, cfg.batch_size, rng)
        self.batches_ += 1

    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        require_fitted(self, self.H_)
        users = np.asarray(recent.users, dtype=np.int64)
        rng = rng_for(self.seed, PURPOSE_NEW_USERS, self.batches_, int(users[0]) if len(users) else 0, len(users))
        init = self._population_plus_noise(rng)(len(users))
        w = self.adapt_new_users(init, recent.items, users, self.config.ft_epochs, self.config.ft_lr, rng)
        return self.score_rows(w, np.asarray(candidates))


def from_config(config: Config) -> MFFineTune:
    return MFFineTune(config.baselines, config.meta)
