"""The meta-learned responsive MF (docs/method.md §3-7) behind ``StreamingRecommender``.

Θ = {P, Q} is meta-trained with MAML (``metarec.maml``) on tasks built from the
history (``metarec.meta_tasks``). Serving (§6) builds each user's support set
R^K from its most recent k interactions plus neighbour interactions up to K
(``meta_tasks.support_sets``), runs the L inner steps from Θ for many users at
once, and scores with the adapted rows; Θ is never changed by serving.
``observe`` (§7) grows P and Q for new ids (mean + N(0, σ²I)), indexes the
batch, forms one task per new interaction of a user with a past (R^K = its own
k previous interactions) and takes meta-objective Adam steps on them.

"New" means untrained (docs/method.md §11): ids are dense over the whole data set,
so new users, stream-only users and items with no positive in the history have
rows that no training step touched. The model records which rows training has
touched (``trained_users_``, ``trained_items_``: a user as a triple's user, an
item as a positive; an item trained only as a negative stays untrained), and an
untrained row is never used as it is: at serving it is replaced by the mean of
the *trained* rows plus noise, after training it is reset to that
(``reset_untrained_rows``, on the ``fit`` path and the pipeline's alike), and
an online update starts a batch's untrained rows from it. The masks are saved
with the model.

Pure: no files, no MLflow; ``tasks/train/training.py`` adds checkpoints, shards and
tracking around the same methods (``init_params``, ``pretrain_epoch``,
``meta_train_epoch``, ``training_state``).

Randomness: P, Q init and the rows of new ids use a torch generator seeded by
``meta.seed``; the task order of epoch e and the pretraining negatives use
``numpy.random.default_rng([meta.seed, e, ...])``, so an epoch's result depends
only on the state at its start (which makes resume exact). Serving draws its
support sets and temporary rows from a generator seeded per call, so scoring
the same input twice gives the same scores and leaves the model as it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from metarec.config import Config, MetaConfig, TaskConfig
from metarec.interface import Interactions, OnEpoch, RecentItems, StreamingRecommender, fitted_copy
from metarec.device import resolve_device
from metarec.distributed import DataParallel
from metarec.maml import (DivergedError, Extras, StartRows, StepStats, TaskBatch, flex_inner_adapt, flex_meta_step, inner_adapt, localise,
                          meta_step, support_ops)
from metarec.meta_tasks import TaskArrays, build_tasks, early_tasks, fill_own, stream_tasks, support_sets
from metarec.models.mf import bpr_triple_loss, init_table, mean_plus_noise
from metarec.neighbours import InteractionIndex
from metarec.sparse_adam import make_optimizer

logger = logging.getLogger(__name__)

SCORE_CHUNK = 4096  # users adapted and scored at once (bounds memory of the candidate lookup)


@dataclass(frozen=True)
class EpochStats:
    """Means over the tasks of an epoch (weighted by batch size), and the meta-gradient's norm before clipping over its
    outer steps (max and mean; docs/method.md §11: clipping, when on, must not hide how large the gradients grew)."""

    support_loss: float
    query_loss: float
    tasks: int
    seconds: float
    grad_norm_max: float = float("nan")
    grad_norm_mean: float = float("nan")
    steps: int = 0
    clipped_steps: int = 0

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Adapted:
    """Adapted rows of B users: user_rows (B, d); item_ids (B, Si) and item_rows (B, Si, d) the items each
    user's support touched (padding slots repeat a real id with the same row)."""

    user_rows: torch.Tensor
    item_ids: torch.Tensor
    item_rows: torch.Tensor


class ResponsiveMF(StreamingRecommender):
    name = "responsive"

    def __init__(self, meta: MetaConfig | None = None, tasks: TaskConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.meta = meta or MetaConfig()
        self.tasks = tasks or TaskConfig()
        self.device = resolve_device(device)
        # random draws stay on the CPU generator, so a seed gives the same Θ on every device
        self.generator_ = torch.Generator().manual_seed(self.meta.seed)
        self.P_ = torch.zeros(0, self.meta.dim, device=self.device)
        self.Q_ = torch.zeros(0, self.meta.dim, device=self.device)
        self.optimizer_: torch.optim.Optimizer | None = None
        self.index_: InteractionIndex | None = None
        self.online_steps_ = 0
        # rows some training step has touched (None: a model saved before they were recorded; see _trained_masks)
        self.trained_users_: torch.Tensor | None = None
        self.trained_items_: torch.Tensor | None = None
        # Θ's optional parameters (Ours+ options, metarec.maml.Extras), with their own Adam so P and Q's is as it was
        self.extra_: dict[str, torch.nn.Parameter] = {}
        self.extra_optimizer_: torch.optim.Adam | None = None
        self.early_pool_: tuple[int, TaskArrays] | None = None  # (id of the index it was built from, the early tasks)

    # ------------------------------------------------------------------ state
    @property
    def n_users_(self) -> int:
        return int(self.P_.shape[0])

    @property
    def n_items_(self) -> int:  # type: ignore[override]
        return int(self.Q_.shape[0])

    def init_params(self, n_users: int, n_items: int) -> None:
        """Fresh Θ with N(0, init_std²) entries and a fresh Adam at the outer rate."""
        std = self.meta.init_std
        self.P_ = torch.nn.Parameter(init_table(n_users, self.meta.dim, std, self.generator_).to(self.device))
        self.Q_ = torch.nn.Parameter(init_table(n_items, self.meta.dim, std, self.generator_).to(self.device))
        self.optimizer_ = make_optimizer(self.meta.optimizer, [self.P_, self.Q_], self.meta.outer_lr)
        self.trained_users_ = torch.zeros(n_users, dtype=torch.bool)
        self.trained_items_ = torch.zeros(n_items, dtype=torch.bool)
        self._set_extras(self._fresh_extras(n_items))

    def _fresh_extras(self, n_items: int) -> dict[str, torch.Tensor]:
        """The optional parameters the options ask for, at a start that changes nothing: b = 0, every rate α, μ = 0 with
        λ = softplus(-4) ≈ 0.018 (a weak pull), p0 = the mean of P's initial rows (0)."""
        m, extras = self.meta, {}
        if m.item_bias:
            extras["bias"] = torch.zeros(n_items)
        if m.learned_inner_lr:
            extras["log_lr"] = torch.full((2, m.inner_steps, m.dim), float(np.log(m.inner_lr)))
        if m.learned_prior:
            extras["prior_mean"], extras["prior_raw"] = torch.zeros(m.dim), torch.full((m.dim,), -4.0)
        if m.learned_start:
            extras["start"] = torch.zeros(m.dim)
        return extras

    def _set_extras(self, tensors: dict[str, torch.Tensor]) -> None:
        self.extra_ = {name: torch.nn.Parameter(value.to(self.device, torch.float32, copy=True)) for name, value in tensors.items()}
        self.extra_optimizer_ = torch.optim.Adam(list(self.extra_.values()), lr=self.meta.outer_lr) if self.extra_ else None

    @property
    def extras(self) -> Extras:
        return Extras(**self.extra_)

    def set_index(self, history: Interactions) -> None:
        """Index what the model has seen (recent items, neighbours, negatives)."""
        self.index_ = InteractionIndex.build(history)

    def training_state(self) -> dict[str, torch.Tensor]:
        """Θ, the trained-row masks, the Adam moments and the generator state as named CPU tensors (for checkpoints)."""
        state: dict[str, torch.Tensor] = {"P": self.P_.detach().cpu().clone(), "Q": self.Q_.detach().cpu().clone()}
        state["generator"] = self.generator_.get_state()
        if self.trained_users_ is not None and self.trained_items_ is not None:
            state["trained_users"], state["trained_items"] = self.trained_users_.clone(), self.trained_items_.clone()
        if self.optimizer_ is not None:
            for name, param in (("P", self.P_), ("Q", self.Q_)):
                for key, value in self.optimizer_.state.get(param, {}).items():
                    state[f"adam.{name}.{key}"] = torch.as_tensor(value).cpu().clone()
        for name, param in self.extra_.items():
            state[f"extra.{name}"] = param.detach().cpu().clone()
            for key, value in (self.extra_optimizer_.state.get(param, {}) if self.extra_optimizer_ is not None else {}).items():
                state[f"extra_adam.{name}.{key}"] = torch.as_tensor(value).cpu().clone()
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.P_ = torch.nn.Parameter(state["P"].to(self.device, copy=True))
        self.Q_ = torch.nn.Parameter(state["Q"].to(self.device, copy=True))
        self.optimizer_ = make_optimizer(self.meta.optimizer, [self.P_, self.Q_], self.meta.outer_lr)
        if "generator" in state:
            self.generator_.set_state(state["generator"])
        has_masks = "trained_users" in state and "trained_items" in state
        self.trained_users_ = state["trained_users"].to(torch.bool).clone() if has_masks else None
        self.trained_items_ = state["trained_items"].to(torch.bool).clone() if has_masks else None
        for name, param in (("P", self.P_), ("Q", self.Q_)):
            # Adam keeps its step count on the CPU (as torch does when it creates it), the moments beside the parameter
            moments = {key.split(".")[-1]: value.clone() if key.endswith(".step") else value.to(self.device, copy=True)
                       for key, value in state.items() if key.startswith(f"adam.{name}.")}
            if moments:
                self.optimizer_.state[param] = moments
        extras = {key.split(".", 1)[1]: value for key, value in state.items() if key.startswith("extra.")}
        self._set_extras(extras if extras or not self.meta.flexible else self._fresh_extras(len(self.Q_)))  # none saved: the neutral start
        for name, param in self.extra_.items():
            moments = {key.split(".")[-1]: value.clone() if key.endswith(".step") else value.to(self.device, copy=True)
                       for key, value in state.items() if key.startswith(f"extra_adam.{name}.")}
            if moments and self.extra_optimizer_ is not None:
                self.extra_optimizer_.state[param] = moments

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Numeric arrays only (saved by tasks.train.models without pickle): Θ, the trained-row masks, every interaction seen."""
        seen = self.index_.interactions if self.index_ is not None else Interactions.from_arrays([], [], [])
        users, items = self._trained_masks()
        return {"P": self.P_.detach().cpu().numpy().copy(), "Q": self.Q_.detach().cpu().numpy().copy(), "trained_users": users, "trained_items": items,
                "seen_users": seen.users, "seen_items": seen.items, "seen_ts": seen.ts,
                **{f"extra.{name}": param.detach().cpu().numpy().copy() for name, param in self.extra_.items()}}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        # np.array copies: a read-only npz array would reach torch as a non-writable tensor (a warning in every log)
        state = {key: torch.as_tensor(np.array(arrays[key])) for key in arrays if key in ("P", "Q", "trained_users", "trained_items") or key.startswith("extra.")}
        self.load_training_state(state)
        self.index_ = InteractionIndex.build(Interactions(*(np.asarray(arrays[k], dtype=np.int64) for k in ("seen_users", "seen_items", "seen_ts"))))

    # --------------------------------------------------------------- training
    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "ResponsiveMF":
        """Index the history, build its tasks, optionally pre-train with BPR, meta-train (DivergedError on NaN/Inf);
        then rows no training step touched get §7's new rows (``reset_untrained_rows``).

        ``on_epoch`` counts pre-training and meta-training epochs as one sequence of passes."""
        self.set_index(history)
        self.init_params(history.n_users, history.n_items)
        t = self.tasks
        tasks = build_tasks(history, t.k, t.support_size, t.seed, t.max_tasks_per_user, index=self.index_, negatives=t.negatives)
        for epoch in range(self.meta.pretrain_epochs):
            self.pretrain_epoch(history, epoch)
            if on_epoch is not None:
                on_epoch(epoch + 1, fitted_copy(self, ResponsiveMF.reset_untrained_rows))
        for epoch in range(self.meta.epochs):
            stats = self.meta_train_epoch([tasks], epoch)
            logger.info("epoch %d: support %.4f query %.4f, %.0f tasks/s", epoch, stats.support_loss, stats.query_loss, stats.tasks_per_s)
            if on_epoch is not None:
                on_epoch(self.meta.pretrain_epochs + epoch + 1, fitted_copy(self, ResponsiveMF.reset_untrained_rows))
        self.reset_untrained_rows()
        return self

    def _trained_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(n_users_,), (n_items_,) bool: rows some training step touched.

        A model saved before the masks were recorded falls back to what its index holds
        (users with an interaction, items with a positive), the best guess it can make.
        """
        if self.trained_users_ is not None and self.trained_items_ is not None:
            return self.trained_users_.numpy().copy(), self.trained_items_.numpy().copy()
        if self.index_ is None:
            return np.zeros(self.n_users_, dtype=bool), np.zeros(self.n_items_, dtype=bool)
        return self.index_.has_user(np.arange(self.n_users_)), self.index_.has_item(np.arange(self.n_items_))

    def _mark_trained(self, batch: TaskBatch, start: StartRows | None = None) -> None:
        """Record the rows an outer step touched: every triple's user, every positive item (negatives do not count).
        An early task's user row is not touched (it started from a new user's row), unless another task touched it."""
        if self.trained_users_ is None or self.trained_items_ is None:
            users, items = self._trained_masks()
            self.trained_users_, self.trained_items_ = torch.as_tensor(users), torch.as_tensor(items)
        own = ~start.fresh.cpu() if start is not None else slice(None)
        self.trained_users_[batch.support_users[own].flatten().cpu()] = True  # the masks stay on the CPU, beside the index
        self.trained_users_[batch.query_user[own].cpu()] = True
        self.trained_items_[batch.support_pos.flatten().cpu()] = True
        self.trained_items_[batch.query_pos.cpu()] = True

    def reset_untrained_rows(self, users: np.ndarray | None = None, items: np.ndarray | None = None) -> None:
        """Untrained rows of P and Q (among ``users``/``items``, default all) become the mean of the trained rows + N(0, σ²I)
        (§7, §11), and Adam's moments for them restart at zero.

        Left alone they would keep their random N(0, init_std²) start, or, for an item sampled only as a
        negative, a row pushed down by training: neither is §7's row for a new id.
        """
        trained_users, trained_items = self._trained_masks()
        for name, table, trained, ids in (("P", self.P_, trained_users, users), ("Q", self.Q_, trained_items, items)):
            fresh = ~trained
            if ids is not None:
                pick = np.zeros(len(trained), dtype=bool)
                ids = np.asarray(ids, dtype=np.int64)
                pick[ids[ids < len(trained)]] = True
                fresh &= pick
            if not fresh.any():
                continue
            rows = torch.as_tensor(np.flatnonzero(fresh), device=self.device)
            with torch.no_grad():
                base = table.detach()[torch.as_tensor(trained, device=self.device)] if trained.any() else table.detach()
                if name == "P" and "start" in self.extra_:
                    base = self.extra_["start"].detach()[None, :]
                table.detach()[rows] = mean_plus_noise(base, len(rows), self.meta.new_row_std, self.generator_)
                if name == "Q" and "bias" in self.extra_:
                    self.extra_["bias"].detach()[rows] = self._mean_bias()
            for moment in (self.optimizer_.state.get(table, {}) if self.optimizer_ is not None else {}).values():
                if torch.is_tensor(moment) and moment.dim() == 2:
                    moment[rows] = 0.0

    def _mean_bias(self) -> torch.Tensor:
        """The bias a new item gets (§7's mean, without noise): the mean of the trained items' biases."""
        bias = self.extra_["bias"].detach()
        trained = torch.as_tensor(self._trained_masks()[1][: len(bias)], device=bias.device)
        return (bias[trained] if bool(trained.any()) else bias).mean()

    def _item_bias(self, items: torch.Tensor) -> torch.Tensor:
        """b of ``items`` (any shape; meta.item_bias), the mean of the trained biases for untrained items or ids beyond the table."""
        bias = self.extra_["bias"].detach()
        trained = np.zeros(max(len(bias), int(items.max()) + 1 if items.numel() else 0), dtype=bool)
        trained[: len(bias)] = self._trained_masks()[1][: len(bias)]
        known = torch.as_tensor(trained, device=bias.device)[items]
        return torch.where(known, bias[torch.where(known, items, torch.zeros_like(items))], self._mean_bias())

    def pretrain_epoch(self, history: Interactions, epoch: int) -> float:
        """One epoch of plain BPR over the history (one sampled negative each), mean loss, its own Adam."""
        if self.index_ is None:
            self.set_index(history)
        rng = np.random.default_rng([self.meta.seed, epoch, 1])
        order = rng.permutation(len(history))
        users, pos = history.users[order], history.items[order]
        neg = self.index_.sample_negatives(users, rng, self.n_items_)
        optimizer = torch.optim.Adam([self.P_, self.Q_], lr=self.meta.outer_lr)
        m = self.meta
        total = 0.0
        for start in range(0, len(users), m.batch_tasks):
            u, j, k = (torch.as_tensor(a[start : start + m.batch_tasks], device=self.device) for a in (users, pos, neg))
            optimizer.zero_grad(set_to_none=True)
            loss = bpr_triple_loss(self.P_[u], self.Q_[j], self.Q_[k], m.lambda_p, m.lambda_q_pos, m.lambda_q_neg).mean()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(u)
        if self.trained_users_ is not None and self.trained_items_ is not None:
            self.trained_users_[torch.as_tensor(history.users)] = True
            self.trained_items_[torch.as_tensor(history.items)] = True
        return total / max(len(users), 1)

    def meta_train_epoch(
        self,
        parts: Iterable[TaskArrays],
        epoch: int,
        progress: Callable[[int], None] | None = None,
        parallel: DataParallel | None = None,
        first_part: int = 0,
    ) -> EpochStats:
        """One pass over the tasks (parts: shards, each shuffled with its own seeded rng), batch_tasks per outer step.

        ``parallel``: this process is one of several data-parallel workers reading the same parts
        (``metarec.distributed``); each step then takes its share of the batch, and Θ ends as with one process.
        ``first_part``: the number of the first of ``parts`` within the epoch, so an epoch run in pieces (with
        ``training_state`` carried between them) draws every shuffle as the whole epoch would."""
        started = time.perf_counter()
        n_tasks, support, query = 0, 0.0, 0.0
        norms: list[float] = []
        clipped = 0

        def so_far() -> EpochStats:
            n = max(n_tasks, 1)
            top, mean = (max(norms), sum(norms) / len(norms)) if norms else (float("nan"), float("nan"))
            return EpochStats(support / n, query / n, n_tasks, time.perf_counter() - started, top, mean, len(norms), clipped)

        try:
            for part_no, part in enumerate(parts, start=first_part):
                part, fresh = self._with_early_tasks(part, epoch, part_no, parallel)
                order = np.random.default_rng([self.meta.seed, epoch, 2, part_no]).permutation(len(part))
                for start in range(0, len(order), self.meta.batch_tasks):
                    rows = order[start : start + self.meta.batch_tasks]
                    batch = TaskBatch.from_arrays(part, rows, self.device)
                    stats = self.meta_update(batch, parallel=parallel, start=self._start_rows(fresh, rows, epoch, part_no, start))
                    n_tasks += len(batch)
                    support += stats.support_loss * len(batch)
                    query += stats.query_loss * len(batch)
                    norms.append(stats.grad_norm)
                    clipped += stats.clipped
                    if progress is not None:
                        progress(len(batch))
        except DivergedError as exc:
            exc.epoch_stats = so_far()  # the steps before the divergence: how the gradient norm grew
            raise
        return so_far()

    def meta_update(self, batch: TaskBatch, lr: float | None = None, parallel: DataParallel | None = None, start: StartRows | None = None) -> StepStats:
        """One Adam step on the meta-objective of ``batch`` (DivergedError on NaN/Inf); ``start``: tasks whose user starts
        as a new user does (early tasks)."""
        if self.optimizer_ is None:
            raise RuntimeError("ResponsiveMF: call fit() or init_params() before training")
        for optimizer in (self.optimizer_, self.extra_optimizer_):
            for group in (optimizer.param_groups if optimizer is not None else []):
                group["lr"] = lr or self.meta.outer_lr
        if self.meta.flexible:
            if parallel is not None:
                raise ValueError("meta.item_bias / learned_inner_lr / learned_prior / learned_start train by autograd in one process; set runtime.workers = 1")
            params = [self.P_, self.Q_, *self.extra_.values()]
            optimizers = [self.optimizer_] + ([self.extra_optimizer_] if self.extra_optimizer_ is not None else [])
            stats = flex_meta_step(params, optimizers, batch, self.meta, self.extras, start)
        else:
            stats = meta_step(self.P_, self.Q_, self.optimizer_, batch, self.meta, parallel, start)
        self._mark_trained(batch, start)
        return stats

    # ------------------------------------------------------------ early tasks
    def _early_pool(self) -> TaskArrays:
        """Every early task of the indexed history (``meta_tasks.early_tasks``), built once per index."""
        if self.index_ is None:
            raise RuntimeError("tasks.early_share needs the model's interaction index: call set_index(history) before meta-training")
        if self.early_pool_ is None or self.early_pool_[0] != id(self.index_):
            t = self.tasks
            pool = early_tasks(self.index_, t.early_max, t.k, t.support_size, t.seed, max(self.n_items_, 1), t.negatives)
            self.early_pool_ = (id(self.index_), pool)
        return self.early_pool_[1]

    def _with_early_tasks(self, part: TaskArrays, epoch: int, part_no: int, parallel) -> tuple[TaskArrays, np.ndarray | None]:
        """The part with the share ``tasks.early_share`` of its tasks replaced by early tasks (seeded draws: which paper
        tasks sit out this epoch, and which early tasks, without repetition while the pool lasts), and which tasks are
        early; the part itself and None at share 0. The epoch keeps its size, so the share does not change how many
        outer steps an epoch takes (more steps alone move the validation metric, docs/findings.md §3)."""
        share = self.tasks.early_share
        if share <= 0 or not len(part):
            return part, None
        if parallel is not None:
            raise ValueError("tasks.early_share > 0 is not supported with data-parallel workers yet; set runtime.workers = 1")
        pool = self._early_pool()
        wanted = min(int(round(len(part) * share)), len(part))
        if not len(pool) or not wanted:
            return part, None
        rng = np.random.default_rng([self.meta.seed, epoch, 5, part_no])
        kept = np.sort(rng.choice(len(part), len(part) - wanted, replace=False))
        picks = rng.choice(len(pool), wanted, replace=wanted > len(pool))
        fresh = np.r_[np.zeros(len(kept), bool), np.ones(wanted, bool)]
        return TaskArrays.concat([part.take(kept), pool.take(picks)]), fresh

    def _start_rows(self, fresh: np.ndarray | None, rows: np.ndarray, epoch: int, part_no: int, offset: int) -> StartRows | None:
        """Where the early tasks among ``rows`` start: the learned p0 (meta.learned_start) or the mean of the trained rows of
        P (a constant here, as serving reads it), plus §7's noise drawn per batch from a seeded generator."""
        if fresh is None:
            return None
        mask = fresh[rows]
        if not mask.any():
            return None
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.meta.seed, epoch, 6, part_no, offset]).integers(2**62)))
        noise = (torch.randn(len(rows), self.meta.dim, generator=generator) * self.meta.new_row_std).to(self.device)
        return StartRows(torch.as_tensor(mask, device=self.device), self._new_user_mean()[None, :] + noise)

    def _new_user_mean(self) -> torch.Tensor:
        """(d,) the row a new user starts from before noise: p0 when learned (meta.learned_start), else the mean of the
        trained rows of P (all rows before any is trained), detached."""
        if "start" in self.extra_:
            return self.extra_["start"]
        trained = torch.as_tensor(self._trained_masks()[0], device=self.device)
        P = self.P_.detach()
        return (P[trained] if bool(trained.any()) else P).mean(0)

    # ---------------------------------------------------------------- serving
    def _rows(self, table: torch.Tensor, ids: torch.Tensor, generator: torch.Generator, new: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        """table[ids] for known ids; mean + N(0, σ²I) for ids beyond the table (§7), without growing it.

        ``new`` (bool, like ids) marks more ids to treat as new (inside the table but never trained);
        ``base``: the rows whose mean new ids get (default: the whole table)."""
        ids = ids.to(table.device)
        known = ids < table.shape[0]
        rows = table.detach()[torch.where(known, ids, torch.zeros_like(ids))]
        fresh = ~known if new is None else (~known | new)
        n_new = int(fresh.sum())
        if n_new:
            rows[fresh] = mean_plus_noise(table.detach() if base is None else base, n_new, self.meta.new_row_std, generator)
        return rows

    def _untrained_rows(self, table: torch.Tensor, trained: np.ndarray, ids: np.ndarray, generator: torch.Generator, all_new: bool = False,
                        start: torch.Tensor | None = None) -> torch.Tensor:
        """table's rows of ``ids``; ids beyond it, untrained ones (or all, ``all_new``) get the mean of the trained rows
        + noise (§7, §11).

        Ids are dense over the whole data set, so a new user's id, or an item with no positive in the history,
        usually lies inside the table, on a row no training step touched (or, for an item, one pushed down as a
        negative only): it must not be scored with that row."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = ids < len(trained)
        new = np.ones(len(ids), dtype=bool) if all_new else inside & ~trained[np.where(inside, ids, 0)]
        base = table.detach()[torch.as_tensor(trained, device=self.device)] if trained.any() else None
        base = start if start is not None else base  # (1, d): its mean is itself
        return self._rows(table, torch.as_tensor(ids, device=self.device), generator, torch.as_tensor(new, device=self.device), base)

    def _user_rows(self, users: np.ndarray, generator: torch.Generator, all_new: bool = False) -> torch.Tensor:
        """Θ's rows of ``users``; untrained users (or all, for new users) get the mean of the trained rows + noise
        (the learned start p0 + noise with meta.learned_start)."""
        start = self.extra_["start"].detach()[None, :] if "start" in self.extra_ else None
        return self._untrained_rows(self.P_, self._trained_masks()[0], users, generator, all_new, start)

    def _item_rows(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Θ's rows of ``items`` (any shape); items no training step had as a positive get the mean of the trained rows + noise."""
        return self._untrained_rows(self.Q_, self._trained_masks()[1], items.flatten().cpu().numpy(), generator).view(*items.shape, -1)

    def _serving_rng(self, tag: int, users: np.ndarray) -> tuple[np.random.Generator, torch.Generator]:
        """Per-call generators: the same call gives the same scores; the model's own state is untouched."""
        key = [self.meta.seed, tag, len(users), int(np.asarray(users, dtype=np.int64).sum()) & 0x7FFFFFFF]
        rng = np.random.default_rng(key)
        return rng, torch.Generator().manual_seed(int(rng.integers(0, 2**62)))

    def supports(self, users: np.ndarray, recent: np.ndarray, recent_ts: np.ndarray, rng: np.random.Generator):
        """Support sets (B, K) for users whose recent items (B, n) (-1 = padding) are given; rows without any item: None."""
        recent = np.asarray(recent, dtype=np.int64).reshape(len(users), -1)
        has = (recent >= 0).any(axis=1)
        if not has.any():
            return None, has
        n_own, n_support = self.tasks.serving_support()
        own = fill_own(recent[has], n_own, rng)
        ts = np.where(recent[has] >= 0, np.asarray(recent_ts, dtype=np.int64).reshape(recent.shape)[has], np.iinfo(np.int64).min)
        if self.index_ is None:
            raise RuntimeError("ResponsiveMF: no interaction index; call fit() or set_index() first")
        s = support_sets(self.index_, np.asarray(users, dtype=np.int64)[has], own, ts.max(axis=1), n_support, rng, max(self.n_items_, 1), shown=recent[has])
        return s, has

    @torch.no_grad()
    def adapt_supports(self, support_users, support_pos, support_neg, generator: torch.Generator, start_rows: torch.Tensor | None = None,
                       steps: int | None = None, rule: MetaConfig | None = None) -> Adapted:
        """The L inner steps from Θ for B tasks at once (first column's user is the one adapted).

        ``start_rows`` (B, d): the adapted user's row to start from (a new user's mean + noise), else Θ's;
        ``steps``: that many steps instead of serving's L (the kept online update, meta.online_adapt_steps);
        ``rule``: the α and L to adapt with (a new item's, ``MetaConfig.item_serving``), else serving's."""
        zeros = np.zeros(len(support_users), dtype=np.int64)
        batch = TaskBatch.from_arrays(
            TaskArrays(support_users, support_pos, support_neg, support_users[:, 0], support_pos[:, 0], support_neg[:, 0], zeros), device=self.device
        )
        loc = localise(batch)
        p_loc = self._user_rows(loc.user_rows.flatten().cpu().numpy(), generator).view(*loc.user_rows.shape, -1)
        if start_rows is not None:
            p_loc[torch.arange(len(p_loc)), loc.q_user] = start_rows.to(p_loc.dtype)
        q_loc = self._item_rows(loc.item_rows, generator)
        serving = rule or self.meta.serving()  # the paper's α and L unless an Ours+ option sets serving's own
        ops = support_ops(loc.s_user, loc.s_pos, loc.s_neg, p_loc.shape[1], q_loc.shape[1], serving, p_loc.dtype)
        if self.meta.flexible:  # the options' own inner rule (biases, learned rates, prior), as trained
            scale = serving.inner_lr / self.meta.inner_lr if serving.inner_lr != self.meta.inner_lr else 1.0
            extras = Extras(**{name: param.detach() for name, param in self.extra_.items()})
            b_loc = self._item_bias(loc.item_rows) if "bias" in self.extra_ else None
            p_ad, q_ad = flex_inner_adapt(p_loc, q_loc, ops, loc, self.meta, extras, b_loc, create_graph=False,
                                          steps=serving.inner_steps if steps is None else steps, scale=scale)
        else:
            p_ad, q_ad = inner_adapt(p_loc, q_loc, ops, serving if steps is None else serving.model_copy(update={"inner_steps": steps}), create_graph=False)
        user = p_ad.gather(1, loc.q_user[:, None, None].expand(-1, 1, p_ad.shape[-1]))[:, 0]
        return Adapted(user, loc.item_rows, q_ad)

    def adapt(self, users: np.ndarray, recent: np.ndarray, recent_ts: np.ndarray | None = None, new_users: bool = False) -> Adapted:
        """Adapted rows for many users at once from their recent items (B, n) (-1 = padding); Θ unchanged.

        A user without any recent item keeps its Θ row (mean + noise when unseen) and no item rows.
        ``new_users``: every user starts from mean + noise (§7), whatever its id.
        """
        users = np.asarray(users, dtype=np.int64)
        recent = np.asarray(recent, dtype=np.int64).reshape(len(users), -1)
        recent_ts = np.zeros_like(recent) + np.iinfo(np.int64).max // 2 if recent_ts is None else recent_ts
        rng, gen = self._serving_rng(1, users)
        s, has = self.supports(users, recent, recent_ts, rng)
        base = self._user_rows(users, gen, all_new=new_users)
        if s is None:
            return Adapted(base, torch.zeros(len(users), 0, dtype=torch.int64, device=self.device), base.new_zeros(len(users), 0, base.shape[1]))
        adapted = self.adapt_supports(*s, gen, start_rows=base[torch.as_tensor(np.flatnonzero(has), device=self.device)])
        rows = base.clone()
        idx = torch.as_tensor(np.flatnonzero(has), device=self.device)
        rows[idx] = adapted.user_rows
        item_ids = torch.full((len(users), adapted.item_ids.shape[1]), -1, dtype=torch.int64, device=self.device)
        item_ids[idx] = adapted.item_ids
        item_rows = base.new_zeros(len(users), *adapted.item_rows.shape[1:])
        item_rows[idx] = adapted.item_rows
        return Adapted(rows, item_ids, item_rows)

    @torch.no_grad()
    def score_adapted(self, adapted: Adapted, candidates: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Scores (B, C): adapted user row · (the adapted row of a candidate the support touched, else Θ's; an
        untrained candidate's row is the mean of the trained rows + noise, ``_item_rows``).

        Few candidates a user: their rows are gathered (B, C, d). Many (full ranking, C of the order of the
        catalogue): one product with every item row instead (``_score_by_product``), the same scores without
        the (B, C, d) gather, which at ML-1M's 3,700 items was 240 MB per 256 users."""
        cand = torch.as_tensor(np.array(candidates, dtype=np.int64), device=self.device)  # a copy: stored candidates are read-only (memory-mapped)
        if 4 * cand.shape[1] >= max(self.n_items_, 1):
            scores = self._score_by_product(adapted, cand, generator)
        else:
            scores = self._score_gathered(adapted, cand, generator)
        if "bias" in self.extra_:  # b_i + p·q (meta.item_bias); b is not adapted, so one term serves both paths
            scores = scores + self._item_bias(cand)
        return scores.cpu().numpy()

    def _score_gathered(self, adapted: Adapted, cand: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        q = self._item_rows(cand, generator)
        scores = torch.bmm(q, adapted.user_rows[:, :, None])[..., 0]
        if adapted.item_ids.shape[1]:  # a candidate the support touched: its adapted row's score (the first matching slot's)
            match = cand[:, :, None] == adapted.item_ids[:, None, :]  # (B, C, Si)
            slot = match.to(torch.uint8).argmax(-1)
            adapted_scores = torch.bmm(adapted.item_rows, adapted.user_rows[:, :, None])[..., 0]  # (B, Si)
            scores = torch.where(match.any(-1), adapted_scores.gather(1, slot), scores)
        return scores

    def _score_by_product(self, adapted: Adapted, cand: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``_score_gathered``'s scores from user rows · every item row (B, n_items), read at the candidates.

        A candidate the support touched takes its adapted row's score; an untrained one (beyond Θ's table, or
        inside it without a positive in training) a row of the mean of the trained rows + noise (§7, §11), drawn
        in the same order as ``_item_rows`` draws them, so the scores are the same."""
        users, Q = adapted.user_rows, self.Q_.detach()
        B, n = len(users), len(Q)
        slot_ids = adapted.item_ids
        width = 1 + max(n, int(cand.max()) + 1 if cand.numel() else 0, int(slot_ids.max()) + 1 if slot_ids.numel() else 0)
        full = users.new_zeros(B, width)  # the last column takes what is written for padding slots
        full[:, :n] = users @ Q.T
        touched = torch.zeros(B, width, dtype=torch.bool, device=users.device)
        if slot_ids.shape[1]:
            # a padding slot repeats an id with Θ's row: only each id's first slot (the adapted one) counts
            earlier = torch.ones(slot_ids.shape[1], slot_ids.shape[1], dtype=torch.bool, device=users.device).tril(-1)
            repeat = ((slot_ids[:, :, None] == slot_ids[:, None, :]) & earlier).any(-1)
            ids = torch.where((slot_ids >= 0) & ~repeat, slot_ids, width - 1)
            full.scatter_(1, ids, torch.bmm(adapted.item_rows, users[:, :, None])[..., 0])
            touched.scatter_(1, ids, True)
            touched[:, -1] = False
        scores = full.gather(1, cand)
        trained = torch.zeros(width, dtype=torch.bool, device=users.device)
        trained_items = torch.as_tensor(self._trained_masks()[1], device=users.device)
        trained[: len(trained_items)] = trained_items
        fresh_at = ~trained[cand]
        n_fresh = int(fresh_at.sum())
        if n_fresh:
            base = Q[trained_items] if bool(trained_items.any()) else Q
            rows = mean_plus_noise(base, n_fresh, self.meta.new_row_std, generator)  # as _rows, in row-major order
            at = fresh_at.nonzero()
            fresh = (users[at[:, 0]] * rows).sum(-1)
            scores[fresh_at] = torch.where(touched.gather(1, cand)[fresh_at], scores[fresh_at], fresh)
        return scores

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Each user adapted from its last k interactions in the index (§6), then scored. Θ unchanged."""
        users = np.asarray(users, dtype=np.int64)
        candidates = np.asarray(candidates, dtype=np.int64).reshape(len(users), -1)
        out = np.empty(candidates.shape, dtype=np.float32)
        for s in range(0, len(users), SCORE_CHUNK):
            u = users[s : s + SCORE_CHUNK]
            recent, recent_ts = self.index_.recent_items(u, self.tasks.serving_support()[0])
            adapted = self.adapt(u, recent, recent_ts)
            out[s : s + SCORE_CHUNK] = self.score_adapted(adapted, candidates[s : s + SCORE_CHUNK], self._serving_rng(2, u)[1])
        return out

    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        """New users adapted from the interactions they have shown (§6); unseen ids start at mean + noise (§7)."""
        users = np.asarray(recent.users, dtype=np.int64)
        candidates = np.asarray(candidates, dtype=np.int64).reshape(len(users), -1)
        out = np.empty(candidates.shape, dtype=np.float32)
        for s in range(0, len(users), SCORE_CHUNK):
            sl = slice(s, s + SCORE_CHUNK)
            adapted = self.adapt(users[sl], recent.items[sl], recent.ts[sl], new_users=True)
            out[sl] = self.score_adapted(adapted, candidates[sl], self._serving_rng(3, users[sl])[1])
        return out

    def recommend(self, user: int, n: int = 10, exclude: np.ndarray | None = None, n_items: int | None = None, recent: np.ndarray | None = None, exclude_seen: bool = True) -> np.ndarray:
        """Top-n items for a user, adapted from ``recent`` (default: its last k interactions); seen items skipped."""
        if recent is None:
            return super().recommend(user, n, self._seen(user, exclude, exclude_seen), n_items)
        n_items = n_items or self.n_items_
        users = np.array([user], dtype=np.int64)
        adapted = self.adapt(users, np.asarray(recent)[None, :])
        scores = self.score_adapted(adapted, np.arange(n_items)[None, :], self._serving_rng(4, users)[1])[0].astype(np.float64)
        skip = self._seen(user, exclude, exclude_seen)
        skip = np.concatenate([skip, np.asarray(recent, dtype=np.int64)]) if exclude_seen else skip
        scores[skip[(skip >= 0) & (skip < n_items)]] = -np.inf
        top = np.argsort(-scores, kind="stable")[:n]
        return top[np.isfinite(scores[top])]

    def _seen(self, user: int, exclude: np.ndarray | None, exclude_seen: bool) -> np.ndarray:
        extra = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        if not exclude_seen or self.index_ is None or user >= self.index_.n_users:
            return extra
        lo, hi = self.index_.user_ptr_[user], self.index_.user_ptr_[user + 1]
        return np.concatenate([extra, self.index_.user_items_[lo:hi]])

    # ------------------------------------------------------------- streaming
    def observe(self, batch: Interactions) -> None:
        """§7: new ids and the batch's untrained rows start at the mean of the trained rows + noise; index the batch;
        one meta step per batch_tasks tasks of users with a past (R^K = their own k previous interactions), in
        ``meta.online_steps`` passes; then (meta.online_adapt_steps > 0, an Ours+ option) the batch's users' rows take
        that many steps of the adaptation rule from their current rows and keep them (``keep_adapted_rows``)."""
        if self.index_ is None or self.optimizer_ is None:
            raise RuntimeError("ResponsiveMF: call fit() before observe()")
        if not len(batch):
            return
        n_users, n_items = self.n_users_, self.n_items_
        self._grow(max(n_users, batch.n_users), max(n_items, batch.n_items))
        self.reset_untrained_rows(batch.users[batch.users < n_users], batch.items[batch.items < n_items])
        self.index_ = self.index_.extend(batch)
        rng = np.random.default_rng([self.meta.seed, 3, self.online_steps_])
        t = self.tasks
        tasks, _ = stream_tasks(self.index_, batch, t.k, t.support_size, rng, self.n_items_, neighbours=t.online_neighbours, negatives=t.negatives)
        for _ in range(self.meta.online_steps):
            for start in range(0, len(tasks), self.meta.batch_tasks):
                self.meta_update(TaskBatch.from_arrays(tasks, slice(start, start + self.meta.batch_tasks), self.device), self.meta.online_lr)
        if self.meta.online_adapt_steps:
            self.keep_adapted_rows(np.unique(np.asarray(batch.users, dtype=np.int64)))
        self.online_steps_ += 1

    @torch.no_grad()
    def keep_adapted_rows(self, users: np.ndarray) -> None:
        """Each user's row of P takes meta.online_adapt_steps steps of the adaptation rule (serving's α; learned rates,
        biases and prior when on) on the support serving would build from its interactions so far, starting from its
        current row, and keeps the result: the next batch starts from there, as RKMF's retrained user row does. Item
        rows adapted on the way are dropped (Θ's items change only by the outer steps)."""
        recent, recent_ts = self.index_.recent_items(users, self.tasks.serving_support()[0])
        rng = np.random.default_rng([self.meta.seed, 4, self.online_steps_])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        s, has = self.supports(users, recent, recent_ts, rng)
        if s is None:
            return
        kept = users[has]
        current = self.P_.detach()[torch.as_tensor(kept, device=self.device)]
        adapted = self.adapt_supports(*s, generator, start_rows=current, steps=self.meta.online_adapt_steps)
        self.P_.detach()[torch.as_tensor(kept, device=self.device)] = adapted.user_rows
        if self.trained_users_ is None:
            self.trained_users_ = torch.as_tensor(self._trained_masks()[0])
        self.trained_users_[torch.as_tensor(kept)] = True  # a kept row is the user's own, no longer §7's new row

    def _grow(self, n_users: int, n_items: int) -> None:
        """New users/items get untrained rows = the mean of the trained rows + N(0, σ²I); Adam's moments for them start at zero."""
        if n_users == self.n_users_ and n_items == self.n_items_:
            return
        state = self.training_state()
        state["trained_users"], state["trained_items"] = (torch.as_tensor(mask) for mask in self._trained_masks())
        for name, mask, n in (("P", "trained_users", n_users), ("Q", "trained_items", n_items)):
            old, trained = state[name], state[mask]
            extra = n - len(old)
            if extra > 0:
                base = old[trained] if trained.any() else old
                state[name] = torch.cat([old, mean_plus_noise(base, extra, self.meta.new_row_std, self.generator_)])
                state[mask] = torch.cat([trained, torch.zeros(extra, dtype=torch.bool)])
                for key in [k for k in state if k.startswith(f"adam.{name}.") and state[k].dim() == 2]:
                    state[key] = torch.cat([state[key], state[key].new_zeros(extra, state[key].shape[1])])
                if name == "Q" and "extra.bias" in state:  # new items' biases: the mean of the trained ones; their moments 0
                    bias = state["extra.bias"]
                    state["extra.bias"] = torch.cat([bias, (bias[trained] if trained.any() else bias).mean().repeat(extra)])
                    for key in [k for k in state if k.startswith("extra_adam.bias.") and state[k].dim() == 1]:
                        state[key] = torch.cat([state[key], state[key].new_zeros(extra)])
        state["generator"] = self.generator_.get_state()
        self.load_training_state(state)


def from_config(config: Config) -> ResponsiveMF:
    return ResponsiveMF(config.meta, config.tasks, config.runtime.device)
