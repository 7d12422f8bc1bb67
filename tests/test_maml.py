"""The batched meta-gradient against a plain per-task autograd loop and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.config import MetaConfig
from metarec.maml import (
    DivergedError,
    TaskBatch,
    local_slots,
    meta_objective,
    meta_step,
    reference_meta_objective,
    support_grads,
    support_ops,
    inner_adapt,
    localise,
    query_loss,
)
from metarec.models.mf import bpr_triple_loss


def _tasks(T: int, K: int, n_users: int, n_items: int, seed: int) -> TaskBatch:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, T)
    k = 2
    own = np.repeat(user[:, None], k, 1)
    neighbours = rng.integers(0, n_users, (T, K - k))  # may repeat each other and the task's user
    return TaskBatch(
        torch.as_tensor(np.concatenate([own, neighbours], 1)),
        torch.as_tensor(rng.integers(0, n_items, (T, K))),  # small item pool: repeated items within a task
        torch.as_tensor(rng.integers(0, n_items, (T, K))),
        torch.as_tensor(user),
        torch.as_tensor(rng.integers(0, n_items, T)),
        torch.as_tensor(rng.integers(0, n_items, T)),
    )


def _params(n_users: int, n_items: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    P = (torch.randn(n_users, d, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    Q = (torch.randn(n_items, d, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    return P, Q


HP = MetaConfig(inner_steps=2, inner_lr=0.7, lambda_ml=1.5, lambda_p=0.01, lambda_q_pos=0.02, lambda_q_neg=0.03)


def _grads(fn, P, Q, batch, hp):
    support, query = fn(P, Q, batch, hp)
    total = support + hp.lambda_ml * query
    gP, gQ = torch.autograd.grad(total, (P, Q))
    return float(total.detach()), gP, gQ


@pytest.mark.parametrize("first_order", [False, True])
def test_batched_meta_gradient_equals_per_task_autograd_loop(first_order):
    hp = HP.model_copy(update={"first_order": first_order})
    P, Q = _params(6, 9, 4)
    batch = _tasks(T=7, K=5, n_users=6, n_items=9, seed=1)
    loss_b, gP_b, gQ_b = _grads(meta_objective, P, Q, batch, hp)
    loss_r, gP_r, gQ_r = _grads(reference_meta_objective, P, Q, batch, hp)
    assert loss_b == pytest.approx(loss_r, rel=1e-12)
    assert torch.allclose(gP_b, gP_r, atol=1e-12) and torch.allclose(gQ_b, gQ_r, atol=1e-12)
    assert gP_b.abs().sum() > 0 and gQ_b.abs().sum() > 0


def test_second_order_differs_from_first_order():
    P, Q = _params(6, 9, 4)
    batch = _tasks(T=7, K=5, n_users=6, n_items=9, seed=1)
    _, gP2, _ = _grads(meta_objective, P, Q, batch, HP)
    _, gP1, _ = _grads(meta_objective, P, Q, batch, HP.model_copy(update={"first_order": True}))
    assert (gP2 - gP1).abs().max() > 1e-6


def test_meta_gradient_matches_finite_differences():
    P, Q = _params(4, 6, 3, seed=2)
    batch = _tasks(T=3, K=4, n_users=4, n_items=6, seed=3)

    def total(P, Q):
        s, q = meta_objective(P, Q, batch, HP)
        return s + HP.lambda_ml * q

    assert torch.autograd.gradcheck(total, (P, Q), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(total, (P, Q), eps=1e-6, atol=1e-6)


def test_repeated_rows_in_one_task_are_one_parameter():
    # one task: the user in every triple, item 2 both a positive and a negative, item 1 twice
    batch = TaskBatch(
        torch.tensor([[0, 0, 0]]), torch.tensor([[1, 2, 1]]), torch.tensor([[2, 3, 3]]),
        torch.tensor([0]), torch.tensor([2]), torch.tensor([1]),
    )
    P, Q = _params(2, 4, 3, seed=5)
    rows, index = local_slots(torch.tensor([[1, 2, 1, 2, 3, 3, 2, 1]]))
    assert rows.tolist() == [[1, 2, 3]] and index.tolist() == [[0, 1, 0, 1, 2, 2, 1, 0]]
    # the closed-form inner gradient equals autograd of the task's loss w.r.t. the whole tables
    loss = bpr_triple_loss(P[[0, 0, 0]], Q[[1, 2, 1]], Q[[2, 3, 3]], HP.lambda_p, HP.lambda_q_pos, HP.lambda_q_neg).mean()
    gP, gQ = torch.autograd.grad(loss, (P, Q))
    ops = support_ops(torch.tensor([[0, 0, 0]]), torch.tensor([[0, 1, 0]]), torch.tensor([[1, 2, 2]]), 1, 3, HP, torch.float64)
    g_p, g_q = support_grads(P[torch.tensor([[0]])], Q[torch.tensor([[1, 2, 3]])], ops)
    assert torch.allclose(g_p[0, 0], gP[0], atol=1e-14)
    assert torch.allclose(g_q[0], gQ[[1, 2, 3]], atol=1e-14)
    loss_b, gP_b, gQ_b = _grads(meta_objective, P, Q, batch, HP)
    loss_r, gP_r, gQ_r = _grads(reference_meta_objective, P, Q, batch, HP)
    assert loss_b == pytest.approx(loss_r, rel=1e-12) and torch.allclose(gQ_b, gQ_r, atol=1e-12)


def test_meta_step_detects_divergence_and_leaves_theta_alone():
    P, Q = _params(6, 9, 4)
    P.data *= 1e200  # scores overflow: the objective is inf
    batch = _tasks(T=4, K=5, n_users=6, n_items=9, seed=1)
    before = P.detach().clone()
    opt = torch.optim.Adam([P, Q], lr=0.1)
    with pytest.raises(DivergedError):
        meta_step(P, Q, opt, batch, HP)
    assert torch.equal(P.detach(), before)


def test_meta_step_lowers_the_objective():
    P, Q = _params(6, 9, 4)
    batch = _tasks(T=16, K=5, n_users=6, n_items=9, seed=4)
    opt = torch.optim.Adam([P, Q], lr=0.05)
    first = meta_step(P, Q, opt, batch, HP)
    for _ in range(30):
        last = meta_step(P, Q, opt, batch, HP)
    assert last.support_loss + HP.lambda_ml * last.query_loss < first.support_loss + HP.lambda_ml * first.query_loss


def test_serving_adaptation_is_the_training_adaptation():
    """inner_adapt (serving, all rows) followed by query_loss equals meta_objective's query term (only the query rows)."""
    P, Q = _params(6, 9, 4)
    batch = _tasks(T=7, K=5, n_users=6, n_items=9, seed=8)
    _, query = meta_objective(P, Q, batch, HP)
    loc = localise(batch)
    p_loc, q_loc = P[loc.user_rows], Q[loc.item_rows]
    ops = support_ops(loc.s_user, loc.s_pos, loc.s_neg, p_loc.shape[1], q_loc.shape[1], HP, P.dtype)
    p_ad, q_ad = inner_adapt(p_loc, q_loc, ops, HP)
    assert float(query_loss(p_ad, q_ad, loc, HP).mean().detach()) == pytest.approx(float(query.detach()), rel=1e-12)
    g = support_grads(p_loc, q_loc, ops)
    p_one, _ = inner_adapt(p_loc, q_loc, ops, HP.model_copy(update={"inner_steps": 1}))
    assert torch.allclose(p_one, p_loc - HP.inner_lr * g[0], atol=1e-12)


def test_chunks_of_a_batch_give_the_whole_batch_objective(monkeypatch):
    import metarec.maml as maml

    P, Q = _params(6, 9, 4)
    batch = _tasks(T=11, K=5, n_users=6, n_items=9, seed=6)
    whole = _grads(meta_objective, P, Q, batch, HP)
    slots = localise(batch).item_rows.shape[1]
    monkeypatch.setattr(maml, "CHUNK_BYTES", 3 * slots * 4 * 8)  # 3 tasks a chunk: chunks of 3, 3, 3, 2
    assert maml.chunk_size(slots, 4, 8) == 3
    chunked = _grads(meta_objective, P, Q, batch, HP)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12)
    assert torch.allclose(chunked[1], whole[1], atol=1e-12) and torch.allclose(chunked[2], whole[2], atol=1e-12)
    reference = _grads(reference_meta_objective, P, Q, batch, HP)
    assert torch.allclose(chunked[1], reference[1], atol=1e-12) and torch.allclose(chunked[2], reference[2], atol=1e-12)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_meta_step_reports_the_gradient_norm_before_clipping_and_clips_only_when_asked(clip):
    """docs/method.md §11: clipping, if used, is reported with the norm before it; without it the step is the plain one."""
    batch = _tasks(T=16, K=6, n_users=12, n_items=20, seed=3)
    hp = HP.model_copy(update={"grad_clip": clip})
    P, Q = _params(12, 20, 4)
    _, gP, gQ = _grads(meta_objective, P, Q, batch, hp)
    expected = float(torch.cat([gP.flatten(), gQ.flatten()]).norm())
    plain_P = P.detach().clone()
    optimizer = torch.optim.SGD([P, Q], lr=1.0)
    stats = meta_step(P, Q, optimizer, batch, hp)
    assert stats.grad_norm == pytest.approx(expected, rel=1e-9)
    assert stats.clipped == (clip is not None)
    step = (plain_P - P.detach()).flatten()
    if clip is None:
        assert torch.allclose(step, gP.flatten())  # SGD at rate 1: the raw gradient, unclipped
    else:
        assert float(step.norm()) <= clip * (1 + 1e-9) < expected  # P's part of a step clipped to norm `clip`
