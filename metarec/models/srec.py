"""sRec: user and item vectors as continuous-time random processes, filtered recursively.

Chang, Zhang, Tang, Yin, Chang & Huang, "Streaming Recommender Systems", WWW 2017.

Followed from the paper (as restated in docs/baselines.md; its full text was not
reachable while writing this):
- each user and item vector is a Gaussian random process that drifts between
  observations (a random walk: the variance of every coordinate grows by
  s²·Δt with the time Δt since that vector was last updated, s² =
  ``baselines.srec_drift_var`` per second);
- an observation is the inner product of the two vectors plus Gaussian noise
  of variance σ² (``baselines.srec_obs_var``);
- inference is recursive mean-field: the posterior after an observation is
  the prior of the next, an update touches only the two vectors involved and
  never revisits old data, and in the update of one side the other side
  enters through its first two moments, E[h] = m_h and
  E[h hᵀ] = m_h m_hᵀ + Σ_h (``baselines.srec_update = "mean_field"``, the
  default). For user u observing y on item i at time t:
    predict  P = Σ_u + s²(t − τ_u),  τ_u ← t  (Σ_h likewise drifted to t);
    update   Σ_u⁻¹ ← P⁻¹ + (m_h m_hᵀ + Σ_h) / σ²,
             m_u   ← Σ_u (P⁻¹ m_u + m_h y / σ²),
  then the same for the item with the user's new moments. The other side's
  variance adds Σ_h/σ² to the precision: it shrinks m_u toward 0 and keeps
  Σ_u larger when the item is itself uncertain;
- one streaming pass over the history at fit time (``baselines.srec_passes``
  = 1), then over the stream as it comes;
- new users and items enter with a prior built from the existing population:
  mean = the mean of the current posterior means, variance = their spread
  (per-coordinate variance across the population).

Adaptations and choices:
- implicit feedback with a Gaussian likelihood: an observed positive is
  y = 1, and each positive comes with ``baselines.srec_negatives`` uniform
  non-positive items observed as y = 0 at the same time. docs/baselines.md names
  a probit/logistic likelihood (the paper's ordinal thresholds reduced to
  binary data) as the faithful reduction; this module keeps the Gaussian one;
- diagonal (mean-field) covariance per vector: O(d) per update, so it scales
  to Netflix. The update above is exact for a diagonal prior (P⁻¹ + Σ_h/σ²
  is diagonal, m_h m_hᵀ/σ² a rank-one term: Sherman–Morrison), and the stored
  Σ_u keeps the diagonal of its result;
- vectorised order: within a batch, all user updates run first (item moments
  fixed at their values before the batch), one observation per user per
  round in time order, then all item updates with the new user moments;
- fit: the history is filtered in time order in chunks of ``SREC_CHUNK``
  positives, from N(0, init_std²) means and variance ``srec_prior_var``;
- variants (labelled in Table 1; this module's earlier defaults):
  ``srec_update = "means_only"`` lets the other side enter by its mean alone
  (Σ_h ignored: the Kalman step with m_h as a known regressor);
  ``srec_passes`` > 1 repeats the fit's pass from the previous means with the
  variances reset to the prior (a multi-pass warm start);
- scoring uses the posterior means, m_uᵀm_i; an id never trained (a user never
  seen, an item with no positive: observed as a negative only) is scored with
  the population prior mean, and such an item re-enters with the prior when its
  first positive arrives; a new user's n interactions are filtered
  into a transient vector from the population prior (``score_new_users``
  changes nothing).
"""

from __future__ import annotations

import numpy as np
import torch

from metarec.config import BaselineConfig, Config
from metarec.interface import Interactions, OnEpoch, RecentItems, fitted_copy
from metarec.neighbours import InteractionIndex

from .common import (
    PURPOSE_FIT,
    PURPOSE_NEW_USERS,
    PURPOSE_OBSERVE,
    FactorBaseline,
    check_ids,
    gaussian,
    grow,
    negatives,
    require_fitted,
    rng_for,
    round_order,
)

SREC_CHUNK = 1024  # history positives filtered together at fit time (same two-sided order as a stream batch)
MIN_VAR = 1e-6
NEVER = -1  # tau of a vector not yet observed: no drift before its first observation


def drifted_var(var: torch.Tensor, tau: torch.Tensor, rows: torch.Tensor, t: torch.Tensor, drift_var: float) -> torch.Tensor:
    """(R, d) variance of ``rows`` at times t: the stored one plus the random walk's growth since each was last updated."""
    last = tau[rows]
    elapsed = (t - torch.where(last == NEVER, t, last)).clamp(min=0).to(var.dtype)  # 0 before the first observation
    return var[rows] + drift_var * elapsed[:, None]


def kalman_round(
    mean: torch.Tensor,
    var: torch.Tensor,
    tau: torch.Tensor,
    rows: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    obs_var: float,
    drift_var: float,
    x_var: torch.Tensor | None = None,
) -> None:
    """One diagonal filtering step for distinct ``rows`` of (mean, var, tau), observing y ≈ v[row]·h at time t.

    h is the other side with mean x and diagonal variance ``x_var`` (mean-field: E[h hᵀ] = x xᵀ + diag(x_var));
    ``x_var`` None is the means-only variant (h = x known). Shapes: rows (R,), x and x_var (R, d), y (R,), t (R,); in place.
    """
    P = drifted_var(var, tau, rows, t, drift_var)
    m = mean[rows]
    if x_var is None:
        S = obs_var + (P * x * x).sum(1, keepdim=True)
        gain = P * x / S
        mean[rows] = m + gain * (y[:, None] - (m * x).sum(1, keepdim=True))
        var[rows] = (P - gain * x * P).clamp(min=MIN_VAR)
    else:
        # precision P⁻¹ + diag(x_var)/σ² (diagonal) plus the rank-one x xᵀ/σ², inverted by Sherman–Morrison
        shrink = torch.reciprocal(1.0 + P * x_var / obs_var)  # what 1.0 / (...) computes (reciprocal, then × 1.0), one op fewer
        D = P * shrink  # (P⁻¹ + x_var/σ²)⁻¹
        Dx = D * x  # computed once: the products below group as (D * x) * ..., so the numbers are unchanged
        S = obs_var + (Dx * x).sum(1, keepdim=True)
        a = shrink * m + Dx * (y[:, None] / obs_var)  # D (P⁻¹ m + x y / σ²)
        mean[rows] = a - Dx * (x * a).sum(1, keepdim=True) / S
        var[rows] = (D - D * D * x * x / S).clamp(min=MIN_VAR)
    tau[rows] = t


def kalman_rounds(
    mean: torch.Tensor,
    var: torch.Tensor,
    tau: torch.Tensor,
    rows: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    obs_var: float,
    drift_var: float,
    x_var: torch.Tensor | None = None,
) -> None:
    """``kalman_round`` over observations whose rows repeat: each row's observations in their given order, one per
    round, the rows of a round distinct (``rounds``). The observations are put in round order once, so each round
    reads slices instead of gathering (the rounds are many and small: a user's whole session may sit in one chunk)."""
    with torch.inference_mode():  # no autograd bookkeeping (~20% of a tiny step); the tables change in place only
        _kalman_rounds(mean, var, tau, np.asarray(rows, dtype=np.int64), x, y, t, obs_var, drift_var, x_var)


def _kalman_rounds(mean, var, tau, rows: np.ndarray, x, y, t, obs_var: float, drift_var: float, x_var) -> None:
    order, bounds = round_order(rows, None)
    at = torch.from_numpy(order)
    r_all, x_all, y_all, t_all = torch.from_numpy(rows[order]), x[at], y[at], t[at]
    v_all = _at(x_var, at)
    for a, b in zip(bounds[:-1], bounds[1:]):
        kalman_round(mean, var, tau, r_all[a:b], x_all[a:b], y_all[a:b], t_all[a:b], obs_var, drift_var, None if v_all is None else v_all[a:b])


def _at(values: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[rows]


class SRec(FactorBaseline):
    name = "srec"
    _state_fields = FactorBaseline._state_fields + ("var_W_", "var_H_", "tau_W_", "tau_H_")

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or BaselineConfig()
        super().__init__(self.config.dim, self.config.seed)
        self.var_W_ = torch.zeros(0, self.dim)
        self.var_H_ = torch.zeros(0, self.dim)
        self.tau_W_ = torch.zeros(0, dtype=torch.int64)
        self.tau_H_ = torch.zeros(0, dtype=torch.int64)

    # ---- observations
    def observations(self, batch: Interactions, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(users, items, y, ts) in time order: each positive (y=1) followed by its sampled negatives (y=0)."""
        k = self.config.srec_negatives
        users = np.repeat(batch.users, 1 + k)
        items = np.repeat(batch.items, 1 + k)
        y = np.tile(np.r_[1.0, np.zeros(k)], len(batch)).astype(np.float32)
        if k:
            slots = y == 0
            items[slots] = negatives(self.index_, users[slots], rng, len(self.H_))
        return users, items, y, np.repeat(batch.ts, 1 + k)

    @property
    def mean_field(self) -> bool:
        return self.config.srec_update == "mean_field"

    def moments(self, mean: torch.Tensor, var: torch.Tensor, tau: torch.Tensor, rows: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and (mean-field only) variance at times t of the other side's ``rows``, as the update uses them."""
        return mean[rows], drifted_var(var, tau, rows, t, self.config.srec_drift_var) if self.mean_field else None

    def filter(self, users: np.ndarray, items: np.ndarray, y: np.ndarray, ts: np.ndarray) -> None:
        """User updates (item moments fixed), then item updates (the users' new moments fixed), in time order."""
        cfg = self.config
        u, i = torch.from_numpy(users), torch.from_numpy(items)
        yt, tt = torch.from_numpy(y), torch.from_numpy(np.asarray(ts, dtype=np.int64))
        item_means, item_vars = self.moments(self.H_, self.var_H_, self.tau_H_, i, tt)
        kalman_rounds(self.W_, self.var_W_, self.tau_W_, users, item_means, yt, tt, cfg.srec_obs_var, cfg.srec_drift_var, item_vars)
        user_means, user_vars = self.moments(self.W_, self.var_W_, self.tau_W_, u, tt)
        kalman_rounds(self.H_, self.var_H_, self.tau_H_, items, user_means, yt, tt, cfg.srec_obs_var, cfg.srec_drift_var, user_vars)

    # ---- population prior
    @staticmethod
    def prior(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and per-coordinate spread of the existing posterior means."""
        if len(means) < 2:
            return torch.zeros(means.shape[1]), torch.ones(means.shape[1])
        return means.mean(0), means.var(0).clamp(min=MIN_VAR)

    def _grow_from_prior(self, n_users: int, n_items: int) -> None:
        tables = (("W_", "var_W_", "tau_W_", n_users, self.trained_user_rows()), ("H_", "var_H_", "tau_H_", n_items, self.trained_item_rows()))
        for mean_name, var_name, tau_name, rows, population in tables:
            mean_tbl = getattr(self, mean_name)
            m, v = self.prior(population)
            setattr(self, mean_name, grow(mean_tbl, rows, lambda k: m.expand(k, -1).clone()))
            setattr(self, var_name, grow(getattr(self, var_name), rows, lambda k: v.expand(k, -1).clone()))
            setattr(self, tau_name, grow(getattr(self, tau_name), rows, lambda k: torch.full((k,), NEVER, dtype=torch.int64)))

    # ---- the protocol
    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "SRec":
        cfg = self.config
        rng = rng_for(self.seed, PURPOSE_FIT)
        self.W_ = gaussian(rng, history.n_users, self.dim, cfg.init_std)
        self.H_ = gaussian(rng, history.n_items, self.dim, cfg.init_std)
        self.seen_, self.index_, self.batches_ = history, InteractionIndex.build(history), 0
        for p in range(cfg.srec_passes):
            self.var_W_ = torch.full_like(self.W_, cfg.srec_prior_var)
            self.var_H_ = torch.full_like(self.H_, cfg.srec_prior_var)
            self.tau_W_ = torch.full((len(self.W_),), NEVER, dtype=torch.int64)
            self.tau_H_ = torch.full((len(self.H_),), NEVER, dtype=torch.int64)
            pass_rng = rng_for(self.seed, PURPOSE_FIT, p + 1)
            for start in range(0, len(history), SREC_CHUNK):
                chunk = history.take(slice(start, start + SREC_CHUNK))
                self.filter(*self.observations(chunk, pass_rng))
            if on_epoch is not None:
                on_epoch(p + 1, fitted_copy(self, SRec._unseen_rows_from_prior))
        self._unseen_rows_from_prior()
        return self

    def _unseen_rows_from_prior(self) -> None:
        unseen = self.unseen_users()  # users first seen later enter with the population prior, as new ones do
        m, v = self.prior(self.trained_user_rows())
        self.W_[unseen], self.var_W_[unseen] = m, v
        unseen = self.unseen_items()  # so do items with no positive (only ever observed as negatives)
        m, v = self.prior(self.trained_item_rows())
        self.H_[unseen], self.var_H_[unseen], self.tau_H_[unseen] = m, v, NEVER

    def user_prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``prior(trained_user_rows())``, from the remembered population (``user_population``)."""
        mean, var = self.user_population()
        if var is None:
            return torch.zeros(self.dim), torch.ones(self.dim)
        return mean, var.clamp(min=MIN_VAR)

    def _default_user(self) -> torch.Tensor:
        return self.user_prior()[0]

    def _default_item(self) -> torch.Tensor:
        return self.prior(self.trained_item_rows())[0]

    def observe(self, batch: Interactions) -> None:
        require_fitted(self, self.H_)
        if not len(batch):
            return
        rng = rng_for(self.seed, PURPOSE_OBSERVE, self.batches_)
        self._grow_from_prior(max(len(self.W_), batch.n_users), max(len(self.H_), batch.n_items))
        m, v = self.prior(self.trained_item_rows())
        renewed = self.renew_untrained_items(batch, lambda k: m.expand(k, -1).clone())  # first positive: start from the prior
        self.var_H_[renewed], self.tau_H_[renewed] = v, NEVER
        self._remember(batch)
        self.filter(*self.observations(batch, rng))
        self.batches_ += 1

    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        require_fitted(self, self.H_)
        cfg = self.config
        users = np.asarray(recent.users, dtype=np.int64)
        rng = rng_for(self.seed, PURPOSE_NEW_USERS, self.batches_, int(users[0]) if len(users) else 0, len(users))
        items = check_ids(self, "recent items", recent.items, allow_padding=True)
        ts = np.broadcast_to(np.asarray(recent.ts, dtype=np.int64), items.shape)
        local, col = np.nonzero((items >= 0) & (items < len(self.H_)))  # row-major: each user's items in time order
        k = cfg.srec_negatives
        rows = np.repeat(local, 1 + k)
        obs_items = np.repeat(items[local, col], 1 + k)
        y = np.tile(np.r_[1.0, np.zeros(k)], len(local)).astype(np.float32)
        if k:
            slots = y == 0
            obs_items[slots] = negatives(self.index_, users[rows[slots]], rng, len(self.H_), exclude=items[rows[slots]])
        obs_ts = torch.from_numpy(np.repeat(ts[local, col], 1 + k).copy())
        m, v = self.user_prior()
        mean, var = m.expand(len(users), -1).clone(), v.expand(len(users), -1).clone()
        tau = torch.full((len(users),), NEVER, dtype=torch.int64)
        x_all, x_var = self.moments(self.H_, self.var_H_, self.tau_H_, torch.from_numpy(obs_items), obs_ts)
        kalman_rounds(mean, var, tau, rows, x_all, torch.from_numpy(y), obs_ts, cfg.srec_obs_var, cfg.srec_drift_var, x_var)
        return self.score_rows(mean, np.asarray(candidates))


def from_config(config: Config) -> SRec:
    return SRec(config.baselines)


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the faithful default."""
    cfg = config.baselines
    parts = (["means-only update"] if cfg.srec_update == "means_only" else []) + ([f"{cfg.srec_passes} passes"] if cfg.srec_passes > 1 else [])
    return ", ".join(parts) or None
