"""MAML over BPR matrix factorisation, batched over tasks (METHOD.md §3, §5).

The two loops, named plainly:

- ``inner_adapt``: L steps of plain gradient descent on each task's support
  loss L^K_t, for T tasks at once, on the rows of P and Q each task gathers.
- ``meta_step``: one Adam step on the outer objective
  mean_t [ L^K_t(Θ) + λ_ML · L^1_t(Θ^L_t) ].

No Python loop runs per task. Each task gathers only the rows it touches into
*local slots*: the distinct users and the distinct items of the task, found by
a vectorised per-row sort/unique. A row that a task uses several times (its
user in every support triple, an item both as a positive and a negative, a
neighbour's item twice) is one slot, so its inner gradient is the sum over all
its uses, exactly as for the single parameter p_i / q_j of Θ. The gather is
ordinary indexing, so the outer gradient flows back into P and Q through it.

Inner gradients are written in closed form (the BPR triple loss has a simple
derivative) and kept differentiable: second order is plain autograd through
them, with no ``torch.autograd.grad`` in the inner loop. They are computed on
each task's slot score matrix p_loc·q_locᵀ (T, Su, Si): the margins are read
off it by index, and the gradients are M·Q and Mᵀ·P with M the (user slot,
item slot) coefficients of the triples, so the work is a few batched matmuls. ``first_order``
detaches them (FOMAML). ``reference_meta_objective`` is the same objective as
a plain per-task loop with torch.autograd, for tests and the benchmark.

Reduction (METHOD.md §3 allows a mean if documented): L_R is the **mean** over
the triples of R, in the inner loop, in the outer objective and in BPR
pre-training alike, so the inner rate α does not scale with K; the outer
objective is the mean over the tasks of a batch, so Adam's rate does not
scale with the batch size. L^1_t has one triple, where mean and sum agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from metarec.models.mf import bpr_triple_loss


class InnerParams(Protocol):
    """The MetaConfig fields the loops read (MetaConfig satisfies it)."""

    lambda_p: float
    lambda_q_pos: float
    lambda_q_neg: float
    lambda_ml: float
    inner_steps: int
    inner_lr: float
    first_order: bool
    grad_clip: float | None


class DivergedError(FloatingPointError):
    """The meta-objective or its gradient became NaN/Inf (large λ_ML or rates do this).

    ``epoch_stats``: set by a training loop that catches and re-raises it, its epoch's statistics up to the divergence.
    """

    epoch_stats = None


@dataclass(frozen=True)
class TaskBatch:
    """T tasks as int64 tensors: support triples (T, K), one query triple (T,)."""

    support_users: torch.Tensor
    support_pos: torch.Tensor
    support_neg: torch.Tensor
    query_user: torch.Tensor
    query_pos: torch.Tensor
    query_neg: torch.Tensor

    @classmethod
    def from_arrays(cls, tasks, index: np.ndarray | slice | None = None) -> "TaskBatch":
        """From anything with the six TaskArrays fields (numpy), optionally a subset of tasks."""
        pick = (lambda a: a) if index is None else (lambda a: a[index])
        names = ("support_users", "support_pos", "support_neg", "query_user", "query_pos", "query_neg")
        return cls(*(torch.as_tensor(np.ascontiguousarray(pick(getattr(tasks, n))), dtype=torch.int64) for n in names))

    def __len__(self) -> int:
        return int(self.query_user.shape[0])


@dataclass(frozen=True)
class LocalTasks:
    """Each task's distinct rows and where every triple finds them.

    user_rows (T, Su), item_rows (T, Si): global ids of the local slots (padding
    slots repeat a real id and are used by no triple); s_user/s_pos/s_neg (T, K)
    and q_user/q_pos/q_neg (T,): slot index of each triple's row.
    """

    user_rows: torch.Tensor
    item_rows: torch.Tensor
    s_user: torch.Tensor
    s_pos: torch.Tensor
    s_neg: torch.Tensor
    q_user: torch.Tensor
    q_pos: torch.Tensor
    q_neg: torch.Tensor


def local_slots(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row unique: ids (T, n) -> rows (T, S) distinct ids per row, index (T, n) with rows.gather(1, index) == ids.

    Vectorised: sort each row, mark first occurrences, number them by a cumsum.
    S is the largest number of distinct ids of any row; shorter rows are padded
    with their own first id (a slot no triple points at).
    """
    ordered, order = ids.sort(dim=1)
    fresh = torch.ones_like(ordered, dtype=torch.bool)
    fresh[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = fresh.long().cumsum(1) - 1
    index = torch.empty_like(rank).scatter_(1, order, rank)
    n_slots = int(rank.max()) + 1 if ids.numel() else 0
    rows = ordered[:, :1].expand(-1, n_slots).clone()
    rows.scatter_(1, rank, ordered)  # duplicates write the same id
    return rows, index


def localise(batch: TaskBatch) -> LocalTasks:
    """Slots for users (support + query user) and items (support pos/neg + query pos/neg)."""
    K = batch.support_users.shape[1]
    users = torch.cat([batch.support_users, batch.query_user[:, None]], dim=1)
    items = torch.cat([batch.support_pos, batch.support_neg, batch.query_pos[:, None], batch.query_neg[:, None]], dim=1)
    user_rows, u_idx = local_slots(users)
    item_rows, i_idx = local_slots(items)
    return LocalTasks(
        user_rows, item_rows,
        u_idx[:, :K], i_idx[:, :K], i_idx[:, K : 2 * K],
        u_idx[:, K], i_idx[:, 2 * K], i_idx[:, 2 * K + 1],
    )


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (T, S, d), index (T, K) -> (T, K, d)."""
    return table.gather(1, index[..., None].expand(-1, -1, table.shape[-1]))


@dataclass(frozen=True)
class SupportOps:
    """The support triples of T tasks as constant index maps on the local slots.

    pair_pos, pair_neg (T, K): flat index u·Si + j of each triple's (user slot,
    positive slot) and (user slot, negative slot) in a task's slot score matrix
    p_loc·q_locᵀ (T, Su, Si); reg_user (T, Su, 1), reg_item (T, Si, 1): the L2
    weight each slot carries in L^K_t = mean_k L_ijk, i.e. λ · (number of
    triples using it) / K. A slot used n times is counted n times, which is how
    repeated rows accumulate into one parameter.
    """

    pair_pos: torch.Tensor
    pair_neg: torch.Tensor
    n_item_slots: int
    reg_user: torch.Tensor
    reg_item: torch.Tensor


def support_ops(s_user, s_pos, s_neg, n_user_slots: int, n_item_slots: int, hp: InnerParams, dtype: torch.dtype) -> SupportOps:
    """Operators for support triples at slot indices s_* (T, K)."""
    K = s_user.shape[1]
    uses = lambda index, n: F.one_hot(index, n).sum(1).to(dtype)[..., None]  # (T, n, 1)
    reg_user = (hp.lambda_p / K) * uses(s_user, n_user_slots)
    reg_item = (hp.lambda_q_pos * uses(s_pos, n_item_slots) + hp.lambda_q_neg * uses(s_neg, n_item_slots)) / K
    return SupportOps(s_user * n_item_slots + s_pos, s_user * n_item_slots + s_neg, n_item_slots, reg_user, reg_item)


def _margins(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps) -> torch.Tensor:
    """x_k = p_u·(q_j - q_k) of each support triple (T, K), read off the slot score matrix (T, Su, Si)."""
    scores = torch.bmm(p_loc, q_loc.transpose(1, 2)).flatten(1)
    return scores.gather(1, ops.pair_pos) - scores.gather(1, ops.pair_neg)


def _mix(coef: torch.Tensor, ops: SupportOps, n_user_slots: int) -> torch.Tensor:
    """M (T, Su, Si) = Σ_k c_k e_u (e_j - e_k)ᵀ: the coefficient of each (user slot, item slot) pair."""
    flat = coef.new_zeros(coef.shape[0], n_user_slots * ops.n_item_slots)
    flat = flat.scatter_add(1, torch.cat([ops.pair_pos, ops.pair_neg], 1), torch.cat([coef, -coef], 1))
    return flat.view(coef.shape[0], n_user_slots, ops.n_item_slots)


def support_loss(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps) -> torch.Tensor:
    """L^K_t = mean_k L_ijk for each task (T,), written on slots (equal to bpr_triple_loss(...).mean(-1))."""
    x = _margins(p_loc, q_loc, ops)
    l2 = (ops.reg_user * p_loc.pow(2)).sum((1, 2)) + (ops.reg_item * q_loc.pow(2)).sum((1, 2))
    return -F.logsigmoid(x).mean(1) + l2


def support_grads(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of L^K_t w.r.t. the slots: (T, Su, d), (T, Si, d).

    With c_k = -σ(-x_k)/K (the derivative of the mean of -log σ(x_k)) and
    M = Σ_k c_k e_u (e_j - e_k)ᵀ (T, Su, Si): ∇P = M·Q + 2 reg_user·P,
    ∇Q = Mᵀ·P + 2 reg_item·Q. Only batched matmuls and element-wise ops, all
    differentiable, so autograd can differentiate it again (second order).
    """
    K = ops.pair_pos.shape[1]
    coef = -torch.sigmoid(-_margins(p_loc, q_loc, ops)) / K
    mix = _mix(coef, ops, p_loc.shape[1])
    g_p = torch.bmm(mix, q_loc) + 2.0 * ops.reg_user * p_loc
    g_q = torch.bmm(mix.transpose(1, 2), p_loc) + 2.0 * ops.reg_item * q_loc
    return g_p, g_q


def _mix_of(x: torch.Tensor, ops: SupportOps, n_user_slots: int) -> torch.Tensor:
    """M (T, Su, Si) from the support margins x (T, K): c_k = d/dx_k mean_k[-log σ(x_k)] = -σ(-x_k)/K."""
    return _mix(-torch.sigmoid(-x) / x.shape[1], ops, n_user_slots)


def _inner_step(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps, lr: float, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step Θ - α∇L^K_t, fused: P' = (1 - 2α reg_user)·P - α M·Q (one baddbmm), Q' likewise.

    Algebraically the same as ``p - lr * support_grads(...)[0]``; fusing the
    L2 term and the matmul into ``baddbmm`` halves the passes over the slots.
    ``x``: the margins at (p_loc, q_loc) when already computed.
    """
    mix = _mix_of(_margins(p_loc, q_loc, ops) if x is None else x, ops, p_loc.shape[1])
    p_new = torch.baddbmm(p_loc * (1.0 - 2.0 * lr * ops.reg_user), mix, q_loc, alpha=-lr)
    q_new = torch.baddbmm(q_loc * (1.0 - 2.0 * lr * ops.reg_item), mix.transpose(1, 2), p_loc, alpha=-lr)
    return p_new, q_new


def _last_step_query_rows(p_loc, q_loc, ops: SupportOps, loc: "LocalTasks", lr: float, x: torch.Tensor, create_graph: bool):
    """The final inner step for the three rows the query reads only: p_u (T, 1, d), q_j and q_k (T, 2, d).

    Row r of M·Q needs only row r of M, so this costs (T, 1, Si)·(T, Si, d) and
    (T, 2, Su)·(T, Su, d) instead of the full slot updates.
    """
    mix = _mix_of(x, ops, p_loc.shape[1])
    u, ij = loc.q_user[:, None], torch.stack([loc.q_pos, loc.q_neg], 1)
    p_u, q_ij = _take(p_loc, u), _take(q_loc, ij)
    p_new = torch.baddbmm(p_u * (1.0 - 2.0 * lr * _take(ops.reg_user, u)), _take(mix, u), q_loc, alpha=-lr)
    q_new = torch.baddbmm(q_ij * (1.0 - 2.0 * lr * _take(ops.reg_item, ij)), _take(mix.transpose(1, 2), ij), p_loc, alpha=-lr)
    if not create_graph:
        p_new, q_new = p_u + (p_new - p_u).detach(), q_ij + (q_new - q_ij).detach()
    return p_new, q_new


def inner_adapt(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps, hp: InnerParams, create_graph: bool = True):
    """L inner steps, for T tasks at once.

    Shapes: p_loc (T, Su, d), q_loc (T, Si, d) local slots; ``ops`` the support
    triples. Returns the adapted (p_loc, q_loc). ``create_graph=False``
    detaches each inner gradient step (the adapted rows then depend on Θ with
    an identity Jacobian): first-order MAML, or serving.
    """
    for _ in range(hp.inner_steps):
        p_new, q_new = _inner_step(p_loc, q_loc, ops, hp.inner_lr)
        if not create_graph:
            p_new = p_loc + (p_new - p_loc).detach()
            q_new = q_loc + (q_new - q_loc).detach()
        p_loc, q_loc = p_new, q_new
    return p_loc, q_loc


def query_loss(p_loc: torch.Tensor, q_loc: torch.Tensor, loc: LocalTasks, hp: InnerParams) -> torch.Tensor:
    """L^1_t of each task's single query triple (T,)."""
    take = lambda table, index: _take(table, index[:, None])[:, 0]
    return bpr_triple_loss(take(p_loc, loc.q_user), take(q_loc, loc.q_pos), take(q_loc, loc.q_neg), hp.lambda_p, hp.lambda_q_pos, hp.lambda_q_neg)


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table (n, d), rows (T, S) -> (T, S, d); the outer gradient flows back through it (index_add)."""
    return table.index_select(0, rows.flatten()).view(*rows.shape, table.shape[1])


def meta_objective(P: torch.Tensor, Q: torch.Tensor, batch: TaskBatch, hp: InnerParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(support loss, query loss), each the mean over tasks; the objective is support + λ_ML · query.

    P (n_users, d), Q (n_items, d). Support: L^K_t(Θ). Query: L^1_t(Θ^L_t).
    The same computation as ``inner_adapt`` followed by ``query_loss``, with two
    savings: the margins at Θ serve both the support loss and the first inner
    step, and the last inner step updates only the three rows the query reads.
    """
    loc = localise(batch)
    p_loc, q_loc = gather_rows(P, loc.user_rows), gather_rows(Q, loc.item_rows)
    ops = support_ops(loc.s_user, loc.s_pos, loc.s_neg, p_loc.shape[1], q_loc.shape[1], hp, P.dtype)
    x = _margins(p_loc, q_loc, ops)
    l2 = (ops.reg_user * p_loc.pow(2)).sum((1, 2)) + (ops.reg_item * q_loc.pow(2)).sum((1, 2))
    support = -F.logsigmoid(x).mean(1) + l2
    create_graph = not hp.first_order
    for _ in range(hp.inner_steps - 1):
        p_new, q_new = _inner_step(p_loc, q_loc, ops, hp.inner_lr, x)
        if not create_graph:
            p_new, q_new = p_loc + (p_new - p_loc).detach(), q_loc + (q_new - q_loc).detach()
        p_loc, q_loc = p_new, q_new
        x = _margins(p_loc, q_loc, ops)
    p_u, q_ij = _last_step_query_rows(p_loc, q_loc, ops, loc, hp.inner_lr, x, create_graph)
    query = bpr_triple_loss(p_u[:, 0], q_ij[:, 0], q_ij[:, 1], hp.lambda_p, hp.lambda_q_pos, hp.lambda_q_neg)
    return support.mean(), query.mean()


@dataclass(frozen=True)
class StepStats:
    """One outer step: the two losses at Θ, the meta-gradient's norm *before* any clipping, and whether it was clipped."""

    support_loss: float
    query_loss: float
    grad_norm: float
    clipped: bool = False


def meta_step(P: torch.Tensor, Q: torch.Tensor, optimizer: torch.optim.Optimizer, batch: TaskBatch, hp: InnerParams) -> StepStats:
    """One outer step on a batch of tasks; raises DivergedError (Θ untouched) on NaN/Inf.

    The gradient norm is measured before clipping and always returned, so that a
    run with clipping still shows how large its gradients grew (METHOD.md §11);
    ``hp.grad_clip`` None (no clipping) lets divergence show as it is.
    """
    optimizer.zero_grad(set_to_none=True)
    support, query = meta_objective(P, Q, batch, hp)
    total = support + hp.lambda_ml * query
    s_val, q_val = float(support.detach()), float(query.detach())
    if not math.isfinite(float(total.detach())):
        raise DivergedError(f"meta-objective is not finite (support loss {s_val}, query loss {q_val})")
    total.backward()
    params = [P, Q]
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if not math.isfinite(norm):
        raise DivergedError(f"meta-gradient norm is {norm} (support loss {s_val}, query loss {q_val})")
    clipped = hp.grad_clip is not None and norm > hp.grad_clip
    if clipped:
        torch.nn.utils.clip_grads_with_norm_(params, hp.grad_clip, torch.tensor(norm))
    optimizer.step()
    if not (torch.isfinite(P).all() and torch.isfinite(Q).all()):
        raise DivergedError(f"P or Q holds NaN/Inf after the outer step (gradient norm before clipping {norm:.4g})")
    return StepStats(s_val, q_val, norm, clipped)


def reference_meta_objective(P: torch.Tensor, Q: torch.Tensor, batch: TaskBatch, hp: InnerParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The same objective as ``meta_objective``, as a plain per-task loop with torch.autograd.

    For tests and the benchmark only: each task gathers its distinct rows
    (torch.unique), takes L autograd steps on them, then scores its query.
    """
    supports, queries = [], []
    for t in range(len(batch)):
        users, u_idx = torch.unique(torch.cat([batch.support_users[t], batch.query_user[t : t + 1]]), return_inverse=True)
        items, i_idx = torch.unique(
            torch.cat([batch.support_pos[t], batch.support_neg[t], batch.query_pos[t : t + 1], batch.query_neg[t : t + 1]]),
            return_inverse=True,
        )
        K = batch.support_users.shape[1]
        su, sp, sn = u_idx[:K], i_idx[:K], i_idx[K : 2 * K]
        p, q = P[users], Q[items]

        def support_loss(p, q):
            return bpr_triple_loss(p[su], q[sp], q[sn], hp.lambda_p, hp.lambda_q_pos, hp.lambda_q_neg).mean()

        supports.append(support_loss(p, q))
        for _ in range(hp.inner_steps):
            g_p, g_q = torch.autograd.grad(support_loss(p, q), (p, q), create_graph=not hp.first_order)
            p, q = p - hp.inner_lr * g_p, q - hp.inner_lr * g_q
        queries.append(
            bpr_triple_loss(p[u_idx[K]], q[i_idx[2 * K]], q[i_idx[2 * K + 1]], hp.lambda_p, hp.lambda_q_pos, hp.lambda_q_neg)
        )
    return torch.stack(supports).mean(), torch.stack(queries).mean()
