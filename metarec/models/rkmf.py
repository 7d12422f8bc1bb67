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

ItemUpdate under BPR is two-sided, as MyMediaLite (zenogantner/MyMediaLite,
Rendle among its authors) retrains an item for implicit feedback
(``ItemRecommendation/BPRMF.cs`` RetrainItem): h_i is redrawn from N(0, σ²)
and trained, W fixed, both as the positive for users who have i and as the
sampled negative for users who do not, so it is pulled up for its users and
pushed down for everyone else. UserUpdate follows its RetrainUser (w_u
redrawn, SGD over u's positives with a uniform negative each, H fixed).

How often each side is trained (``baselines.rkmf_item_update``):
- "two_sided" (default): h_i's own terms of one offline BPR epoch, the
  paper's principle (retrain a row on its part of the training objective):
  the positive of (u, i, j) once for each user u of i, j uniform over u's
  non-positives; the negative of (u, k, i) a Poisson number of times with the
  mean a fit epoch has, Σ_{u ∌ i} |I_u| / (I − |I_u|), u drawn ∝
  |I_u| / (I − |I_u|) among users without i, k uniform over u's positives;
- "mymedialite" (a variant): RetrainItem's own sampling, ⌊P / I⌋ users drawn
  uniformly per epoch (P positives, I items), each training h_i on the side
  it is on for them. Relative to its positive steps, i is then the negative
  U·I/P times as often as in a fit epoch (U users; the inverse density, 23 on
  ml-100k; its source remarks that the item "may be updated more or less
  frequently than in the normal from-scratch training"): on ml-100k it
  pushes the stream's items below the rest and the stream AUC falls from
  0.85 to 0.56;
- "positives_only" (a variant, this module's earlier default): h_i only as
  the positive of each of its users, so it is only ever pulled up, which
  inflates item norms.

Adaptations to our implicit, pairwise setting (docs/baselines.md):
- the squared loss on ratings becomes BPR: −log σ(r̂_ui − r̂_uj) over u's
  positives i and uniform negatives j, offline and in both updates; the
  constant a (and r_min) cancels in the difference, and we fix b = 0 (with a
  pairwise loss b only moves where σ saturates); MyMediaLite's BPRMF item
  biases are not used (no model here has one);
- kernels offered: linear and logistic (``baselines.rkmf_kernel``); the
  paper's polynomial and RBF kernels are not implemented;
- the updates run ``baselines.rkmf_update_epochs`` epochs (MyMediaLite runs
  one pass; the paper retrains for several); variants are labelled in Table 1;
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
from metarec.interface import Interactions, OnEpoch, RecentItems
from metarec.neighbours import InteractionIndex

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
    sgd_item_rounds,
    sgd_rounds,
    uniform_positives,
    user_positives,
)


MAX_DRAW_ROUNDS = 32  # redraws of a user who has the item; ones still drawing an owner after that are dropped


def draw_users_without(index: InteractionIndex, weight: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per entry of ``items``, a user drawn ∝ ``weight`` among those without that item (-1 if none was found)."""
    cdf = np.cumsum(weight)
    out = np.full(len(items), -1, dtype=np.int64)
    if not len(items) or cdf[-1] <= 0:
        return out
    pending = np.arange(len(items))
    for _ in range(MAX_DRAW_ROUNDS):
        drawn = np.minimum(np.searchsorted(cdf, rng.random(len(pending)) * cdf[-1], side="right"), len(cdf) - 1)
        ok = ~index.has_pair(drawn, items[pending])
        out[pending[ok]] = drawn[ok]
        pending = pending[~ok]
        if not len(pending):
            break
    return out


class RKMF(FactorBaseline):
    name = "rkmf"

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or BaselineConfig()
        super().__init__(self.config.dim, self.config.seed)
        self.kernel = self.config.rkmf_kernel
        self.scale = self.config.rkmf_scale if self.kernel == "logistic" else 1.0
        self.grad_fn = kernel_bpr_grads(self.kernel, self.scale, self.config.reg)
        self.new_row_std = self.config.new_row_std

    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "RKMF":
        self.fit_bpr(history, self.config.init_std, on_epoch)
        return self

    def user_update(self, users: np.ndarray, rng: np.random.Generator) -> None:
        """UserUpdate for each of ``users``: fresh w_u, retrained over all of u's positives, H fixed."""
        self.W_[torch.from_numpy(users)] = gaussian(rng, len(users), self.dim, self.config.init_std)
        owner, items = user_positives(self.index_, users)
        for _ in range(self.config.rkmf_update_epochs):
            neg = negatives(self.index_, owner, rng, len(self.H_))
            sgd_rounds(self.W_, self.H_, owner, items, neg, self.grad_fn, self.config.lr, rng, side="user")

    def item_update(self, items: np.ndarray, rng: np.random.Generator) -> None:
        """ItemUpdate for each of ``items`` (sorted, distinct): fresh h_i, retrained with W fixed."""
        self.H_[torch.from_numpy(items)] = gaussian(rng, len(items), self.dim, self.config.init_std)
        if self.config.rkmf_item_update == "positives_only":
            self._positives_only_item_update(items, rng)
        elif self.config.rkmf_item_update == "mymedialite":
            self._mymedialite_item_update(items, rng)
        else:
            self._two_sided_item_update(items, rng)

    def _two_sided_item_update(self, items: np.ndarray, rng: np.random.Generator) -> None:
        """h_i on its own terms of an offline BPR epoch: the positive of each of its users, the negative as often as a fit epoch draws it.

        A fit epoch pairs every positive (u, k) with a uniform non-positive j, so i is the negative of (u, k), u
        without i, with probability 1 / (I − |I_u|): in all, a Poisson count with mean Σ_{u ∌ i} |I_u| / (I − |I_u|),
        a user drawn ∝ |I_u| / (I − |I_u|) among those without i, k uniform among u's positives.
        """
        n_items = len(self.H_)
        pos_item, pos_user = item_positives(self.index_, items)
        counts = self.index_.positive_counts(np.arange(len(self.W_)))
        weight = np.where(counts < n_items, counts / np.maximum(n_items - counts, 1), 0.0)
        owners_weight = np.bincount(np.searchsorted(items, pos_item), weights=weight[pos_user], minlength=len(items))
        expected = np.maximum(weight.sum() - owners_weight, 0.0)
        for _ in range(self.config.rkmf_update_epochs):
            j = negatives(self.index_, pos_user, rng, n_items)
            as_negative = np.repeat(items, rng.poisson(expected))
            users = draw_users_without(self.index_, weight, as_negative, rng)
            kept = users >= 0
            users, as_negative = users[kept], as_negative[kept]
            k = uniform_positives(self.index_, users, rng)
            sgd_item_rounds(
                self.W_, self.H_, np.r_[pos_user, users], np.r_[pos_item, k], np.r_[j, as_negative], np.r_[pos_item, as_negative],
                self.grad_fn, self.config.lr, rng,
            )

    def _mymedialite_item_update(self, items: np.ndarray, rng: np.random.Generator) -> None:
        """MyMediaLite's RetrainItem sampling: ⌊P/I⌋ uniform users per epoch; h_i is the positive for those who have i, else the negative."""
        n_items = len(self.H_)
        users = np.arange(len(self.W_))
        counts = self.index_.positive_counts(users)  # 0 for ids the index has never seen
        eligible = users[(counts > 0) & (counts < n_items)]
        if not len(eligible):
            return
        draws = max(1, len(self.index_.pair_key_) // n_items)
        retrained = np.repeat(items, draws)
        for _ in range(self.config.rkmf_update_epochs):
            drawn = eligible[rng.integers(len(eligible), size=len(retrained))]
            has = self.index_.has_pair(drawn, retrained)
            pos, neg = retrained.copy(), retrained.copy()
            neg[has] = negatives(self.index_, drawn[has], rng, n_items)
            pos[~has] = uniform_positives(self.index_, drawn[~has], rng)
            sgd_item_rounds(self.W_, self.H_, drawn, pos, neg, retrained, self.grad_fn, self.config.lr, rng)

    def _positives_only_item_update(self, items: np.ndarray, rng: np.random.Generator) -> None:
        """The variant: h_i trained as the positive of every user of i (a uniform negative each), never as a negative."""
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


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the faithful default."""
    return {"positives_only": "positives-only item update", "mymedialite": "MyMediaLite item sampling"}.get(config.baselines.rkmf_item_update)
