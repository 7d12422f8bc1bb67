"""The per-row round drivers (RKMF's UserUpdate/ItemUpdate, a new user's row, sRec's filter) against the loops they
replaced, bit for bit: the faster drivers put the triples in round order once and read slices, gather the rows that do
not change during a pass once, and leave out products by the linear kernel's slope 1. None of that may change a float.

The references below are the drivers as they were (one gather per array per round, every gradient computed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.models.common import _apply, kernel_bpr_grads, autograd_bpr_grads, rounds, sgd_item_rounds, sgd_rounds
from metarec.models.mf import bpr_triple_loss
from metarec.models.srec import _at, kalman_round, kalman_rounds


def _reference_grads(kernel: str, scale: float, reg: float):
    """kernel_bpr_grads before the linear path: every slope multiplied in."""

    def slope(z):
        if kernel == "linear":
            return torch.ones_like(z)
        s = torch.sigmoid(z)
        return scale * s * (1.0 - s)

    def score(z):
        return z if kernel == "linear" else scale * torch.sigmoid(z)

    def grads(w, hi, hj):
        zi, zj = (w * hi).sum(-1), (w * hj).sum(-1)
        g = -torch.sigmoid(-(score(zi) - score(zj)))
        ki, kj = slope(zi), slope(zj)
        gw = g[:, None] * (ki[:, None] * hi - kj[:, None] * hj) + 2 * reg * w
        ghi = (g * ki)[:, None] * w + 2 * reg * hi
        ghj = -(g * kj)[:, None] * w + 2 * reg * hj
        return gw, ghi, ghj

    return grads


def _reference_rounds(W, H, u, i, j, grad_fn, lr, rng, side):
    ut, it, jt = (torch.from_numpy(np.array(a, dtype=np.int64)) for a in (u, i, j))
    for part in rounds(np.asarray(u if side == "user" else i, dtype=np.int64), rng):
        b = torch.from_numpy(part)
        ub, ib, jb = ut[b], it[b], jt[b]
        gw, ghi, ghj = grad_fn(W[ub], H[ib], H[jb])
        _apply(W, H, ub, ib, jb, gw, ghi, ghj, lr, (side,))


def _reference_item_rounds(W, H, u, i, j, retrained, grad_fn, lr, rng):
    ut, it, jt, rt = (torch.from_numpy(np.array(a, dtype=np.int64)) for a in (u, i, j, retrained))
    for part in rounds(np.asarray(retrained, dtype=np.int64), rng):
        b = torch.from_numpy(part)
        ub, ib, jb, rb = ut[b], it[b], jt[b], rt[b]
        _, ghi, ghj = grad_fn(W[ub], H[ib], H[jb])
        H.index_add_(0, rb, torch.where((ib == rb)[:, None], ghi, ghj), alpha=-lr)


def _planted(seed: int, n_users: int = 30, n_items: int = 40, n: int = 900, dim: int = 8):
    """Skewed triples: a few rows hold most of them, so rounds run long with few rows each (as on MovieLens)."""
    rng = np.random.default_rng(seed)
    u = np.minimum(rng.zipf(1.6, n) - 1, n_users - 1)
    i = np.minimum(rng.zipf(1.4, n) - 1, n_items - 1)
    j = (i + 1 + rng.integers(0, n_items - 1, n)) % n_items  # never the positive
    gen = torch.Generator().manual_seed(seed)
    return u, i, j, torch.randn(n_users, dim, generator=gen) * 0.3, torch.randn(n_items, dim, generator=gen) * 0.3


@pytest.mark.parametrize("kernel,scale", [("linear", 1.0), ("logistic", 4.0)])
def test_kernel_grads_equal_the_full_formula_bit_for_bit(kernel, scale):
    _, _, _, W, H = _planted(0)
    w, hi, hj = W[:20], H[:20], H[20:40]
    for ours, ref in zip(kernel_bpr_grads(kernel, scale, 0.01)(w, hi, hj), _reference_grads(kernel, scale, 0.01)(w, hi, hj)):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("kernel,scale", [("linear", 1.0), ("logistic", 4.0), ("autograd", 1.0)])
@pytest.mark.parametrize("side", ["user", "pos"])
def test_sgd_rounds_equal_the_gathering_loop_bit_for_bit(kernel, scale, side):
    u, i, j, W, H = _planted(1)
    if kernel == "autograd":
        ours_fn = ref_fn = autograd_bpr_grads(lambda w, hi, hj: bpr_triple_loss(w, hi, hj, 0.01, 0.01, 0.01))
    else:
        ours_fn, ref_fn = kernel_bpr_grads(kernel, scale, 0.01), _reference_grads(kernel, scale, 0.01)
    W_ref, H_ref = W.clone(), H.clone()
    for epoch in range(3):
        sgd_rounds(W, H, u, i, j, ours_fn, 0.2, np.random.default_rng(epoch), side=side)
        _reference_rounds(W_ref, H_ref, u, i, j, ref_fn, 0.2, np.random.default_rng(epoch), side=side)
    assert torch.equal(W, W_ref) and torch.equal(H, H_ref)
    assert not torch.equal(W if side == "user" else H, _planted(1)[3 if side == "user" else 4])  # it did train


@pytest.mark.parametrize("kernel,scale", [("linear", 1.0), ("logistic", 4.0)])
def test_sgd_item_rounds_equal_the_gathering_loop_bit_for_bit(kernel, scale):
    u, i, j, W, H = _planted(2)
    rng = np.random.default_rng(5)
    as_negative = rng.random(len(u)) < 0.4  # the retrained item sits on either side, and is read as the other item too
    retrained = np.where(as_negative, j, i)
    W_ref, H_ref = W.clone(), H.clone()
    for epoch in range(3):
        sgd_item_rounds(W, H, u, i, j, retrained, kernel_bpr_grads(kernel, scale, 0.01), 0.2, np.random.default_rng(epoch))
        _reference_item_rounds(W_ref, H_ref, u, i, j, retrained, _reference_grads(kernel, scale, 0.01), 0.2, np.random.default_rng(epoch))
    assert torch.equal(H, H_ref) and torch.equal(W, W_ref)
    assert not torch.equal(H, _planted(2)[4])


def _reference_kalman(mean, var, tau, rows, x, y, t, obs_var, drift_var, x_var, mean_field):
    """The filter's loop as it was, with kalman_round's mean-field arithmetic before D·x was shared."""
    r_all = torch.from_numpy(rows)
    for part in rounds(rows, None):
        b = torch.from_numpy(part)
        rb, xb, yb, tb, vb = r_all[b], x[b], y[b], t[b], _at(x_var, b)
        if not mean_field:
            kalman_round(mean, var, tau, rb, xb, yb, tb, obs_var, drift_var, None)
            continue
        last = tau[rb]
        elapsed = torch.where(last == -1, torch.zeros_like(tb), (tb - last).clamp(min=0)).to(var.dtype)
        P, m = var[rb] + drift_var * elapsed[:, None], mean[rb]
        shrink = 1.0 / (1.0 + P * vb / obs_var)
        D = P * shrink
        S = obs_var + (D * xb * xb).sum(1, keepdim=True)
        a = shrink * m + D * xb * (yb[:, None] / obs_var)
        mean[rb] = a - D * xb * (xb * a).sum(1, keepdim=True) / S
        var[rb] = (D - D * D * xb * xb / S).clamp(min=1e-6)
        tau[rb] = tb


@pytest.mark.parametrize("mean_field", [True, False])
def test_kalman_rounds_equal_the_gathering_loop_bit_for_bit(mean_field):
    rows, _, _, W, H = _planted(3)
    rng = np.random.default_rng(3)
    n = len(rows)
    x = torch.from_numpy(rng.normal(0, 0.5, (n, W.shape[1])).astype(np.float32))
    x_var = torch.from_numpy(rng.uniform(0.01, 0.2, (n, W.shape[1])).astype(np.float32)) if mean_field else None
    y = torch.from_numpy((rng.random(n) < 0.3).astype(np.float32))
    t = torch.from_numpy(np.sort(rng.integers(0, 10_000, n)))
    tables = (W, torch.full_like(W, 0.2), torch.full((len(W),), -1, dtype=torch.int64))
    ref = tuple(table.clone() for table in tables)
    kalman_rounds(*tables, rows, x, y, t, 0.05, 1e-5, x_var)
    _reference_kalman(*ref, rows, x, y, t, 0.05, 1e-5, x_var, mean_field)
    assert all(torch.equal(a, b) for a, b in zip(tables, ref))
    assert not torch.equal(tables[0], _planted(3)[3])
