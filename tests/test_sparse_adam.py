"""Row-sparse optimisation of Θ: RowSparseAdam against dense Adam and SparseAdam, the meta-step and the online update
with meta.optimizer = "lazy_adam", and the baselines' SGD drivers, which must leave every untouched row bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.config import MetaConfig, TaskConfig
from metarec.interface import Interactions
from metarec.maml import DivergedError, TaskBatch, _all_finite, meta_step
from metarec.meta_tasks import build_tasks
from metarec.models.common import _as_int64_tensor, kernel_bpr_grads, sgd_epoch, sgd_item_rounds, sgd_rounds
from metarec.models.responsive import ResponsiveMF
from metarec.sparse_adam import RowSparseAdam, make_optimizer
from metarec.synthetic import planted_interactions

N, D = 12, 4


def _sparse(rows: list[int], values: torch.Tensor, n: int = N) -> torch.Tensor:
    """An uncoalesced row-sparse gradient (a repeated row appears twice, as F.embedding(sparse=True) leaves it)."""
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (n, values.shape[1]), check_invariants=True)


def _table(seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(N, D, generator=torch.Generator().manual_seed(seed)))


def _step(opt: torch.optim.Optimizer, param: torch.Tensor, grad: torch.Tensor) -> None:
    param.grad = grad
    opt.step()


def test_first_step_touching_every_row_equals_dense_adam_bit_for_bit():
    lazy, dense = _table(), _table()
    grad = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(2)).tolist()  # rows in any order
    _step(RowSparseAdam([lazy], lr=0.01), lazy, _sparse(order, grad[order]))
    _step(torch.optim.Adam([dense], lr=0.01), dense, grad.clone())
    assert torch.equal(lazy.detach(), dense.detach())


def test_an_untouched_row_and_its_moments_stay_bit_identical_where_dense_adam_moves_them():
    lazy, dense = _table(), _table()
    opt_lazy, opt_dense = RowSparseAdam([lazy], lr=0.01), torch.optim.Adam([dense], lr=0.01)
    first = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    _step(opt_lazy, lazy, _sparse(list(range(N)), first))  # every row gets non-zero moments
    _step(opt_dense, dense, first.clone())
    before = {key: value.clone() for key, value in opt_lazy.state[lazy].items()}
    row_before, untouched = lazy.detach().clone(), [r for r in range(N) if r not in (3, 7)]
    _step(opt_lazy, lazy, _sparse([3, 7, 3], torch.ones(3, D)))
    dense_grad = torch.zeros(N, D)
    dense_grad[3], dense_grad[7] = 2.0, 1.0
    _step(opt_dense, dense, dense_grad)
    state = opt_lazy.state[lazy]
    assert torch.equal(lazy.detach()[untouched], row_before[untouched])
    assert torch.equal(state["exp_avg"][untouched], before["exp_avg"][untouched])
    assert torch.equal(state["exp_avg_sq"][untouched], before["exp_avg_sq"][untouched])
    assert not torch.equal(dense.detach()[untouched], row_before[untouched])  # dense Adam's momentum moves them
    # the touched rows took dense Adam's step (their moments decayed once, as the dense ones did), the repeat summed
    assert torch.equal(lazy.detach()[[3, 7]], dense.detach()[[3, 7]])
    assert float(state["step"]) == 2.0 and state["step"].device.type == "cpu"


def test_many_steps_on_changing_rows_follow_sparse_adams_semantics():
    """Against torch.optim.SparseAdam (the same semantics; it adds ε before the bias correction, hence the tolerance)
    and against a float64 transcription of those semantics with one global step count."""
    ours, theirs = _table(), _table()
    opt_ours, opt_theirs = RowSparseAdam([ours], lr=0.05), torch.optim.SparseAdam([theirs], lr=0.05)
    ref, m, v = ours.detach().double().clone(), torch.zeros(N, D, dtype=torch.float64), torch.zeros(N, D, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 9):
        rows = torch.randint(0, N, (5,), generator=gen).tolist()
        values = torch.randn(5, D, generator=gen)
        _step(opt_ours, ours, _sparse(rows, values))
        _step(opt_theirs, theirs, _sparse(rows, values))
        g = torch.zeros(N, D, dtype=torch.float64).index_add_(0, torch.tensor(rows), values.double())
        touched = torch.unique(torch.tensor(rows))
        m[touched] = 0.9 * m[touched] + 0.1 * g[touched]
        v[touched] = 0.999 * v[touched] + 0.001 * g[touched] ** 2
        ref[touched] -= 0.05 / (1 - 0.9**t) * m[touched] / (v[touched].sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8)
    assert torch.allclose(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.detach().double(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.detach(), _table().detach())


def test_a_dense_gradient_gets_plain_adam():
    ours, theirs = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt_ours, opt_theirs = RowSparseAdam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for t in range(4):
        grad = torch.tensor([1.0, -2.0, 0.5]) * (t + 1)
        _step(opt_ours, ours, grad.clone())
        _step(opt_theirs, theirs, grad.clone())
    assert torch.equal(ours.detach(), theirs.detach())
    assert torch.equal(opt_ours.state[ours]["exp_avg_sq"], opt_theirs.state[theirs]["exp_avg_sq"])


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="lr"):
        RowSparseAdam([_table()], lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        RowSparseAdam([_table()], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        make_optimizer("sgd", [_table()], 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer"):
        MetaConfig(optimizer="sgd")


# ------------------------------------------------------------------ the meta-step and the online update
@pytest.fixture(scope="module")
def planted():
    return planted_interactions(n_users=60, n_items=50, per_user=12, seed=1)


def _model(history, optimizer: str, **meta) -> ResponsiveMF:
    settings = {"dim": 8, "epochs": 1, "batch_tasks": 20, "outer_lr": 0.01, "inner_lr": 1.0, **meta}
    model = ResponsiveMF(MetaConfig(optimizer=optimizer, **settings), TaskConfig(k=3, K=6))
    model.init_params(history.n_users, history.n_items)
    model.set_index(history)
    return model


def _batch_rows(batch: TaskBatch) -> tuple[np.ndarray, np.ndarray]:
    users = torch.cat([batch.support_users.flatten(), batch.query_user]).unique().numpy()
    items = torch.cat([batch.support_pos.flatten(), batch.support_neg.flatten(), batch.query_pos, batch.query_neg]).unique().numpy()
    return users, items


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_lazy_meta_step_takes_dense_adams_first_step_and_its_gradient_is_row_sparse(planted, grad_clip):
    history = planted.interactions
    tasks = build_tasks(history, 3, 6, seed=1)
    batch = TaskBatch.from_arrays(tasks, slice(0, 20))
    lazy, dense = _model(history, "lazy_adam", grad_clip=grad_clip), _model(history, "adam", grad_clip=grad_clip)
    stats_lazy = meta_step(lazy.P_, lazy.Q_, lazy.optimizer_, batch, lazy.meta)
    stats_dense = meta_step(dense.P_, dense.Q_, dense.optimizer_, batch, dense.meta)
    assert stats_lazy.grad_norm == pytest.approx(stats_dense.grad_norm, rel=1e-5)
    assert stats_lazy.clipped == stats_dense.clipped == (grad_clip is not None)
    users, items = _batch_rows(batch)
    assert lazy.P_.grad.is_sparse and sorted(lazy.P_.grad._indices()[0].tolist()) == users.tolist()
    assert sorted(lazy.Q_.grad._indices()[0].tolist()) == items.tolist()
    # on a first step dense Adam moves no untouched row either (its moments are zero), so the tables agree
    assert torch.allclose(lazy.P_.detach(), dense.P_.detach(), rtol=0, atol=1e-6)
    assert torch.allclose(lazy.Q_.detach(), dense.Q_.detach(), rtol=0, atol=1e-6)


def test_lazy_meta_steps_leave_rows_outside_the_batch_and_their_moments_bit_identical(planted):
    history = planted.interactions
    tasks = build_tasks(history, 3, 6, seed=1)
    model = _model(history, "lazy_adam")
    meta_step(model.P_, model.Q_, model.optimizer_, TaskBatch.from_arrays(tasks, slice(0, 200)), model.meta)  # moments everywhere
    batch = TaskBatch.from_arrays(tasks, slice(200, 203))
    users, items = _batch_rows(batch)
    before = model.training_state()
    meta_step(model.P_, model.Q_, model.optimizer_, batch, model.meta)
    after = model.training_state()
    out_u, out_i = np.setdiff1d(np.arange(history.n_users), users), np.setdiff1d(np.arange(history.n_items), items)
    assert len(out_u) and len(out_i)
    for key, out in (("P", out_u), ("adam.P.exp_avg", out_u), ("adam.P.exp_avg_sq", out_u), ("Q", out_i), ("adam.Q.exp_avg", out_i)):
        assert torch.equal(after[key][out], before[key][out]), key
    assert not torch.equal(after["P"][users], before["P"][users])
    # the same two steps with dense Adam move rows outside the second batch
    dense = _model(history, "adam")
    meta_step(dense.P_, dense.Q_, dense.optimizer_, TaskBatch.from_arrays(tasks, slice(0, 200)), dense.meta)
    P1 = dense.P_.detach().clone()
    meta_step(dense.P_, dense.Q_, dense.optimizer_, batch, dense.meta)
    assert not torch.equal(dense.P_.detach()[out_u], P1[out_u])


def test_online_update_with_lazy_adam_changes_only_the_rows_of_its_tasks(planted):
    history = planted.interactions
    model = _model(history, "lazy_adam").fit(history)
    assert isinstance(model.optimizer_, RowSparseAdam)
    t = int(history.ts.max()) + 1
    batch = Interactions.from_arrays([0, 0], [5, 6], [t, t + 1])
    before = model.training_state()
    model.observe(batch)
    after = model.training_state()
    others = np.arange(1, history.n_users)
    assert not torch.equal(after["P"][0], before["P"][0])
    assert torch.equal(after["P"][others], before["P"][others])
    assert torch.equal(after["adam.P.exp_avg"][others], before["adam.P.exp_avg"][others])
    assert float(after["adam.P.step"]) == float(before["adam.P.step"]) + 1
    # a checkpoint of a lazy model loads back into one that continues identically
    clone = _model(history, "lazy_adam")
    clone.load_training_state(after)
    assert isinstance(clone.optimizer_, RowSparseAdam) and torch.equal(clone.optimizer_.state[clone.P_]["exp_avg"], after["adam.P.exp_avg"])


# ------------------------------------------------------------------ the baselines' SGD drivers
def _tables(n_users: int = 30, n_items: int = 25):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n_users, D, generator=gen), torch.randn(n_items, D, generator=gen)


def _untouched(n: int, *touched: np.ndarray) -> np.ndarray:
    return np.setdiff1d(np.arange(n), np.concatenate(touched))


def test_sgd_epoch_leaves_rows_outside_its_triples_bit_identical():
    W, H = _tables()
    W0, H0 = W.clone(), H.clone()
    u, i, j = np.array([1, 4, 4, 9]), np.array([2, 3, 7, 2]), np.array([11, 12, 3, 20])
    sgd_epoch(W, H, u, i, j, kernel_bpr_grads("linear", 1.0, 0.01), 0.1, 2, np.random.default_rng(0))
    assert torch.equal(W[_untouched(len(W), u)], W0[_untouched(len(W), u)])
    assert torch.equal(H[_untouched(len(H), i, j)], H0[_untouched(len(H), i, j)])
    assert not torch.equal(W[u], W0[u]) and not torch.equal(H[np.unique(np.r_[i, j])], H0[np.unique(np.r_[i, j])])


def test_sgd_epoch_reads_its_triples_without_changing_them_whatever_their_dtype_or_flags():
    """The triples are shared with torch, not copied (memory at 100M): the caller's arrays stay as they were,
    and int64, int32 and read-only input give the same tables."""
    u, i, j = np.array([1, 4, 4, 9]), np.array([2, 3, 7, 2]), np.array([11, 12, 3, 20])
    results = []
    for cast in (lambda a: a, lambda a: a.astype(np.int32), lambda a: np.frombuffer(a.tobytes(), dtype=np.int64)):
        args = [cast(a) for a in (u, i, j)]
        before = [a.copy() for a in args]
        W, H = _tables()
        sgd_epoch(W, H, *args, kernel_bpr_grads("linear", 1.0, 0.01), 0.1, 2, np.random.default_rng(0))
        assert all(np.array_equal(a, b) for a, b in zip(args, before))
        results.append((W, H))
    shared = _as_int64_tensor(u)
    assert shared.data_ptr() == u.ctypes.data  # int64 and writable: the same buffer, no copy
    assert all(torch.equal(W, results[0][0]) and torch.equal(H, results[0][1]) for W, H in results)


def test_sgd_rounds_change_only_the_rows_of_their_side():
    grads = kernel_bpr_grads("logistic", 4.0, 0.01)
    u, i, j = np.array([1, 4, 4, 9]), np.array([2, 3, 7, 2]), np.array([11, 12, 3, 20])
    for side, changed in (("user", u), ("pos", i)):
        W, H = _tables()
        W0, H0 = W.clone(), H.clone()
        sgd_rounds(W, H, u, i, j, grads, 0.1, np.random.default_rng(0), side=side)
        table, start = (W, W0) if side == "user" else (H, H0)
        other, other_start = (H, H0) if side == "user" else (W, W0)
        keep = _untouched(len(table), changed)
        assert torch.equal(table[keep], start[keep]) and torch.equal(other, other_start)
        assert not torch.equal(table[np.unique(changed)], start[np.unique(changed)])
    W, H = _tables()
    H0 = H.clone()
    retrained = np.array([2, 12, 7, 2])  # pos, neg, pos, pos
    sgd_item_rounds(W, H, u, i, j, retrained, grads, 0.1, np.random.default_rng(0))
    keep = _untouched(len(H), retrained)
    assert torch.equal(H[keep], H0[keep]) and not torch.equal(H[np.unique(retrained)], H0[np.unique(retrained)])


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_a_step_that_leaves_theta_non_finite_raises(planted, optimizer, monkeypatch):
    history = planted.interactions
    model = _model(history, optimizer)
    batch = TaskBatch.from_arrays(build_tasks(history, 3, 6, seed=1), slice(0, 20))
    step = model.optimizer_.step

    def overflowing_step():  # as a step that overflows float32 would leave one of the batch's rows
        step()
        model.Q_.data[batch.query_pos[0]] = float("inf")

    monkeypatch.setattr(model.optimizer_, "step", overflowing_step)
    with pytest.raises(DivergedError, match="NaN/Inf after the outer step"):
        meta_step(model.P_, model.Q_, model.optimizer_, batch, model.meta)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_finiteness_check_finds_any_nan_or_inf(bad):
    table = torch.randn(50, 4)
    assert _all_finite(table) and _all_finite(table[:0])
    table[17, 2] = bad
    assert not _all_finite(table)
