"""Shared machinery of the baselines: BPR gradients, batched SGD, per-row update rounds, table growth, state.

Every baseline is trained on BPR triples (u, i, j): i one of u's positives, j
an item u never had, drawn uniformly by ``InteractionIndex.sample_negatives``.
Two SGD drivers, both without a Python loop per interaction:

- ``sgd_epoch``: shuffled minibatches; the gradients of a minibatch are
  scatter-added into the tables (``index_add_``), which equals sequential SGD
  whenever a row appears once in the minibatch (keep batches small).
- ``sgd_rounds``: for methods that retrain single rows (RKMF's
  UserUpdate/ItemUpdate, a new user's vector): round r applies every row's
  r-th triple at once, so each row takes exactly one SGD step per triple, as
  the per-rating loops of the papers do, vectorised across rows.

Randomness: every call takes a ``numpy.random.Generator`` that the model seeds
from ``(seed, purpose, counter)``, so results depend only on the seed and the
sequence of calls, and a model's state needs no RNG state to be saved.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import numpy as np
import torch

from metarec.interface import Interactions, OnEpoch, StreamingRecommender, fitted_copy
from metarec.neighbours import InteractionIndex

# (w, h_i, h_j) rows (B, d) -> gradients of the per-triple loss w.r.t. each, (B, d) each
GradFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Kernel = Literal["linear", "logistic"]
Side = Literal["user", "pos", "neg"]

PURPOSE_FIT, PURPOSE_OBSERVE, PURPOSE_NEW_USERS, PURPOSE_NEW_ROWS = 0, 1, 2, 3
SCORE_CHUNK = 1024  # users scored at once


def rng_for(seed: int, purpose: int, *counters: int) -> np.random.Generator:
    """A generator determined by the model seed, what it is for, and a call counter."""
    return np.random.default_rng([seed, purpose, *counters])


# ---------------------------------------------------------------- kernels and gradients
def kernel_score(z: torch.Tensor, kernel: Kernel, scale: float) -> torch.Tensor:
    """RKMF's kernels on z = <w, h>: linear z; logistic scale * sigmoid(z) (bias b = 0)."""
    return z if kernel == "linear" else scale * torch.sigmoid(z)


def _kernel_slope(z: torch.Tensor, kernel: Kernel, scale: float) -> torch.Tensor:
    if kernel == "linear":
        return torch.ones_like(z)
    s = torch.sigmoid(z)
    return scale * s * (1.0 - s)


@dataclass(frozen=True)
class KernelGrads:
    """Closed-form gradients of -log sigma(K(w,h_i) - K(w,h_j)) + reg(|w|^2 + |h_i|^2 + |h_j|^2), a ``GradFn``.

    The linear kernel's slope is 1 and a product with 1 changes no float, so its path leaves those products
    out: the same numbers with fewer tensor operations, which is what the round drivers below spend their time
    on (thousands of steps of a few rows each)."""

    kernel: Kernel
    scale: float
    reg: float

    def coefficients(self, w: torch.Tensor, hi: torch.Tensor, hj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """g = dL/dx (B,) and the kernel's slopes at z_i, z_j (None, None for the linear kernel: both 1)."""
        zi, zj = (w * hi).sum(-1), (w * hj).sum(-1)
        x = kernel_score(zi, self.kernel, self.scale) - kernel_score(zj, self.kernel, self.scale)
        g = -torch.sigmoid(-x)  # dL/dx
        if self.kernel == "linear":
            return g, None, None
        return g, _kernel_slope(zi, self.kernel, self.scale), _kernel_slope(zj, self.kernel, self.scale)

    def __call__(self, w: torch.Tensor, hi: torch.Tensor, hj: torch.Tensor):
        g, ki, kj = self.coefficients(w, hi, hj)
        if ki is None:
            gw = g[:, None] * (hi - hj) + 2 * self.reg * w
            ghi = g[:, None] * w + 2 * self.reg * hi
            ghj = -g[:, None] * w + 2 * self.reg * hj
            return gw, ghi, ghj
        gw = g[:, None] * (ki[:, None] * hi - kj[:, None] * hj) + 2 * self.reg * w
        ghi = (g * ki)[:, None] * w + 2 * self.reg * hi
        ghj = -(g * kj)[:, None] * w + 2 * self.reg * hj
        return gw, ghi, ghj


def kernel_bpr_grads(kernel: Kernel, scale: float, reg: float) -> KernelGrads:
    """Closed-form gradients of -log sigma(K(w,h_i) - K(w,h_j)) + reg(|w|^2 + |h_i|^2 + |h_j|^2)."""
    return KernelGrads(kernel, scale, reg)


def autograd_bpr_grads(loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> GradFn:
    """Gradients of any per-triple loss by autograd (MF-FT uses metarec.models.mf.bpr_triple_loss through this)."""

    def grads(w: torch.Tensor, hi: torch.Tensor, hj: torch.Tensor):
        w, hi, hj = (t.detach().requires_grad_(True) for t in (w, hi, hj))
        loss = loss_fn(w, hi, hj).sum()
        gw, ghi, ghj = torch.autograd.grad(loss, (w, hi, hj))
        return gw, ghi, ghj

    return grads


# ---------------------------------------------------------------- SGD drivers
def _apply(W: torch.Tensor, H: torch.Tensor, u, i, j, gw, ghi, ghj, lr: float, update: Iterable[Side]) -> None:
    update = set(update)
    if "user" in update:
        W.index_add_(0, u, gw, alpha=-lr)
    if "pos" in update:
        H.index_add_(0, i, ghi, alpha=-lr)
    if "neg" in update:
        H.index_add_(0, j, ghj, alpha=-lr)


def sgd_epoch(
    W: torch.Tensor,
    H: torch.Tensor,
    u: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    grad_fn: GradFn,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
    update: Iterable[Side] = ("user", "pos", "neg"),
) -> None:
    """One shuffled pass of minibatch SGD over triples (u, i, j), in place on W (users) and H (items)."""
    order = torch.from_numpy(rng.permutation(len(u)))
    # views, not copies, of int64 input: at 100M ratings (68M history rows) a copy of the triples is 1.6 GB of a fit's peak
    ut, it, jt = (_as_int64_tensor(a) for a in (u, i, j))
    update = tuple(update)
    for start in range(0, len(order), batch_size):
        b = order[start : start + batch_size]
        ub, ib, jb = ut[b], it[b], jt[b]
        gw, ghi, ghj = grad_fn(W[ub], H[ib], H[jb])
        _apply(W, H, ub, ib, jb, gw, ghi, ghj, lr, update)


def _as_int64_tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor over ``values`` without a copy when it is already contiguous int64 (read-only arrays are copied:
    torch cannot share them)."""
    array = np.ascontiguousarray(values, dtype=np.int64)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def round_order(rows: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
    """``rounds`` as one permutation of the positions and its round boundaries: round r is order[bounds[r]:bounds[r+1]].

    A driver that permutes its arrays by ``order`` once reads each round as a slice, not a gather."""
    if not len(rows):
        return np.zeros(0, dtype=np.int64), [0]
    tiebreak = rng.random(len(rows)) if rng is not None else np.arange(len(rows))
    order = np.lexsort((tiebreak, rows))
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_rows[1:] != sorted_rows[:-1])))
    counts = np.diff(np.concatenate((starts, [len(rows)])))
    rank = np.arange(len(rows)) - np.repeat(starts, counts)
    by_rank = np.argsort(rank, kind="stable")
    return order[by_rank], [0, *np.cumsum(np.bincount(rank)).tolist()]


def rounds(rows: np.ndarray, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Positions of ``rows`` split into rounds holding each row at most once.

    Each row's entries are shuffled by ``rng``, or kept in their given order when it is None.
    """
    order, bounds = round_order(rows, rng)
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _spans(bounds: list[int]) -> Iterable[tuple[int, int]]:
    return zip(bounds[:-1], bounds[1:])


def _user_grad(grad_fn: GradFn, w: torch.Tensor, hi: torch.Tensor, hj: torch.Tensor, diff: torch.Tensor | None) -> torch.Tensor:
    """The user row's gradient alone; ``diff`` = hi - hj, computed once per pass for the linear kernel."""
    if not isinstance(grad_fn, KernelGrads):
        return grad_fn(w, hi, hj)[0]
    g, ki, kj = grad_fn.coefficients(w, hi, hj)
    mixed = diff if ki is None else ki[:, None] * hi - kj[:, None] * hj
    return g[:, None] * mixed + 2 * grad_fn.reg * w


def sgd_rounds(
    W: torch.Tensor,
    H: torch.Tensor,
    u: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    grad_fn: GradFn,
    lr: float,
    rng: np.random.Generator,
    side: Literal["user", "pos"],
) -> None:
    """One pass where only the rows of one side change, one SGD step per triple and row (see module doc).

    The arrays are put in round order once, so a round reads slices; on the user side H never changes during
    the pass, so its rows (and hi - hj) are gathered once, not per round. Same steps, same numbers."""
    rows = np.asarray(u if side == "user" else i, dtype=np.int64)
    order, bounds = round_order(rows, rng)
    with torch.inference_mode(isinstance(grad_fn, KernelGrads)):  # no autograd bookkeeping (~20% of a tiny step)
        _sgd_rounds(W, H, u, i, j, grad_fn, lr, side, order, bounds)


def _sgd_rounds(W, H, u, i, j, grad_fn: GradFn, lr: float, side: Side, order: np.ndarray, bounds: list[int]) -> None:
    ut, it, jt = (torch.from_numpy(np.asarray(a, dtype=np.int64)[order]) for a in (u, i, j))
    if side == "user":
        hi_all, hj_all = H[it], H[jt]
        linear = isinstance(grad_fn, KernelGrads) and grad_fn.kernel == "linear"
        diff = hi_all - hj_all if linear else None
        for a, b in _spans(bounds):
            ub = ut[a:b]
            gw = _user_grad(grad_fn, W[ub], hi_all[a:b], hj_all[a:b], diff[a:b] if linear else None)
            W.index_add_(0, ub, gw, alpha=-lr)
        return
    for a, b in _spans(bounds):
        ub, ib, jb = ut[a:b], it[a:b], jt[a:b]
        gw, ghi, ghj = grad_fn(W[ub], H[ib], H[jb])
        _apply(W, H, ub, ib, jb, gw, ghi, ghj, lr, (side,))


def sgd_item_rounds(
    W: torch.Tensor,
    H: torch.Tensor,
    u: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    retrained: np.ndarray,
    grad_fn: GradFn,
    lr: float,
    rng: np.random.Generator,
) -> None:
    """One pass retraining only the item rows ``retrained`` (one per triple), each on whichever side of BPR it sits.

    Triple t holds its retrained item as the positive (i[t] == retrained[t]) or as the negative
    (j[t] == retrained[t]); that row takes the matching gradient, one SGD step per triple, every other row fixed.
    W never changes here, so its rows are gathered once; only the retrained row's gradient is computed.
    """
    order, bounds = round_order(np.asarray(retrained, dtype=np.int64), rng)
    with torch.inference_mode(isinstance(grad_fn, KernelGrads)):  # no autograd bookkeeping (~20% of a tiny step)
        _sgd_item_rounds(W, H, u, i, j, retrained, grad_fn, lr, order, bounds)


def _sgd_item_rounds(W, H, u, i, j, retrained, grad_fn: GradFn, lr: float, order: np.ndarray, bounds: list[int]) -> None:
    ut, it, jt, rt = (torch.from_numpy(np.asarray(a, dtype=np.int64)[order]) for a in (u, i, j, retrained))
    w_all, positive = W[ut], it == rt
    kernel = grad_fn if isinstance(grad_fn, KernelGrads) else None
    sign = torch.where(positive, 1.0, -1.0).to(H.dtype)  # ±g: the positive's and the negative's coefficient
    for a, b in _spans(bounds):
        ib, jb, rb, pos = it[a:b], jt[a:b], rt[a:b], positive[a:b, None]
        w, hi, hj = w_all[a:b], H[ib], H[jb]
        if kernel is None:
            _, ghi, ghj = grad_fn(w, hi, hj)
            grad = torch.where(pos, ghi, ghj)
        else:
            g, ki, kj = kernel.coefficients(w, hi, hj)
            coef = sign[a:b] * g if ki is None else torch.where(pos[:, 0], g * ki, -(g * kj))
            grad = coef[:, None] * w + 2 * kernel.reg * torch.where(pos, hi, hj)
        H.index_add_(0, rb, grad, alpha=-lr)


# ---------------------------------------------------------------- data helpers
def negatives(index: InteractionIndex, users: np.ndarray, rng: np.random.Generator, n_items: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """One uniform non-positive item in [0, n_items) per user entry."""
    return index.sample_negatives(np.asarray(users, dtype=np.int64), rng, n_items=n_items, exclude=exclude)


def uniform_positives(index: InteractionIndex, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of each user's distinct positive items, uniformly (every user must have one)."""
    users = np.asarray(users, dtype=np.int64)
    lo, hi = index.pair_ptr_[users], index.pair_ptr_[users + 1]
    pick = lo + np.minimum(np.floor(rng.random(len(users)) * (hi - lo)).astype(np.int64), hi - lo - 1)
    return index.pair_key_[pick] & np.int64(0xFFFFFFFF)


def csr_rows(ptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, value) for every value of the given CSR rows (rows beyond ptr have none)."""
    rows = np.asarray(rows, dtype=np.int64)
    rows = rows[rows < len(ptr) - 1]
    lo, hi = ptr[rows], ptr[rows + 1]
    counts = hi - lo
    owner = np.repeat(rows, counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, values[np.repeat(lo, counts) + offset]


def user_positives(index: InteractionIndex, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct (user, item) positive of the given users."""
    return csr_rows(index.pair_ptr_, index.pair_key_ & np.int64(0xFFFFFFFF), users)


def item_positives(index: InteractionIndex, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct (item, user) positive of the given items."""
    return csr_rows(index.item_ptr_, index.item_users_, items)


def concat(a: Interactions, b: Interactions) -> Interactions:
    return Interactions(np.concatenate([a.users, b.users]), np.concatenate([a.items, b.items]), np.concatenate([a.ts, b.ts]))


def grow(table: torch.Tensor, rows: int, fill: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The table with rows appended up to ``rows`` (unchanged if already that long)."""
    extra = rows - len(table)
    return torch.cat([table, fill(extra)]) if extra > 0 else table


def lookup(table: torch.Tensor, ids: np.ndarray, default: torch.Tensor) -> torch.Tensor:
    """Rows of ``ids`` (any shape); ids beyond the table get ``default`` (d,), the model's rule for unseen ids."""
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    known = ids_t < len(table)
    rows = table[torch.where(known, ids_t, torch.zeros_like(ids_t))]
    return torch.where(known[..., None], rows, default.to(rows.dtype))


def gaussian(rng: np.random.Generator, rows: int, dim: int, std: float) -> torch.Tensor:
    return torch.from_numpy(rng.normal(0.0, std, size=(rows, dim)).astype(np.float32))


def sampled_metrics(scores: np.ndarray) -> dict[str, float]:
    """HR@10, NDCG@10 and AUC of (B, 1 + negatives) scores whose column 0 is the true item (docs/method.md §9)."""
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[:, :1], scores[:, 1:]
    # a tie counts half, as in the AUC; the rank is pessimistic on ties so ties never help HR
    rank = (neg >= pos).sum(1)
    hit = rank < 10
    auc = ((neg < pos).sum(1) + 0.5 * (neg == pos).sum(1)) / neg.shape[1]
    return {
        "hr@10": float(hit.mean()),
        "ndcg@10": float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean()),
        "auc": float(auc.mean()),
        "cases": int(len(scores)),
    }


# ---------------------------------------------------------------- state without pickle
class ArrayStateMixin:
    """State as named numpy arrays (for .npz without pickle): the listed attributes plus the seen interactions.

    Subclasses list their fitted tensors/arrays in ``_state_fields`` and may
    override ``_after_load`` to rebuild derived structures (the index).
    """

    _state_fields: tuple[str, ...] = ()

    def state_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in self._state_fields:
            value = getattr(self, name)
            out[name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        seen: Interactions = self.seen_  # type: ignore[attr-defined]
        out.update(seen_users=seen.users, seen_items=seen.items, seen_ts=seen.ts)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name in self._state_fields:
            current = getattr(self, name, None)
            value = arrays[name]
            if isinstance(current, torch.Tensor):
                setattr(self, name, torch.from_numpy(np.array(value)))
            elif isinstance(current, (int, float)) and np.ndim(value) == 0:
                setattr(self, name, type(current)(value))
            else:
                setattr(self, name, np.array(value))
        self.seen_ = Interactions(arrays["seen_users"], arrays["seen_items"], arrays["seen_ts"])
        self._after_load()

    def _after_load(self) -> None:
        self.index_ = InteractionIndex.build(self.seen_)  # type: ignore[attr-defined]


def check_ids(model: StreamingRecommender, what: str, ids: np.ndarray, allow_padding: bool = False) -> np.ndarray:
    """``ids`` as int64, or a clear error: negative ids would silently index from the end of a table."""
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{model.name}: {what} must be integer ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    low = -1 if allow_padding else 0
    if ids.size and ids.min() < low:
        raise ValueError(f"{model.name}: {what} must be ids >= {low}{' (-1 = padding)' if allow_padding else ''}, got {ids.min()}")
    return ids


def require_fitted(model: StreamingRecommender, *tables: torch.Tensor) -> None:
    if any(t is None or len(t) == 0 for t in tables):
        raise RuntimeError(f"{model.name}: call fit(history) before scoring or observing")


# ---------------------------------------------------------------- the shared shape of the factor baselines
class FactorBaseline(ArrayStateMixin, StreamingRecommender):
    """User table W_ (n_users, d), item table H_ (n_items, d), the index of positives seen so far.

    Subclasses set ``grad_fn`` and implement ``fit``/``observe``; scoring,
    unseen ids, new-user adaptation and state are shared. A user the model has
    seen no interaction of, an item it has seen no positive of, and an id
    beyond a table are new (docs/method.md §11: "new" means untrained; ids are dense,
    so such rows exist inside the tables, at their random start or, for an item
    drawn as a negative, pushed down). They are scored with the model's default
    row: the mean of the trained rows of the table (sRec: its population prior,
    whose mean is that), i.e. §7's mean + noise in expectation, the noise's
    random order of equal scores being what the metrics' tie rule already
    averages over. Rows a training step starts from get the noise too
    (``new_item_rows``): untrained item rows after ``fit_bpr``, and an item's
    row when its first positive arrives (``renew_untrained_items``).
    """

    _state_fields = ("W_", "H_", "batches_")
    kernel: Kernel = "linear"
    scale: float = 1.0
    new_row_std: float = 0.01  # σ of §7's noise on new rows (subclasses take it from their config)

    def __init__(self, dim: int, seed: int) -> None:
        self.dim = dim
        self.seed = seed
        self.W_ = torch.zeros(0, dim)
        self.H_ = torch.zeros(0, dim)
        self.batches_ = 0  # stream batches observed: the counter that seeds each observe
        self.seen_ = Interactions.from_arrays([], [])
        self.index_: InteractionIndex | None = None

    def fit_bpr(
        self, history: Interactions, init_std: float, on_epoch: OnEpoch | None = None,
        finish: Callable[["FactorBaseline", np.random.Generator], None] | None = None,
    ) -> None:
        """Fresh W and H, then ``config.epochs`` of BPR-SGD over the history (RKMF, SPMF and MF-FT alike), then the rows
        training never made: ``finish(model, rng)`` draws the model's own (SPMF's reservoir) from the fit's generator.

        ``on_epoch`` (``StreamingRecommender.fit``) gets, after each epoch, a copy finished the same way: every epoch
        draws from its own generator, so the copy after e epochs is the model ``epochs = e`` would fit.
        """
        cfg = self.config
        rng = rng_for(self.seed, PURPOSE_FIT)
        self.W_ = gaussian(rng, history.n_users, self.dim, init_std)
        self.H_ = gaussian(rng, history.n_items, self.dim, init_std)
        self.seen_, self.index_, self.batches_ = history, InteractionIndex.build(history), 0

        def finished(model: "FactorBaseline", fit_rng: np.random.Generator) -> None:
            unseen = model.unseen_items()  # items with no positive: trained only as negatives, they start as new ones do
            model.H_[unseen] = model.new_item_rows(rng_for(model.seed, PURPOSE_NEW_ROWS))(len(unseen))
            if finish is not None:
                finish(model, fit_rng)

        for epoch in range(cfg.epochs):
            epoch_rng = rng_for(self.seed, PURPOSE_FIT, epoch + 1)
            u, i, j = self.fit_triples(history, epoch_rng)
            sgd_epoch(self.W_, self.H_, u, i, j, self.grad_fn, cfg.lr, cfg.batch_size, epoch_rng)
            if on_epoch is not None:
                on_epoch(epoch + 1, fitted_copy(self, lambda model: finished(model, copy.deepcopy(rng))))
        finished(self, rng)

    @property
    def n_items_(self) -> int:  # type: ignore[override]
        return len(self.H_)

    @property
    def n_users_(self) -> int:
        return len(self.W_)

    # ---- scoring
    def _seen_users(self, users: np.ndarray) -> np.ndarray:
        """(B,) bool: the model has seen at least one interaction of the user."""
        return self.index_.has_user(users) if self.index_ is not None else np.zeros(len(users), dtype=bool)

    def trained_user_rows(self) -> torch.Tensor:
        """The rows of W_ of users seen so far (all of W_ before any is seen): what the population is."""
        seen = self._seen_users(np.arange(len(self.W_)))
        return self.W_[torch.from_numpy(seen)] if seen.any() else self.W_

    def user_population(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and unbiased variance (None under two rows) over ``trained_user_rows()``, kept until W_ changes (in
        place or replaced) or the index does. The new-user protocol asks for them once per chunk of users, and at
        Netflix's 480k users each gather of W_'s trained rows is a 123 MB copy and about 0.5 s: recomputed, that was
        most of sRec's and MF-FT's new-user evaluation at 100M."""
        key = (self.W_, self.W_._version, self.index_)
        held = getattr(self, "_user_population", None)
        if held is None or held[0]() is not key[0] or held[1] != key[1] or held[2]() is not key[2]:
            rows = self.trained_user_rows()
            summary = (rows.mean(0), rows.var(0) if len(rows) >= 2 else None)
            # weak references: the memo never keeps a replaced table or index alive
            held = (weakref.ref(key[0]), key[1], weakref.ref(key[2]) if key[2] is not None else (lambda: None), summary)
            self._user_population = held
        return held[3]

    def unseen_users(self) -> torch.Tensor:
        """Ids of W_'s rows of users with no interaction seen (stream-only and new users, as ids are dense)."""
        return torch.from_numpy(np.flatnonzero(~self._seen_users(np.arange(len(self.W_)))))

    def _seen_items(self, items: np.ndarray) -> np.ndarray:
        """bool like ``items``: the model has seen a positive of the item (trained it as one)."""
        items = np.asarray(items, dtype=np.int64)
        return self.index_.has_item(items.ravel()).reshape(items.shape) if self.index_ is not None else np.zeros(items.shape, dtype=bool)

    def trained_item_rows(self) -> torch.Tensor:
        """The rows of H_ of items with a positive seen so far (all of H_ before any is seen)."""
        seen = self._seen_items(np.arange(len(self.H_)))
        return self.H_[torch.from_numpy(seen)] if seen.any() else self.H_

    def unseen_items(self) -> torch.Tensor:
        """Ids of H_'s rows of items with no positive seen (stream-only items, items only ever drawn as negatives)."""
        return torch.from_numpy(np.flatnonzero(~self._seen_items(np.arange(len(self.H_)))))

    def new_item_rows(self, rng: np.random.Generator) -> Callable[[int], torch.Tensor]:
        """k -> k rows of §7: the mean of the trained item rows + N(0, new_row_std² I)."""
        mean = self.trained_item_rows().mean(0, keepdim=True) if len(self.H_) else torch.zeros(1, self.dim)
        return lambda k: mean + gaussian(rng, k, self.dim, self.new_row_std)

    def renew_untrained_items(self, batch: Interactions, fill: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Before a batch is remembered: rows of its items inside H_ that have no positive yet get ``fill`` (their first
        update starts from a new row, not from a row pushed down as a negative). Returns their ids."""
        items = np.unique(np.asarray(batch.items, dtype=np.int64))
        items = items[(items < len(self.H_)) & ~self._seen_items(items)]
        ids = torch.from_numpy(items)
        if len(ids):
            self.H_[ids] = fill(len(ids)).to(self.H_.dtype)
        return ids

    def _default_user(self) -> torch.Tensor:
        return self.user_population()[0] if len(self.W_) else torch.zeros(self.dim)

    def _default_item(self) -> torch.Tensor:
        return self.trained_item_rows().mean(0) if len(self.H_) else torch.zeros(self.dim)

    def score_rows(self, w: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
        """Scores (B, C) of user rows w (B, d) for candidate ids (B, C), in chunks of rows.

        Few candidates per row: gather their rows (B, C, d). Many (full ranking):
        one matmul against every item row plus the unseen-item default, then a
        gather, so memory stays O(chunk x items) rather than O(chunk x C x d).
        """
        candidates = check_ids(self, "candidates", candidates)
        out = np.empty(candidates.shape, dtype=np.float32)
        default = self._default_item()
        full = torch.cat([self.H_, default[None]])  # row len(H_) stands for every unseen id
        seen = np.concatenate([self._seen_items(np.arange(len(self.H_))), [False]])
        for start in range(0, len(candidates), SCORE_CHUNK):
            rows = slice(start, start + SCORE_CHUNK)
            cands = candidates[rows]
            ids = np.where(seen[np.minimum(cands, len(self.H_))], cands, len(self.H_))  # unseen -> the default row
            if 4 * cands.shape[1] < len(full):
                z = torch.einsum("bd,bcd->bc", w[rows], full[torch.from_numpy(ids)])
            else:
                z = (w[rows] @ full.T).gather(1, torch.from_numpy(ids))
            out[rows] = kernel_score(z, self.kernel, self.scale).numpy()
        return out

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        require_fitted(self, self.H_)
        users, candidates = check_ids(self, "users", users), check_ids(self, "candidates", candidates)
        if candidates.shape[:1] != users.shape:
            raise ValueError(f"{self.name}: candidates {candidates.shape} must have one row per user ({users.shape})")
        return self.score_rows(self.user_rows(users), candidates)

    def user_rows(self, users: np.ndarray) -> torch.Tensor:
        """W_'s rows of ``users``; a user with no interaction seen yet gets the model's default row.

        Ids are dense over the whole data set, so a stream user first seen in a
        batch has a row inside W_ that no update has touched (its random init):
        scored before the model observes it, it gets the unseen-id rule instead.
        """
        default = self._default_user()
        rows = lookup(self.W_, users, default)
        unseen = torch.from_numpy(~self._seen_users(users))
        return torch.where(unseen[:, None], default.to(rows.dtype), rows)

    # ---- new users: only a transient user row is trained; the model is untouched
    def new_user_triples(self, recent_items: np.ndarray, recent_users: np.ndarray, epochs: int, rng: np.random.Generator):
        """Triples (local row, pos, neg) for ``epochs`` passes over each new user's shown items (padding < 0 skipped)."""
        items = np.asarray(recent_items, dtype=np.int64)
        local, col = np.nonzero(items >= 0)
        pos = items[local, col]
        local_all = np.tile(local, epochs)
        pos_all = np.tile(pos, epochs)
        owners = np.asarray(recent_users, dtype=np.int64)[local_all]
        neg = negatives(self.index_, owners, rng, max(len(self.H_), 1), exclude=items[local_all])
        return local_all, pos_all, neg

    def adapt_new_users(self, init: torch.Tensor, recent_items: np.ndarray, recent_users: np.ndarray, epochs: int, lr: float, rng: np.random.Generator) -> torch.Tensor:
        """Rows (B, d) trained from ``init`` by per-row SGD on each new user's shown items, H_ fixed."""
        w = init.clone()
        items = check_ids(self, "recent items", recent_items, allow_padding=True)
        # items never trained as a positive (beyond H_, or inside it with no positive) carry no signal for the user row; drop them
        items = np.where((items >= 0) & self._seen_items(np.where(items >= 0, items, 0)), items, -1)
        for epoch in range(epochs):
            local, pos, neg = self.new_user_triples(items, recent_users, 1, rng)
            sgd_rounds(w, self.H_, local, pos, neg, self.grad_fn, lr, rng, side="user")
        return w

    def grad_fn(self, w: torch.Tensor, hi: torch.Tensor, hj: torch.Tensor):  # pragma: no cover - overridden
        raise NotImplementedError

    # ---- growth and bookkeeping
    def _grow(self, n_users: int, n_items: int, user_fill, item_fill) -> None:
        self.W_ = grow(self.W_, n_users, user_fill)
        self.H_ = grow(self.H_, n_items, item_fill)

    def _remember(self, batch: Interactions) -> None:
        self.seen_ = concat(self.seen_, batch)
        self.index_ = self.index_.extend(batch) if self.index_ is not None else InteractionIndex.build(batch)

    def fit_triples(self, history: Interactions, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every history positive with one fresh uniform negative."""
        neg = negatives(self.index_, history.users, rng, len(self.H_))
        return history.users, history.items, neg
