"""MetaHIN: meta-learning on heterogeneous information networks (Lu, Fang, Shi; KDD 2020), for implicit feedback.

What we follow (the paper's §4, and the authors' code, rootlu/MetaHIN: ``HeteML_new.py``, ``MetaLearner_new.py``):

- The heterogeneous graph: users, items and the side features' values as
  nodes (user–item interactions of the history; item–attribute edges from the
  item features, e.g. genre and year; user–attribute edges from the user
  features, e.g. occupation and age).
- Semantic-enhanced tasks: a user's support is augmented, per meta-path p,
  with the items reached from it along p (its semantic context):
  UI (the support items), UIUI (items of other users who had a support item),
  UIAI (items sharing an attribute value with a support item), UAUI (items of
  other users sharing an attribute value with the user). ``CONTEXT_ITEMS``
  walks per path and user, each from a support item (or the user) drawn at random.
- Context aggregation g_φ: x_u^p = LeakyReLU(mean_j (W e_j + b)) over the
  context's item embeddings e_j (the items' feature fields and id, as MeLU's).
- Preference predictor h_ω: an MLP on [e_i; x_u^p] (widths ``neural.hidden``).
- Co-adaptation: semantic-wise adaptation φ_u^p = φ - α ∇_φ L(S_u; ω, x_u^p(φ))
  (α = ``neural.semantic_lr``); task-wise adaptation from the gated start
  ω^p = ω ⊙ σ(G x_u^p(φ_u^p)) (the code's per-weight transforms),
  ω_u^p = ω^p - β ∇ L(S_u; ω^p, x_u^p) (β = ``neural.local_lr``), each for
  ``neural.local_steps`` steps; the paths fuse by a_p = softmax_p(-L_p):
  ω_u = Σ_p a_p ω_u^p and x_u = Σ_p a_p x_u^p.
- Global update: Adam on the query loss at (ω_u, x_u), through both adaptations
  (second order unless ``neural.first_order``).

What we adapted, and why:

- Implicit feedback: BPR (``neural.loss``) over sampled negatives, the same
  kind as ours, instead of MSE on ratings.
- Episodes: the random support/query splits of ``split_episodes`` (MetaHIN's
  tasks are a user's support and query sets too), supports of 1..k items.
- The path weights a_p use each path's support loss after adaptation; the code
  uses the query loss (``q_loss.data``), which a served user does not have.
  The query is scored with the support's context (the code builds the query's
  own contexts, which read the query items).
- Walks never pass through the task's own user (which would reveal its query
  items); a walk that cannot continue (an item nobody else had, a value no
  other item has) stays at its support item.
- Meta-paths come from the features the data set has: without item (user)
  features UIAI (UAUI) is dropped, and with none the row runs on the id-only
  paths UI and UIUI, which ``feature_report`` states.
- Batched: the (user, path) pairs are one batch of per-pair parameter copies
  under ``torch.func.vmap``; contexts are drawn with numpy for the whole batch.
  No Python loop per user.
- Items without a training positive are new items (the mean id row, their own
  features); serving adapts on every shown item, or the last ``neural.serve_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from metarec.config import Config
from metarec.features import Features
from metarec.models.neural import EpisodicRecommender, Episodes, FieldEncoder, departures, expand_params, masked_mean, pair_loss, query_loss, reset_linears, sgd_steps
from metarec.neighbours import InteractionIndex

CONTEXT_ITEMS = 16  # walks per meta-path and user (the code averages every neighbour; a sample bounds the cost)


def _csr(owner: np.ndarray, member: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray]:
    """(ptr (n_owners + 1,), members sorted by owner): who belongs to each owner."""
    order = np.argsort(owner, kind="stable")
    return np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=n_owners)))).astype(np.int64), member[order]


def _pick(ptr: np.ndarray, members: np.ndarray, owner: np.ndarray, ok: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniform member of each ``owner`` (any shape) where ``ok``; returns (member, found)."""
    inside = ok & (owner >= 0) & (owner < len(ptr) - 1)
    o = np.where(inside, owner, 0)
    degree = np.where(inside, ptr[o + 1] - ptr[o], 0)
    found = degree > 0
    at = ptr[o] + np.floor(rng.random(owner.shape) * np.maximum(degree, 1)).astype(np.int64)
    return (members[np.minimum(at, len(members) - 1)] if len(members) else np.zeros_like(owner)), found


@dataclass(frozen=True)
class MetaPaths:
    """The graph's adjacency as CSR arrays, built from the interactions seen and the side features."""

    index: InteractionIndex
    item_codes: np.ndarray | None  # (n, S) item attribute codes, -1 = padding
    code_items: tuple[np.ndarray, np.ndarray] | None
    user_codes: np.ndarray | None
    code_users: tuple[np.ndarray, np.ndarray] | None

    @classmethod
    def build(cls, index: InteractionIndex, features: Features) -> "MetaPaths":
        def attribute(table, n_known: int):
            if table is None:
                return None, None
            codes = table.codes[:n_known] if n_known else table.codes[:0]
            entity = np.repeat(np.arange(len(codes)), codes.shape[1])
            flat = codes.ravel()
            keep = flat >= 0
            return codes, _csr(flat[keep], entity[keep], table.n_codes)

        # the attribute -> entity edges reach only entities the graph has interactions of; an entity's own values
        # are read from the full table (a new user's or a new item's attributes lead to known ones)
        _, code_items = attribute(features.items, index.n_items)
        _, code_users = attribute(features.users, index.n_users)
        item_codes = features.items.codes if features.items is not None else None
        user_codes = features.users.codes if features.users is not None else None
        return cls(index, item_codes, code_items, user_codes, code_users)

    @staticmethod
    def names_for(features: Features) -> tuple[str, ...]:
        """The meta-paths the features allow: UI and UIUI always, UIAI with item features, UAUI with user features."""
        return ("UI", "UIUI") + (("UIAI",) if features.items is not None else ()) + (("UAUI",) if features.users is not None else ())

    def _code_of(self, codes: np.ndarray | None, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A uniform attribute code of each row (any shape); (code, found)."""
        if codes is None or not len(codes):
            return np.zeros_like(rows), np.zeros(rows.shape, dtype=bool)
        inside = (rows >= 0) & (rows < len(codes))
        table = codes[np.where(inside, rows, 0)]  # (..., S)
        count = np.where(inside, (table >= 0).sum(-1), 0)
        col = np.floor(rng.random(rows.shape) * np.maximum(count, 1)).astype(np.int64)
        packed = np.take_along_axis(table, np.argsort(table < 0, axis=-1, kind="stable"), -1)
        return np.take_along_axis(packed, col[..., None], -1)[..., 0], count > 0

    def _item_of_user(self, users: np.ndarray, ok: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        return _pick(self.index.user_ptr_, self.index.user_items_, users, ok, rng)

    def contexts(self, owners: np.ndarray, support: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, P, CONTEXT_ITEMS) items reached along each path from the users' supports (B, S) under mask (B, S)."""
        B = len(owners)
        n_valid = mask.sum(1).astype(np.int64)
        col = np.floor(rng.random((B, CONTEXT_ITEMS)) * np.maximum(n_valid, 1)[:, None]).astype(np.int64)
        start = np.take_along_axis(support, col, 1)  # (B, C) the walk's support item
        owner = np.repeat(owners[:, None], CONTEXT_ITEMS, 1)
        everyone = np.ones_like(start, dtype=bool)
        out = [start]
        # U-I-U-I: a user who had the support item, then one of its items
        ptr, users = self.index.item_ptr_, self.index.item_users_
        other, found = _pick(ptr, users, start, everyone, rng)
        found &= other != owner
        item, found2 = self._item_of_user(other, found, rng)
        out.append(np.where(found & found2, item, start))
        if self.code_items is not None:  # U-I-A-I
            code, found = self._code_of(self.item_codes, start, rng)
            item, found2 = _pick(*self.code_items, code, found, rng)
            out.append(np.where(found & found2, item, start))
        if self.code_users is not None:  # U-A-U-I
            code, found = self._code_of(self.user_codes, owner, rng)
            other, found2 = _pick(*self.code_users, code, found, rng)
            found &= found2 & (other != owner)
            item, found3 = self._item_of_user(other, found, rng)
            out.append(np.where(found & found3, item, start))
        return np.stack(out, 1)


class MetaHINNet(nn.Module):
    """items: FieldEncoder; aggregate: φ (W, b); predict: ω; gates: one transform per ω weight (x_u^p -> its gate)."""

    def __init__(self, items: FieldEncoder, dim: int, hidden: int) -> None:
        super().__init__()
        self.items = items
        self.aggregate = nn.Linear(items.out_dim, dim)
        self.predict = nn.Sequential(nn.Linear(items.out_dim + dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.gates = nn.ModuleDict({name.replace(".", "-"): nn.Linear(dim, p.numel()) for name, p in self.predict.named_parameters()})


class MetaHIN(EpisodicRecommender):
    name = "metahin"
    feature_sides = ("users", "items")
    _paths: MetaPaths | None = None

    def build_net(self, n_users: int, n_items: int) -> MetaHINNet:
        n = self.neural
        items = FieldEncoder(self.side_table("items"), n_items, n.dim, with_ids=True, std=n.init_std, generator=self.generator_)
        self._paths = None
        self.updates_ = 0
        return reset_linears(MetaHINNet(items, n.dim, n.hidden), self.generator_)

    # ---- the graph
    def paths(self) -> MetaPaths:
        """The meta-paths over the interactions indexed so far (rebuilt when the index grows)."""
        if self._paths is None or self._paths.index is not self.index_:
            self._paths = MetaPaths.build(self.index_, self.features_)
        return self._paths

    def feature_report(self) -> dict:
        report = super().feature_report()
        names = MetaPaths.names_for(self.features_)
        id_only = set(names) == {"UI", "UIUI"}
        report["meta_paths"] = list(names)
        report["note"] += f"; meta-paths {', '.join(names)}" + (" (id-only paths: no side features)" if id_only else "")
        return report

    # ---- one batch of (user, path) pairs
    def decide(self, omega: dict[str, torch.Tensor], x: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """omega (N, ...), x (N, d), item_vecs (N, C, Di) -> (N, C)."""
        inputs = torch.cat([item_vecs, x[:, None, :].expand(-1, item_vecs.shape[1], -1)], -1)
        return vmap(lambda params, rows: functional_call(self.net_.predict, params, (rows,)))(omega, inputs)[..., 0]

    def adapted(self, episodes: Episodes, context: torch.Tensor, create_graph: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(ω_u per user, x_u (B, d)) after both adaptations and the fusion of the paths (module docstring)."""
        net, n = self.net_, self.neural
        B, P = context.shape[:2]
        mean_context = net.items(context).mean(2).flatten(0, 1)  # (N, Di): the aggregation is linear before its activation
        support = net.items(torch.cat([episodes.support_pos, episodes.support_neg], 1)).repeat_interleave(P, 0)
        mask = episodes.support_mask.repeat_interleave(P, 0)
        k = episodes.support_pos.shape[1]
        omega = dict(net.predict.named_parameters())

        def user_vec(phi):
            return F.leaky_relu(torch.einsum("ndi,ni->nd", phi["weight"], mean_context) + phi["bias"])

        def loss_at(params, x):
            s = self.decide(params, x, support)
            return masked_mean(pair_loss(s[:, :k], s[:, k:], n.loss), mask)

        phi = sgd_steps(expand_params(dict(net.aggregate.named_parameters()), B * P),
                        lambda phi: loss_at(expand_params(omega, B * P), user_vec(phi)), n.local_steps, n.semantic_lr, create_graph)
        x = user_vec(phi)
        gated = {name: w.unsqueeze(0) * torch.sigmoid(net.gates[name.replace(".", "-")](x)).view(-1, *w.shape) for name, w in omega.items()}
        fast = sgd_steps(gated, lambda params: loss_at(params, x), n.local_steps, n.local_lr, create_graph)
        weights = torch.softmax(-loss_at(fast, x).detach().view(B, P), 1)  # a_p: the paths that fit the support best
        fused = {name: torch.einsum("bp,bp...->b...", weights, value.view(B, P, *value.shape[1:])) for name, value in fast.items()}
        return fused, torch.einsum("bp,bpd->bd", weights, x.view(B, P, -1))

    def context_of(self, episodes: Episodes, rng: np.random.Generator) -> torch.Tensor:
        support = episodes.support_pos.numpy()
        return torch.as_tensor(self.paths().contexts(episodes.users.numpy(), support, episodes.support_mask.numpy(), rng))

    def episode_loss(self, episodes: Episodes) -> torch.Tensor:
        rng = np.random.default_rng([self.neural.seed, 6, self.updates_])
        self.updates_ += 1
        omega, x = self.adapted(episodes, self.context_of(episodes, rng), create_graph=not self.neural.first_order)
        s = self.decide(omega, x, self.net_.items(torch.cat([episodes.query_pos, episodes.query_neg], 1)))
        return query_loss(s, episodes.query_mask, self.neural.loss).mean()

    def adapt(self, episodes: Episodes, new_users: bool):
        rng = np.random.default_rng([self.neural.seed, 7, len(episodes), int(episodes.support_pos.sum()) & 0x7FFFFFFF])
        context = self.context_of(episodes, rng)
        with torch.enable_grad():
            omega, x = self.adapted(episodes, context, create_graph=False)
        return {name: value.detach() for name, value in omega.items()}, x.detach()

    def score_adapted(self, adapted, candidates: torch.Tensor) -> torch.Tensor:
        omega, x = adapted
        return self.decide(omega, x, self.net_.items(candidates))

    # ---- the update counter seeds training's walks: saved, so load -> observe continues as the original
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**super().state_arrays(), "updates": np.asarray(self.updates_, dtype=np.int64)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.updates_ = int(arrays["updates"])


def from_config(config: Config) -> MetaHIN:
    return MetaHIN(config.neural, config.tasks)


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the row as its docstring describes it."""
    return departures(config.neural)
