"""MAML over BPR matrix factorisation, batched over tasks (docs/method.md §3, §5).

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
them, with no ``torch.autograd.grad`` in the inner loop (``_chunk_losses``).
They are computed on each task's slot score matrix q_loc·p_locᵀ (T, Si, Su):
the margins are read off it by index, and the gradients are M·Q and Mᵀ·P
with M the (user slot, item slot) coefficients of the triples, so the work
is a few batched matmuls. ``first_order`` detaches them (FOMAML). For speed,
``meta_objective`` runs the same computation with a hand-written backward pass
(``_MetaObjective``, derived in the comment above it), chunk by chunk;
``reference_meta_objective`` is the same objective as a plain per-task loop
with torch.autograd, for tests and the benchmark.

Reduction (docs/method.md §3 allows a mean if documented): L_R is the **mean** over
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
from metarec.sparse_adam import coalesced, grad_values, takes_row_sparse

# Bytes of one (tasks, item slots, d) tensor per chunk of meta_objective. Measured on this machine's 2 MB L2
# (K = 20, d = 64, so about 190 tasks a chunk): 1,024 tasks per step ran 1.2-1.3x faster in chunks of 128-256
# tasks than at once, 4,096 tasks 2x; chunks of 64 lose the gain again to per-operation overhead. Larger
# batches only help once chunked: unchunked, 256-512 tasks a step were fastest and 4,096 half as fast.
CHUNK_BYTES = 2 << 20


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
    def from_arrays(cls, tasks, index: np.ndarray | slice | None = None, device: torch.device | str = "cpu") -> "TaskBatch":
        """From anything with the six TaskArrays fields (numpy), optionally a subset of tasks, on ``device``."""
        pick = (lambda a: a) if index is None else (lambda a: a[index])
        names = ("support_users", "support_pos", "support_neg", "query_user", "query_pos", "query_neg")
        return cls(*(torch.as_tensor(np.ascontiguousarray(pick(getattr(tasks, n))), dtype=torch.int64).to(device) for n in names))

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

    def take(self, rows: slice) -> "LocalTasks":
        """The slots of a contiguous run of tasks."""
        return LocalTasks(*(getattr(self, name)[rows] for name in LocalTasks.__dataclass_fields__))


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

    pair_pos, pair_neg (T, K): flat index j·Su + u of each triple's (positive
    slot, user slot) and (negative slot, user slot) in a task's slot score
    matrix q_loc·p_locᵀ (T, Si, Su); reg_user (T, Su, 1), reg_item (T, Si, 1): the L2
    weight each slot carries in L^K_t = mean_k L_ijk, i.e. λ · (number of
    triples using it) / K. A slot used n times is counted n times, which is how
    repeated rows accumulate into one parameter.
    """

    pair_pos: torch.Tensor
    pair_neg: torch.Tensor
    n_item_slots: int
    reg_user: torch.Tensor
    reg_item: torch.Tensor

    @property
    def pairs(self) -> torch.Tensor:
        """(T, 2K): pair_pos then pair_neg, where ``_mix`` scatters +c and -c."""
        return torch.cat([self.pair_pos, self.pair_neg], 1)

    def take(self, rows: slice) -> "SupportOps":
        """The operators of a contiguous run of tasks."""
        return SupportOps(self.pair_pos[rows], self.pair_neg[rows], self.n_item_slots, self.reg_user[rows], self.reg_item[rows])


def _uses(index: torch.Tensor, n_slots: int, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """(T, n_slots, 1): weight × how many of a task's triples use each slot (index (T, K))."""
    counts = torch.zeros(index.shape[0], n_slots, dtype=dtype, device=index.device)
    return counts.scatter_add_(1, index, torch.full(index.shape, weight, dtype=dtype, device=index.device))[..., None]


def support_ops(s_user, s_pos, s_neg, n_user_slots: int, n_item_slots: int, hp: InnerParams, dtype: torch.dtype) -> SupportOps:
    """Operators for support triples at slot indices s_* (T, K)."""
    K = s_user.shape[1]
    reg_user = _uses(s_user, n_user_slots, hp.lambda_p / K, dtype)
    reg_item = _uses(s_pos, n_item_slots, hp.lambda_q_pos / K, dtype) + _uses(s_neg, n_item_slots, hp.lambda_q_neg / K, dtype)
    return SupportOps(s_pos * n_user_slots + s_user, s_neg * n_user_slots + s_user, n_item_slots, reg_user, reg_item)


def _margins(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps) -> torch.Tensor:
    """x_k = p_u·(q_j - q_k) of each support triple (T, K), read off the slot score matrix q_loc·p_locᵀ (T, Si, Su).

    Items × users rather than users × items: the backward pass then computes the item slots' gradient
    (the larger one) as a plain product (T, Si, Su)·(T, Su, d), not as the transpose of a (T, d, Si) one
    (measured 1.06-1.08x faster per step)."""
    scores = torch.bmm(q_loc, p_loc.transpose(1, 2)).flatten(1)
    return scores.gather(1, ops.pair_pos) - scores.gather(1, ops.pair_neg)


def _mix(coef: torch.Tensor, ops: SupportOps, n_user_slots: int, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """M (T, Su, Si) = Σ_k c_k e_u (e_j - e_k)ᵀ: the coefficient of each (user slot, item slot) pair (stored item-major).

    ``pairs``: ``ops.pairs`` when the caller has it already (it is the same for every inner step)."""
    flat = coef.new_zeros(coef.shape[0], n_user_slots * ops.n_item_slots)
    flat = flat.scatter_add(1, ops.pairs if pairs is None else pairs, torch.cat([coef, -coef], 1))
    return flat.view(coef.shape[0], ops.n_item_slots, n_user_slots).transpose(1, 2)


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


def _step_mix(x: torch.Tensor, ops: SupportOps, n_user_slots: int, lr: float, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """-α·M (T, Su, Si) from the support margins x (T, K), with c_k = d/dx_k mean_k[-log σ(x_k)] = -σ(-x_k)/K.

    The step's -α is folded into the small mix (c_k·(-α) = α·σ(-x_k)/K) rather than passed to ``baddbmm`` as
    ``alpha``: its backward then multiplies no (T, S, d) gradient by α (measured: such scalar products of
    slot-sized tensors were the largest single cost of the backward pass)."""
    return _mix(torch.sigmoid(-x) * (lr / x.shape[1]), ops, n_user_slots, pairs)


def _inner_step(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps, lr: float, x: torch.Tensor | None = None,
                pairs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step Θ - α∇L^K_t, fused: P' = (1 - 2α reg_user)·P - α M·Q (one baddbmm), Q' likewise.

    Algebraically the same as ``p - lr * support_grads(...)[0]``; fusing the
    L2 term and the matmul into ``baddbmm`` halves the passes over the slots.
    ``x``: the margins at (p_loc, q_loc) when already computed.
    """
    mix = _step_mix(_margins(p_loc, q_loc, ops) if x is None else x, ops, p_loc.shape[1], lr, pairs)
    p_new = torch.baddbmm(p_loc * (1.0 - 2.0 * lr * ops.reg_user), mix, q_loc)
    q_new = torch.baddbmm(q_loc * (1.0 - 2.0 * lr * ops.reg_item), mix.transpose(1, 2), p_loc)
    return p_new, q_new


def _last_step_query_rows(p_loc, q_loc, ops: SupportOps, loc: "LocalTasks", lr: float, x: torch.Tensor, create_graph: bool,
                          pairs: torch.Tensor | None = None):
    """The final inner step for the three rows the query reads only: p_u (T, 1, d), q_j and q_k (T, 2, d).

    Row r of M·Q needs only row r of M, so this costs (T, 1, Si)·(T, Si, d) and
    (T, 2, Su)·(T, Su, d) instead of the full slot updates.
    """
    mix = _step_mix(x, ops, p_loc.shape[1], lr, pairs)
    u, ij = loc.q_user[:, None], torch.stack([loc.q_pos, loc.q_neg], 1)
    p_u, q_ij = _take(p_loc, u), _take(q_loc, ij)
    p_new = torch.baddbmm(p_u * (1.0 - 2.0 * lr * _take(ops.reg_user, u)), _take(mix, u), q_loc)
    q_new = torch.baddbmm(q_ij * (1.0 - 2.0 * lr * _take(ops.reg_item, ij)), _take(mix.transpose(1, 2), ij), p_loc)
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


def gather_rows(table: torch.Tensor, rows: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
    """table (n, d), rows (T, S) -> (T, S, d); the outer gradient flows back through it: a dense (n, d) table
    (index_add into zeros), or with ``sparse_grad`` a sparse COO gradient holding the gathered rows only."""
    if sparse_grad:
        return F.embedding(rows, table, sparse=True)
    return table.index_select(0, rows.flatten()).view(*rows.shape, table.shape[1])


def chunk_size(n_item_slots: int, dim: int, element_size: int, budget: int | None = None) -> int:
    """Tasks per chunk of ``meta_objective``: as many as keep one (T, Si, d) slot tensor within ``budget`` bytes."""
    return max(1, (CHUNK_BYTES if budget is None else budget) // max(1, n_item_slots * dim * element_size))


def meta_objective(P: torch.Tensor, Q: torch.Tensor, batch: TaskBatch, hp: InnerParams,
                   start: "StartRows | None" = None, sparse_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(support loss, query loss), each the mean over tasks; the objective is support + λ_ML · query.

    P (n_users, d), Q (n_items, d). Support: L^K_t(Θ). Query: L^1_t(Θ^L_t).
    The rows are gathered once for the whole batch (one index_select per
    table, so one gradient per table in the backward pass: dense, or with
    ``sparse_grad`` row-sparse over the batch's rows, for ``RowSparseAdam``). The rest is
    ``_MetaObjective``: the computation of ``_chunk_losses`` with a hand-written
    backward pass, over chunks of ``chunk_size`` tasks, so that a chunk's slot
    tensors stay in cache between the passes over them.
    """
    loc = localise(batch)
    p_loc, q_loc = gather_rows(P, loc.user_rows, sparse_grad), gather_rows(Q, loc.item_rows, sparse_grad)
    p_loc = with_start_rows(p_loc, loc, start)
    ops = support_ops(loc.s_user, loc.s_pos, loc.s_neg, p_loc.shape[1], q_loc.shape[1], hp, P.dtype)
    size = chunk_size(q_loc.shape[1], q_loc.shape[2], q_loc.element_size())
    size = -(-len(batch) // -(-len(batch) // size))  # the same number of chunks, of near-equal sizes
    support, query = _MetaObjective.apply(p_loc, q_loc, ops, loc, hp, size)
    return support / len(batch), query / len(batch)


def _chunk_losses(p_loc: torch.Tensor, q_loc: torch.Tensor, ops: SupportOps, loc: LocalTasks, hp: InnerParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the tasks of L^K_t(Θ) and L^1_t(Θ^L_t), for autograd: what ``_MetaObjective`` computes.

    The same computation as ``inner_adapt`` followed by ``query_loss``, with two
    savings: the margins at Θ serve both the support loss and the first inner
    step, and the last inner step updates only the three rows the query reads.
    """
    pairs = ops.pairs  # the same for every inner step
    x = _margins(p_loc, q_loc, ops)
    l2 = (ops.reg_user * p_loc.pow(2)).sum((1, 2)) + (ops.reg_item * q_loc.pow(2)).sum((1, 2))
    support = -F.logsigmoid(x).mean(1) + l2
    create_graph = not hp.first_order
    for _ in range(hp.inner_steps - 1):
        p_new, q_new = _inner_step(p_loc, q_loc, ops, hp.inner_lr, x, pairs)
        if not create_graph:
            p_new, q_new = p_loc + (p_new - p_loc).detach(), q_loc + (q_new - q_loc).detach()
        p_loc, q_loc = p_new, q_new
        x = _margins(p_loc, q_loc, ops)
    p_u, q_ij = _last_step_query_rows(p_loc, q_loc, ops, loc, hp.inner_lr, x, create_graph, pairs)
    query = bpr_triple_loss(p_u[:, 0], q_ij[:, 0], q_ij[:, 1], hp.lambda_p, hp.lambda_q_pos, hp.lambda_q_neg)
    return support.sum(), query.sum()


# ---------------------------------------------------------------- the objective with a hand-written backward pass
#
# Per task, item-major: A_l (Si, Su) holds a_k = α·σ(-x_k)/K at (j_k, u_k) and -a_k at (n_k, u_k), so that
# one inner step is p' = p∘keep_u + A_lᵀ·q, q' = q∘keep_i + A_l·p (keep = 1 - 2α·reg; A_l = (-α·M)ᵀ of
# ``_step_mix``). Backward through a step, given g_p', g_q':
#   g_p = g_p'∘keep_u + A_lᵀ·g_q'     g_q = g_q'∘keep_i + A_l·g_p'
#   g_a_k = (q·g_p'ᵀ + g_q'·pᵀ)[j_k, u_k] - [n_k, u_k]      (only A's entries at the pairs matter)
#   g_x_k = g_a_k · (-α/K)·σ(-x_k)σ(x_k),  and through x = scores of (q, p): g_q += G·p, g_p += Gᵀ·q
# with G the pair matrix of g_x. The last step reads only rows u*, j*, n* (column u* and rows j*, n* of A);
# first order treats every step as the identity for (p, q) and its A as a constant. Compared with autograd
# over ``_chunk_losses`` this saves the gradient accumulations, temporaries and copies autograd makes
# (measured 1.3-1.4x per step); tests/test_maml.py checks it against the per-task reference, finite
# differences and second derivatives.

def _pair_matrix(coef: torch.Tensor, pairs: torch.Tensor, n_item_slots: int, n_user_slots: int) -> torch.Tensor:
    """(T, Si, Su) item-major: +c_k at (j_k, u_k), -c_k at (n_k, u_k); ``pairs`` = ``SupportOps.pairs``."""
    flat = coef.new_zeros(coef.shape[0], n_item_slots * n_user_slots).scatter_add_(1, pairs, torch.cat([coef, -coef], 1))
    return flat.view(coef.shape[0], n_item_slots, n_user_slots)


def _at_pairs(matrix: torch.Tensor, ops: SupportOps) -> torch.Tensor:
    """m[j_k, u_k] - m[n_k, u_k] of item-major (T, Si, Su) matrices: (T, K)."""
    flat = matrix.flatten(1)
    return flat.gather(1, ops.pair_pos) - flat.gather(1, ops.pair_neg)


def _row(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (T, S, w), index (T,) -> (T, w)."""
    return table.gather(1, index[:, None, None].expand(-1, 1, table.shape[-1]))[:, 0]


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(rows, dim=-1).square()


@dataclass
class _ChunkState:
    """What a chunk's forward pass keeps for its backward pass."""

    p0: torch.Tensor
    q0: torch.Tensor
    ops: SupportOps
    loc: LocalTasks
    pairs: torch.Tensor
    keep_u: torch.Tensor
    keep_i: torch.Tensor
    steps: list  # (p, q, x, A) before each full inner step
    p: torch.Tensor  # the state the last step starts from
    q: torch.Tensor
    x: torch.Tensor
    last: tuple  # A[:, u*], A[j*, :], A[n*, :], keep at u*, j*, n*
    query_rows: tuple  # adapted p_u*, q_j*, q_n* and the query margin z


def _chunk_forward(p0: torch.Tensor, q0: torch.Tensor, ops: SupportOps, loc: LocalTasks, hp: InnerParams) -> tuple[torch.Tensor, torch.Tensor, _ChunkState]:
    """(Σ support, Σ query) of a chunk (= ``_chunk_losses``) and the state its backward pass needs."""
    n_user_slots, n_item_slots, K, lr = p0.shape[1], q0.shape[1], ops.pair_pos.shape[1], hp.inner_lr
    pairs = ops.pairs
    keep_u, keep_i = 1.0 - 2.0 * lr * ops.reg_user, 1.0 - 2.0 * lr * ops.reg_item
    x = _at_pairs(torch.bmm(q0, p0.transpose(1, 2)), ops)
    support = F.softplus(-x).mean(1).sum() + (_squared_norms(p0) * ops.reg_user[..., 0]).sum() + (_squared_norms(q0) * ops.reg_item[..., 0]).sum()
    steps, p, q = [], p0, q0
    for _ in range(hp.inner_steps - 1):
        A = _pair_matrix(torch.sigmoid(-x) * (lr / K), pairs, n_item_slots, n_user_slots)
        steps.append((p, q, x, A))
        p, q = (p * keep_u).baddbmm_(A.transpose(1, 2), q), (q * keep_i).baddbmm_(A, p)
        x = _at_pairs(torch.bmm(q, p.transpose(1, 2)), ops)
    # the last step, for the query's rows only
    A = _pair_matrix(torch.sigmoid(-x) * (lr / K), pairs, n_item_slots, n_user_slots)
    u, j, n = loc.q_user, loc.q_pos, loc.q_neg
    col = A.gather(2, u[:, None, None].expand(-1, n_item_slots, 1))[..., 0]  # (T, Si)
    row_j, row_n = _row(A, j), _row(A, n)  # (T, Su)
    k_u, k_j, k_n = _row(keep_u, u), _row(keep_i, j), _row(keep_i, n)  # (T, 1)
    p_t = torch.bmm(col[:, None, :], q)[:, 0].addcmul_(_row(p, u), k_u)
    q_j = torch.bmm(row_j[:, None, :], p)[:, 0].addcmul_(_row(q, j), k_j)
    q_n = torch.bmm(row_n[:, None, :], p)[:, 0].addcmul_(_row(q, n), k_n)
    z = (p_t * (q_j - q_n)).sum(-1)
    query = (F.softplus(-z) + hp.lambda_p * _squared_norms(p_t) + hp.lambda_q_pos * _squared_norms(q_j) + hp.lambda_q_neg * _squared_norms(q_n)).sum()
    state = _ChunkState(p0, q0, ops, loc, pairs, keep_u, keep_i, steps, p, q, x, (col, row_j, row_n, k_u, k_j, k_n), (p_t, q_j, q_n, z))
    return support, query, state


def _chunk_backward(c: _ChunkState, g_support: float, g_query: float, hp: InnerParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. the chunk's slots (p0, q0) of g_support·Σ support + g_query·Σ query."""
    T, n_user_slots, n_item_slots, d = c.p0.shape[0], c.p0.shape[1], c.q0.shape[1], c.p0.shape[2]
    K, lr, second = c.ops.pair_pos.shape[1], hp.inner_lr, not hp.first_order
    u, j, n = c.loc.q_user, c.loc.q_pos, c.loc.q_neg
    col, row_j, row_n, k_u, k_j, k_n = c.last
    p_t, q_j, q_n, z = c.query_rows
    p, q = c.p, c.q
    # the query triple: -log σ(z) + the L2 terms
    dz = (-g_query * torch.sigmoid(-z))[:, None]
    g_pt = (q_j - q_n).mul_(dz).add_(p_t, alpha=2 * hp.lambda_p * g_query)
    g_qj = (p_t * dz).add_(q_j, alpha=2 * hp.lambda_q_pos * g_query)
    g_qn = (p_t * -dz).add_(q_n, alpha=2 * hp.lambda_q_neg * g_query)
    at = lambda index, width: index[:, None, None].expand(-1, 1, width)
    if second:  # the last step: rows u*, j*, n* of (p, q) and column u*, rows j*, n* of A
        g_q = torch.bmm(col[:, :, None], g_pt[:, None, :])
        g_p = torch.bmm(torch.stack([row_j, row_n], 2), torch.stack([g_qj, g_qn], 1))
        g_p.scatter_add_(1, at(u, d), (k_u * g_pt)[:, None])
        g_q.scatter_add_(1, at(j, d), (k_j * g_qj)[:, None]).scatter_add_(1, at(n, d), (k_n * g_qn)[:, None])
        g_A = torch.zeros(T, n_item_slots, n_user_slots, dtype=p.dtype, device=p.device)
        g_A.scatter_(2, u[:, None, None].expand(-1, n_item_slots, 1), torch.bmm(q, g_pt[:, :, None]))
        g_A.scatter_add_(1, torch.stack([j, n], 1)[:, :, None].expand(-1, 2, n_user_slots), torch.bmm(torch.stack([g_qj, g_qn], 1), p.transpose(1, 2)))
        sig = torch.sigmoid(-c.x)
        g_x = _at_pairs(g_A, c.ops).mul_(sig * (1 - sig)).mul_(-lr / K)
    else:  # first order: the adapted rows move one for one with the rows they started from
        g_p, g_q = torch.zeros_like(p), torch.zeros_like(q)
        g_p.scatter_add_(1, at(u, d), g_pt[:, None])
        g_q.scatter_add_(1, at(j, d), g_qj[:, None]).scatter_add_(1, at(n, d), g_qn[:, None])
        g_x = None
    for p_prev, q_prev, x_prev, A in reversed(c.steps):  # the full steps, last first
        if g_x is not None:  # through the margins x = scores of (q, p)
            G = _pair_matrix(g_x, c.pairs, n_item_slots, n_user_slots)
            g_q.baddbmm_(G, p)
            g_p.baddbmm_(G.transpose(1, 2), q)
        if second:
            g_a = _at_pairs(torch.bmm(q_prev, g_p.transpose(1, 2)).baddbmm_(g_q, p_prev.transpose(1, 2)), c.ops)
            g_p, g_q = (g_p * c.keep_u).baddbmm_(A.transpose(1, 2), g_q), g_q.mul_(c.keep_i).baddbmm_(A, g_p)
            sig = torch.sigmoid(-x_prev)
            g_x = g_a.mul_(sig * (1 - sig)).mul_(-lr / K)
        p, q = p_prev, q_prev
    # the support loss at Θ: -log σ(x0) through its margins, and its L2 term
    support_gx = torch.sigmoid(-(c.steps[0][2] if c.steps else c.x)) * (-g_support / K)
    g_x = support_gx if g_x is None else g_x.add_(support_gx)
    G = _pair_matrix(g_x, c.pairs, n_item_slots, n_user_slots)
    g_q.addcmul_(c.ops.reg_item, c.q0, value=2 * g_support).baddbmm_(G, c.p0)
    g_p.addcmul_(c.ops.reg_user, c.p0, value=2 * g_support).baddbmm_(G.transpose(1, 2), c.q0)
    return g_p, g_q


class _MetaObjective(torch.autograd.Function):
    """(Σ_t L^K_t, Σ_t L^1_t(Θ^L_t)) of the slots (p_loc, q_loc), chunk by chunk, with ``_chunk_backward``.

    A backward pass that must itself be differentiable (``create_graph=True``: second derivatives of the
    objective) differentiates ``_chunk_losses`` with autograd instead, from the same inputs."""

    @staticmethod
    def forward(ctx, p_loc, q_loc, ops: SupportOps, loc: LocalTasks, hp: InnerParams, size: int):
        support = query = 0.0
        ctx.chunks = []
        for start in range(0, len(p_loc), size):
            rows = slice(start, start + size)
            s, q, state = _chunk_forward(p_loc[rows], q_loc[rows], ops.take(rows), loc.take(rows), hp)
            ctx.chunks.append((rows, state))
            support, query = support + s, query + q
        ctx.save_for_backward(p_loc, q_loc)
        ctx.ops, ctx.loc, ctx.hp = ops, loc, hp
        return support, query

    @staticmethod
    def backward(ctx, g_support, g_query):
        p_loc, q_loc = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            with torch.enable_grad():  # from the saved inputs themselves, so the gradient stays a function of them
                support, query = _chunk_losses(p_loc, q_loc, ctx.ops, ctx.loc, ctx.hp)
                g_p, g_q = torch.autograd.grad((support, query), (p_loc, q_loc), (g_support, g_query), create_graph=True)
            return g_p, g_q, None, None, None, None
        g_p, g_q = torch.empty_like(p_loc), torch.empty_like(q_loc)
        for rows, state in ctx.chunks:
            g_p[rows], g_q[rows] = _chunk_backward(state, float(g_support), float(g_query), ctx.hp)
        return g_p, g_q, None, None, None, None


@dataclass(frozen=True)
class StartRows:
    """Where some tasks' users start: ``fresh`` (T,) bool marks tasks that look like a new user's (``tasks.early_share``),
    whose user row is ``rows`` (T, d) (a new user's start: mean of the trained rows + noise, or a learned vector + noise)
    instead of the user's own row in P."""

    fresh: torch.Tensor
    rows: torch.Tensor


def with_start_rows(p_loc: torch.Tensor, loc: LocalTasks, start: StartRows | None) -> torch.Tensor:
    """p_loc with each fresh task's user slot replaced by its start row; gradients flow into ``start.rows``, not into P."""
    if start is None or not bool(start.fresh.any()):
        return p_loc
    at = start.fresh.nonzero()[:, 0]
    p_loc = p_loc.clone()
    p_loc[at, loc.q_user[at]] = start.rows[at].to(p_loc.dtype)
    return p_loc


@dataclass(frozen=True)
class StepStats:
    """One outer step: the two losses at Θ, the meta-gradient's norm *before* any clipping, and whether it was clipped."""

    support_loss: float
    query_loss: float
    grad_norm: float
    clipped: bool = False


def meta_step(P: torch.Tensor, Q: torch.Tensor, optimizer: torch.optim.Optimizer, batch: TaskBatch, hp: InnerParams, parallel=None,
              start: StartRows | None = None) -> StepStats:
    """One outer step on a batch of tasks; raises DivergedError (Θ untouched) on NaN/Inf.

    ``parallel`` (``metarec.distributed.DataParallel``): this worker computes its share of the batch and the
    gradients are summed over the workers before the step, so every worker takes the whole batch's step.

    An optimiser that takes row-sparse gradients (``metarec.sparse_adam.RowSparseAdam``, meta.optimizer
    "lazy_adam") gets P's and Q's gradients as sparse COO tensors over the batch's rows, so that the
    gradient, its norm, the clipping, the step and the finiteness check all cost the batch, not the tables.

    The gradient norm is measured before clipping and always returned, so that a
    run with clipping still shows how large its gradients grew (docs/method.md §11);
    ``hp.grad_clip`` None (no clipping) lets divergence show as it is.
    """
    optimizer.zero_grad(set_to_none=True)
    sparse = takes_row_sparse(optimizer)
    if parallel is None:
        support, query = meta_objective(P, Q, batch, hp, start, sparse_grad=sparse)
    else:  # start rows are single-process only (config rejects them with runtime.workers > 1)
        support, query = parallel.objective(P, Q, batch, hp, sparse_grad=True) if sparse else parallel.objective(P, Q, batch, hp)
    total = support + hp.lambda_ml * query
    s_val, q_val = float(support.detach()), float(query.detach())
    if not math.isfinite(float(total.detach())):
        raise DivergedError(f"meta-objective is not finite (support loss {s_val}, query loss {q_val})")
    total.backward()
    if parallel is not None:
        parallel.reduce_gradients((P, Q))
    params = [P, Q]
    for param in params:  # a row-sparse gradient once per row, so that its norm and the step see summed duplicates
        if param.grad is not None:
            param.grad = coalesced(param.grad)
    norm = float(torch.nn.utils.get_total_norm([grad_values(p.grad) for p in params if p.grad is not None]))
    if not math.isfinite(norm):
        raise DivergedError(f"meta-gradient norm is {norm} (support loss {s_val}, query loss {q_val})")
    clipped = hp.grad_clip is not None and norm > hp.grad_clip
    if clipped:
        torch.nn.utils.clip_grads_with_norm_(params, hp.grad_clip, torch.tensor(norm))
    optimizer.step()
    if not all(_all_finite(_stepped_rows(p)) for p in params):
        raise DivergedError(f"P or Q holds NaN/Inf after the outer step (gradient norm before clipping {norm:.4g})")
    return StepStats(s_val, q_val, norm, clipped)


def _all_finite(table: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``table``: its min and max are finite (NaN propagates through both). One reduction pass,
    where ``isfinite(table).all()`` makes four (measured 9x faster on a 480k x 64 table; it was 30% of a dense step)."""
    if not table.numel():
        return True
    low, high = torch.aminmax(table)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _stepped_rows(param: torch.Tensor) -> torch.Tensor:
    """The part of a table an optimiser step can have changed: the rows of a row-sparse gradient, else all of it
    (so the finiteness check after a lazy step costs the batch, not the table)."""
    grad = param.grad
    return param.detach().index_select(0, grad._indices()[0]) if grad is not None and grad.is_sparse else param.detach()


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


# ------------------------------------------------------------------ the flexible path: Θ's optional parameters
#
# Ours+'s options (meta.item_bias, learned_inner_lr, learned_prior, learned_start) add small parameters to Θ that the
# hand-written backward pass above does not know. They train by plain autograd through the same closed-form inner
# steps (``support_grads``), which is slower per task but exact (tests/test_maml.py checks it against the fast path
# with every option off). The default path is untouched.

@dataclass(frozen=True)
class Extras:
    """Θ's optional parameters (None when their option is off).

    bias (n_items,): b_i in the score b_i + p·q (not adapted in the inner loop); log_lr (2, L, d): the inner rates of
    user and item rows per step and dimension, as logarithms (so they stay positive); prior_mean (d,), prior_raw (d,):
    μ and λ = softplus(raw) >= 0 of the adapted user's ½ (p − μ)ᵀ diag(λ) (p − μ); start (d,): a new user's learned row.
    """

    bias: torch.Tensor | None = None
    log_lr: torch.Tensor | None = None
    prior_mean: torch.Tensor | None = None
    prior_raw: torch.Tensor | None = None
    start: torch.Tensor | None = None

    def rates(self, step: int, hp: InnerParams, scale: float = 1.0) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(user rate, item rate) of inner step ``step``: the learned (d,) rates (steps past the learned ones reuse the
        last), else α."""
        if self.log_lr is None:
            return hp.inner_lr * scale, hp.inner_lr * scale
        rates = self.log_lr[:, min(step, self.log_lr.shape[1] - 1)].exp() * scale
        return rates[0], rates[1]


def _bias_margins(b_loc: torch.Tensor | None, loc: LocalTasks) -> torch.Tensor | float:
    """b_j − b_k of each support triple (T, K), 0 without item biases."""
    if b_loc is None:
        return 0.0
    return b_loc.gather(1, loc.s_pos) - b_loc.gather(1, loc.s_neg)


def flex_support_grads(p, q, ops: SupportOps, loc: LocalTasks, extras: Extras, b_margin) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ of the inner objective w.r.t. the slots: ``support_grads`` with the item biases in the margins and, with a
    learned prior, λ ∘ (p − μ) on the adapted user's slot."""
    K = ops.pair_pos.shape[1]
    coef = -torch.sigmoid(-(_margins(p, q, ops) + b_margin)) / K
    mix = _mix(coef, ops, p.shape[1])
    g_p = torch.bmm(mix, q) + 2.0 * ops.reg_user * p
    g_q = torch.bmm(mix.transpose(1, 2), p) + 2.0 * ops.reg_item * q
    if extras.prior_mean is not None:
        user_slot = F.one_hot(loc.q_user, p.shape[1]).to(p.dtype)[..., None]  # (T, Su, 1)
        g_p = g_p + user_slot * F.softplus(extras.prior_raw) * (p - extras.prior_mean)
    return g_p, g_q


def flex_inner_adapt(p, q, ops: SupportOps, loc: LocalTasks, hp: InnerParams, extras: Extras, b_loc: torch.Tensor | None = None,
                     create_graph: bool = True, steps: int | None = None, scale: float = 1.0):
    """``steps`` (default L) inner steps with the options of ``extras``. First order (``create_graph=False``)
    detaches the inner gradients but not the learned rates that multiply them, so the rates still learn."""
    b_margin = _bias_margins(b_loc, loc)
    for step in range(hp.inner_steps if steps is None else steps):
        g_p, g_q = flex_support_grads(p, q, ops, loc, extras, b_margin)
        if not create_graph:
            g_p, g_q = g_p.detach(), g_q.detach()
        lr_p, lr_q = extras.rates(step, hp, scale)
        p, q = p - lr_p * g_p, q - lr_q * g_q
    return p, q


def flex_meta_objective(P: torch.Tensor, Q: torch.Tensor, batch: TaskBatch, hp: InnerParams, extras: Extras,
                        start: StartRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``meta_objective`` with Θ's optional parameters, by autograd: (mean support loss at Θ, mean query loss after L steps)."""
    loc = localise(batch)
    p_loc, q_loc = gather_rows(P, loc.user_rows), gather_rows(Q, loc.item_rows)
    p_loc = with_start_rows(p_loc, loc, start)
    b_loc = None if extras.bias is None else extras.bias[loc.item_rows]
    ops = support_ops(loc.s_user, loc.s_pos, loc.s_neg, p_loc.shape[1], q_loc.shape[1], hp, P.dtype)
    x = _margins(p_loc, q_loc, ops) + _bias_margins(b_loc, loc)
    l2 = (ops.reg_user * p_loc.pow(2)).sum((1, 2)) + (ops.reg_item * q_loc.pow(2)).sum((1, 2))
    support = -F.logsigmoid(x).mean(1) + l2
    p_ad, q_ad = flex_inner_adapt(p_loc, q_loc, ops, loc, hp, extras, b_loc, create_graph=not hp.first_order)
    take = lambda table, index: _take(table, index[:, None])[:, 0]  # noqa: E731
    p_u, q_j, q_n = take(p_ad, loc.q_user), take(q_ad, loc.q_pos), take(q_ad, loc.q_neg)
    query = bpr_triple_loss(p_u, q_j, q_n, hp.lambda_p, hp.lambda_q_pos, hp.lambda_q_neg)
    if b_loc is not None:  # -log σ(z + b_j − b_n) in place of -log σ(z)
        z = (p_u * (q_j - q_n)).sum(-1)
        b_z = b_loc.gather(1, loc.q_pos[:, None])[:, 0] - b_loc.gather(1, loc.q_neg[:, None])[:, 0]
        query = query + F.logsigmoid(z) - F.logsigmoid(z + b_z)
    return support.mean(), query.mean()


def flex_meta_step(params: list[torch.Tensor], optimizers: list[torch.optim.Optimizer], batch: TaskBatch, hp: InnerParams,
                   extras: Extras, start: StartRows | None = None) -> StepStats:
    """``meta_step`` on ``flex_meta_objective``: params[0], params[1] are P and Q, the rest the extras' tensors, stepped
    by ``optimizers`` (P and Q's own, then the extras'); the gradient norm and clipping span all of them."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    support, query = flex_meta_objective(params[0], params[1], batch, hp, extras, start)
    total = support + hp.lambda_ml * query
    s_val, q_val = float(support.detach()), float(query.detach())
    if not math.isfinite(float(total.detach())):
        raise DivergedError(f"meta-objective is not finite (support loss {s_val}, query loss {q_val})")
    total.backward()
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if not math.isfinite(norm):
        raise DivergedError(f"meta-gradient norm is {norm} (support loss {s_val}, query loss {q_val})")
    clipped = hp.grad_clip is not None and norm > hp.grad_clip
    if clipped:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], hp.grad_clip, torch.tensor(norm))
    for optimizer in optimizers:
        optimizer.step()
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise DivergedError(f"Θ holds NaN/Inf after the outer step (gradient norm before clipping {norm:.4g})")
    return StepStats(s_val, q_val, norm, clipped)
