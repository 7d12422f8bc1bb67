"""Prototype: cold-start tasks with a meta-learned new-user start row p0 (an extra row of P)."""
from __future__ import annotations
import numpy as np, torch
from metarec.models.responsive import ResponsiveMF, EpochStats
from metarec.meta_tasks import TaskArrays, build_tasks, fill_own, support_sets
from metarec.interface import Interactions
from metarec.maml import TaskBatch

def cold_tasks(index, k, K, max_pos, rng, n_items, p0_id, all_shown=False):
    ptr = index.user_ptr_
    counts = np.diff(ptr)
    users = np.repeat(np.arange(len(counts)), np.minimum(np.maximum(counts - 1, 0), max_pos))
    first = np.concatenate(([0], np.cumsum(np.minimum(np.maximum(counts - 1, 0), max_pos))[:-1]))
    i = np.arange(len(users)) - first[users] + 1   # position of the query: 1..max_pos
    q = ptr[users] + i
    width = max_pos if all_shown else k
    cols = q[:, None] - width + np.arange(width)[None, :]
    own = np.where(cols >= ptr[users][:, None], index.user_items_[np.maximum(cols, 0)], -1)
    kk = width if all_shown else k
    own = fill_own(own, kk, rng)
    cutoff = index.user_ts_[q - 1]
    s_users, s_pos, s_neg = support_sets(index, users, own, cutoff, max(K, kk), rng, n_items)
    s_users = s_users.copy(); s_users[:, :kk] = p0_id
    q_pos = index.user_items_[q]
    q_neg = index.sample_negatives(users, rng, n_items)
    return TaskArrays(s_users, s_pos, s_neg, np.full(len(users), p0_id), q_pos, q_neg, index.user_ts_[q])

class ColdStartMF(ResponsiveMF):
    cold_share = 1.0   # cold tasks repeated this many times relative to their natural count
    max_pos = 10
    def fit(self, history: Interactions):
        self.set_index(history)
        self.p0_id = history.n_users
        self.init_params(history.n_users + 1, history.n_items)
        with torch.no_grad():
            self.P_[self.p0_id] = self.P_[:-1].mean(0)
        t = self.tasks
        tasks = build_tasks(history, t.k, t.K, t.seed, t.max_tasks_per_user, index=self.index_)
        rng = np.random.default_rng(5)
        cold = cold_tasks(self.index_, t.k, t.K, self.max_pos, rng, history.n_items, self.p0_id)
        reps = max(1, int(round(self.cold_share)))
        mixed = TaskArrays.concat([tasks] + [cold] * reps)
        for epoch in range(self.meta.epochs):
            self.meta_train_epoch([mixed], epoch)
        self.reset_unseen_users(history)
        return self
    def _user_rows(self, users, generator, all_new=False):
        rows = super()._user_rows(users, generator, all_new)
        if all_new:
            rows[:] = self.P_.detach()[self.p0_id]
        return rows

    def reset_unseen_users(self, history):
        keep = self.P_.detach()[self.p0_id].clone()
        super().reset_unseen_users(history)
        with torch.no_grad():
            self.P_[self.p0_id] = keep

def make(config):
    m = ColdStartMF(config.meta, config.tasks)
    import os
    m.cold_share = float(os.environ.get("COLD_SHARE", "1"))
    m.max_pos = int(os.environ.get("COLD_MAXPOS", "10"))
    return m


class BiasMF(ResponsiveMF):
    """Item bias as an extra dimension: users' coordinate fixed at 1 in Θ (the inner loop may adapt it), items' free."""
    def init_params(self, n_users, n_items):
        super().init_params(n_users, n_items)
        with torch.no_grad():
            P = torch.cat([self.P_.detach(), torch.ones(n_users, 1)], 1)
            Q = torch.cat([self.Q_.detach(), torch.zeros(n_items, 1)], 1)
        self.P_ = torch.nn.Parameter(P)
        self.Q_ = torch.nn.Parameter(Q)
        mask = torch.ones_like(P); mask[:, -1] = 0
        self.P_.register_hook(lambda g: g * mask)
        self.optimizer_ = torch.optim.Adam([self.P_, self.Q_], lr=self.meta.outer_lr)


def make_bias(config):
    return BiasMF(config.meta, config.tasks)


class ZeroStartMF(ResponsiveMF):
    """Serving: new users start from zeros (pure item similarity after adaptation) instead of mean + noise."""
    start_scale = 0.0
    def _user_rows(self, users, generator, all_new=False):
        rows = super()._user_rows(users, generator, all_new)
        seen = self._seen_user_mask()
        users = np.asarray(users)
        inside = users < len(seen)
        unseen = torch.as_tensor(~(inside & seen[np.where(inside, users, 0)]) | all_new)
        return torch.where(unseen[:, None], rows * self.start_scale, rows)


def make_zero(config):
    import os
    m = ZeroStartMF(config.meta, config.tasks)
    m.start_scale = float(os.environ.get("START_SCALE", "0"))
    return m
